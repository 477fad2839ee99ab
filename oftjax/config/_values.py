"""Checks of single ``OFTConfig`` values (each names its field: configs come from untrusted files) and
PEFT's version rule."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from oftjax.config._patterns import PatternError, compile_pattern


def parse_version(version: str) -> tuple[tuple[int, ...], bool]:
    """``(release, is_final)`` of a PEP 440-ish version; drops PEFT's ``@commit`` suffix."""
    text = version.partition("@")[0].strip()
    match = re.match(r"v?(\d+(?:\.\d+)*)(.*)$", text)
    if match is None:
        raise ValueError(f"OFTConfig: cannot parse peft_version {version!r}; expected e.g. '0.21.2'")
    release = tuple(int(p) for p in match.group(1).split("."))
    release = release + (0,) * (3 - len(release))
    return release, match.group(2) == ""


def is_before_018(version: str) -> bool:
    # The series changed in 0.18.0 (docs/peft-oft.md, "Versions of the OFT parameterization"). A 0.18 dev
    # build already writes peft_version (added in the 0.18 cycle), so only the release number decides.
    return parse_version(version)[0] < (0, 18, 0)


def str_collection(name: str, value: Any) -> str | frozenset[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise TypeError(f"OFTConfig.{name}: expected module names (str); got {bad!r}")
        return frozenset(items)
    raise TypeError(f"OFTConfig.{name}: expected None, a regex string or a list of names; got {value!r}")


def checked_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"OFTConfig.{name}: expected an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"OFTConfig.{name}: must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"OFTConfig.{name}: must be <= {maximum}; got {value}")
    return value


def check_pattern(name: str, pattern: str) -> None:
    try:
        compile_pattern(pattern)
    except PatternError as e:
        raise ValueError(f"OFTConfig.{name}: pattern {pattern!r:.200}: {e}") from None


def save_pattern(module: str) -> str:
    """PEFT's pattern for a ``modules_to_save`` entry (matched as ``re.match`` matches it)."""
    return rf"(^|.*\.){module}($|\..*)"


PLAIN_NAME = re.compile(r"[\w.\-]+")
