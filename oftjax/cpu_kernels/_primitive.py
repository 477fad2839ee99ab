"""Operations with a C++ CPU kernel as JAX primitives: the kernel when lowered for the CPU, JAX elsewhere.

A ``KernelOp`` is built from a pure-JAX formulation ``xla`` and a CPU formulation ``cpu`` (JAX code around
``jax.ffi.ffi_call``) computing the same outputs, and optionally a CPU backward kernel ``cpu_bwd``. It defines
up to three primitives:

* ``fwd(*operands) -> outputs``: the operation. Lowered with ``cpu`` for the ``cpu`` platform and with
  ``xla`` for every other platform, so the choice follows the platform a computation is compiled for, not
  the host. ``outputs`` are the ``num_results`` results, then any residuals ``cpu_bwd`` reads (the
  attention kernel's log-sum-exp); ``xla`` may return placeholders for those, since only ``cpu_bwd`` reads
  them.
* ``lin(*operands, *residuals, *tangents) -> result tangents``: the JVP's tangent map, linear in the tangents
  of the differentiable operands ``diff``. Evaluated (forward-mode AD) with ``jax.jvp`` of ``xla`` on every
  platform; *transposed* (reverse-mode AD) into ``bwd``.
* ``bwd(*operands, *residuals, *cotangents) -> cotangents of diff operands``: lowered with ``cpu_bwd`` for the
  ``cpu`` platform and with ``jax.vjp`` of ``xla`` elsewhere.

So ``jax.grad`` runs the forward and backward kernels, ``jax.jvp`` runs the forward kernel and the pure-JAX
tangent, and everything else — ``vmap`` (``xla`` vectorized), higher-order derivatives (``jax.jvp`` of the
primitives' pure-JAX formulations), ``jit``, ``remat``, sharding — works as for any JAX code. Without
``cpu_bwd`` (the dequantize kernels) the JVP is ``xla``'s and ``lin``/``bwd`` are not defined. This is the
pattern of JAX's own primitives ("How JAX primitives work" in the JAX docs): a primitive per function, with
abstract evaluation, lowering, JVP, transpose and batching rules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["KernelOp"]


def _structs(avals: Sequence[Any]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]


def _define(
    name: str, default: Callable[..., Sequence[jax.Array]], cpu: Callable[..., Sequence[jax.Array]] | None
) -> Primitive:
    """A multiple-result primitive lowered with ``cpu`` on the CPU (when given) and ``default`` elsewhere,
    with abstract evaluation, eager execution, a JVP and a batching rule taken from ``default``."""
    p = Primitive(name)
    p.multiple_results = True

    def abstract(*avals: Any, **params: Any) -> list[Any]:
        out = jax.eval_shape(functools.partial(default, **params), *_structs(avals))
        return [jax.core.ShapedArray(o.shape, o.dtype) for o in out]

    p.def_abstract_eval(abstract)
    p.def_impl(functools.partial(_apply_jitted, p))
    mlir.register_lowering(p, mlir.lower_fun(default, multiple_results=True))
    if cpu is not None:
        mlir.register_lowering(p, mlir.lower_fun(cpu, multiple_results=True), platform="cpu")
    ad.primitive_jvps[p] = functools.partial(_default_jvp, p, default)
    batching.primitive_batchers[p] = functools.partial(_default_batch, default)
    return p


@functools.cache
def _jitted(p: Primitive, params: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    return jax.jit(functools.partial(p.bind, **dict(params)))


def _apply_jitted(p: Primitive, *args: Any, **params: Any) -> Any:
    # Eager calls compile the primitive alone, once per set of static parameters (and shapes, by jit).
    return _jitted(p, tuple(sorted(params.items())))(*args)


def _default_jvp(p: Primitive, default: Callable, primals: Sequence, tangents: Sequence, **params: Any):
    """The primitive's value, with tangents computed by ``jax.jvp`` of its pure-JAX formulation."""
    out = p.bind(*primals, **params)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, t_out = jax.jvp(functools.partial(default, **params), tuple(primals), tuple(tangents))
    return out, list(t_out)


def _default_batch(default: Callable, args: Sequence, dims: Sequence, **params: Any):
    """``vmap`` rule: the pure-JAX formulation, vectorized (kernels run unbatched calls only)."""
    in_axes = tuple(dims)  # None: not mapped
    out = jax.vmap(functools.partial(default, **params), in_axes=in_axes)(*args)
    return list(out), [0] * len(out)


