"""The docstring examples of every module of ``oftjax`` and ``interop`` run and print what they show.

One test per module (found on disk, so a new module is covered without being listed here), with the standard
``doctest`` flags; an example that needs a file it cannot build is marked ``# doctest: +SKIP`` in place.
``python -m pytest --doctest-modules oftjax interop`` runs the same examples.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("oftjax", "interop")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(
    name
    for pkg in PACKAGES
    for path in (ROOT / pkg).rglob("*.py")
    # ``__main__`` modules run their program when imported
    if "__pycache__" not in path.parts and path.stem != "__main__" and (name := _module_name(path))
)


@pytest.mark.parametrize("name", MODULES, ids=MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see stdout)"


def test_the_modules_are_found():
    expected = {"interop.bnb", "interop.hf", "interop.peft", "oftjax.config", "oftjax.oft._blocks"}
    assert expected | {"oftjax.nn._forward", "oftjax.cpu_kernels", "oftjax._registry"} <= set(MODULES)
