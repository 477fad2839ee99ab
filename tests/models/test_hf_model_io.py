"""load_model / save_model without torch: exact round trips (float, int8, 4-bit), OFT saves, bad files."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from interop._io import InteropError
from interop._safetensors import SafetensorsFile, write_safetensors
from interop.hf_model import linear_paths, load_model, modules_from_model, quantization_config, save_model
from oftjax.models import LlamaForCausalLM, ModelConfig, UnsupportedConfigError
from oftjax.nn import Linear4bit, Linear8bit
from oftjax.quant import FourBitWeight, Int8Weight
from tests._tiny import TINY_LLAMA

CFG = ModelConfig(**TINY_LLAMA, head_dim=16, extra={"bos_token_id": 1, "eos_token_id": 2})
IDS = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) * 5


@nnx.jit
def run(m, x):
    return m(x)


def flat_params(model):
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def random_4bit(out_f, in_f, seed, *, nested, storage=np.uint8):
    rng = np.random.default_rng(seed)
    n, nb = out_f * in_f, out_f * in_f // 64
    packed = rng.integers(0, 256, (n // 2,), dtype=np.uint8).view(storage).reshape(-1, 1)
    if nested:
        absmax = rng.integers(0, 256, (nb,), dtype=np.uint8)
        extra = dict(nested_absmax=rng.random(-(-nb // 256), dtype=np.float32) * 0.1, offset=np.float32(0.05))
    else:
        absmax, extra = rng.random(nb, dtype=np.float32) * 0.1 + 0.01, {}
    return FourBitWeight(
        packed, absmax, **extra, shape=(out_f, in_f), dtype=np.dtype(np.float32), quant_type="nf4"
    )


def random_int8(out_f, in_f, seed):
    rng = np.random.default_rng(seed)
    cb = rng.integers(-127, 128, (out_f, in_f), dtype=np.int8)
    return Int8Weight(
        cb, (rng.random(out_f, dtype=np.float32) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    )


def quantized(model, kind):
    """Swap every projection except lm_head for a (random) packed base, as a bnb checkpoint would hold."""
    for i, path in enumerate(p for p in linear_paths(model.config) if p != "lm_head"):
        parent_path, _, name = path.rpartition(".")
        parent = model
        for part in parent_path.split("."):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        old = getattr(parent, name)
        shape = (old.kernel.shape[1], old.kernel.shape[0])
        if kind == "int8":
            layer = Linear8bit(jax.tree.map(jnp.asarray, random_int8(*shape, i)))
        else:
            q = random_4bit(*shape, i, nested=kind == "nf4-dq")
            layer = Linear4bit(jax.tree.map(jnp.asarray, q))
        setattr(parent, name, layer)
    return model


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    save_model(model, path)
    return path


def test_float_round_trip_is_exact(model, saved):
    again = load_model(saved)
    assert again.config == model.config and again.config.extra == model.config.extra
    a, b = flat_params(model), flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(run(again, IDS)), np.asarray(run(model, IDS)))


def test_written_files_use_hf_names_and_layout(saved):
    f = SafetensorsFile(saved / "model.safetensors")
    assert f.shape("model.layers.0.self_attn.k_proj.weight") == (32, 64)  # torch [out, in]
    assert f.shape("model.embed_tokens.weight") == (128, 64)
    assert "lm_head.weight" in f and "model.norm.weight" in f
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    f.close()


def test_dtype_and_compute_dtype_options(saved):
    m = load_model(saved, dtype=jnp.bfloat16)
    assert m.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert run(m, IDS).dtype == jnp.bfloat16
    mixed = load_model(saved, compute_dtype=jnp.bfloat16)
    assert mixed.model.norm.weight.dtype == jnp.float32 and run(mixed, IDS).dtype == jnp.bfloat16


def test_bf16_params_saved_as_bf16(tmp_path):
    m = LlamaForCausalLM(CFG, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    save_model(m, tmp_path / "bf16")
    f = SafetensorsFile(tmp_path / "bf16" / "model.safetensors")
    assert f.dtype("model.norm.weight") == np.dtype(ml_dtypes.bfloat16)
    f.close()
    np.testing.assert_array_equal(
        np.asarray(run(load_model(tmp_path / "bf16"), IDS), np.float32), np.asarray(run(m, IDS), np.float32)
    )


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"], ids=str)
def test_quantized_round_trip_keeps_packed_bytes(tmp_path, kind):
    m = quantized(LlamaForCausalLM(CFG, rngs=nnx.Rngs(2)), kind)
    qc = quantization_config(m)
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] == (kind == "int8")
    if kind != "int8":
        assert (
            qc["bnb_4bit_use_double_quant"] == (kind == "nf4-dq")
            and qc["bnb_4bit_compute_dtype"] == "float32"
        )
    save_model(m, tmp_path / kind)
    again = load_model(tmp_path / kind)
    layer = again.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear8bit if kind == "int8" else Linear4bit)
    a, b = modules_from_model(m), modules_from_model(again)
    for path in a:
        for name, leaf in a[path].items():
            for x, y in zip(jax.tree.leaves(leaf), jax.tree.leaves(b[path][name]), strict=True):
                assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"{path}.{name}"
    np.testing.assert_array_equal(np.asarray(run(again, IDS)), np.asarray(run(m, IDS)))


def test_oft_wrapped_model_saves_base_weights(model, tmp_path):
    from oftjax.config import OFTConfig
    from oftjax.surgery import apply_oft

    wrapped = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    paths = apply_oft(
        wrapped, OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
        rngs=nnx.Rngs(3),
    )  # fmt: skip
    assert "model.layers.0.self_attn.q_proj" in paths
    assert not np.allclose(np.asarray(run(wrapped, IDS)), np.asarray(run(model, IDS)))  # the adapter acts
    save_model(wrapped, tmp_path / "base")
    base = load_model(tmp_path / "base")
    np.testing.assert_array_equal(np.asarray(run(base, IDS)), np.asarray(run(model, IDS)))


def test_save_refuses_existing_dir_without_force(model, saved):
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_model(model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    save_model(model, saved, force=True)


def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, fn):
    f = SafetensorsFile(path / "model.safetensors")
    tensors = fn({k: f.get(k) for k in f.keys()})
    f.close()
    (path / "model.safetensors").unlink()
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_config(saved, tmp_path):
    d = copy(saved, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(InteropError, match="config.json"):
        load_model(d)


def test_truncated_safetensors(saved, tmp_path):
    d = copy(saved, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InteropError, match="model.safetensors"):
        load_model(d)


def test_missing_tensor_is_named(saved, tmp_path):
    d = copy(saved, tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(InteropError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d)


def test_unexpected_tensor_is_named(saved, tmp_path):
    d = copy(saved, tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(InteropError, match="q_norm"):
        load_model(d)


def test_shape_disagreeing_with_config_is_named(saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_config(d, intermediate_size=96)
    with pytest.raises(InteropError, match=r"gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_model(d)


def test_bias_missing_for_qkv_bias_config(saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_config(d, attention_bias=True)
    with pytest.raises(InteropError, match=r"q_proj.*bias"):
        load_model(d)


@pytest.mark.parametrize(
    "change,name",
    [({"hidden_act": "gelu_new"}, "hidden_act"), ({"rope_parameters": {"rope_type": "yarn"}}, "yarn")],
    ids=["act", "rope"],
)
def test_unsupported_config_refused_at_load(saved, tmp_path, change, name):
    d = copy(saved, tmp_path)
    edit_config(d, **change)
    with pytest.raises(UnsupportedConfigError, match=name):
        load_model(d)


def test_unknown_config_key_strict_and_lenient(saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_config(d, logit_softcapping=30.0)
    with pytest.raises(UnsupportedConfigError, match="logit_softcapping"):
        load_model(d, strict=True)
    with pytest.warns(UserWarning, match="logit_softcapping"):
        load_model(d)  # lenient by default


def test_tied_model_has_no_lm_head_tensor(tmp_path):
    cfg = dataclasses.replace(CFG, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(4))
    save_model(m, tmp_path / "qwen")
    f = SafetensorsFile(tmp_path / "qwen" / "model.safetensors")
    assert "lm_head.weight" not in f and "model.layers.0.self_attn.v_proj.bias" in f
    f.close()
    np.testing.assert_array_equal(
        np.asarray(run(load_model(tmp_path / "qwen"), IDS)), np.asarray(run(m, IDS))
    )


def test_sharded_save_and_load(model, tmp_path):
    save_model(model, tmp_path / "sharded", max_shard_size=40_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = load_model(tmp_path / "sharded")
    a, b = flat_params(model), flat_params(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