class KernelOp:
    """A differentiable operation with a CPU kernel (see the module docstring).

    Args:
      name: the primitives' base name.
      xla: ``(*operands, **params) -> tuple of outputs``, pure JAX: the formulation for other platforms,
        forward-mode AD, batching and shapes.
      cpu: the same function for the CPU platform (``jax.ffi.ffi_call`` of the kernel).
      num_results: how many leading outputs are the operation's results (the rest are residuals).
      diff: indices of the operands that carry derivatives through ``cpu_bwd``.
      cpu_bwd: ``(*operands, *residuals, *result cotangents, **params) -> cotangents of the diff operands``
        on the CPU, or None (derivatives then come from ``xla`` alone).
    """

    def __init__(
        self,
        name: str,
        *,
        xla: Callable[..., tuple[jax.Array, ...]],
        cpu: Callable[..., tuple[jax.Array, ...]],
        num_results: int,
        diff: tuple[int, ...] = (),
        cpu_bwd: Callable[..., tuple[jax.Array, ...]] | None = None,
    ):
        self.name, self.xla, self.num_results, self.diff = name, xla, num_results, tuple(diff)
        self.fwd = _define(name, xla, cpu)
        if cpu_bwd is None:
            return
        self.lin = _define(f"{name}_jvp", self._lin_xla, None)
        self.bwd = _define(f"{name}_vjp", self._bwd_xla, lambda *a, num_operands, **p: cpu_bwd(*a, **p))
        ad.primitive_jvps[self.fwd] = self._fwd_jvp
        ad.primitive_transposes[self.lin] = self._lin_transpose

    def __call__(self, *operands: jax.Array, **params: Any) -> list[jax.Array]:
        """The operation's results (residual outputs dropped)."""
        return self.fwd.bind(*operands, **params)[: self.num_results]

    # --- pure-JAX formulations of the tangent map and the backward, from ``xla``

    def _results_of_diff(self, operands: Sequence[jax.Array], params: dict[str, Any]) -> Callable:
        """``f(*diff operands) -> results`` with the other operands fixed."""

        def f(*d: jax.Array) -> tuple[jax.Array, ...]:
            full = list(operands)
            for i, v in zip(self.diff, d, strict=True):
                full[i] = v
            return tuple(self.xla(*full, **params)[: self.num_results])

        return f

    def _lin_xla(self, *args: jax.Array, num_operands: int, **params: Any) -> tuple[jax.Array, ...]:
        operands, tangents = args[:num_operands], args[len(args) - len(self.diff) :]
        f = self._results_of_diff(operands, params)
        return jax.jvp(f, tuple(operands[i] for i in self.diff), tuple(tangents))[1]

    def _bwd_xla(self, *args: jax.Array, num_operands: int, **params: Any) -> tuple[jax.Array, ...]:
        operands, cts = args[:num_operands], args[len(args) - self.num_results :]
        f = self._results_of_diff(operands, params)
        _, pullback = jax.vjp(f, *(operands[i] for i in self.diff))
        return pullback(tuple(cts))

    # --- rules

    def _fwd_jvp(self, primals: Sequence, tangents: Sequence, **params: Any):
        out = self.fwd.bind(*primals, **params)
        others_move = any(type(t) is not ad.Zero for i, t in enumerate(tangents) if i not in self.diff)
        residual_zeros = [ad.Zero(jax.typeof(r).to_tangent_aval()) for r in out[self.num_results :]]
        if others_move:  # a tangent the kernels do not differentiate: the pure-JAX JVP for all of them
            _, t = _default_jvp(self.fwd, self.xla, primals, tangents, **params)
            return out, [*t[: self.num_results], *residual_zeros]
        d_tangents = [ad.instantiate_zeros(tangents[i]) for i in self.diff]
        residuals = out[self.num_results :]
        t = self.lin.bind(*primals, *residuals, *d_tangents, num_operands=len(primals), **params)
        return out, [*t, *residual_zeros]

    def _lin_transpose(self, cts: Sequence, *args: Any, num_operands: int, **params: Any):
        n_known = len(args) - len(self.diff)
        known, tangents = args[:n_known], args[n_known:]
        if any(isinstance(a, ad.UndefinedPrimal) for a in known):
            raise ValueError(f"{self.name}: the tangent map is linear only in the tangents")
        if all(type(ct) is ad.Zero for ct in cts):
            return [None] * len(args)
        cts = [ad.instantiate_zeros(ct) for ct in cts]
        grads = self.bwd.bind(*known, *cts, num_operands=num_operands, **params)
        out = [g if isinstance(t, ad.UndefinedPrimal) else None for g, t in zip(grads, tangents, strict=True)]
        return [None] * n_known + out
