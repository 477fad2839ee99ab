"""LLM.int8 (bitsandbytes' eval-mode int8 forward) vs bitsandbytes 0.50.2 on the CPU.

* the steps (``oftjax.quant``) vs bnb's ops: activation quantization, rescale and the threshold-0 forward are
  bit-exact; the outlier columns are a float matmul (XLA's order, not MKL's);
* ``Linear8bit`` in eval (``model.eval()``, ``nnx.view``) vs ``Linear8bitLt`` in eval, with and without
  outlier columns, thresholds 0, 6.0 and a custom one, float32 and bfloat16 inputs; OFT on top vs PEFT's OFT
  over ``Linear8bitLt`` (the rotation goes to the input, never to the weight);
* a tiny Llama loaded from an 8-bit checkpoint, in eval mode, vs transformers' default (eval) int8 forward.

Tolerances (tests/tolerances.py, "llm_int8_*") are counted in steps of the activation quantization: a step
``SCA_i / 127`` on one input of row ``i`` moves output ``(i, j)`` by at most ``SCA_i / 127 * max_k |W_jk|``.
"""

import json
import warnings

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from torch import nn
from transformers import BitsAndBytesConfig

from interop.hf_model import load_model
from oftjax import quant
from oftjax.nn import Linear8bit, OFTLinear
from oftjax.surgery import apply_oft
from tests.parity import _bridge as br
from tests.parity.test_model_parity import build_hf, hf_logits
from tests.tolerances import TOL

# layer and model parity run with the pure-JAX default and with the CPU kernels (tests/conftest.py)
KERNELS = pytest.mark.usefixtures("kernels")

OPS = torch.ops.bitsandbytes
DTYPES = {"f32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}
THRESHOLDS = {"thr0": 0.0, "thr6": 6.0, "thr2.5": 2.5}


def to_jax(t: torch.Tensor) -> jax.Array:
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.numpy())


def to_np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy()
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


