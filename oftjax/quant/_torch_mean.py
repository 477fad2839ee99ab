"""torch's CPU float32 ``Tensor.mean()`` reproduced bit for bit in numpy (host side).

bitsandbytes' double quantization stores ``offset = absmax.mean()`` computed by torch on the CPU, so a
bit-exact quantizer must sum in torch's order. torch 2.x sums a contiguous float32 vector with ``cascade_sum``
(pytorch ``aten/src/ATen/native/cpu/SumKernel.cpp``: ``vectorized_inner_sum`` -> ``row_sum`` ->
``multi_row_sum``) and divides once by n (docs/bitsandbytes-formats.md, "Double quantization"):

  * n >= Vec width W: the vector is read as n // W lanes-vectors; ``row_sum`` folds them with 4 interleaved
    accumulators, each a 4-level cascade (groups of 2**max(4, ceil_log2(rows) // 4) rows); leftover vectors go
    into accumulator 0, the four are folded 0+1+2+3; then the scalar tail is summed serially and the W lanes
    are added one by one.
  * n < W: the same ``row_sum`` on scalars.
  * n >= 32768 (``at::internal::GRAIN_SIZE``) with T > 1 threads: ``two_pass_reduction`` splits into
    ``min(T, ceil(n / 32768))`` chunks of ``ceil(n / ntask)``, sums each chunk as above and adds the partial
    sums in chunk order.

Both W and T depend on the machine: W = 8 matched torch 2.13 on the AVX512 host these notes were verified on
(torch's sum behaves as AVX2 width there), and T is ``torch.get_num_threads()``, which by default is the
number of CPU cores available to the process. ``default_num_threads`` approximates that without importing
torch; pass ``num_threads`` explicitly to reproduce a given torch configuration.
"""

from __future__ import annotations

import os

import numpy as np

from oftjax.quant._host_f32 import decode, encode, r32

VEC_WIDTH = 8
GRAIN_SIZE = 32768


def default_num_threads() -> int:
    """The thread count torch's CPU reductions use by default here (cores available to this process).

    torch sets its intra-op pool to the number of cores; we use the CPU affinity mask, falling back to
    ``os.cpu_count()``. Only sums of >= 32768 absmax values (weights of >= 2M elements at blocksize 64)
    depend on it.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else int(x - 1).bit_length()


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """``multi_row_sum``: rows [size, k] (float32 values on float64 carriers) -> [k], the 4-level cascade."""
    size, k = rows.shape
    num_levels = 4
    level_power = max(4, _ceil_log2(size) // num_levels)
    step = 1 << level_power
    mask = step - 1
    acc = np.zeros((num_levels, k))
    nblk = size // step
    if nblk:
        # Level 0 restarts from zero for every group of `step` rows: vectorize it across groups.
        blocks = rows[: nblk * step].reshape(nblk, step, k)
        s0 = np.zeros((nblk, k))
        for j in range(step):
            s0 = r32(s0 + blocks[:, j])
        i = 0
        for b in range(nblk):
            i += step
            acc[0] = s0[b]
            for j in range(1, num_levels):
                acc[j] = r32(acc[j] + acc[j - 1])
                acc[j - 1] = 0
                if i & (mask << (j * level_power)):
                    break
    for r in rows[nblk * step :]:
        acc[0] = r32(acc[0] + r)
    for j in range(1, num_levels):
        acc[0] = r32(acc[0] + acc[j])
    return acc[0]


def _row_sum(data: np.ndarray) -> np.ndarray:
    """``row_sum`` with ilp_factor 4: data [size, lanes] -> [lanes]."""
    size, lanes = data.shape
    size_ilp = size // 4
    partial = _multi_row_sum(data[: size_ilp * 4].reshape(size_ilp, 4 * lanes)).reshape(4, lanes).copy()
    for r in data[size_ilp * 4 :]:
        partial[0] = r32(partial[0] + r)
    for k in range(1, 4):
        partial[0] = r32(partial[0] + partial[k])
    return partial[0]


def _inner_sum(x: np.ndarray, vec_width: int) -> float:
    n = x.shape[0]
    if n < vec_width:
        return float(r32(0.0 + _row_sum(x.reshape(n, 1))[0]))
    vec_size = n // vec_width
    lanes = _row_sum(x[: vec_size * vec_width].reshape(vec_size, vec_width))
    acc = 0.0
    for v in x[vec_size * vec_width :]:
        acc = float(r32(acc + v))
    for v in lanes:
        acc = float(r32(acc + v))
    return acc


def _sum64(x: np.ndarray, num_threads: int | None, vec_width: int) -> float:
    """The torch float32 sum of float32 values carried in float64 ``x`` (see module docstring)."""
    n = x.shape[0]
    threads = default_num_threads() if num_threads is None else int(num_threads)
    if n < GRAIN_SIZE or threads <= 1:
        return _inner_sum(x, vec_width)
    ntask = min(threads, -(-n // GRAIN_SIZE))
    chunk = -(-n // ntask)
    total = 0.0
    for t in range(ntask):
        total = float(r32(total + _inner_sum(x[t * chunk : (t + 1) * chunk], vec_width)))
    return total


def torch_sum_f32(x: np.ndarray, *, num_threads: int | None = None, vec_width: int = VEC_WIDTH) -> np.float32:
    """``torch.sum`` of a contiguous float32 vector on the CPU, bit for bit (see module docstring).

    Example:
        >>> torch_sum_f32(np.arange(10, dtype=np.float32))
        np.float32(45.0)
    """
    x64 = decode(np.asarray(x, np.float32).reshape(-1))
    return encode(_sum64(x64, num_threads, vec_width)).view(np.float32)[()]


def torch_mean_f32(
    x: np.ndarray, *, num_threads: int | None = None, vec_width: int = VEC_WIDTH
) -> np.float32:
    """``torch.mean`` of a float32 vector on the CPU: ``fl32(torch_sum_f32(x) / n)``.

    Exact also where float32 subnormals occur, and also inside XLA's flush-to-zero threads (``_host_f32``).

    Example:
        >>> torch_mean_f32(np.array([1.0, 2.0], np.float32))
        np.float32(1.5)
    """
    return mean_bits(x, num_threads=num_threads, vec_width=vec_width).view(np.float32)[()]


def mean_bits(x: np.ndarray, *, num_threads: int | None = None, vec_width: int = VEC_WIDTH) -> np.ndarray:
    """The float32 bits (uint32 scalar array) of ``torch_mean_f32(x)``; FTZ-safe to pass across callbacks."""
    x64 = decode(np.asarray(x, np.float32).reshape(-1))
    if x64.size == 0:
        raise ValueError(
            "torch_mean_f32 needs at least one value (the mean of an empty tensor is NaN in torch)"
        )
    return encode(r32(_sum64(x64, num_threads, vec_width) / x64.size))
