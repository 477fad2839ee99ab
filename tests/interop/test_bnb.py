"""interop.bnb on real transformers-written bnb checkpoints: exact inverses, dequant parity, refusals."""

from __future__ import annotations

import json

import bitsandbytes as bnb_torch
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from interop import bnb, oracle
from interop._io import InteropError
from interop._safetensors import SafetensorsFile
from oftjax import quant
from tests.interop import _bnb_fixtures as fx

VARIANTS = list(fx.VARIANTS)
LAYERS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
]


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "bnb_checkpoints"


@pytest.fixture(scope="session")
def state_dicts(fixture_root):
    fixture_root.mkdir(exist_ok=True)
    out = {}
    for v in VARIANTS:
        f = SafetensorsFile(fx.quantized_dir(fixture_root, v) / "model.safetensors")
        out[v] = {k: f.get(k) for k in f.keys()}
    return out


def _layer(sd, prefix):
    return {k: v for k, v in sd.items() if k.startswith(prefix + ".") and not k.endswith(".bias")}


def _assert_same_bytes(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_from_to_state_dict_are_exact_inverses(state_dicts, variant):
    sd = state_dicts[variant]
    n = 0
    for prefix in sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith("_proj.weight")}):
        q = bnb.from_state_dict(sd, prefix)
        assert isinstance(q, quant.Int8Weight if variant == "int8" else quant.FourBitWeight)
        _assert_same_bytes(bnb.to_state_dict(q, prefix + "."), _layer(sd, prefix))
        n += 1
    assert n == 14  # 7 linear layers x 2 decoder layers, all quantized; lm_head never is


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=VARIANTS[1:])
def test_quant_state_json_reproduced_byte_for_byte(state_dicts, variant):
    sd = state_dicts[variant]
    qt = "fp4" if variant == "fp4" else "nf4"
    key = f"{LAYERS[0]}.weight.quant_state.bitsandbytes__{qt}"
    q = bnb.from_state_dict(sd, LAYERS[0])
    blob = bnb.to_state_dict(q, LAYERS[0])[key]
    assert blob.tobytes() == sd[key].tobytes()
    if "dq" in variant:  # the offset survives float32 -> JSON float -> float32 exactly
        assert q.offset.dtype == np.float32
        assert float(q.offset) == json.loads(sd[key].tobytes())["nested_offset"]


def _torch(v):
    if v.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.asarray(v).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(v))


def _bnb_dequant(sd, prefix):
    t = {k: _torch(v) for k, v in _layer(sd, prefix).items()}
    if prefix + ".SCB" in t:
        return bnb_torch.functional.int8_vectorwise_dequant(t[prefix + ".weight"], t[prefix + ".SCB"]).numpy()
    oracle.use_default_cpu_dequant()
    qs = bnb_torch.functional.QuantState.from_dict(
        {k[len(prefix) + len(".weight.") :]: v for k, v in t.items() if k != prefix + ".weight"},
        torch.device("cpu"),
    )
    out = bnb_torch.functional.dequantize_4bit(t[prefix + ".weight"], qs)
    return out.float().numpy()


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_dequantize_of_read_layer_equals_bnb(state_dicts, variant):
    sd = state_dicts[variant]
    deq = jax.jit(quant.dequantize, static_argnames="dtype")
    for prefix in LAYERS:
        q = bnb.from_state_dict(sd, prefix)
        ref = _bnb_dequant(sd, prefix)
        got = np.asarray(deq(q, dtype=np.float32))
        if variant == "int8":
            # bnb's int8 dequant output is float32; its original dtype is not stored in the layer
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        else:
            # bnb dequantizes to the JSON dtype (bf16); compare in that dtype, values (FP4 has a signed zero)
            got_bf16 = np.asarray(deq(q)).astype(np.float32)
            assert np.asarray(deq(q)).dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got_bf16, ref)


# ------------------------------------------------------------------------------------------------ refusals


def _four(sd, variant="nf4", prefix=LAYERS[0]):
    return {k: v.copy() for k, v in _layer(sd, prefix).items()}


def _set_json(layer, key, **changes):
    qs = json.loads(layer[key].tobytes())
    qs.update(changes)
    layer[key] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()


QS = LAYERS[0] + ".weight.quant_state.bitsandbytes__nf4"
P = LAYERS[0]


def _drop(key):
    return lambda L: L.pop(key)


def _bf16_absmax(L):
    L[P + ".weight.absmax"] = L[P + ".weight.absmax"].astype(ml_dtypes.bfloat16)


def _absmax_2d(L):
    L[P + ".weight.absmax"] = L[P + ".weight.absmax"].reshape(1, -1).T.copy()


