"""The seam between the pure-JAX defaults and the CPU kernels: ``oftjax._registry``, ``oftjax.cpu_kernels``.

* Importing the library loads no kernel library; ``enable()`` loads them (the process's memory maps say so).
* ``enable``/``disable``/``enabled``/``info``, and ``with enable():`` restoring what it found (nested, and
  when the block raises); enabling clears JAX's caches, so a function jitted before runs the kernels after.
* The platform a computation is lowered for chooses the kernels, not the host; calls the kernels do not cover
  keep the default while enabled; the registry refuses unknown names and a second declaration.
* Every JAX transformation works through the kernel primitives and agrees with the default: ``grad`` (the
  backward kernels), ``jvp`` (forward kernel, pure-JAX tangent), ``vmap`` and ``hessian`` (pure JAX),
  forward-over-reverse and ``checkpoint``; the dequantize kernel's JVP in the statistics is the default's.
"""

import ast
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from oftjax import _registry, cpu_kernels, oft, quant
from oftjax.cpu_kernels import _attention, _dequant, _library, _matmul4, _rotate, _swiglu
from oftjax.models._attention import causal_attention
from oftjax.models._layers import swiglu
from tests.cpu_kernels._helpers import BUILT_HERE, assert_trees_close, lowered, skip_without_avx512

OPERATIONS = (
    "causal_attention",
    "cayley_neumann_blocks",
    "dequant_matmul_4bit",
    "dequantize_4bit",
    "dequantize_rotate",
    "rotate_blocks",
    "swiglu",
)
LIBRARIES = {
    "rotation": _rotate,
    "dequantize": _dequant,
    "attention": _attention,
    "swiglu": _swiglu,
    "matmul4": _matmul4,
}

# the operations whose library loads here: all of them where CI runs
LOADED = tuple(sorted(o for m in LIBRARIES.values() if m.LIBRARY.load()[0] is not None for o in m.OPERATIONS))
kernels_run = skip_without_avx512(_rotate.supports(32, np.float32), "the other test files")


def test_every_operation_has_its_library_where_ci_runs():
    assert set(LOADED) <= set(OPERATIONS)
    if BUILT_HERE:
        assert LOADED == OPERATIONS, cpu_kernels.info()


# --- loading ------------------------------------------------------------------------------------------------

