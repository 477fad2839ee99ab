"""Shared builders for the nn / surgery / merge tests: random quantized weights and a compile counter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import monitoring

from oftjax import quant
from oftjax.nn import Linear4bit, Linear8bit

BASES = ("float", "int8", "nf4", "fp4", "nf4-dq")


def random_int8(out_f: int, in_f: int, seed: int = 0) -> quant.Int8Weight:
    rng = np.random.default_rng(seed)
    CB = rng.integers(-127, 128, size=(out_f, in_f), dtype=np.int8)
    SCB = rng.uniform(0.5, 2.0, size=(out_f,)).astype(np.float16).astype(np.float32)
    return quant.Int8Weight(jnp.asarray(CB), jnp.asarray(SCB), dtype=np.dtype("float32"))


def random_4bit(out_f: int, in_f: int, quant_type: str, nested: bool, seed: int = 0) -> quant.FourBitWeight:
    rng = np.random.default_rng(seed)
    n, bs = out_f * in_f, 64
    nb = -(-n // bs)
    packed = rng.integers(0, 256, size=((n + 1) // 2, 1), dtype=np.uint8)
    if nested:
        absmax = rng.integers(0, 256, size=(nb,), dtype=np.uint8)
        nested_absmax = rng.uniform(0.05, 0.1, size=(-(-nb // 256),)).astype(np.float32)
        offset = np.float32(0.1)
        return quant.FourBitWeight(
            jnp.asarray(packed), jnp.asarray(absmax), jnp.asarray(nested_absmax), jnp.asarray(offset),
            shape=(out_f, in_f), dtype=np.dtype("float32"), blocksize=bs, quant_type=quant_type,
        )  # fmt: skip
    absmax = rng.uniform(0.05, 0.2, size=(nb,)).astype(np.float32)
    return quant.FourBitWeight(
        jnp.asarray(packed), jnp.asarray(absmax),
        shape=(out_f, in_f), dtype=np.dtype("float32"), blocksize=bs, quant_type=quant_type,
    )  # fmt: skip


def make_base(kind: str, in_f: int, out_f: int, *, seed: int = 0, bias: bool = True) -> nnx.Module:
    """A frozen base layer of the given kind with random (fixed-seed) weights."""
    b = (
        jnp.asarray(np.random.default_rng(seed + 1).normal(size=(out_f,)).astype(np.float32))
        if bias
        else None
    )
    if kind == "float":
        layer = nnx.Linear(in_f, out_f, use_bias=bias, rngs=nnx.Rngs(seed))
        return layer
    if kind == "int8":
        return Linear8bit(random_int8(out_f, in_f, seed), b)
    quant_type, _, dq = kind.partition("-")
    return Linear4bit(random_4bit(out_f, in_f, quant_type, dq == "dq", seed), b)


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) inside ``counting()``, and executables the
    persistent compilation cache hands back instead (tests/conftest.py enables it): either is a compilation
    of the program."""

    def __init__(self) -> None:
        self.count = 0
        self._active = False
        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name: str, duration: float, **kwargs: object) -> None:
        if self._active and name in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",  # recorded once per cache hit
        ):
            self.count += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[CompileCounter]:
        self.count, self._active = 0, True
        try:
            yield self
        finally:
            self._active = False


COMPILES = CompileCounter()


def rand(shape: tuple[int, ...], seed: int = 0, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
