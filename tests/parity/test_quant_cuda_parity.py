"""rounding="cuda" against bitsandbytes' CUDA kernels (needs a CUDA GPU and CUDA bitsandbytes).

Marked ``gpu``: deselected by default (run ``pytest -m gpu``). It never skips: without CUDA it fails loudly.
The double-quant offset is torch's CUDA mean, whose summation order we do not emulate, so the nested codes are
compared given bnb's own offset.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oftjax import quant
from oftjax.quant._blockwise import quantize_blockwise

pytestmark = pytest.mark.gpu

CASES = [((64, 64), 64), ((33, 65), 64), ((7, 9), 32), ((1001,), 256), ((96, 200), 4096), ((256, 1024), 128)]


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def data(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:64] = 0.0  # an all-zero block
    return x


@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
@pytest.mark.parametrize("shape,bs", CASES, ids=[f"{'x'.join(map(str, s))}-bs{b}" for s, b in CASES])
def test_4bit_cuda_rounding_matches_bnb_cuda(shape, bs, qt):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU with CUDA bitsandbytes"
    x = data(shape, seed=bs)
    p, st = F.quantize_4bit(torch.from_numpy(x).cuda(), blocksize=bs, quant_type=qt)
    q = quant.quantize_4bit(jnp.asarray(x), qt, bs, rounding="cuda")
    np.testing.assert_array_equal(bits(q.packed), bits(p.cpu().numpy()))
    np.testing.assert_array_equal(bits(q.absmax), bits(st.absmax.cpu().numpy()))
    ref = F.dequantize_4bit(p, st).cpu().numpy()
    for f in (quant.dequantize, jax.jit(quant.dequantize)):  # on the default JAX backend (a GPU if present)
        np.testing.assert_array_equal(np.asarray(f(q)), ref)


@pytest.mark.parametrize("shape,bs", CASES[:3], ids=[f"{'x'.join(map(str, s))}-bs{b}" for s, b in CASES[:3]])
def test_nested_cuda_rounding_matches_bnb_cuda(shape, bs):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU with CUDA bitsandbytes"
    x = data(shape, seed=bs + 1)
    p, st = F.quantize_4bit(
        torch.from_numpy(x).cuda(), blocksize=bs, quant_type="nf4", compress_statistics=True
    )
    absmax = (
        F.quantize_4bit(torch.from_numpy(x).cuda(), blocksize=bs, quant_type="nf4")[1].absmax.cpu().numpy()
    )
    offset = st.offset.cpu().numpy()
    q, am2 = quantize_blockwise(jnp.asarray(absmax) - jnp.asarray(offset), rounding="cuda")
    np.testing.assert_array_equal(np.asarray(q), st.absmax.cpu().numpy())
    np.testing.assert_array_equal(bits(am2), bits(st.state2.absmax.cpu().numpy()))
    qj = quant.FourBitWeight(
        jnp.asarray(p.cpu().numpy()),
        jnp.asarray(st.absmax.cpu().numpy()),
        jnp.asarray(st.state2.absmax.cpu().numpy()),
        jnp.asarray(offset),
        shape=shape,
        blocksize=bs,
        quant_type="nf4",
    )
    np.testing.assert_array_equal(
        np.asarray(jax.jit(quant.dequantize)(qj)), F.dequantize_4bit(p, st).cpu().numpy()
    )


def test_int8_cuda_rounding_close_to_bnb_cuda():
    assert torch.cuda.is_available(), "this test needs a CUDA GPU with CUDA bitsandbytes"
    x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    CB, SCB, _ = F.int8_vectorwise_quant(torch.from_numpy(x).half().cuda())
    q = quant.quantize_int8(jnp.asarray(x), rounding="cuda")
    np.testing.assert_array_equal(bits(q.SCB), bits(SCB.cpu().numpy()))
    diff = np.abs(np.asarray(q.CB, np.int32) - CB.cpu().numpy().astype(np.int32))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * x.size  # __fdividef is within 2 ulp
