"""oftjax.oft and OFTConfig against PEFT 0.21's own torch code (the oracle; fails if torch/peft are missing).

Every JAX function runs jitted. Rotation parameters move between frameworks as plain arrays.
"""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import OFTConfig as PeftOFTConfig
from peft import get_peft_model
from peft.tuners.oft.layer import MultiplicativeDropoutLayer, OFTLayer, OFTRotationModule
from peft.tuners.tuners_utils import check_target_module_exists

from oftjax import OFTConfig
from oftjax.oft import (
    adjust_oft_parameters,
    block_diag,
    cayley,
    cayley_neumann,
    coft_project,
    dropout_blocks,
    merge_rotation,
    num_elements,
    resolve_block_size,
    rotate_input,
    rotation_blocks,
    skew_from_vec,
    triu_indices,
    unmerge_rotation,
    vec_from_skew,
)
from tests.tolerances import TOL

torch.manual_seed(0)

_skew = jax.jit(skew_from_vec, static_argnums=1)
_cayley = jax.jit(cayley)
_neumann = jax.jit(cayley_neumann, static_argnums=(1, 2))
_project = jax.jit(coft_project, static_argnums=1)
_block_diag = jax.jit(block_diag)
_merge = jax.jit(merge_rotation)
_unmerge = jax.jit(unmerge_rotation)


def _close(actual, expected, name):
    tol = TOL[name]
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol.rtol, atol=tol.atol)


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _vec(seed, rows, b, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal((rows, num_elements(b)))).astype(np.float32)


def _peft_module(v, b, r, *, coft=False, eps=6e-5, block_share=False, neumann=True, terms=5):
    m = OFTRotationModule(
        1 if block_share else r,
        num_elements(b),
        b,
        r * b,
        coft=coft,
        eps=eps,
        block_share=block_share,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
    )
    with torch.no_grad():
        m.weight.copy_(_t(v))
    return m


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("b", [2, 3, 4, 7, 16], ids=lambda b: f"b{b}")
def test_triu_and_skew_bit_exact(b):
    rows, cols = torch.triu_indices(b, b, 1)
    ours_r, ours_c = triu_indices(b)
    np.testing.assert_array_equal(ours_r, rows.numpy())
    np.testing.assert_array_equal(ours_c, cols.numpy())
    v = _vec(b, 3, b, scale=1.0)
    m = _peft_module(v, b, 3)
    Q_torch = m._pytorch_skew_symmetric(_t(v), b).numpy()
    Q = np.asarray(_skew(jnp.asarray(v), b))
    np.testing.assert_array_equal(Q, Q_torch)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(vec_from_skew)(jnp.asarray(Q))), m._pytorch_skew_symmetric_inv(_t(Q), b)
    )


# ----------------------------------------------------------------------------- Cayley


@pytest.mark.parametrize("terms", [0, *range(1, 9)], ids=lambda t: "exact" if t == 0 else f"neumann{t}")
def test_cayley_batch(terms):
    b, r = 8, 3
    v = _vec(terms, r, b, scale=0.3)
    m = _peft_module(v, b, r)
    expected = m._cayley_batch(_t(v), b, use_cayley_neumann=terms > 0, num_neumann_terms=terms).numpy()
    Q = _skew(jnp.asarray(v), b)
    ours = _cayley(Q) if terms == 0 else _neumann(Q, terms, False)
    _close(ours, expected, "oft_rotation_fp32")


def _cayley_batch_peft017(Q_skew, block_size, num_neumann_terms):
    """PEFT v0.16.0-v0.17.1 ``OFTRotationModule._cayley_batch``, Neumann branch, verbatim (pre-0.18)."""
    b = Q_skew.shape[0]
    R = torch.eye(block_size, dtype=Q_skew.dtype).repeat(b, 1, 1)
    if num_neumann_terms > 1:
        R.add_(Q_skew, alpha=2.0)
        if num_neumann_terms > 2:
            Q_squared = torch.bmm(Q_skew, Q_skew)
            R.add_(Q_squared, alpha=2.0)
            Q_power = Q_squared
            for _ in range(3, num_neumann_terms):
                Q_power = torch.bmm(Q_power, Q_skew)
                R.add_(Q_power, alpha=2.0)
    return R


@pytest.mark.parametrize("terms", range(1, 9), ids=lambda t: f"t{t}")
def test_legacy_neumann_matches_peft017(terms):
    b, r = 6, 2
    v = _vec(10 + terms, r, b, scale=0.3)
    Q = _skew(jnp.asarray(v), b)
    expected = _cayley_batch_peft017(_t(np.asarray(Q)), b, terms).numpy()
    _close(_neumann(Q, terms, True), expected, "oft_rotation_fp32")


