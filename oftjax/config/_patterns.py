"""Regular expressions from adapter files, matched in time linear in the module path (never a hang).

PEFT matches a string ``target_modules`` (and ``exclude_modules``, ``modules_to_save``) with Python's
``re``, a backtracking engine: ``(.*)*Z`` takes exponential time on a module path without a ``Z``, so one
field of an untrusted ``adapter_config.json`` can stop the loader forever. Here a pattern is parsed by
Python's own parser (the same syntax and the same ``re.error`` messages) and run as a Thompson NFA: the set of
reachable states advances one character at a time, ``O(len(path) * len(program))`` whatever the pattern. It
answers exactly the question ``re.fullmatch`` / ``re.match`` answer (does some way of matching exist), so the
result is PEFT's. Constructs that are not regular (backreferences, lookaround, conditionals) or that depend
on backtracking order (possessive repeats, atomic groups) are refused with the pattern named; so are programs
beyond ``MAX_PROGRAM`` instructions (``(a{1000}){1000}``).

Reference: Russ Cox, "Regular Expression Matching Can Be Simple And Fast" (2007), Thompson's construction.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

__all__ = ["MAX_PROGRAM", "PatternError", "Pattern", "compile_pattern"]

MAX_PROGRAM = 20_000  # instructions of one compiled pattern

_CHAR, _SPLIT, _JUMP, _ASSERT, _MATCH = range(5)
_REFUSED = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "POSSESSIVE_REPEAT": "a possessive repeat",
    "ATOMIC_GROUP": "an atomic group",
}
_NEWLINE = "\n"


class PatternError(ValueError):
    """A pattern that is invalid, or that this linear-time matcher does not run (the message says why)."""


@dataclasses.dataclass
class _Ins:
    op: int
    test: Callable[[str], bool] | None = None  # _CHAR: does the character match
    at: Callable[[str, int], bool] | None = None  # _ASSERT: does the position satisfy it
    x: int = -1  # _SPLIT / _JUMP targets
    y: int = -1


def _is_word(c: str, ascii_only: bool) -> bool:
    return (c.isalnum() or c == "_") and (c.isascii() or not ascii_only)


def _category(cat: object, flags: int) -> Callable[[str], bool]:
    ascii_only = bool(flags & re.ASCII)
    tests: dict[object, Callable[[str], bool]] = {
        _c.CATEGORY_DIGIT: lambda c: c.isdecimal() and (c.isascii() or not ascii_only),
        _c.CATEGORY_NOT_DIGIT: lambda c: not (c.isdecimal() and (c.isascii() or not ascii_only)),
        _c.CATEGORY_SPACE: lambda c: c.isspace() and (c.isascii() or not ascii_only),
        _c.CATEGORY_NOT_SPACE: lambda c: not (c.isspace() and (c.isascii() or not ascii_only)),
        _c.CATEGORY_WORD: lambda c: _is_word(c, ascii_only),
        _c.CATEGORY_NOT_WORD: lambda c: not _is_word(c, ascii_only),
    }
    if cat not in tests:
        raise PatternError(f"character category {cat} is not supported")
    return tests[cat]


def _equals(ch: str) -> Callable[[str], bool]:
    return lambda c: c == ch


def _folded(test: Callable[[str], bool], flags: int) -> Callable[[str], bool]:
    """``test`` made case-insensitive (``re.IGNORECASE``): a character matches when one of its cases does."""
    if not flags & re.IGNORECASE:
        return test
    return lambda c: test(c) or test(c.lower()) or test(c.upper())


def _char_class(items: list, flags: int) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            tests.append(_equals(chr(av)))
        elif op is _c.RANGE:
            tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif op is _c.CATEGORY:
            tests.append(_category(av, flags))
        else:
            raise PatternError(f"{op} in a character class is not supported")
    test = _folded(lambda c: any(t(c) for t in tests), flags)
    return (lambda c: not test(c)) if negate else test


def _at(kind: object, flags: int) -> Callable[[str, int], bool]:
    """The position test of an anchor (``^ $ \\A \\Z \\b \\B``), with ``re``'s exact meaning."""
    multiline, ascii_only = bool(flags & re.MULTILINE), bool(flags & re.ASCII)

    def boundary(s: str, i: int) -> bool:
        before = i > 0 and _is_word(s[i - 1], ascii_only)
        after = i < len(s) and _is_word(s[i], ascii_only)
        return before != after

    tests: dict[object, Callable[[str, int], bool]] = {
        _c.AT_BEGINNING_STRING: lambda s, i: i == 0,
        _c.AT_END_STRING: lambda s, i: i == len(s),
        _c.AT_BOUNDARY: boundary,
        _c.AT_NON_BOUNDARY: lambda s, i: not boundary(s, i),
    }
    if multiline:
        tests[_c.AT_BEGINNING] = lambda s, i: i == 0 or s[i - 1] == _NEWLINE
        tests[_c.AT_END] = lambda s, i: i == len(s) or s[i] == _NEWLINE
    else:
        tests[_c.AT_BEGINNING] = lambda s, i: i == 0
        tests[_c.AT_END] = lambda s, i: i == len(s) or (i == len(s) - 1 and s[i] == _NEWLINE)
    if kind not in tests:
        raise PatternError(f"anchor {kind} is not supported")
    return tests[kind]


