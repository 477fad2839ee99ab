"""Named operations with a pure-JAX default and an optional replacement: the one seam for faster kernels.

A handful of the library's inner computations are *named operations*: the function that computes them is
decorated with ``@operation("name")``. Called normally it runs its own body, pure JAX, so every JAX
transformation works on every backend. A kernel package (today ``oftjax.cpu_kernels``) may ``install`` a
replacement per name; the replacement takes the same arguments and returns the same result, or
``NotImplemented`` to hand a call it does not cover (a dtype, a block size, a machine without the
instruction set) back to the default. Replacements are looked up when JAX traces the call; whoever installs
or removes them clears JAX's caches so that jitted functions trace again.

This module imports nothing from the library: the pure core (``oftjax.oft``, ``oftjax.quant``) and the layers
above it may all declare operations here.

Example:
    >>> @operation("doctest_square")
    ... def square(x):
    ...     return x * x
    >>> square(3)
    9
    >>> previous = install({"doctest_square": lambda x: NotImplemented if x < 0 else x**2 + 0.5})
    >>> square(3), square(-3)
    (9.5, 9)
    >>> _ = install(previous, replace=True)
    >>> square(3)
    9
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["current", "default", "install", "installed", "names", "operation"]

_defaults: dict[str, Callable[..., Any]] = {}
_installed: dict[str, Callable[..., Any]] = {}


def operation(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``fn`` as the default implementation of the named operation ``name``.

    The decorated function calls the installed replacement for ``name`` when there is one (and it does not
    return ``NotImplemented``), else ``fn``. ``fn`` itself stays reachable as ``.default``.
    """

    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        known = _defaults.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
            where = f"{known.__module__}.{known.__qualname__}"
            raise ValueError(f"operation {name!r} is already declared by {where}")
        _defaults[name] = fn

        @functools.wraps(fn)
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            impl = _installed.get(name)
            if impl is not None:
                out = impl(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            return fn(*args, **kwargs)

        dispatch.default = fn  # type: ignore[attr-defined]
        dispatch.operation_name = name  # type: ignore[attr-defined]
        return dispatch

    return declare


def default(name: str) -> Callable[..., Any]:
    """The pure-JAX default of operation ``name`` (KeyError naming the known operations if undeclared)."""
    try:
        return _defaults[name]
    except KeyError:
        raise KeyError(f"no operation {name!r}; declared: {sorted(_defaults)}") from None


def install(
    impls: Mapping[str, Callable[..., Any]], *, replace: bool = False
) -> dict[str, Callable[..., Any]]:
    """Install replacements by operation name; return what was installed before (to restore it).

    Args:
      impls: operation name -> replacement. Every name must be a declared operation.
      replace: drop every current replacement first (restoring a saved set), instead of adding to them.

    Callers must clear JAX's caches (``jax.clear_caches()``) afterwards: functions jitted before still hold
    the implementation they were traced with.
    """
    unknown = sorted(set(impls) - set(_defaults))
    if unknown:
        raise KeyError(f"no operation(s) {unknown}; declared: {sorted(_defaults)}")
    previous = dict(_installed)
    if replace:
        _installed.clear()
    _installed.update(impls)
    return previous


def current() -> dict[str, Callable[..., Any]]:
    """The installed replacements (a copy), to restore later with ``install(saved, replace=True)``."""
    return dict(_installed)


def installed() -> tuple[str, ...]:
    """Names of the operations that have a replacement installed now."""
    return tuple(sorted(_installed))


def names() -> tuple[str, ...]:
    """Names of all declared operations."""
    return tuple(sorted(_defaults))
