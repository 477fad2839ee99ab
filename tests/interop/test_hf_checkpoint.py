"""interop.hf read/write on real transformers-written checkpoints: byte-identical round trips, transformers
loads what we write with identical logits, the JAX checkpoint format, torch .bin, and bad input (clear errors,
nothing written)."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from interop import hf
from interop._io import InteropError
from interop._safetensors import LazyTensor, SafetensorsFile, write_safetensors
from oftjax import quant
from tests.interop import _bnb_fixtures as fx

VARIANTS = list(fx.VARIANTS)
INPUT_IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 0, 8, 1]])


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "bnb_checkpoints"
    path.mkdir(exist_ok=True)
    return path


def _tensors(path):
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        h = SafetensorsFile(f)
        out.update({k: (h.dtype(k), h.shape(k), bytes(h.raw(k))) for k in h.keys()})
    return out


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k] == tb[k], k


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_read_gives_quantized_pytrees_and_float_arrays(root, variant):
    config, weights = hf.read_checkpoint(fx.quantized_dir(root, variant))
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    q = weights["model.layers.0.self_attn.q_proj"]["weight"]
    if variant == "int8":
        assert isinstance(q, quant.Int8Weight) and q.CB.dtype == np.int8 and q.dtype == ml_dtypes.bfloat16
    else:
        assert isinstance(q, quant.FourBitWeight) and q.shape == (64, 64) and q.blocksize == 64
        assert q.quant_type == ("fp4" if variant == "fp4" else "nf4")
        assert q.compress_statistics == ("dq" in variant)
        assert q.packed.dtype == (ml_dtypes.bfloat16 if "bf16storage" in variant else np.uint8)
    assert weights["lm_head"]["weight"].dtype == ml_dtypes.bfloat16
    assert weights["model.norm"]["weight"].shape == (64,)
    assert list(weights)[:2] == ["lm_head", "model.embed_tokens"]
    # natural order: layer 1 after layer 0 even with many layers
    keys = [k for k in weights if k.startswith("model.layers.")]
    assert keys == sorted(keys, key=lambda k: int(k.split(".")[2]))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_read_write_round_trip_is_byte_identical_and_loads_in_transformers(root, tmp_path, variant):
    src = fx.quantized_dir(root, variant)
    config, weights = hf.read_checkpoint(src)
    out = hf.write_checkpoint(tmp_path / "out", config, weights)
    _assert_same_tensors(src, out)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    ref = fx.load_logits(src, INPUT_IDS)
    got = fx.load_logits(out, INPUT_IDS)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("variant", ["nf4_dq_bf16storage", "int8"], ids=["nf4_dq_bf16storage", "int8"])
def test_jax_checkpoint_round_trip_sharded_loads_in_transformers(root, tmp_path, variant):
    src = fx.quantized_dir(root, variant)
    jax_dir = hf.checkpoint_to_jax(src, tmp_path / "jax")
    assert sorted(p.name for p in jax_dir.iterdir()) == [
        "generation_config.json",
        "oftjax_checkpoint.json",
        "weights.safetensors",
    ]
    back = hf.checkpoint_to_hf(jax_dir, tmp_path / "back", max_shard_size="40KB")
    assert (back / "model.safetensors.index.json").is_file()
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    _assert_same_tensors(src, back)
    assert (back / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert torch.equal(fx.load_logits(src, INPUT_IDS), fx.load_logits(back, INPUT_IDS))
    # the sharded directory reads back to the same weights
    _, w1 = hf.read_checkpoint(src)
    _, w2 = hf.read_checkpoint(back)
    _, w3 = hf.read_jax_checkpoint(jax_dir)
    for w in (w2, w3):
        assert list(w) == list(w1)
        for m in w1:
            for name in w1[m]:
                a, b = w1[m][name], w[m][name]
                assert type(a) is type(b)
                for la, lb in zip(
                    __import__("jax").tree.leaves(a), __import__("jax").tree.leaves(b), strict=True
                ):
                    assert la.dtype == lb.dtype and la.tobytes() == lb.tobytes()


def test_lazy_read_streams_and_materializes_to_the_same(root):
    src = fx.quantized_dir(root, "nf4_dq")
    _, lazy = hf.read_checkpoint(src, lazy=True)
    q = lazy["model.layers.0.self_attn.q_proj"]["weight"]
    assert isinstance(q.packed, LazyTensor) and isinstance(lazy["lm_head"]["weight"], LazyTensor)
    _, eager = hf.read_checkpoint(src)
    m = hf.materialize(lazy)
    assert m["lm_head"]["weight"].tobytes() == eager["lm_head"]["weight"].tobytes()
    assert m["model.layers.0.self_attn.q_proj"]["weight"].packed.tobytes() == q.packed.load().tobytes()


def test_float_checkpoint_reads_bf16_exactly(root):
    src = fx.float_dir(root)
    config, weights = hf.read_checkpoint(src)
    assert "quantization_config" not in config
    ref = safetensors.torch.load_file(src / "model.safetensors")
    for k, t in ref.items():
        module, _, name = k.rpartition(".")
        got = weights[module][name]
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())


def test_torch_bin_state_dict_reads_like_safetensors(root, tmp_path):
    src = fx.quantized_dir(root, "nf4_dq")
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(safetensors.torch.load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    _, a = hf.read_checkpoint(src)
    _, b = hf.read_checkpoint(dst)
    out = hf.write_checkpoint(tmp_path / "from_bin", *hf.read_checkpoint(dst))
    _assert_same_tensors(src, out)
    assert list(a) == list(b)
    # sharded torch files with an index, one layer's tensors split across the two files
    sd = safetensors.torch.load_file(src / "model.safetensors")
    names = sorted(sd)
    half = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    sharded = tmp_path / "bin_sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    for fname, keys in half.items():
        torch.save({k: sd[k] for k in keys}, sharded / fname)
    wmap = {k: f for f, keys in half.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    _assert_same_tensors(
        src, hf.write_checkpoint(tmp_path / "from_sharded_bin", *hf.read_checkpoint(sharded))
    )
    # a single .pt file works too
    torch.save(safetensors.torch.load_file(src / "model.safetensors"), dst / "weights.pt")
    _, c = hf.read_checkpoint(dst / "weights.pt")
    assert list(c) == list(a)


def test_write_refuses_quantized_weights_without_matching_config(root, tmp_path):
    config, weights = hf.read_checkpoint(fx.quantized_dir(root, "nf4"))
    bad = dict(config, quantization_config=hf.bnb_quantization_config("int8"))
    with pytest.raises(InteropError, match="_proj.weight is 4bit but quantization_config says int8"):
        hf.write_checkpoint(tmp_path / "x", bad, weights)
    bad = dict(config, quantization_config=hf.bnb_quantization_config("4bit", quant_type="fp4"))
    with pytest.raises(InteropError, match="quant_type, double_quant, storage"):
        hf.write_checkpoint(tmp_path / "x", bad, weights)
    with pytest.raises(InteropError, match="no quantization_config"):
        hf.write_checkpoint(
            tmp_path / "x", {k: v for k, v in config.items() if k != "quantization_config"}, weights
        )
    assert not (tmp_path / "x").exists()


def test_bnb_quantization_config_matches_transformers(root):
    config = json.loads((fx.quantized_dir(root, "nf4_dq") / "config.json").read_text())
    ours = hf.bnb_quantization_config("4bit", quant_type="nf4", use_double_quant=True)
    assert ours == config["quantization_config"]
    config8 = json.loads((fx.quantized_dir(root, "int8") / "config.json").read_text())
    assert hf.bnb_quantization_config("int8") == config8["quantization_config"]


# ------------------------------------------------------------------------------------------------ bad input


def _copy(root, tmp_path, variant="nf4"):
    return fx.copy_dir(fx.quantized_dir(root, variant), tmp_path / "src")


def _rewrite(path, mutate):
    """Rewrite model.safetensors after ``mutate(dict)`` (a valid file with different content)."""
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: f.get(k) for k in f.keys()}
    f.close()
    mutate(tensors)
    write_safetensors(path / "model.safetensors", tensors)


Q = "model.layers.1.self_attn.v_proj"
QS = Q + ".weight.quant_state.bitsandbytes__nf4"


def _json_blob(tensors, **changes):
    qs = json.loads(tensors[QS].tobytes())
    qs.update(changes)
    tensors[QS] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_header(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"#" * 10
    f.write_bytes(bytes(data))


def _config(path, **qc_changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(qc_changes)
    (path / "config.json").write_text(json.dumps(cfg))


BAD = {
    "truncated": (_truncate, r"model\.safetensors: truncated"),
    "corrupt_header": (_corrupt_header, r"model\.safetensors: corrupt"),
    "missing_key": (
        lambda p: _rewrite(p, lambda t: t.pop(Q + ".weight.absmax")),
        rf"missing tensor key.*{Q}",
    ),
    "shape_vs_json": (
        lambda p: _rewrite(p, lambda t: _json_blob(t, shape=[64, 64])),
        rf"model\.safetensors: tensor '{Q}\.weight'.*disagrees with the quant_state shape \[64, 64\]",
    ),
    "unknown_quant_type": (
        lambda p: _rewrite(p, lambda t: _json_blob(t, quant_type="nf3")),
        rf"model\.safetensors: tensor '{QS}': unknown quant_type 'nf3'",
    ),
    "unknown_config_key": (
        lambda p: _config(p, bnb_4bit_magic=True),
        r"config\.json: quantization_config: unknown key\(s\) \['bnb_4bit_magic'\]",
    ),
    "fp16_weight_int8": (lambda p: _config(p, llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
    "other_method": (lambda p: _config(p, quant_method="gptq"), "quant_method 'gptq'"),
    "config_disagrees": (
        lambda p: _config(p, bnb_4bit_quant_type="fp4"),
        r"config\.json: model\.layers\.\d\.\w+\.\w+\.weight is \(quant_type.*'nf4'.*'fp4'",
    ),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), "no weights found"),
    "bad_config_json": (lambda p: (p / "config.json").write_text("{"), r"config\.json: invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_naming_file_and_key_and_nothing_is_written(root, tmp_path, case):
    src = _copy(root, tmp_path)
    mutate, msg = BAD[case]
    mutate(src)
    with pytest.raises(InteropError, match=msg):
        hf.read_checkpoint(src)
    with pytest.raises(InteropError, match=msg):
        hf.checkpoint_to_jax(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dst, no temporary left behind


def test_sharded_index_naming_a_missing_tensor(root, tmp_path):
    src = fx.quantized_dir(root, "fp4")
    sharded = hf.write_checkpoint(tmp_path / "sharded", *hf.read_checkpoint(src), max_shard_size="30KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        InteropError, match=r"model-00001-of-0000\d\.safetensors: missing tensor key 'model\.layers\.9"
    ):
        hf.read_checkpoint(sharded)


def test_existing_output_needs_force(root, tmp_path):
    src = fx.quantized_dir(root, "nf4")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="dst: exists"):
        hf.checkpoint_to_jax(src, dst)
    with pytest.raises(FileExistsError):
        hf.write_checkpoint(dst, *hf.read_checkpoint(src))
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    hf.checkpoint_to_jax(src, dst, force=True)
    assert (dst / "oftjax_checkpoint.json").is_file() and not (dst / "keep.txt").exists()


JAX_CHECKPOINT_BAD = {
    "unknown_meta_key": (lambda m: m.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    "version": (lambda m: m.update(format_version=99), "version 99"),
    "unknown_kind": (
        lambda m: m["modules"]["lm_head"]["weight"].update(kind="fp8"),
        "kind 'array', 'int8' or '4bit'",
    ),
    "shape": (
        lambda m: m["modules"][Q]["weight"].update(shape=[64, 64]),
        rf"{Q}\.weight.*disagrees with the quant_state shape",
    ),
    "missing_leaf": (lambda m: m["modules"][Q]["weight"]["tensors"].pop("absmax"), "4bit leaves"),
}


@pytest.mark.parametrize("case", list(JAX_CHECKPOINT_BAD), ids=list(JAX_CHECKPOINT_BAD))
def test_bad_jax_checkpoint_is_refused(root, tmp_path, case):
    jax_dir = hf.checkpoint_to_jax(fx.quantized_dir(root, "nf4"), tmp_path / "jax")
    meta = json.loads((jax_dir / "oftjax_checkpoint.json").read_text())
    JAX_CHECKPOINT_BAD[case][0](meta)
    (jax_dir / "oftjax_checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(InteropError, match=JAX_CHECKPOINT_BAD[case][1]):
        hf.checkpoint_to_hf(jax_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_our_safetensors_files_read_in_the_official_library(root, tmp_path):
    """bf16 and every other dtype we write read back through safetensors' own torch and numpy loaders."""
    config, weights = hf.read_checkpoint(fx.quantized_dir(root, "nf4_dq_bf16storage"))
    out = hf.write_checkpoint(tmp_path / "out", config, weights)
    ours = SafetensorsFile(out / "model.safetensors")
    ref = safetensors.torch.load_file(out / "model.safetensors")
    assert sorted(ref) == sorted(ours.keys())
    for k, t in ref.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert raw == bytes(ours.raw(k)), k
    f32 = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array(7, np.uint8),
        "c": np.zeros(0, np.int8),
    }
    write_safetensors(tmp_path / "plain.safetensors", f32)
    back = safetensors.numpy.load_file(tmp_path / "plain.safetensors")
    for k, v in f32.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
    # interop._io's reader falls back to ml_dtypes for bf16 (safetensors.numpy cannot build bf16 arrays)
    from interop._safetensors import read_safetensors

    lm = read_safetensors(out / "model.safetensors", ["lm_head.weight"])["lm_head.weight"]
    assert lm.dtype == ml_dtypes.bfloat16 and lm.tobytes() == weights["lm_head"]["weight"].tobytes()


