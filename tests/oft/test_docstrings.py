"""The docstring examples of oftjax.oft and oftjax.config run and are right."""

import doctest
import importlib

import pytest

MODULES = [
    "oftjax.oft._skew",
    "oftjax.oft._cayley",
    "oftjax.oft._coft",
    "oftjax.oft._blocks",
    "oftjax.oft._adjust",
    "oftjax.config",
]


@pytest.mark.parametrize("name", MODULES, ids=MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
