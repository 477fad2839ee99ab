"""Shared by the family parity tests: JAX logits, the logits bound, PEFT loading without missing keys, OFT
targets by family (PEFT's module names)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict

from interop import oracle
from tests.tolerances import TOL

# OFT on every projection, by the family's own module names (PEFT's names)
_FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
_SPLIT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def targets(model_type: str) -> list[str]:
    """Every projection of a family by PEFT's names: Phi-3's fused ``qkv_proj`` / ``gate_up_proj``."""
    return _FUSED if model_type == "phi3" else _SPLIT


def jax_logits(model: Any, ids: Any, mask: Any = None, positions: Any = None) -> np.ndarray:
    """Jitted logits of an NNX model for torch (or numpy) inputs, as float32 numpy."""
    graph, state = nnx.split(model)
    fn = jax.jit(lambda st, i, m, p: nnx.merge(graph, st)(i, m, p))
    to = lambda t: None if t is None else jnp.asarray(np.asarray(t))  # noqa: E731
    return np.asarray(fn(state, to(ids), to(mask), to(positions)), np.float32)


def assert_logits_close(got: np.ndarray, want: np.ndarray, keep: np.ndarray | None = None) -> None:
    """max |got - want| <= rtol * max |want| over the kept positions (``TOL["family_logits_fp32"]``), and the
    same top-1 token at each."""
    if keep is not None:
        got, want = got[keep], want[keep]
    tol = TOL["family_logits_fp32"]
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= tol.rtol * scale + tol.atol, f"max abs error {err:.3e} vs max |logit| {scale:.3e}"
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def peft_loads_cleanly(base: Any, path: Any) -> Any:
    """``PeftModel.from_pretrained(base, path)`` in eval mode, asserting no missing and no unexpected adapter
    keys (as tests/parity/test_adapter_attach_parity.py checks: the same calls PEFT's ``load_adapter`` makes,
    then the warning ``from_pretrained`` gives for missing keys)."""
    check = get_peft_model(base, PeftConfig.from_pretrained(str(path)))
    result = set_peft_model_state_dict(check, load_peft_weights(str(path)))
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "oft_" in k]
    base = check.unload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, str(path))
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    oracle.disable_cpu_repacking(loaded)
    return loaded.eval()