# ----------------------------------------------------------------------------- COFT


@pytest.mark.parametrize("eps", [1e-5, 6e-5, 1e-2, 10.0], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("rows", [1, 4], ids=lambda r: f"R{r}")
def test_project_batch(eps, rows):
    b = 4
    v = _vec(rows, rows, b, scale=0.01)
    v[0] *= 1e-3  # one block inside the ball for most eps
    m = _peft_module(v, b, rows)
    expected = m._project_batch(_t(v), eps=eps).numpy()
    _close(_project(jnp.asarray(v), eps), expected, "oft_rotation_fp32")


# ----------------------------------------------------------------------------- forward / grad / get_weight

CASES = {
    "b2-r5-exact": dict(b=2, r=5, neumann=False),
    "b4-r4-neumann": dict(b=4, r=4),
    "b16-r4-neumann": dict(b=16, r=4),
    "b8-r2-neumann8": dict(b=8, r=2, terms=8),
    "b4-r3-exact-share": dict(b=4, r=3, neumann=False, block_share=True),
    "b4-r4-coft": dict(b=4, r=4, coft=True, eps=1e-2),
    "b4-r4-coft-share": dict(b=4, r=4, coft=True, eps=1e-2, block_share=True),
    "b2-r5-coft-share-exact": dict(b=2, r=5, coft=True, eps=1e-2, block_share=True, neumann=False),
}


def _ours(v, x, g, *, b, r, coft=False, eps=6e-5, block_share=False, neumann=True, terms=5):
    def loss(v):
        v = coft_project(v, eps) if coft else v
        R = rotation_blocks(
            v,
            block_size=b,
            num_blocks=r,
            use_cayley_neumann=neumann,
            num_terms=terms,
            block_share=block_share,
        )
        y = rotate_input(x, R)
        return jnp.sum(y * g), (y, v, R)

    (_, (y, v_proj, R)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(v)
    return y, v_proj, R, grad


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_grad_and_weight(case):
    kw = CASES[case]
    b, r = kw["b"], kw["r"]
    rows = 1 if kw.get("block_share") else r
    v = _vec(b * r, rows, b, scale=0.2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, r * b)).astype(np.float32)
    g = rng.standard_normal((2, 3, r * b)).astype(np.float32)

    m = _peft_module(v, **kw)
    y_t = m(_t(x))
    (y_t * _t(g)).sum().backward()
    y, v_proj, R, grad = _ours(jnp.asarray(v), jnp.asarray(x), jnp.asarray(g), **kw)

    _close(y, y_t.detach().numpy(), "fp32_forward")
    _close(v_proj, m.weight.detach().numpy(), "oft_rotation_fp32")  # PEFT's in-place COFT projection
    _close(grad, m.weight.grad.numpy(), "fp32_grad")
    with torch.no_grad():
        _close(_block_diag(R), m.get_weight().numpy(), "oft_rotation_fp32")


# ----------------------------------------------------------------------------- merge / unmerge on PEFT's MLP


class MLP(torch.nn.Module):
    """PEFT's test MLP (tests/test_custom_models.py): lin0 10->20, lin1 20->2."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.relu = torch.nn.ReLU()
        self.lin1 = torch.nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


MERGE_CASES = {
    "r2-exact": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    "b2-neumann": dict(r=0, oft_block_size=2),
    "b5-neumann": dict(r=0, oft_block_size=5),
    "r2-coft-share": dict(r=2, oft_block_size=0, coft=True, eps=1e-2, block_share=True),
}


@pytest.mark.parametrize("case", list(MERGE_CASES), ids=list(MERGE_CASES))
def test_merge_unmerge_against_peft_linear(case):
    kw = MERGE_CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PeftOFTConfig(target_modules=["lin0"], init_weights=False, **kw))
    layer = model.base_model.model.lin0
    oft = layer.oft_R["default"]
    b, r = oft.block_size, layer.r["default"]
    W = layer.base_layer.weight.detach().numpy().copy()
    bias = layer.base_layer.bias.detach().numpy()
    x = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)

    with torch.no_grad():
        y_t = layer(_t(x)).numpy()  # projects COFT params in place first
    v = oft.weight.detach().numpy()
    R = rotation_blocks(
        jnp.asarray(v),
        block_size=b,
        num_blocks=r,
        use_cayley_neumann=oft.use_cayley_neumann,
        num_terms=oft.num_cayley_neumann_terms,
        block_share=oft.block_share,
    )
    y = jax.jit(lambda x, R, W, c: rotate_input(x, R) @ W.T + c)(
        jnp.asarray(x), R, jnp.asarray(W), jnp.asarray(bias)
    )
    _close(y, y_t, "fp32_forward")

    model.merge_adapter()
    merged_t = layer.base_layer.weight.detach().numpy().copy()
    merged = _merge(jnp.asarray(W), R)
    _close(merged, merged_t, "fp32_forward")
    model.unmerge_adapter()
    _close(_unmerge(jnp.asarray(merged_t), R), layer.base_layer.weight.detach().numpy(), "fp32_forward")


# ----------------------------------------------------------------------------- adjustment rule


def test_adjust_rule_exhaustive():
    for d in range(1, 71):
        for p in range(1, 81):
            assert adjust_oft_parameters(d, p) == OFTLayer.adjust_oft_parameters(None, d, p), (d, p)


@pytest.mark.parametrize(
    "in_features,r,b", [(24, 0, 5), (24, 5, 0), (24, 0, 32), (10, 3, 0), (24, 0, 8)], ids=lambda v: str(v)
)
def test_resolve_block_size_matches_peft_layer(in_features, r, b):
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(in_features, 4))
    with warnings.catch_warnings(record=True) as peft_warns:
        warnings.simplefilter("always")
        model = get_peft_model(base, PeftOFTConfig(r=r, oft_block_size=b, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with warnings.catch_warnings(record=True) as our_warns:
        warnings.simplefilter("always")
        assert resolve_block_size(in_features, r, b) == (layer.r["default"], layer.oft_block_size["default"])
    peft_msgs = [str(w.message) for w in peft_warns if str(w.message).startswith("Invalid")]
    assert [str(w.message) for w in our_warns] == peft_msgs


# ----------------------------------------------------------------------------- module dropout


@pytest.mark.parametrize("r,p", [(8, 0.5), (5, 0.3), (4, 0.0), (1, 0.9)], ids=lambda v: str(v))
def test_dropout_semantics_match_peft_layer(r, p):
    R = np.asarray(
        rotation_blocks(
            jnp.asarray(_vec(r, r, 4, 0.5)), block_size=4, num_blocks=r, use_cayley_neumann=True, num_terms=5
        )
    )
    layer = MultiplicativeDropoutLayer(p=p).train()
    peft_out = layer(_t(R)).numpy()
    ours = np.asarray(
        jax.jit(dropout_blocks, static_argnames="p")(jnp.asarray(R), p=p, key=jax.random.key(0))
    )
    eye = np.eye(4, dtype=np.float32)
    for out in (peft_out, ours):
        dropped = np.all(out == eye, axis=(1, 2))
        assert dropped.sum() == int(p * r) if r > 1 else not dropped.any()
        np.testing.assert_array_equal(out[~dropped], R[~dropped])


# ----------------------------------------------------------------------------- OFTConfig


def test_config_fields_and_defaults_match_peft():
    ours = OFTConfig(target_modules=["q_proj"]).to_dict()
    theirs = PeftOFTConfig(target_modules=["q_proj"]).to_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key == "target_modules":
            assert ours[key] == sorted(value)
        elif key == "peft_type":
            assert ours[key] == str(value.value)
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=0, oft_block_size=0), dict(r=2, oft_block_size=4), dict(layers_pattern="layers")],
    ids=["neither", "both", "pattern-without-layers"],
)
def test_config_validation_matches_peft(kwargs):
    with pytest.raises(ValueError) as peft_err:
        PeftOFTConfig(**kwargs)
    with pytest.raises(ValueError) as our_err:
        OFTConfig(**kwargs)
    assert str(our_err.value).startswith(str(peft_err.value).strip())


PATHS = [
    "lm_head",
    "q_proj",
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.2.self_attn.xq_proj",
    "model.layers.1.mlp.experts.0.w1",
    "model.layers.0.mlp.experts.1.w1",
    "transformer.h.3.attn.q_proj",
    "encoder.block.1.layer.0.SelfAttention.q",
]
TARGET_CONFIGS = {
    "list": dict(target_modules=["q_proj", "v_proj", "w1", "q"]),
    "regex": dict(target_modules=r".*\.(q|v)_proj"),
    "regex-partial": dict(target_modules="q_proj"),
    "exclude-list": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"]),
    "exclude-regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1.*"),
    "layers-int": dict(target_modules=["q_proj", "v_proj", "w1"], layers_to_transform=1),
    "layers-pattern": dict(
        target_modules=["q_proj", "w1"], layers_to_transform=[0, 3], layers_pattern="layers"
    ),
    "layers-patterns": dict(
        target_modules=["q_proj", "q"], layers_to_transform=[1, 3], layers_pattern=["h", "block"]
    ),
    "layers-regex-ignored": dict(target_modules=r".*q_proj", layers_to_transform=[1]),
    "modules-to-save": dict(
        target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head", "layers.0.self_attn"]
    ),
}


@pytest.mark.parametrize("case", list(TARGET_CONFIGS), ids=list(TARGET_CONFIGS))
def test_is_target_matches_check_target_module_exists(case):
    kw = TARGET_CONFIGS[case]
    theirs = PeftOFTConfig(**kw)
    ours = OFTConfig(**kw)
    for path in PATHS:
        assert ours.is_target(path) == bool(check_target_module_exists(theirs, path)), path


def test_from_dict_reads_peft_saved_config(tmp_path):
    PeftOFTConfig(
        r=2, oft_block_size=0, target_modules=["q_proj", "v_proj"], coft=True, eps=1e-3, task_type="CAUSAL_LM"
    ).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = OFTConfig.from_dict(data, source=str(tmp_path))
    assert cfg.target_modules == frozenset({"q_proj", "v_proj"}) and cfg.coft and cfg.eps == 1e-3
    assert not cfg.legacy_neumann and cfg.peft_version == data["peft_version"]
    again = PeftOFTConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"})
    assert again.to_dict()["target_modules"] == {"q_proj", "v_proj"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", cfg.to_dict()["peft_version"])


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("neumann", [False, True], ids=["exact", "neumann"])
def test_bf16_parameters(neumann):
    # autocast_adapter_dtype=False keeps bf16 adapters: exact Cayley solves in fp32 (PEFT's fp32 identity) and
    # casts back; Neumann runs in bf16.
    b, r = 4, 3
    v = _vec(5, r, b, scale=0.2)
    m = _peft_module(v, b, r, neumann=neumann).to(torch.bfloat16)
    x = np.random.default_rng(6).standard_normal((5, r * b)).astype(np.float32)
    x_bf16 = torch.from_numpy(x).to(torch.bfloat16)
    with torch.no_grad():
        R_t = m._cayley_batch(m.weight, b, neumann, 5).float().numpy()
        y_t = m(x_bf16).float().numpy()
    v_bf16 = jnp.asarray(m.weight.detach().float().numpy()).astype(jnp.bfloat16)
    R = jax.jit(
        rotation_blocks, static_argnames=("block_size", "num_blocks", "use_cayley_neumann", "num_terms")
    )(v_bf16, block_size=b, num_blocks=r, use_cayley_neumann=neumann, num_terms=5)
    assert R.dtype == jnp.bfloat16
    _close(R.astype(jnp.float32), R_t, "bf16_forward")
    y = jax.jit(rotate_input)(jnp.asarray(x).astype(jnp.bfloat16), R)
    assert y.dtype == jnp.bfloat16
    _close(y.astype(jnp.float32), y_t, "bf16_forward")


_SEGMENTS = [
    "model",
    "layers",
    "h",
    "0",
    "1",
    "2",
    "self_attn",
    "mlp",
    "q_proj",
    "v_proj",
    "up_proj",
    "lm_head",
]


@settings(max_examples=60, deadline=None)
@given(
    paths=st.lists(
        st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=5).map(".".join), min_size=1, max_size=8
    ),
    targets=st.one_of(
        st.lists(
            st.sampled_from(["q_proj", "v_proj", "mlp.up_proj", "lm_head", "layers.0.self_attn.q_proj"]),
            min_size=1,
        ),
        st.sampled_from([r".*q_proj", r"model\.layers\.\d\.mlp\..*", "lm_head"]),
    ),
    excludes=st.one_of(
        st.none(), st.lists(st.sampled_from(["q_proj", "1.q_proj", "h.2.v_proj"]), min_size=1)
    ),
    layers=st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2)),
    pattern=st.sampled_from([None, "layers", ["h", "layers"]]),
)
def test_is_target_property_matches_peft(paths, targets, excludes, layers, pattern):
    pattern = pattern if layers is not None else None
    kw = dict(
        target_modules=targets, exclude_modules=excludes, layers_to_transform=layers, layers_pattern=pattern
    )
    theirs, ours = PeftOFTConfig(**kw), OFTConfig(**kw)
    for path in paths:
        assert ours.is_target(path) == bool(check_target_module_exists(theirs, path)), (path, kw)