class _Compiler:
    """Parsed ``re`` items -> a list of ``_Ins`` (Thompson's construction; splits prefer nothing)."""

    def __init__(self) -> None:
        self.prog: list[_Ins] = []

    def add(self, ins: _Ins) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise PatternError(f"more than {MAX_PROGRAM} states once repeats are expanded")
        self.prog.append(ins)
        return len(self.prog) - 1

    def seq(self, items: list, flags: int) -> None:
        for op, av in items:
            self.item(op, av, flags)

    def item(self, op: object, av: object, flags: int) -> None:
        if op is _c.LITERAL:
            self.add(_Ins(_CHAR, _folded(_equals(chr(av)), flags)))
        elif op is _c.NOT_LITERAL:
            test = _folded(_equals(chr(av)), flags)
            self.add(_Ins(_CHAR, lambda c: not test(c)))
        elif op is _c.ANY:
            self.add(_Ins(_CHAR, (lambda c: True) if flags & re.DOTALL else (lambda c: c != _NEWLINE)))
        elif op is _c.IN:
            self.add(_Ins(_CHAR, _char_class(av, flags)))
        elif op is _c.AT:
            self.add(_Ins(_ASSERT, at=_at(av, flags)))
        elif op is _c.BRANCH:
            self.branch(av[1], flags)
        elif op is _c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            self.seq(sub, (flags | add_flags) & ~del_flags)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same language
            self.repeat(*av, flags)
        else:
            what = _REFUSED.get(str(op), str(op))
            raise PatternError(f"{what} cannot be matched without backtracking; write the pattern without it")

    def branch(self, alternatives: list, flags: int) -> None:
        jumps = []
        for k, alt in enumerate(alternatives):
            if k < len(alternatives) - 1:
                split = self.add(_Ins(_SPLIT))
                self.prog[split].x = len(self.prog)
                self.seq(alt, flags)
                jumps.append(self.add(_Ins(_JUMP)))
                self.prog[split].y = len(self.prog)
            else:
                self.seq(alt, flags)
        for j in jumps:
            self.prog[j].x = len(self.prog)

    def repeat(self, lo: int, hi: int, body: list, flags: int) -> None:
        for _ in range(lo):
            self.seq(body, flags)
        if hi == _c.MAXREPEAT:
            split = self.add(_Ins(_SPLIT))
            self.prog[split].x = len(self.prog)
            self.seq(body, flags)
            self.prog[self.add(_Ins(_JUMP))].x = split
            self.prog[split].y = len(self.prog)
            return
        splits = []
        for _ in range(hi - lo):
            splits.append(self.add(_Ins(_SPLIT)))
            self.prog[splits[-1]].x = len(self.prog)
            self.seq(body, flags)
        for s in splits:
            self.prog[s].y = len(self.prog)


class Pattern:
    """A compiled pattern: ``fullmatch(s)`` / ``match(s)`` answer as ``re.fullmatch`` / ``re.match`` do.

    Example:
        >>> p = compile_pattern("(.*)*Z")
        >>> p.fullmatch("a" * 10_000), p.fullmatch("a" * 10_000 + "Z")  # at once: no backtracking
        (False, True)
    """

    def __init__(self, pattern: str, prog: list[_Ins]):
        self.pattern = pattern
        self.prog = prog
        self._anchored = any(ins.op == _ASSERT for ins in prog)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def _closure(self, pcs: frozenset[int] | set[int], s: str, i: int) -> frozenset[int]:
        """The character-consuming and final states reachable from ``pcs`` without consuming input."""
        out, seen, stack = set(), set(), list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.prog[pc]
            if ins.op == _SPLIT:
                stack += (ins.x, ins.y)
            elif ins.op == _JUMP:
                stack.append(ins.x)
            elif ins.op == _ASSERT:
                if ins.at(s, i):
                    stack.append(pc + 1)
            else:
                out.add(pc)
        return frozenset(out)

    def _step(self, states: frozenset[int], s: str, i: int) -> frozenset[int]:
        c = s[i]
        key = (states, c)
        if not self._anchored and key in self._steps:
            return self._steps[key]
        moved = {pc + 1 for pc in states if self.prog[pc].op == _CHAR and self.prog[pc].test(c)}
        nxt = self._closure(moved, s, i + 1)
        if not self._anchored and len(self._steps) < 100_000:
            self._steps[key] = nxt  # without anchors the closure depends on the states alone
        return nxt

    def _run(self, s: str, prefix: bool) -> bool:
        final = len(self.prog) - 1
        states = self._closure({0}, s, 0)
        for i in range(len(s)):
            if prefix and final in states:
                return True
            states = self._step(states, s, i)
            if not states:
                return False
        return final in states

    def fullmatch(self, s: str) -> bool:
        return self._run(s, prefix=False)

    def match(self, s: str) -> bool:
        return self._run(s, prefix=True)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Pattern:
    """Parse ``pattern`` with Python's ``re`` parser and compile it to a linear-time matcher.

    Raises:
        PatternError: an invalid pattern (``re``'s message), or one this matcher refuses (see the module).
    """
    if not isinstance(pattern, str):
        raise PatternError(f"expected a string pattern, got {type(pattern).__name__}")
    try:
        parsed = _sre.parse(pattern)
    except re.error as e:
        raise PatternError(f"invalid regular expression ({e})") from None
    except RecursionError:
        raise PatternError("invalid regular expression (nested too deeply)") from None
    compiler = _Compiler()
    try:
        compiler.seq(list(parsed), parsed.state.flags)
    except RecursionError:
        raise PatternError("nested too deeply") from None
    compiler.add(_Ins(_MATCH))
    return Pattern(pattern, compiler.prog)
