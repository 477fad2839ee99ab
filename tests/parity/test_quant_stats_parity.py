"""The double-quantization statistics against torch / bitsandbytes on the CPU.

* ``torch_mean_f32`` (the emulated float32 ``Tensor.mean``) equals torch bit for bit, with the thread count
  set on both sides (sums of >= 32768 values are split across threads by torch).
* the 8-bit blockwise quantizer (CPU LUT rule; jnp and exact host versions) equals
  ``bitsandbytes.functional.quantize_blockwise`` with the dynamic map.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oftjax.quant._blockwise import quantize_blockwise, quantize_blockwise_host
from oftjax.quant._host_f32 import decode, encode
from oftjax.quant._tables import DYNAMIC
from oftjax.quant._torch_mean import torch_mean_f32

SIZES = [1, 3, 7, 8, 9, 31, 64, 65, 255, 1000, 4097, 16385, 32767]
LARGE = [32768, 40000, 100001, 300001]


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def torch_mean(x: np.ndarray, threads: int) -> np.ndarray:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return torch.from_numpy(x).mean().numpy()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", SIZES, ids=str)
def test_mean_matches_torch_single_chunk(n):
    rng = np.random.default_rng(n)
    for x in (np.abs(rng.standard_normal(n)) * 0.05, rng.random(n) * 3 + 1e-3):
        x = x.astype(np.float32)
        assert bits(torch_mean_f32(x)) == bits(torch_mean(x, 2))


@pytest.mark.parametrize("threads", [1, 2, 3], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n", LARGE, ids=str)
def test_mean_matches_torch_threads(n, threads):
    x = (np.abs(np.random.default_rng(n).standard_normal(n)) * 0.05).astype(np.float32)
    assert bits(torch_mean_f32(x, num_threads=threads)) == bits(torch_mean(x, threads))


def test_mean_subnormal_matches_torch():
    x = np.zeros(5, np.float32)
    x[-1] = np.float32(1e-38)  # the absmax of an all-zero ragged block
    assert bits(torch_mean_f32(x)) == bits(torch_mean(x, 1))


def bnb_blockwise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, st = F.quantize_blockwise(torch.from_numpy(x), code=torch.from_numpy(DYNAMIC.copy()), blocksize=256)
    return q.numpy(), st.absmax.numpy()


@pytest.mark.parametrize("n", [5, 256, 1000, 70000], ids=str)
def test_blockwise_lut_matches_bnb(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    if n >= 512:
        x[256:512] = 0.0  # an all-zero block stores absmax 0 and codes 0
    q_ref, am_ref = bnb_blockwise(x)
    for q, am in (quantize_blockwise(jnp.asarray(x)), jax.jit(quantize_blockwise)(jnp.asarray(x))):
        np.testing.assert_array_equal(np.asarray(q), q_ref)
        np.testing.assert_array_equal(bits(am), bits(am_ref))
    q, am = quantize_blockwise_host(decode(x))
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(encode(am), bits(am_ref))


def test_blockwise_host_subnormal_matches_bnb():
    x = np.array([-2.5e-39, -2.5e-39, -2.5e-39, 7.5e-39], np.float32)
    q_ref, am_ref = bnb_blockwise(x)
    q, am = quantize_blockwise_host(decode(x))
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(encode(am), bits(am_ref))
