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

# Modules other engineers are still rewriting: their examples are not checked here until they are done (the
# lead empties this tuple then). A module in ALREADY_RUNNING runs even though it sits below one of these.
NOT_YET = (
    "oftjax.nn",
    "oftjax.quant",
    "oftjax.oft",
    "oftjax.models",
    "oftjax.train",
    "oftjax.cli",
    "oftjax.surgery",
    "oftjax.merging",
)
# Examples that already ran before this file covered every module (tests/oft/test_docstrings.py's list).
ALREADY_RUNNING = (
    "oftjax.oft._skew",
    "oftjax.oft._cayley",
    "oftjax.oft._coft",
    "oftjax.oft._blocks",
    "oftjax.oft._adjust",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _not_yet(name: str) -> bool:
    return name not in ALREADY_RUNNING and any(name == p or name.startswith(p + ".") for p in NOT_YET)


MODULES = sorted(
    name
    for pkg in PACKAGES
    for path in (ROOT / pkg).rglob("*.py")
    if "__pycache__" not in path.parts and not _not_yet(name := _module_name(path))
)


@pytest.mark.parametrize("name", MODULES, ids=MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see stdout)"


def test_the_modules_are_found():
    assert {"interop.bnb", "interop.hf", "interop.peft", "oftjax.config", *ALREADY_RUNNING} <= set(MODULES)
    assert not any(_not_yet(m) for m in MODULES)
