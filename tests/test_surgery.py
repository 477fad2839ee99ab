"""apply_oft and adapter management on NNX models: paths, dispatch by type, errors, bias modes, training."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oftjax.config import OFTConfig
from oftjax.nn import (
    Linear4bit,
    Linear8bit,
    OFTBias,
    OFTLinear,
    OFTParam,
    QuantWeight,
    find_modules,
    module_at,
    path_str,
    replace_module,
)
from oftjax.surgery import (
    apply_oft,
    delete_adapter,
    disable_adapters,
    oft_layers,
    set_adapter,
    trainable_count,
)
from tests.nn._helpers import make_base, rand


class Block(nnx.Module):
    def __init__(self, rngs, seed, kinds=("float", "float")):
        self.q_proj = make_base(kinds[0], 64, 64, seed=seed)
        self.v_proj = make_base(kinds[1], 64, 32, seed=3)
        self.norm = nnx.LayerNorm(64, rngs=rngs)


class Tiny(nnx.Module):
    """Llama-like nesting: model.layers.{i}.{q,v}_proj in an nnx.List, extras in a Dict, and lm_head."""

    def __init__(self, kinds=("float", "float")):
        rngs = nnx.Rngs(0)
        self.model = nnx.Dict(layers=nnx.List([Block(rngs, i, kinds) for i in range(2)]))
        self.lm_head = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        for layer in self.model["layers"]:
            x = layer.norm(layer.q_proj(x))
        return self.lm_head(self.model["layers"][1].v_proj(x))


def cfg(**kw):
    kw.setdefault("oft_block_size", 16)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return OFTConfig(**kw)


def test_paths_are_dotted_with_list_indices():
    model = Tiny()
    paths = apply_oft(model, cfg())
    assert paths == [
        "model.layers.0.q_proj",
        "model.layers.0.v_proj",
        "model.layers.1.q_proj",
        "model.layers.1.v_proj",
    ]
    assert [p for p, _ in oft_layers(model)] == paths
    flat = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model))}
    assert "model/layers/0/q_proj/base_layer/kernel" in flat  # the base's state, below PEFT's base_layer
    assert "model/layers/0/q_proj/oft_R/default" in flat


@pytest.mark.parametrize("kinds", [("int8", "nf4"), ("fp4", "float")], ids=["int8-nf4", "fp4-float"])
def test_dispatch_by_base_type_and_identity(kinds):
    model = Tiny(kinds)
    x = rand((2, 64))
    y0 = model(x)
    apply_oft(model, cfg())
    layer = model.model["layers"][0]
    assert isinstance(layer.q_proj, OFTLinear) and isinstance(layer.v_proj, OFTLinear)
    want = {"int8": Linear8bit, "nf4": Linear4bit, "fp4": Linear4bit, "float": nnx.Linear}
    assert type(layer.q_proj.base_layer) is want[kinds[0]]
    assert type(layer.v_proj.base_layer) is want[kinds[1]]
    if kinds[0] != "float":
        assert isinstance(layer.q_proj.base_layer.weight, QuantWeight)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y0))


def test_regex_target_all_linear_and_layers_to_transform():
    model = Tiny()
    assert apply_oft(model, cfg(target_modules=r".*\.1\.v_proj")) == ["model.layers.1.v_proj"]
    model = Tiny()
    assert apply_oft(
        model, cfg(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    ) == ["model.layers.1.q_proj"]
    model = Tiny()
    paths = apply_oft(model, cfg(target_modules="all-linear"))
    assert "lm_head" not in paths and len(paths) == 4


def test_nothing_matches_names_patterns_and_candidates():
    with pytest.raises(ValueError, match=r"\['k_proj'\] not found.*model\.layers\.0\.q_proj"):
        apply_oft(Tiny(), cfg(target_modules=["k_proj"]))


def test_unsupported_target_type():
    with pytest.raises(TypeError, match="norm.*not supported"):
        apply_oft(Tiny(), cfg(target_modules=["norm"]))


def test_existing_adapter_name_raises_and_nothing_changes():
    model = Tiny()
    apply_oft(model, cfg())
    with pytest.raises(ValueError, match="'default' already exists on model.layers.0.q_proj"):
        apply_oft(model, cfg())
    assert all(list(layer.adapters) == ["default"] for _, layer in oft_layers(model))


def test_block_size_adjusted_with_peft_warning():
    with pytest.warns(
        UserWarning, match=r"Invalid `oft_block_size` \(24\)! Adjusted `oft_block_size` to \(16\)"
    ):
        apply_oft(Tiny(), cfg(oft_block_size=24))
    model = Tiny()
    with pytest.warns(UserWarning, match=r"Invalid `r` \(5\)! Adjusted `r` to \(4\)"):
        apply_oft(model, cfg(r=5, oft_block_size=0))
    assert model.model["layers"][0].q_proj.adapters["default"].block_size == 16


def test_config_rejects_both_or_neither_r_and_block_size():
    with pytest.raises(ValueError):
        OFTConfig(r=2, oft_block_size=4, target_modules=["q_proj"])
    with pytest.raises(ValueError):
        OFTConfig(r=0, oft_block_size=0, target_modules=["q_proj"])


def test_second_adapter_is_inactive_until_set_adapter_then_chains():
    model = Tiny()
    x = rand((2, 64))
    apply_oft(model, cfg(init_weights=False), rngs=nnx.Rngs(1))
    y_default = model(x)
    apply_oft(
        model, cfg(target_modules=["q_proj"], oft_block_size=4, init_weights=False), "b", rngs=nnx.Rngs(2)
    )
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y_default))
    set_adapter(model, ["default", "b"])
    y_both = model(x)
    assert not np.allclose(np.asarray(y_both), np.asarray(y_default))
    with pytest.raises(ValueError, match="unknown adapter"):
        set_adapter(model, ["c"])
    delete_adapter(model, "b")
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y_default))
    with pytest.raises(ValueError, match="not found"):
        delete_adapter(model, "b")


def test_disable_adapters_context():
    model = Tiny(("nf4", "int8"))
    x = rand((2, 64))
    y0 = model(x)
    apply_oft(model, cfg(init_weights=False), rngs=nnx.Rngs(1))
    y1 = model(x)
    with disable_adapters(model):
        np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y1))


@pytest.mark.parametrize("bias", ["none", "all", "oft_only"], ids=["none", "all", "oft_only"])
def test_bias_modes_select_trainable_biases(bias):
    model = Tiny(("int8", "float"))
    apply_oft(model, cfg(bias=bias))
    rot = 4 * (4 * 120)  # 4 layers x [4 blocks, 16*15/2]
    biases = {"none": 0, "oft_only": 2 * (64 + 32), "all": 2 * (64 + 32) + 8 + 2 * 64}[
        bias
    ]  # + LayerNorm biases
    assert trainable_count(model) == rot + biases
    assert isinstance(
        model.model["layers"][0].q_proj.base_layer.bias, OFTBias if bias != "none" else nnx.Param
    )
    assert isinstance(model.lm_head.bias, OFTBias) == (bias == "all")
    # LayerNorm's bias is a bias too: PEFT's "all" marks every parameter named *bias*.
    assert isinstance(model.model["layers"][0].norm.bias, OFTBias) == (bias == "all")


def test_training_by_type_reaches_only_rotations():
    model = Tiny(("nf4", "int8"))
    apply_oft(model, cfg(coft=True, eps=1e-2, init_weights=False), rngs=nnx.Rngs(1))
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(OFTParam)))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=OFTParam)
    x, target = rand((4, 64)), rand((4, 8), seed=1)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - target) ** 2), argnums=nnx.DiffState(0, OFTParam)
        )(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction promotes an int count
            opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Not(OFTParam))), jax.tree.leaves(frozen), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_modules_to_save_warns():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        apply_oft(Tiny(), cfg(modules_to_save=["lm_head"]))
    assert any("modules_to_save" in str(w.message) for w in rec)


def test_list_indices_sort_numerically_and_plain_lists_work():
    class Deep(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(11)])
            self.extra = nnx.data([nnx.Linear(4, 4, rngs=nnx.Rngs(0))])

    model = Deep()
    paths = apply_oft(model, cfg(target_modules=r"(layers|extra)\.\d+", oft_block_size=2))
    assert paths == [f"layers.{i}" for i in range(11)] + ["extra.0"] or paths == ["extra.0"] + [
        f"layers.{i}" for i in range(11)
    ]
    assert isinstance(model.layers[10], OFTLinear) and isinstance(model.extra[0], OFTLinear)


def test_find_and_replace_modules_by_attribute_index_and_dict_key():
    model = Tiny()
    linears = [path_str(p) for p, _ in find_modules(model, lambda m: isinstance(m, nnx.Linear))]
    assert linears == [
        "lm_head",
        "model.layers.0.q_proj",
        "model.layers.0.v_proj",
        "model.layers.1.q_proj",
        "model.layers.1.v_proj",
    ]
    new = nnx.Linear(64, 64, rngs=nnx.Rngs(5))
    replace_module(model, ("model", "layers", 1, "q_proj"), new)  # nnx.Dict key, nnx.List index, attribute
    assert module_at(model, "model.layers.1.q_proj") is new and model.model["layers"][1].q_proj is new
    block = Block(nnx.Rngs(0), 7)
    replace_module(model, "model.layers.0", block)
    assert model.model["layers"][0] is block
    with pytest.raises(ValueError, match="root"):
        replace_module(model, (), block)


def test_find_modules_does_not_enter_oft_layers_unless_asked():
    model = Tiny()
    apply_oft(model, cfg(target_modules=["q_proj"]))
    names = [path_str(p) for p, _ in find_modules(model)]
    assert "model.layers.0.q_proj" in names and not any("base_layer" in n or "oft_R" in n for n in names)
    everything = [path_str(p) for p, _ in find_modules(model, enter=lambda m: True)]
    assert "model.layers.0.q_proj.base_layer" in everything


def test_replace_module_refuses_immutable_parents():
    class Held(nnx.Module):
        def __init__(self):
            self.pair = nnx.data((nnx.Linear(2, 2, rngs=nnx.Rngs(0)),))

    with pytest.raises(TypeError, match=r"pair\.0 sits in an immutable tuple"):
        replace_module(Held(), ("pair", 0), nnx.Linear(2, 2, rngs=nnx.Rngs(1)))