def bits(a) -> np.ndarray:
    """The bit patterns of a torch or JAX array (bfloat16 as its 16 bits)."""
    if isinstance(a, torch.Tensor):
        a = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy()
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def activations(shape, seed, outliers: bool, dtype=torch.float32) -> torch.Tensor:
    """Activations below every threshold here (N(0, 0.3^2)); with ``outliers`` two columns x20 (LLM.int8's
    systematic outlier features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 0.3
    if outliers:
        x[..., 3] *= 20.0
        x[..., -5] *= 20.0
    return x.to(dtype)


def int8_layer(in_f, out_f, threshold, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    bias = torch.randn(out_f, generator=g) * 0.1
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(bias)
    return layer.to("cpu")


def jax_int8_layer(layer: nn.Module, threshold: float, compute_dtype) -> Linear8bit:
    q = br.quant_weight_from_bnb(layer)
    return Linear8bit(q, to_jax(layer.bias.detach()), compute_dtype=compute_dtype, threshold=threshold)


def assert_within_one_step(got, want, x_base, q, tol) -> None:
    """|got - want| <= tol.rtol |want| + tol.atol * (SCA_i / 127) * max_k |W_jk| (one activation step).

    ``x_base``: the base layer's input (float), whose row absmax (outliers excluded) sets the step.
    """
    got, want = to_np(got).reshape(-1, q.shape[0]), to_np(want).reshape(-1, q.shape[0])
    x2 = jnp.asarray(to_np(x_base)).reshape(-1, q.shape[1])
    SCA = np.asarray(quant.quantize_activations(x2, 0.0).SCA, np.float64)
    wmax = np.abs(np.asarray(quant.dequantize(q, jnp.float32), np.float64)).max(1)
    bound = tol.rtol * np.abs(want) + tol.atol * (SCA[:, None] / 127.0) * wmax[None, :]
    excess = np.abs(got.astype(np.float64) - want) - bound
    assert excess.max() <= 0, f"max excess {excess.max():.3g} over the one-step bound at {np.argmax(excess)}"


# -------------------------------------------------------------------------------------------- the steps


@pytest.mark.parametrize("threshold", list(THRESHOLDS.values()), ids=list(THRESHOLDS))
@pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
def test_steps_match_bnb_ops(outliers, dt, threshold):
    tdt, _ = DTYPES[dt]
    x = activations((9, 64), seed=1, outliers=outliers, dtype=tdt)
    x[4] = 0.0  # an all-zero row: SCA = 0
    layer = int8_layer(64, 24, threshold)
    q = br.quant_weight_from_bnb(layer)
    CB, SCB, bias = layer.weight.data, layer.weight.SCB, layer.bias.detach().to(tdt)
    CA, SCA, cols = OPS.int8_vectorwise_quant.default(x.to(torch.float16), threshold)
    qa = quant.quantize_activations(to_jax(x), threshold)
    np.testing.assert_array_equal(np.asarray(qa.CA), CA.numpy())
    np.testing.assert_array_equal(bits(qa.SCA), bits(SCA))
    want_cols = np.zeros(64, bool)
    if cols is not None:
        want_cols[cols.numpy()] = True
    np.testing.assert_array_equal(np.asarray(qa.outlier_cols), want_cols)
    assert want_cols.any() == (outliers and threshold > 0)
    acc = OPS.int8_linear_matmul.default(CA, CB)
    np.testing.assert_array_equal(np.asarray(quant.int8_matmul(qa.CA, q.CB)), acc.numpy())
    rescaled = OPS.int8_mm_dequant.default(acc, SCA, SCB, dtype=tdt, bias=bias)
    got = quant.rescale_int32(jnp.asarray(acc.numpy()), qa.SCA, q.SCB, to_jax(bias), to_jax(bias).dtype)
    np.testing.assert_array_equal(bits(got), bits(rescaled))
    if threshold > 0:
        want, _ = OPS.int8_mixed_scaled_mm.default(x, CA, CB, SCA, SCB, cols, bias)
    else:
        want = OPS.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=tdt)
    y = jax.jit(quant.llm_int8_matmul, static_argnames=("threshold",))(
        to_jax(x), q, to_jax(bias), threshold=threshold
    )
    if not want_cols.any():  # no float part: every step is bnb's, bit for bit
        np.testing.assert_array_equal(bits(y), bits(want))
    assert_within_one_step(y, want, x, q, TOL["llm_int8_" + dt])


# ----------------------------------------------------------------------------------------------- layers


def _eval_modes(layer: Linear8bit):
    """The ways to ask for the eval forward, each on its own copy: model.eval(), nnx.view, the attribute."""
    evaluated = nnx.clone(layer)
    evaluated.eval()
    forced = nnx.clone(layer)
    forced.int8_matmul = "llm_int8"
    return {
        "eval()": evaluated,
        "view": nnx.view(layer, deterministic=True),
        "llm_int8": forced,
    }


@KERNELS
@pytest.mark.parametrize("threshold", list(THRESHOLDS.values()), ids=list(THRESHOLDS))
@pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
def test_linear8bit_eval_matches_linear8bitlt_eval(outliers, dt, threshold):
    tdt, jdt = DTYPES[dt]
    tl = int8_layer(64, 40, threshold, seed=2).eval()
    x = activations((3, 7, 64), seed=3, outliers=outliers, dtype=tdt)
    with torch.no_grad():
        want = tl(x)
    layer = jax_int8_layer(tl, threshold, jdt)
    q = layer.weight.get_value()
    assert not layer.uses_llm_int8  # a new layer trains: dequantize-then-matmul
    for name, view in _eval_modes(layer).items():
        assert view.uses_llm_int8, name
        got = nnx.jit(lambda m, x: m(x))(view, to_jax(x))
        assert got.dtype == jdt and got.shape == (3, 7, 40)
        if threshold == 0 or not outliers:
            np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)
        assert_within_one_step(got, want, x, q, TOL["llm_int8_" + dt])
    # and the training forward is still bnb's train mode (MatMul8bitFp), not LLM.int8
    with torch.no_grad():
        want_train = tl.train()(x)
    got_train = nnx.jit(lambda m, x: m(x))(layer, to_jax(x))
    tol = TOL["fp32_forward" if dt == "f32" else "bf16_forward"]
    np.testing.assert_allclose(to_np(got_train), to_np(want_train), rtol=tol.rtol, atol=tol.atol)
    if outliers or threshold == 0:
        assert not np.allclose(to_np(got_train), to_np(want), rtol=1e-3, atol=0)  # the two paths differ


OFT_CASES = {  # rotate: what the layer is asked for (training would take the weight path either way)
    "b16-neumann-weight": (dict(oft_block_size=16), "weight"),
    "r4-exact-coft-auto": (
        dict(r=4, oft_block_size=0, use_cayley_neumann=False, coft=True, eps=1e-2),
        "auto",
    ),
}


@KERNELS
@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["thr0", "thr6"])
@pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(OFT_CASES), ids=list(OFT_CASES))
def test_oft_over_linear8bit_eval_matches_peft(case, dt, threshold):
    """PEFT's OFT layer over Linear8bitLt in eval: x rotated in the adapter dtype, cast back, then LLM.int8.
    Ours routes to the input path in LLM.int8 mode even when asked (or when "auto" would pick) the weight."""
    tdt, jdt = DTYPES[dt]
    tq = br.TorchQuantNet("int8", 64, 32, seed=5)
    tq.lin0 = int8_layer(64, 32, threshold, seed=5)
    jq = br.JaxQuantNet(tq)
    jq.lin0 = jax_int8_layer(tq.lin0, threshold, jdt)
    config, rotate = OFT_CASES[case]
    pcfg, jcfg = br.configs(target_modules=["lin0"], init_weights=False, **config)
    pm = peft.get_peft_model(tq, pcfg).eval()
    apply_oft(jq, jcfg, rngs=nnx.Rngs(0))
    br.copy_adapter(pm, jq)
    jq.lin0.rotate = rotate
    x = activations((48, 64), seed=6, outliers=True, dtype=tdt)  # 48 tokens > 32 outputs: "auto" -> weight
    with torch.no_grad():
        want = pm(x)
        rotated = br.peft_oft_layers(pm)["lin0"].oft_R["default"](x.float()).to(tdt)
    layer: OFTLinear = jq.lin0
    assert layer.uses_weight_path(x.shape, layer.forward_adapters())  # training: the cheaper weight path
    jq.eval()
    assert layer.base_layer.uses_llm_int8 and layer.deterministic
    assert not layer.uses_weight_path(x.shape, layer.forward_adapters())
    got = nnx.jit(lambda m, x: m(x))(jq, to_jax(x))
    assert got.dtype == jdt
    q = layer.base_layer.weight.get_value()
    assert_within_one_step(got, want, rotated, q, TOL["llm_int8_" + dt])
    with pytest.raises(ValueError, match="rotate the input"):
        layer.base_layer.rotated_forward(to_jax(x), (jnp.stack([jnp.eye(16)] * 4),))


def test_per_call_view_leaves_the_model_training():
    tl = int8_layer(64, 16, 6.0, seed=7)
    layer = jax_int8_layer(tl, 6.0, jnp.float32)
    x = to_jax(activations((5, 64), seed=8, outliers=True))
    eval_y = nnx.view(layer, deterministic=True)(x)
    assert not layer.uses_llm_int8
    forced = nnx.view(layer, int8_matmul="llm_int8")(x)
    np.testing.assert_array_equal(np.asarray(eval_y), np.asarray(forced))
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(eval_y))
    assert not np.array_equal(np.asarray(nnx.view(layer, int8_matmul="dequantize")(x)), np.asarray(eval_y))
    layer.train()
    assert not layer.uses_llm_int8


# ------------------------------------------------------------------------------------------- the model

SKIP = ["model.layers.1.mlp", "q_proj"]  # a prefix at a module boundary and a suffix (transformers' rules)
MODEL_CASES = {
    "default": {},  # threshold 6.0: no outlier column in this model
    # threshold 2: outlier columns in most layers; float q_proj and layer-1 MLP, and with a skip list
    # transformers quantizes lm_head too
    "skip-modules": {"llm_int8_threshold": 2.0, "llm_int8_skip_modules": SKIP},
    # float weights in the file, quantized by bnb at each forward (transformers cannot load this directory
    # back: the reference is the model quantized on load)
    "fp16-weight": {
        "llm_int8_threshold": 2.0,
        "llm_int8_has_fp16_weight": True,
        "llm_int8_skip_modules": SKIP,
    },
}


@pytest.fixture(scope="module")
def int8_dirs(tmp_path_factory):
    """A tiny random Llama saved as float, then quantized by transformers on load (8-bit) and saved."""
    src = tmp_path_factory.mktemp("float") / "llama"
    build_hf("LlamaConfig", {}).save_pretrained(src)
    out = {}
    for name, kw in MODEL_CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                src, quantization_config=BitsAndBytesConfig(load_in_8bit=True, **kw), dtype=torch.float32
            )
        path = tmp_path_factory.mktemp("int8") / name
        model.save_pretrained(path)
        out[name] = (path, model.eval())
    return out


def model_inputs():
    """No left padding: a fully masked query row is undefined in transformers, and every row takes part in
    the choice of outlier columns."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 128, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    return ids, mask


