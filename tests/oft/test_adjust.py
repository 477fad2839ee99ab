"""PEFT's r / block-size adjustment rule and its warning text."""

import re
import warnings

import pytest

from oftjax.oft import adjust_oft_parameters, resolve_block_size


@pytest.mark.parametrize(
    "d,p,expected",
    [
        (64, 24, 16),
        (64, 32, 32),
        (64, 100, 64),
        (64, 64, 64),
        (10, 3, 2),
        (10, 4, 5),
        (7, 3, 1),
        (12, 5, 4),
        (1, 1, 1),
    ],
    ids=lambda v: str(v),
)
def test_adjust_rule(d, p, expected):
    assert adjust_oft_parameters(d, p) == expected


def test_resolve_block_size_valid_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_block_size(64, 0, 16) == (4, 16)
        assert resolve_block_size(10, 2, 0) == (2, 5)


def test_resolve_block_size_warns_with_peft_text():
    with pytest.warns(
        UserWarning, match=re.escape("Invalid `oft_block_size` (24)! Adjusted `oft_block_size` to (16).")
    ):
        assert resolve_block_size(64, 0, 24) == (4, 16)
    with pytest.warns(UserWarning, match=re.escape("Invalid `r` (3)! Adjusted `r` to (2).")):
        assert resolve_block_size(10, 3, 0) == (2, 5)
    with pytest.warns(
        UserWarning, match=re.escape("Invalid `oft_block_size` (32)! Adjusted `oft_block_size` to (10).")
    ):
        assert resolve_block_size(10, 0, 32) == (1, 10)


@pytest.mark.parametrize("r,b", [(0, 0), (2, 16)], ids=["neither", "both"])
def test_resolve_block_size_needs_exactly_one(r, b):
    with pytest.raises(ValueError, match="exactly one of r"):
        resolve_block_size(64, r, b)