REFUSALS_NF4 = {
    "absmax_2d": (_absmax_2d, "not 1-D"),
    "absmax_bf16": (_bf16_absmax, "repacking"),
    "missing_weight": (_drop(P + ".weight"), "missing tensor key"),
    "missing_absmax": (_drop(P + ".weight.absmax"), "missing tensor key"),
    "missing_quant_map": (_drop(P + ".weight.quant_map"), "missing tensor key"),
    "missing_quant_state": (_drop(QS), "missing tensor key.*quant_state"),
    "two_quant_states": (
        lambda L: L.update({P + ".weight.quant_state.bitsandbytes__fp4": L[QS]}),
        "exactly one",
    ),
    "shape_vs_json": (lambda L: _set_json(L, QS, shape=[64, 128]), "disagrees with the quant_state shape"),
    "blocksize_vs_absmax": (lambda L: _set_json(L, QS, blocksize=128), "blocks"),
    "bad_blocksize": (lambda L: _set_json(L, QS, blocksize=48), "blocksize"),
    "unknown_quant_type": (lambda L: _set_json(L, QS, quant_type="int4"), "unknown quant_type"),
    "unknown_json_key": (lambda L: _set_json(L, QS, bogus=1), "unknown quant_state JSON key"),
    "corrupt_json": (lambda L: L.update({QS: L[QS][:-3]}), "corrupt quant_state JSON"),
    "nonstandard_quant_map": (lambda L: L[P + ".weight.quant_map"].__setitem__(3, 0.5), "code table"),
    "quant_map_of_fp4": (lambda L: L.update({P + ".weight.quant_map": quant.FP4.copy()}), "code table"),
    "nested_without_json": (
        lambda L: L.update({P + ".weight.nested_absmax": np.ones(1, np.float32)}),
        "nested",
    ),
    "bad_dtype": (lambda L: _set_json(L, QS, dtype="complex64"), "unsupported dtype"),
}


@pytest.mark.parametrize("case", list(REFUSALS_NF4), ids=list(REFUSALS_NF4))
def test_refuses_bad_4bit_layers(state_dicts, case):
    mutate, msg = REFUSALS_NF4[case]
    layer = _four(state_dicts["nf4"])
    mutate(layer)
    with pytest.raises(InteropError, match=msg) as e:
        bnb.from_state_dict(layer, P)
    assert P in str(e.value)  # names the key


def _dq_nested_bf16(L):
    _set_json(L, QS, nested_dtype="bfloat16")


REFUSALS_DQ = {
    "nested_dtype_bf16": (_dq_nested_bf16, "nested_dtype 'bfloat16'.*repacking"),
    "nested_blocksize": (lambda L: _set_json(L, QS, nested_blocksize=128), "nested_blocksize"),
    "missing_nested_absmax": (_drop(P + ".weight.nested_absmax"), "missing tensor key"),
    "missing_nested_quant_map": (_drop(P + ".weight.nested_quant_map"), "missing tensor key"),
    "nonstandard_nested_map": (
        lambda L: L[P + ".weight.nested_quant_map"].__setitem__(0, 0.0),
        "dynamic map",
    ),
    "nested_absmax_length": (
        lambda L: L.update({P + ".weight.nested_absmax": np.ones(2, np.float32)}),
        "expected float32 \\[1\\]",
    ),
    "absmax_float_with_nested": (
        lambda L: L.update({P + ".weight.absmax": L[P + ".weight.absmax"].astype(np.float32)}),
        "expected uint8",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS_DQ), ids=list(REFUSALS_DQ))
def test_refuses_bad_double_quant_layers(state_dicts, case):
    mutate, msg = REFUSALS_DQ[case]
    layer = _four(state_dicts["nf4_dq"])
    mutate(layer)
    with pytest.raises(InteropError, match=msg):
        bnb.from_state_dict(layer, P)


REFUSALS_INT8 = {
    "legacy_weight_format": (
        lambda L: L.update({P + ".weight_format": np.array(1, np.uint8)}),
        "legacy tiled",
    ),
    "missing_weight": (_drop(P + ".weight"), "missing tensor key"),
    "scb_length": (lambda L: L.update({P + ".SCB": L[P + ".SCB"][:-1]}), "one scale per row"),
    "cb_dtype": (lambda L: L.update({P + ".weight": L[P + ".weight"].astype(np.float32)}), "expected int8"),
    "missing_scb": (_drop(P + ".SCB"), "missing tensor key"),
}


@pytest.mark.parametrize("case", list(REFUSALS_INT8), ids=list(REFUSALS_INT8))
def test_refuses_bad_int8_layers(state_dicts, case):
    mutate, msg = REFUSALS_INT8[case]
    layer = _four(state_dicts["int8"])
    mutate(layer)
    with pytest.raises(InteropError, match=msg):
        bnb.from_state_dict(layer, P)


@pytest.mark.parametrize("variant", ["nf4", "nf4_dq"], ids=["nf4", "nf4_dq"])
def test_refuses_what_bnb_saves_after_its_cpu_repacking(fixture_root, variant):
    """The real thing: an eval forward on an AVX512-BF16 CPU repacks the weights, and a save after it writes a
    layout that reloads silently but dequantizes wrongly (docs/bitsandbytes-formats.md, "bitsandbytes CPU
    defects"). We refuse it with the reason."""
    model = transformers.LlamaForCausalLM.from_pretrained(
        fx.quantized_dir(fixture_root, variant), device_map="cpu"
    )
    model.eval()
    with torch.no_grad():
        model(torch.arange(8)[None])
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(P + ".")}
    layer = {
        k: (v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
        for k, v in sd.items()
    }
    if not bnb_torch.functional.has_avx512bf16():  # no repacking on this CPU: the layer stays valid
        assert isinstance(bnb.from_state_dict(layer, P), quant.FourBitWeight)
        return
    with pytest.raises(InteropError, match="repacking"):
        bnb.from_state_dict(layer, P)


def test_to_state_dict_accepts_jax_leaves(state_dicts):
    q = bnb.from_state_dict(state_dicts["nf4_dq_bf16storage"], P)
    qj = jax.tree.map(jax.numpy.asarray, q)
    _assert_same_bytes(bnb.to_state_dict(qj, P), _layer(state_dicts["nf4_dq_bf16storage"], P))


def test_rejects_non_quantized_leaf():
    with pytest.raises(TypeError, match="Int8Weight or FourBitWeight"):
        bnb.to_state_dict(np.zeros(3), "x")
