"""load_adapter / save_adapter on NNX models without torch (interop/_peft_attach.py).

Parity with real PEFT lives in tests/parity/test_adapter_attach_parity.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from interop import peft
from interop._io import InteropError
from oftjax.config import OFTConfig
from oftjax.nn import OFTBias, OFTLinear, OFTParam

P = "base_model.model."


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class Deep(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d: int = 12, n: int = 3):
        self.layers = nnx.List([Block(d, rngs) for _ in range(n)])
        self.head = nnx.Linear(d, 4, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _adapter(tmp_path, config, shapes, seed=0, bias=None):
    rng = np.random.default_rng(seed)
    tensors = {f"{P}{m}.oft_R.weight": rng.normal(0, 0.1, s).astype(np.float32) for m, s in shapes.items()}
    for m, size in (bias or {}).items():
        tensors[f"{P}{m}.base_layer.bias"] = rng.normal(0, 1, (size,)).astype(np.float32)
    return peft.write_adapter(tmp_path / f"adapter{seed}", config, tensors), tensors


def _x():
    return jax.random.normal(jax.random.key(1), (5, 12), jnp.float32)


def test_load_wraps_exactly_named_modules_with_block_size_from_tensor(tmp_path):
    # The block size comes from the tensor: oft_block_size=5 is adjusted to 4 for in_features 12.
    config = OFTConfig(
        oft_block_size=5, target_modules=["layers.0.lin", "layers.2.lin"], use_cayley_neumann=False
    )
    path, tensors = _adapter(tmp_path, config, {"layers.0.lin": (3, 6), "layers.2.lin": (3, 6)})
    model = Deep(nnx.Rngs(0))
    assert peft.load_adapter(model, path) == ["layers.0.lin", "layers.2.lin"]
    assert isinstance(model.layers[0].lin, OFTLinear) and isinstance(model.layers[2].lin, OFTLinear)
    assert not isinstance(model.layers[1].lin, OFTLinear)
    np.testing.assert_array_equal(
        model.layers[2].lin.oft_R["default"][...], tensors[f"{P}layers.2.lin.oft_R.weight"]
    )
    assert model.layers[0].lin.adapters["default"].block_size == 4
    state = nnx.to_flat_state(nnx.state(model, OFTParam))
    assert sorted(".".join(map(str, k)) for k, _ in state) == [
        "layers.0.lin.oft_R.default",
        "layers.2.lin.oft_R.default",
    ]


def test_load_then_save_round_trips_tensors_and_config(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["lin"], bias="oft_only")
    shapes = {f"layers.{i}.lin": (3, 6) for i in range(3)}
    path, tensors = _adapter(tmp_path, config, shapes, bias={f"layers.{i}.lin": 12 for i in range(3)})
    model = Deep(nnx.Rngs(0))
    peft.load_adapter(model, path)
    assert isinstance(model.layers[1].lin.base_layer.bias, OFTBias)
    y = model(_x())
    out = peft.save_adapter(model, tmp_path / "saved", config=peft.read_adapter(path)[0])
    config2, tensors2 = peft.read_adapter(out)
    assert config2 == dataclasses.replace(peft.read_adapter(path)[0], inference_mode=True)  # as PEFT saves
    assert sorted(tensors2) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(tensors2[k], tensors[k])
    # inferred config (no config given): exact module paths, same layout; a fresh model reproduces y
    peft.save_adapter(model, tmp_path / "inferred")
    raw = json.loads((tmp_path / "inferred" / "adapter_config.json").read_text())
    assert raw["target_modules"] == ["layers.0.lin", "layers.1.lin", "layers.2.lin"]
    assert (raw["r"], raw["oft_block_size"], raw["bias"]) == (0, 4, "oft_only")  # the OFTBias biases
    fresh = Deep(nnx.Rngs(0))
    peft.load_adapter(fresh, tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(fresh(_x())), np.asarray(y))


def test_second_adapter_is_added_inactive_and_saved_in_subfolder(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["layers.0.lin"])
    p0, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6)}, seed=0)
    config1 = OFTConfig(oft_block_size=4, target_modules=["layers.0.lin", "layers.1.lin"])
    p1, t1 = _adapter(tmp_path, config1, {"layers.0.lin": (3, 6), "layers.1.lin": (3, 6)}, seed=1)
    model = Deep(nnx.Rngs(0))
    peft.load_adapter(model, p0)
    y0 = model(_x())
    peft.load_adapter(model, p1, adapter_name="other")
    np.testing.assert_array_equal(np.asarray(model(_x())), np.asarray(y0))  # still only "default" active
    assert model.layers[1].lin.active_adapters == ("default",)
    out = peft.save_adapter(model, tmp_path / "multi", adapter_name="other")
    assert out == tmp_path / "multi" / "other"
    _, back = peft.read_adapter(tmp_path / "multi", "other")
    for k in t1:
        np.testing.assert_array_equal(back[k], t1[k])


def test_missing_module_named_and_model_unchanged(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["lin"])
    path, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6), "layers.7.lin": (3, 6)})
    model = Deep(nnx.Rngs(0))
    with pytest.raises(InteropError, match=r"layers\.7\.lin\.oft_R\.weight.*no module 'layers\.7\.lin'"):
        peft.load_adapter(model, path)
    assert not isinstance(model.layers[0].lin, OFTLinear)


def test_missing_key_for_a_targeted_layer(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["lin"])  # selects layers.{0,1,2}.lin
    path, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6)})
    model = Deep(nnx.Rngs(0))
    with pytest.raises(
        InteropError, match=r"missing tensor key\(s\) \['base_model.model.layers.1.lin.oft_R.weight'"
    ):
        peft.load_adapter(model, path)
    assert not isinstance(model.layers[0].lin, OFTLinear)
    assert peft.load_adapter(model, path, strict=False) == ["layers.0.lin"]


def test_shape_not_tiling_layer(tmp_path):
    config = OFTConfig(oft_block_size=5, target_modules=["head"])
    path, _ = _adapter(tmp_path, config, {"head": (2, 10)})  # 2 blocks of 5 = 10 != 12
    with pytest.raises(InteropError, match=r"head\.oft_R\.weight.*does not tile.*in_features=12"):
        peft.load_adapter(Deep(nnx.Rngs(0)), path)


def test_existing_adapter_name(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["layers.0.lin"])
    path, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6)})
    model = Deep(nnx.Rngs(0))
    peft.load_adapter(model, path)
    with pytest.raises(InteropError, match="already has an adapter named 'default'"):
        peft.load_adapter(model, path)


def test_save_refuses_config_disagreeing_with_model(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["lin"])
    path, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6)})
    model = Deep(nnx.Rngs(0))
    peft.load_adapter(model, path, strict=False)
    # "lin" also selects layers.1/2.lin, which carry no adapter: PEFT would report missing keys
    with pytest.raises(InteropError, match=r"layers\.1\.lin: selected by the config"):
        peft.save_adapter(model, tmp_path / "bad", config=config)
    with pytest.raises(InteropError, match=r"r=3, b=4; the config gives r=2, b=6"):
        peft.save_adapter(
            model, tmp_path / "bad", config=OFTConfig(oft_block_size=6, target_modules=["layers.0.lin"])
        )
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InteropError, match="no OFT adapter named 'nope'"):
        peft.save_adapter(model, tmp_path / "bad", adapter_name="nope")


def test_native_save_and_load_on_models(tmp_path):
    config = OFTConfig(oft_block_size=4, target_modules=["layers.0.lin"], bias="oft_only")
    p0, _ = _adapter(tmp_path, config, {"layers.0.lin": (3, 6)}, bias={"layers.0.lin": 12}, seed=0)
    p1, _ = _adapter(
        tmp_path, OFTConfig(oft_block_size=6, target_modules=["head"]), {"head": (2, 15)}, seed=1
    )
    model = Deep(nnx.Rngs(0))
    peft.load_adapter(model, p0)
    peft.load_adapter(model, p1, "other")
    peft.save_jax_adapter(model, tmp_path / "native")
    adapters, _ = peft.read_jax_adapter(tmp_path / "native")
    assert sorted(adapters) == ["default", "other"]
    assert sorted(adapters["default"][1]) == ["layers.0.lin.bias", "layers.0.lin.oft_R.default"]
    fresh = Deep(nnx.Rngs(0))
    assert peft.load_jax_adapter(fresh, tmp_path / "native") == ["head", "layers.0.lin"]
    for name in ("default", "other"):
        a, b = peft.collect_adapter(model, name), peft.collect_adapter(fresh, name)
        assert a[0] == b[0] and sorted(a[1]) == sorted(b[1])
        for k in a[1]:
            np.testing.assert_array_equal(a[1][k], b[1][k])
    with pytest.raises(InteropError, match=r"no adapter\(s\) \['nope'\]"):
        peft.load_jax_adapter(Deep(nnx.Rngs(0)), tmp_path / "native", ["nope"])


def test_embedding_adapter_is_read_and_attached(tmp_path):
    """``oft_embedding_R`` attaches to an ``nnx.Embed`` as ``OFTEmbed`` (full coverage: tests/nn, parity)."""
    from oftjax.nn import OFTEmbed

    config = OFTConfig(r=1, oft_block_size=0, target_modules=["emb"])
    vec = np.zeros((1, 6), np.float32)
    out = peft.write_adapter(tmp_path / "emb", config, {f"{P}emb.oft_embedding_R.weight": vec})
    _, tensors = peft.read_adapter(out)
    assert list(tensors) == [f"{P}emb.oft_embedding_R.weight"]

    class WithEmb(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(10, 4, rngs=rngs)

    model = WithEmb(nnx.Rngs(0))
    assert peft.load_adapter(model, out) == ["emb"]
    assert isinstance(model.emb, OFTEmbed)
    np.testing.assert_array_equal(np.asarray(model.emb.oft_embedding_R["default"][...]), vec)
    # PEFT's saved base table (save_embedding_layers) is loaded into the embedding; wrong kinds are refused.
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    with_table = {f"{P}emb.oft_embedding_R.weight": vec, f"{P}emb.base_layer.weight": table}
    model = WithEmb(nnx.Rngs(0))
    peft.attach_adapter(model, config, with_table)
    np.testing.assert_array_equal(np.asarray(model.emb.base_layer.embedding[...]), table)
    with pytest.raises(InteropError, match="lacks"):
        peft.attach_adapter(WithEmb(nnx.Rngs(0)), config, {**tensors, f"{P}other.base_layer.weight": table})
    with pytest.raises(InteropError, match="not a linear layer .an embedding"):
        peft.attach_adapter(WithEmb(nnx.Rngs(0)), config, {f"{P}emb.oft_R.weight": vec})
    with pytest.raises(InteropError, match="resized vocabulary"):
        peft.attach_adapter(WithEmb(nnx.Rngs(0)), config, {**tensors, f"{P}emb.base_layer.weight": table[:5]})


def test_embed_tokens_adapters_save_and_load_native(tmp_path):
    """Two adapters on an ``embed_tokens``: the base table PEFT saves with each is stored once natively."""
    from oftjax.config import OFTConfig as Cfg
    from oftjax.nn import OFTEmbed
    from oftjax.surgery import apply_oft

    class WithEmbTokens(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(10, 4, rngs=rngs)

    model = WithEmbTokens(nnx.Rngs(0))
    for name, seed in (("default", 1), ("two", 2)):
        cfg = Cfg(r=2, oft_block_size=0, target_modules=["embed_tokens"], init_weights=False)
        apply_oft(model, cfg, adapter_name=name, rngs=nnx.Rngs(seed))
    _, tensors = peft.collect_adapter(model, "two")
    assert sorted(tensors) == [
        f"{P}embed_tokens.base_layer.weight",
        f"{P}embed_tokens.oft_embedding_R.weight",
    ]
    peft.save_jax_adapter(model, tmp_path / "native")
    fresh = WithEmbTokens(nnx.Rngs(5))
    assert peft.load_jax_adapter(fresh, tmp_path / "native") == ["embed_tokens"]
    assert isinstance(fresh.embed_tokens, OFTEmbed) and list(fresh.embed_tokens.adapters) == [
        "default",
        "two",
    ]
    np.testing.assert_array_equal(
        np.asarray(fresh.embed_tokens.base_layer.embedding[...]),
        np.asarray(model.embed_tokens.base_layer.embedding[...]),
    )
    for name in ("default", "two"):
        np.testing.assert_array_equal(
            np.asarray(fresh.embed_tokens.oft_embedding_R[name][...]),
            np.asarray(model.embed_tokens.oft_embedding_R[name][...]),
        )
