"""OFT layers vs PEFT 0.21 (+ bitsandbytes): forward, rotation gradients, merged weights, COFT after a step.

Float cases run PEFT's own test MLP (lin0 10->20, lin1 20->2) with both layers targeted; bnb cases wrap one
Linear8bitLt / Linear4bit (nf4, fp4, nf4 + double quant; in_features 64 and 128). Parameters are copied from
PEFT into JAX (tests/parity/_bridge.py), so any difference is in the math.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

from interop import oracle
from oftjax import merge, quant, unmerge
from oftjax.nn import OFTParam
from oftjax.nn._merge import merged_weight
from oftjax.surgery import apply_oft, set_adapter
from tests.parity import _bridge as br
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

FWD, GRAD, RGRAD = TOL["fp32_forward"], TOL["fp32_grad"], TOL["fp32_rotation_grad"]

oracle.use_default_cpu_dequant()

MLP_CASES = {
    "r2-exact": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    "b2-neumann": dict(oft_block_size=2),
    "b4-adjusted": dict(oft_block_size=4),  # lin0: 10 -> b=5, lin1: 20 -> b=4 (PEFT's adjustment)
    "b16-capped": dict(oft_block_size=16),  # lin0: b=10 (b > d), lin1: 20 -> 20
    "b2-exact": dict(oft_block_size=2, use_cayley_neumann=False),
    "coft": dict(r=2, oft_block_size=0, coft=True, eps=1e-2),
    "block-share": dict(r=2, oft_block_size=0, block_share=True, use_cayley_neumann=False),
    "coft-block-share": dict(r=2, oft_block_size=0, coft=True, eps=1e-2, block_share=True),
    **{f"neumann-t{t}": dict(oft_block_size=5, num_cayley_neumann_terms=t) for t in range(1, 9)},
}


def _mlp_pair(case, seed=0):
    torch.manual_seed(seed)
    tm = br.TorchMLP().eval()
    jm = br.JaxMLP(tm)
    pcfg, jcfg = br.configs(target_modules=["lin0", "lin1"], init_weights=False, **case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adjustment warnings: checked in test_adjust_warning_matches_peft
        pm = peft.get_peft_model(tm, pcfg)
        paths = apply_oft(jm, jcfg, rngs=nnx.Rngs(0))
    br.copy_adapter(pm, jm)
    return pm, jm, paths


def _jax_loss_and_grads(model, x, G):
    def loss(m):
        y = m(x)
        return jnp.sum(y * G), y

    return nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, OFTParam), has_aux=True))(model)


def _grad_of(grads, path):
    node = grads
    for key in path.split("."):
        node = node[int(key) if key.isdigit() else key]
    return np.asarray(node["oft_R"]["default"][...])


def _compare_forward_and_grads(pm, jm, paths, x_np, G_np):
    xt = torch.from_numpy(x_np)
    out_t = pm(xt)
    loss_t = (out_t * torch.from_numpy(G_np)).sum()
    if loss_t.requires_grad:  # not with Neumann t=1 (R = I whatever the parameters)
        loss_t.backward()
    (_, out_j), grads = _jax_loss_and_grads(jm, jnp.asarray(x_np), jnp.asarray(G_np))
    np.testing.assert_allclose(np.asarray(out_j), out_t.detach().numpy(), rtol=FWD.rtol, atol=FWD.atol)
    tg = br.peft_grads(pm)
    assert sorted(tg) == sorted(paths)
    for p in paths:
        atol = RGRAD.atol * max(1.0, float(np.abs(tg[p]).max()))
        np.testing.assert_allclose(_grad_of(grads, p), tg[p], rtol=RGRAD.rtol, atol=atol, err_msg=p)
    # COFT projected in place on both sides during the forward.
    for p, v in br.peft_params(pm).items():
        np.testing.assert_allclose(br.jax_params(jm, [p])[p], v, rtol=FWD.rtol, atol=FWD.atol, err_msg=p)


def _inputs(n, d, out, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, out)).astype(np.float32)


@pytest.mark.parametrize("case", list(MLP_CASES), ids=list(MLP_CASES))
def test_mlp_forward_grads_and_merge_match_peft(case):
    pm, jm, paths = _mlp_pair(MLP_CASES[case])
    assert paths == ["lin0", "lin1"]
    for p, m in br.peft_oft_layers(pm).items():  # same per-layer r / b as PEFT
        s = br.jax_layer(jm, p).adapters["default"]
        assert (s.r, s.block_size) == (m.r["default"], m.oft_block_size["default"])
    x, G = _inputs(6, 10, 2)
    _compare_forward_and_grads(pm, jm, paths, x, G)
    if case.startswith("neumann-t"):
        return  # the series only changes R; merging is covered by the other cases (keeps the run short)
    # merged weights: PEFT's dense merge W BD^T vs ours (nnx layout kernel' = BD kernel).
    pm.base_model.merge_adapter()
    merge(jm)
    for p, m in br.peft_oft_layers(pm).items():
        want = m.get_base_layer().weight.detach().numpy()
        got = np.asarray(br.jax_layer(jm, p).base_layer.kernel[...]).T
        np.testing.assert_allclose(got, want, rtol=FWD.rtol, atol=FWD.atol, err_msg=p)
    with torch.no_grad():
        out_t = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(jm(jnp.asarray(x))), out_t, rtol=FWD.rtol, atol=FWD.atol)


@pytest.mark.parametrize("case", ["coft", "coft-block-share"], ids=["coft", "coft-block-share"])
def test_coft_params_after_an_optimizer_step_match_peft(case):
    pm, jm, paths = _mlp_pair(MLP_CASES[case], seed=2)
    x, G = _inputs(6, 10, 2, seed=3)
    topt = torch.optim.SGD([p for n, p in pm.named_parameters() if "oft_R" in n], lr=0.5)
    jopt = nnx.Optimizer(jm, optax.sgd(0.5), wrt=OFTParam)
    for _ in range(2):
        topt.zero_grad()
        (pm(torch.from_numpy(x)) * torch.from_numpy(G)).sum().backward()
        topt.step()
        _, grads = _jax_loss_and_grads(jm, jnp.asarray(x), jnp.asarray(G))
        jopt.update(jm, grads)
        tp = br.peft_params(pm)  # stepped (not yet projected) values
        for p in paths:
            np.testing.assert_allclose(
                br.jax_params(jm, [p])[p], tp[p], rtol=GRAD.rtol, atol=GRAD.atol, err_msg=p
            )
    with torch.no_grad():
        pm(torch.from_numpy(x))  # the next forward projects in place
    jm(jnp.asarray(x))
    tp = br.peft_params(pm)
    for p in paths:
        np.testing.assert_allclose(
            br.jax_params(jm, [p])[p], tp[p], rtol=GRAD.rtol, atol=GRAD.atol, err_msg=p
        )


def test_adjust_warning_matches_peft():
    torch.manual_seed(0)
    pcfg, jcfg = br.configs(target_modules=["lin0"], oft_block_size=4)
    with pytest.warns(
        UserWarning, match=r"Invalid `oft_block_size` \(4\)! Adjusted `oft_block_size` to \(5\)"
    ) as w:
        peft.get_peft_model(br.TorchMLP(), pcfg)
    peft_msgs = {str(m.message) for m in w if "Invalid" in str(m.message)}
    with pytest.warns(UserWarning) as w2:
        apply_oft(br.JaxMLP(br.TorchMLP()), jcfg)
    assert {str(m.message) for m in w2 if "Invalid" in str(m.message)} == peft_msgs


def test_identity_at_init_matches_base():
    torch.manual_seed(0)
    tm = br.TorchMLP().eval()
    jm = br.JaxMLP(tm)
    x = jnp.asarray(_inputs(4, 10, 2)[0])
    y0 = jm(x)
    apply_oft(jm, br.configs(target_modules=["lin0", "lin1"], oft_block_size=2)[1])
    np.testing.assert_array_equal(np.asarray(jm(x)), np.asarray(y0))


@pytest.mark.parametrize("b", [2, 5], ids=["b2-commuting", "b5"])
def test_multi_adapter_merge_order_vs_peft(b):
    """Forward of two active adapters matches PEFT; our merge keeps it, PEFT's merge does not for b >= 4."""
    torch.manual_seed(0)
    tm = br.TorchMLP().eval()
    jm = br.JaxMLP(tm)
    x, _ = _inputs(6, 10, 2)
    xt = torch.from_numpy(x)
    pm = None
    for name, seed in (("a", 0), ("b", 1)):
        pcfg, jcfg = br.configs(target_modules=["lin0"], oft_block_size=b, init_weights=False)
        torch.manual_seed(seed)
        if pm is None:
            pm = peft.get_peft_model(tm, pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
        apply_oft(jm, jcfg, name, rngs=nnx.Rngs(seed))
        br.copy_adapter(pm, jm, name)
    pm.base_model.set_adapter(["a", "b"])
    set_adapter(jm, ["a", "b"])
    with torch.no_grad():
        y_t = pm(xt).numpy()
    y_j = np.asarray(jm(jnp.asarray(x)))
    np.testing.assert_allclose(y_j, y_t, rtol=FWD.rtol, atol=FWD.atol)
    merge(jm)
    np.testing.assert_allclose(np.asarray(jm(jnp.asarray(x))), y_t, rtol=FWD.rtol, atol=FWD.atol)
    pm.base_model.merge_adapter()
    with torch.no_grad():
        y_t_merged = pm(xt).numpy()
    peft_merge_error = float(np.abs(y_t_merged - y_t).max())
    if b == 2:  # 2x2 rotations commute: PEFT's order does not matter
        assert peft_merge_error < FWD.rtol
    else:  # PEFT merges W BD_a^T BD_b^T, i.e. computes x BD_b BD_a W^T
        assert peft_merge_error > 1e-3
    unmerge(jm)
    np.testing.assert_allclose(np.asarray(jm(jnp.asarray(x))), y_t, rtol=FWD.rtol, atol=FWD.atol)


# bnb layers: every format at in_features 64 and 128, config variants spread over them (full product: slow).
BNB_LAYOUTS = [(k, d) for d in (64, 128) for k in ("int8", "nf4", "fp4", "nf4-dq")]
BNB_CONFIGS = [
    dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    dict(oft_block_size=16),
    dict(oft_block_size=4, coft=True, eps=1e-2),
    dict(r=2, oft_block_size=0, block_share=True),
    dict(r=4, oft_block_size=0, coft=True, eps=1e-2, block_share=True, use_cayley_neumann=False),
    dict(oft_block_size=2, use_cayley_neumann=False),
    dict(oft_block_size=16, num_cayley_neumann_terms=3),
    dict(oft_block_size=8, num_cayley_neumann_terms=8),
]
BNB_CASES = [(k, d, c) for (k, d), c in zip(BNB_LAYOUTS, BNB_CONFIGS, strict=True)]
BNB_ALL = [(k, d, c) for k, d in BNB_LAYOUTS for c in BNB_CONFIGS]


def _cid(case):
    k, d, c = case
    return f"{k}-{d}-" + "-".join(f"{a}{int(v) if isinstance(v, bool) else v}" for a, v in sorted(c.items()))


def _bnb_requantize(target: np.ndarray, q):
    """What bitsandbytes itself produces from the float weight ``target`` with q's format options."""
    if isinstance(q, quant.Int8Weight):
        layer = br.bnb_layer("int8", torch.from_numpy(target), None)
        return (layer.weight.data.numpy(), layer.weight.SCB.numpy())
    kind = q.quant_type + ("-dq" if q.compress_statistics else "")
    layer = br.bnb_layer(kind, torch.from_numpy(target), None)
    return tuple(np.asarray(a) for a in jax.tree.leaves(br.four_bit_from_params(layer.weight)))


def _run_bnb_case(kind, d, case):
    tq = br.TorchQuantNet(kind, d, 32, seed=d).train()  # bnb int8 training path: dequantize-then-matmul
    jq = br.JaxQuantNet(tq)
    pcfg, jcfg = br.configs(target_modules=["lin0"], init_weights=False, **case)
    pm = peft.get_peft_model(tq, pcfg)
    apply_oft(jq, jcfg, rngs=nnx.Rngs(0))
    br.copy_adapter(pm, jq)
    x, G = _inputs(5, d, 32, seed=d + 1)
    _compare_forward_and_grads(pm, jq, ["lin0"], x, G)
    # merged weights vs PEFT's dense merge of the dequantized weight
    peft_layer = br.peft_oft_layers(pm)["lin0"]
    with torch.no_grad():
        W = peft_layer.get_base_weight().float()
        dense = torch.mm(peft_layer.get_delta_weight("default"), W.t()).t().numpy()
    layer = jq.lin0
    target = np.array(merged_weight(layer, ["default"]))  # writable: handed to torch
    np.testing.assert_allclose(target.astype(np.float32), dense, rtol=FWD.rtol, atol=FWD.atol)
    # requantized bytes == bitsandbytes quantizing the same float weight
    report = merge(jq).layers["lin0"]
    got = tuple(np.asarray(a) for a in jax.tree.leaves(layer.base_layer.weight.get_value()))
    want = _bnb_requantize(target, layer.base_layer.weight.get_value())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert 0 < report.requant_rel_error < TOL["requant_int8" if kind == "int8" else "requant_4bit"].rtol


@pytest.mark.parametrize("case", BNB_CASES, ids=[_cid(c) for c in BNB_CASES])
def test_bnb_forward_grads_and_merge_match_peft(case):
    _run_bnb_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", BNB_ALL, ids=[_cid(c) for c in BNB_ALL])
def test_bnb_full_product(case):
    _run_bnb_case(*case)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"], ids=["nf4", "fp4-dq"])
def test_bnb_bf16_compute_forward_matches_peft(kind):
    """bnb compute_dtype=bf16: x is rotated in fp32 (the adapter dtype), then the base computes in bf16."""
    tq = br.TorchQuantNet(kind, 64, 32, seed=7, compute_dtype=torch.bfloat16).train()
    jq = br.JaxQuantNet(tq)
    assert jq.lin0.compute_dtype == jnp.bfloat16
    pcfg, jcfg = br.configs(target_modules=["lin0"], init_weights=False, oft_block_size=16)
    pm = peft.get_peft_model(tq, pcfg)
    apply_oft(jq, jcfg, rngs=nnx.Rngs(0))
    br.copy_adapter(pm, jq)
    x, _ = _inputs(5, 64, 32, seed=8)
    with torch.no_grad():
        want = pm(torch.from_numpy(x)).float().numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(jq, jnp.asarray(x)))
    tol = TOL["bf16_forward"]
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol)