_MAPS = """
import os, oftjax, oftjax.nn, oftjax.models, oftjax.cpu_kernels
package = os.path.dirname(oftjax.__file__)
def mapped():
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if package in line and ".so" in line})
print(repr((oftjax.cpu_kernels.enabled(), mapped())))
oftjax.cpu_kernels.enable()
print(repr((oftjax.cpu_kernels.enabled(), mapped())))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_import_maps_no_kernel_library_and_enable_maps_them():
    out = subprocess.run([sys.executable, "-c", _MAPS], capture_output=True, text=True, check=True).stdout
    (on_import, at_import), (on_enable, at_enable) = map(ast.literal_eval, out.splitlines()[-2:])
    assert (on_import, at_import) == (False, [])
    libraries = sorted(str(_library.library_path(m.LIBRARY.stem)) for m in LIBRARIES.values())
    assert on_enable and (at_enable == libraries or not BUILT_HERE), (at_enable, libraries)


# --- enable, disable, enabled, info -------------------------------------------------------------------------


def _state():
    return cpu_kernels.enabled(), cpu_kernels.info()["enabled"], _registry.installed()


def test_enable_and_disable_install_and_remove_every_operation():
    assert _state() == (False, False, ())
    try:
        assert isinstance(cpu_kernels.enable(), type(cpu_kernels.disable()))
        cpu_kernels.enable()
        cpu_kernels.enable()  # twice is once
        assert _state() == (True, True, LOADED)
        assert cpu_kernels.info()["operations"] == list(LOADED)
    finally:
        cpu_kernels.disable()
    assert _state() == (False, False, ())
    cpu_kernels.disable()  # disabling when disabled is harmless
    assert _state() == (False, False, ())


def test_info_says_what_runs_here():
    info = cpu_kernels.info()
    assert set(info) == {"enabled", "operations", *LIBRARIES}
    for name, module in LIBRARIES.items():
        entry = info[name]
        assert {"available", "library", "reason"} <= set(entry)
        assert entry["available"] == (module.LIBRARY.load()[0] is not None)
        if BUILT_HERE:
            assert entry["available"] and entry["reason"] == "loaded", entry
            assert entry["library"] == str(_library.library_path(module.LIBRARY.stem))
    assert info["rotation"]["block_sizes"] == [b for b in range(1, 257) if _rotate.supports(b, np.float32)]
    assert info["attention"]["head_dims"] == [d for d in range(1, 257) if _attention.supports(d, np.float32)]
    assert info["swiglu"]["runs"] == _swiglu.supports(np.float32)
    assert info["dequantize"]["avx512"] == _dequant.has_avx512()


def test_with_enable_restores_what_it_found():
    with cpu_kernels.enable() as restore:
        assert restore is not None and _state() == (True, True, LOADED)
        with cpu_kernels.disable():
            assert _state() == (False, False, ())
            with cpu_kernels.enable():
                assert cpu_kernels.enabled()
            assert not cpu_kernels.enabled()
        assert cpu_kernels.enabled()
        with cpu_kernels.enable():  # already enabled: still enabled after
            pass
        assert cpu_kernels.enabled()
    assert _state() == (False, False, ())
    try:
        cpu_kernels.enable()  # enabled globally: a with-block inside leaves it so
        with cpu_kernels.disable():
            assert not cpu_kernels.enabled()
        assert cpu_kernels.enabled()
    finally:
        cpu_kernels.disable()


def test_with_enable_restores_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_kernels.enable():
            assert cpu_kernels.enabled()
            raise RuntimeError("inside")
    assert _state() == (False, False, ())


@pytest.fixture
def scratch_registry(monkeypatch):
    """Declarations made by the test vanish with it."""
    monkeypatch.setattr(_registry, "_defaults", dict(_registry._defaults))


def test_disable_keeps_replacements_that_are_not_the_kernels(scratch_registry):
    @_registry.operation("scratch_double")
    def double(x):
        return 2 * x

    previous = _registry.install({"scratch_double": lambda x: NotImplemented if x < 0 else 3 * x})
    try:
        assert (double(2), double(-2)) == (6, -4)  # NotImplemented hands the call back to the default
        assert not cpu_kernels.enabled()
        with cpu_kernels.enable():
            assert set(_registry.installed()) == {*LOADED, "scratch_double"}
            cpu_kernels.disable()
            assert _registry.installed() == ("scratch_double",)
        assert _registry.installed() == ("scratch_double",)
    finally:
        _registry.install(previous, replace=True)
    assert double(2) == 4 and double.default is not double and double.operation_name == "scratch_double"


def test_registry_refuses_unknown_names_and_a_second_declaration(scratch_registry):
    with pytest.raises(KeyError, match=r"no operation\(s\) \['nope'\]; declared: \[.*'rotate_blocks'"):
        _registry.install({"nope": lambda: None, "swiglu": lambda g, u: NotImplemented})
    assert _registry.installed() == ()  # nothing of a refused set is installed
    with pytest.raises(KeyError, match="no operation 'nope'"):
        _registry.default("nope")
    declared = "'rotate_blocks' is already declared by oftjax.oft._blocks.rotate_blocks"
    with pytest.raises(ValueError, match=declared):

        @_registry.operation("rotate_blocks")
        def rotate_blocks(x, R, precision=None):
            return x

    assert _registry.default("rotate_blocks") is oft.rotate_blocks.default
    assert set(OPERATIONS) <= set(_registry.names())


def _subnormal_weight():
    # code 15 (1.0) times a subnormal absmax: the kernel keeps the product, XLA:CPU flushes it to zero
    packed = jnp.full((32, 1), 0xFF, jnp.uint8)
    return quant.FourBitWeight(packed, jnp.asarray([1e-39], jnp.float32), shape=(64,), blocksize=64)


@kernels_run
def test_a_function_jitted_before_enable_runs_the_kernel_after_it():
    q = _subnormal_weight()
    f = jax.jit(lambda q: quant.dequantize(q, jnp.float32))
    x, R = jnp.ones((4, 64), jnp.float32), jnp.ones((2, 32, 32), jnp.float32)
    g = jax.jit(oft.rotate_blocks)
    flushed, kept = np.zeros(64, np.float32), np.full(64, np.float32(1e-39))
    np.testing.assert_array_equal(np.asarray(f(q)), flushed)
    g(x, R)
    try:
        cpu_kernels.enable()
        np.testing.assert_array_equal(np.asarray(f(q)), kept)  # traced again: the cache was cleared
        assert "@oftjax_rotate(" in g.lower(x, R).as_text()
        g(x, R)
    finally:
        cpu_kernels.disable()
    np.testing.assert_array_equal(np.asarray(f(q)), flushed)
    assert "oftjax_" not in g.lower(x, R).as_text()


@kernels_run
def test_the_lowering_platform_chooses_the_kernel_not_the_host():
    # exported for a GPU or TPU (no such device needed) a function holds no kernel call; for the CPU it does
    x, R = jnp.ones((8, 64), jnp.float32), jnp.ones((2, 32, 32), jnp.float32)
    f = jax.jit(jax.value_and_grad(lambda x, R: jnp.sum(jnp.sin(oft.rotate_blocks(x, R))), (0, 1)))
    targets = ("oftjax_rotate", "oftjax_rotate_grad")
    # our targets carry no stability promise, which export checks for
    unchecked = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    with cpu_kernels.enable():
        for platform in ("cuda", "rocm", "tpu"):
            assert "oftjax_" not in export.export(f, platforms=[platform])(x, R).mlir_module(), platform
        text = export.export(f, platforms=["cpu", "cuda"], disabled_checks=unchecked)(x, R).mlir_module()
    assert text.count("@oftjax_rotate(") == text.count("@oftjax_rotate_grad(") == 1


def _unsupported_calls():
    rng = np.random.default_rng(0)

    def arr(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    bf16 = jnp.bfloat16
    highest = lambda x, R: oft.rotate_input(x, R, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    attend = lambda q, k, v: causal_attention(q, k, v, None, None, scale=0.2)  # noqa: E731
    return {
        "rotate-bf16": (oft.rotate_blocks, (arr(4, 64, dtype=bf16), arr(2, 32, 32, dtype=bf16))),
        "rotate-b8": (oft.rotate_blocks, (arr(4, 64), arr(8, 8, 8))),
        "rotate-highest": (highest, (arr(4, 64), arr(2, 32, 32))),
        "series-b8": (lambda v: oft.cayley_neumann_blocks(v, 8, 5, False), (arr(3, 28),)),
        "series-bf16": (lambda v: oft.cayley_neumann_blocks(v, 16, 5, False), (arr(3, 120, dtype=bf16),)),
        "attention-d24": (attend, (arr(1, 8, 2, 24), arr(1, 8, 1, 24), arr(1, 8, 1, 24))),
        "attention-bf16": (attend, tuple(arr(1, 8, h, 16, dtype=jnp.bfloat16) for h in (2, 1, 1))),
        "swiglu-bf16": (swiglu, (arr(4, 8, dtype=jnp.bfloat16), arr(4, 8, dtype=jnp.bfloat16))),
        "swiglu-broadcast": (swiglu, (arr(4, 8), arr(1, 8))),
    }


@pytest.mark.parametrize("case", list(_unsupported_calls()))
def test_calls_the_kernels_do_not_cover_keep_the_default(case):
    f, args = _unsupported_calls()[case]
    expected = jax.jit(f)(*args)
    with cpu_kernels.enable():
        assert "oftjax_" not in lowered(f, *args)
        got = jax.jit(f)(*args)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


# --- every transformation through the kernel primitives -----------------------------------------------------


def _rope(s, d):
    ang = np.arange(s)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([ang, ang], axis=-1)[None]
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def _kernel_ops():
    """name -> (operation with array arguments, arguments, TOL key of its kernel tests, its FFI targets)."""
    rng = np.random.default_rng(1)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    cos, sin = _rope(5, 16)
    qkv = (arr(1, 5, 2, 16), arr(1, 5, 1, 16), arr(1, 5, 1, 16))
    return {
        "rotate": (oft.rotate_blocks, (arr(3, 32), arr(2, 16, 16, scale=0.3)), "native_rotate", "rotate"),
        "series": (
            lambda v: oft.cayley_neumann_blocks(v, 16, 5, False),
            (arr(1, 120, scale=0.1),),
            "native_cayley",
            "cayley_neumann",
        ),
        "attention": (
            lambda q, k, v: causal_attention(q, k, v, cos, sin, scale=0.25),
            qkv,
            "native_attention",
            "attention",
        ),
        "swiglu": (swiglu, (arr(4, 8), arr(4, 8)), "swiglu", "swiglu"),
    }


def _scalar(op, weight):
    return lambda *a: jnp.sum(jnp.sin(op(*a)) * weight)


def _transformations(op, args):
    """name -> (function of args, whether its lowering calls the forward kernel, and the backward kernel).

    Reverse mode runs the backward kernel, forward mode the forward kernel with the pure-JAX tangent;
    ``vmap`` batches the pure-JAX formulation; ``jax.hessian`` (forward over reverse, the tangents batched)
    evaluates the primal unbatched with the forward kernel and the rest in pure JAX.
    """
    out_shape = jax.eval_shape(op, *args).shape
    f = _scalar(op, jnp.asarray(np.random.default_rng(2).standard_normal(out_shape), jnp.float32))
    every = tuple(range(len(args)))
    tangents = tuple(0.5 * a + 0.25 for a in args)
    vmapped = jax.vmap(op, in_axes=(0,) + (None,) * (len(args) - 1))
    return {
        "grad": (jax.grad(f, every), True, True),
        "jvp": (lambda *a: jax.jvp(op, a, tangents), True, False),
        "vmap": (lambda a0, *rest: vmapped(jnp.stack([a0, -2 * a0]), *rest), False, False),
        "hessian": (jax.hessian(f), True, False),
        "jvp-of-grad": (lambda *a: jax.jvp(jax.grad(f), a, tangents), True, True),
        "checkpoint": (jax.grad(jax.checkpoint(f), every), True, True),
    }


@kernels_run
@pytest.mark.parametrize("transformation", ["grad", "jvp", "vmap", "hessian", "jvp-of-grad", "checkpoint"])
@pytest.mark.parametrize("name", ["rotate", "series", "attention", "swiglu"])
def test_every_transformation_agrees_with_the_default(name, transformation):
    op, args, tol_key, target = _kernel_ops()[name]
    fn, forward, backward = _transformations(op, args)[transformation]
    expected = jax.jit(fn)(*args)
    with cpu_kernels.enable():
        text = lowered(fn, *args)
        got = jax.jit(fn)(*args)
    assert (f"@oftjax_{target}(" in text, f"@oftjax_{target}_grad(" in text) == (forward, backward)
    assert_trees_close(got, expected, tol_key)


def _quantized(nested):
    w = jnp.asarray(np.random.default_rng(3).standard_normal((64, 96)) * 0.05, jnp.float32)
    return quant.quantize_4bit(w, "nf4", 64, nested)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_dequantize_jvp_in_the_statistics_is_the_defaults(nested):
    q = _quantized(nested)
    fields = ("nested_absmax", "offset") if nested else ("absmax",)
    primals = tuple(getattr(q, k) for k in fields)
    tangents = tuple(jnp.linspace(-1.0, 1.0, p.size, dtype=jnp.float32).reshape(p.shape) for p in primals)

    def dequantize(*stats):
        return quant.dequantize(dataclasses.replace(q, **dict(zip(fields, stats, strict=True))), jnp.float32)

    fn = jax.jit(lambda *p: jax.jvp(dequantize, p, tangents))
    expected = fn(*primals)
    with cpu_kernels.enable():
        assert "@oftjax_dequant4" in fn.lower(*primals).as_text()
        got = fn(*primals)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
