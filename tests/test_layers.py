"""The import layers: each package imports only layers below it; nothing below imports the application.

The layers, bottom up (docs/architecture.md, "Layers")::

    oft, quant                      pure numerics: nothing of oftjax but themselves (and _registry)
    nn                              oft, quant, config, _registry
    config, surgery, merging        the nn level: nn and what nn may import
    models                          nn, oft, quant, config, _registry
    generate                        the nn level and models
    train                           anything above, never the application
    interop                         anything above, never the command line
    the application                 oftjax.cli (with its allocator setting), oftjax.data, oftjax.default_job

Every module under ``oftjax/`` and ``interop/`` is parsed with ``ast`` (nothing is imported), and every
``import`` statement counts, at module level or inside a function. The cycle checks read the module-level
imports only (outside ``if TYPE_CHECKING:``): the ones that run when a module is first imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("oftjax", "interop")

APPLICATION = ("oftjax.cli", "oftjax.data", "oftjax.default_job")
_NN = ("oftjax.oft", "oftjax.quant", "oftjax._registry", "oftjax.nn", "oftjax.config")
_NN_LEVEL = (*_NN, "oftjax.surgery", "oftjax.merging")
# layer -> what its modules may import of oftjax and interop
ALLOWED: dict[str, tuple[str, ...]] = {
    "oftjax.oft": ("oftjax.oft", "oftjax._registry"),
    "oftjax.quant": ("oftjax.quant", "oftjax._registry"),
    "oftjax._registry": (),
    "oftjax.nn": _NN,
    "oftjax.config": _NN_LEVEL,
    "oftjax.surgery": _NN_LEVEL,
    "oftjax.merging": _NN_LEVEL,
    "oftjax.models": (*_NN, "oftjax.models"),
    "oftjax.generate": (*_NN_LEVEL, "oftjax.models", "oftjax.generate"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    _module_name(p): p
    for pkg in PACKAGES
    for p in sorted((ROOT / pkg).rglob("*.py"))
    if "__pycache__" not in p.parts
}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The most specific of ``modules`` that the dotted import target ``name`` refers to ('' for none)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """Our modules that one import statement in ``module`` imports (stdlib and third party dropped)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {r for n in names if (r := _resolve(n, modules))}


def imports_of(
    source: str, module: str, *, is_package: bool, module_level_only: bool, modules: dict = MODULES
) -> list[tuple[int, str]]:
    """``(line, imported module)`` for the import statements of one module's source."""
    out: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.extend((node.lineno, t) for t in sorted(_targets(node, module, is_package, modules)))
            elif not module_level_only:
                visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)

    visit(ast.parse(source).body)
    return out


def _imports(module: str, *, module_level_only: bool) -> list[tuple[int, str]]:
    path = MODULES[module]
    return imports_of(
        path.read_text(encoding="utf-8"),
        module,
        is_package=path.name == "__init__.py",
        module_level_only=module_level_only,
    )


def _why_not(module: str, target: str) -> str | None:
    """Why ``module`` may not import ``target`` (None: it may)."""
    layer = next((layer for layer in ALLOWED if _within(module, (layer,))), None)
    if layer is not None and not _within(target, ALLOWED[layer]):
        return f"the {layer} layer imports only {', '.join(ALLOWED[layer]) or 'nothing of ours'}"
    if _within(target, APPLICATION) and not _within(module, APPLICATION):
        return "only the application (oftjax.cli, oftjax.data, oftjax.default_job) imports it"
    if _within(target, ("oftjax.default_job",)) and not _within(module, ("oftjax.cli",)):
        return "the default job is the command line's (oftjax.cli)"
    if (
        _within(target, ("interop",))
        and _within(module, ("oftjax",))
        and not _within(module, ("oftjax.cli",))
    ):
        return "of oftjax, only the command line (oftjax.cli) sits above interop"
    return None


def _violations() -> dict[tuple[str, str], str]:
    found = {}
    for module in MODULES:
        for line, target in _imports(module, module_level_only=False):
            if target != module and (why := _why_not(module, target)):
                found[(module, target)] = (
                    f"{MODULES[module].relative_to(ROOT)}:{line}: imports {target}: {why}"
                )
    return found


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets in ``graph`` (node -> successors), each closed: ``[a, b, a]``."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def _import_graph(prefix: str) -> dict[str, list[str]]:
    members = {m for m in MODULES if _within(m, (prefix,))}
    return {
        m: sorted({t for _, t in _imports(m, module_level_only=True) if t in members and t != m})
        for m in sorted(members)
    }


def test_imports_are_read_from_every_kind_of_statement():
    modules = dict.fromkeys(["pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.typing_only"])
    source = """
import os
from typing import TYPE_CHECKING
from . import a
if TYPE_CHECKING:
    from pkg import typing_only
try:
    from pkg.sub.b import thing
except ImportError:
    pass
def later():
    import pkg.sub
    from ..elsewhere import x
"""
    kw = {"is_package": False, "modules": modules}
    module_level = imports_of(source, "pkg.sub.c", module_level_only=True, **kw)
    everywhere = imports_of(source, "pkg.sub.c", module_level_only=False, **kw)
    assert module_level == [(4, "pkg.sub"), (8, "pkg.sub.b")]
    assert everywhere == [
        (4, "pkg.sub"),
        (6, "pkg.typing_only"),
        (8, "pkg.sub.b"),
        (12, "pkg.sub"),
        (13, "pkg"),
    ]


def test_cycles_are_found():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_the_rule_is_checked_on_real_files():
    # the application's own imports are seen (a function-level one among them) and allowed
    train = {t for _, t in _imports("oftjax.cli._train", module_level_only=False)}
    assert {"oftjax.cli._malloc", "oftjax.default_job", "oftjax.train"} <= train
    assert _why_not("oftjax.cli._train", "oftjax.default_job") is None
    assert _why_not("oftjax.train._loop", "oftjax.data") is not None
    assert _why_not("oftjax.nn._linear", "oftjax.models") is not None
    assert _why_not("oftjax.quant._dequant", "oftjax.oft") is not None
    assert _why_not("interop.hf", "oftjax.cli") is not None


def test_no_layer_imports_one_above_it():
    assert list(_violations().values()) == []


@pytest.mark.parametrize("prefix", ["interop", "oftjax.nn"])
def test_no_import_cycles(prefix):
    assert find_cycles(_import_graph(prefix)) == []