def _layer_kinds(hf_model, ours) -> None:
    """Every projection is 8-bit in JAX exactly where transformers made it a Linear8bitLt."""
    from interop.hf_model import linear_paths

    for path in linear_paths(ours.config):
        theirs = hf_model.get_submodule(path)
        node = ours
        for key in path.split("."):
            node = node[int(key)] if key.isdigit() else getattr(node, key)
        assert isinstance(node, Linear8bit) == isinstance(theirs, bnb.nn.Linear8bitLt), path


@KERNELS
@pytest.mark.parametrize("name", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_int8_model_eval_logits_match_transformers_eval(int8_dirs, name):
    path, hf_model = int8_dirs[name]
    threshold = json.loads((path / "config.json").read_text())["quantization_config"]["llm_int8_threshold"]
    assert threshold == MODEL_CASES[name].get("llm_int8_threshold", 6.0)
    ids, mask = model_inputs()
    want = hf_logits(hf_model, ids, mask)
    ours = load_model(path)
    _layer_kinds(hf_model, ours)
    k_proj = ours.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, Linear8bit) and k_proj.threshold == threshold and not k_proj.uses_llm_int8
    ours.eval()
    assert k_proj.uses_llm_int8
    got = np.asarray(ours(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())), np.float32)
    keep = mask.numpy().astype(bool)
    top1 = float((got.argmax(-1) == want.argmax(-1))[keep].mean())
    assert top1 >= 0.99, top1
    tol = TOL["llm_int8_logits"]
    scale = float(np.abs(want[keep]).max())
    np.testing.assert_allclose(got[keep], want[keep], rtol=tol.rtol, atol=tol.atol * scale)
    # the training forward is far from transformers' eval forward: the comparison above is not vacuous
    train_logits = np.asarray(nnx.view(ours, deterministic=False)(jnp.asarray(ids.numpy())), np.float32)
    assert np.abs(train_logits - hf_logits(hf_model, ids, torch.ones_like(mask))).max() > tol.atol * scale