def test_quantized_layer_with_bias_and_top_level_tensor(root, tmp_path):
    config, weights = hf.read_checkpoint(fx.quantized_dir(root, "int8"))
    bias = np.linspace(-1, 1, 64).astype(ml_dtypes.bfloat16)
    weights["model.layers.0.self_attn.q_proj"]["bias"] = bias
    weights[""] = {"scalar": np.array(3.0, np.float32)}
    out = hf.write_checkpoint(tmp_path / "out", config, weights)
    with pytest.raises(InteropError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj"):
        hf.read_checkpoint(out)  # a Llama config has no place for them
    # the format itself holds any tensor: a config of an architecture oftjax does not model is not checked
    config = {k: v for k, v in config.items() if k != "model_type"}
    out = hf.write_checkpoint(tmp_path / "other", config, weights)
    _, back = hf.read_checkpoint(out)
    q = back["model.layers.0.self_attn.q_proj"]
    assert isinstance(q["weight"], quant.Int8Weight) and q["bias"].tobytes() == bias.tobytes()
    assert back[""]["scalar"] == 3.0


def test_write_torch_state_dict_matches_the_safetensors_and_reads_back(root, tmp_path):
    """Our .bin holds the same keys, dtypes and bytes as the transformers-saved safetensors; it reads back."""
    src = fx.quantized_dir(root, "nf4_dq_bf16storage")
    config, weights = hf.read_checkpoint(src)
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    hf.write_torch_state_dict(dst / "pytorch_model.bin", weights)
    ours = torch.load(dst / "pytorch_model.bin", weights_only=True)
    theirs = safetensors.torch.load_file(src / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, k
        assert (
            torch.equal(ours[k].view(torch.uint8), t.view(torch.uint8)) if t.ndim else torch.equal(ours[k], t)
        ), k
    _assert_same_tensors(src, hf.write_checkpoint(tmp_path / "back", *hf.read_checkpoint(dst)))
    with pytest.raises(FileExistsError, match="exists"):
        hf.write_torch_state_dict(dst / "pytorch_model.bin", weights)
