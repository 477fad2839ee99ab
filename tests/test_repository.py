"""The repository explains itself: the facts the code relies on are in docs/, and citations of them resolve.

* The four documents exist with the sections the rest of the repository cites them by.
* Every ``docs/<file>.md`` cited anywhere (source, tests, benchmarks, examples, docs, README) exists, and so
  does the section a citation names in quotes right after the file (``(docs/oracle.md, "No model hub")``).
* No such file points outside the repository instead (research notes by file, tracker issue numbers, people
  by role): what the code relies on is cited from docs/.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("oftjax", "interop", "csrc", "tests", "benchmarks", "examples", "docs", "README.md")
SKIPPED_DIRS = {"third_party", "__pycache__", ".pytest_cache", ".hypothesis"}
TEXT_SUFFIXES = {".py", ".md", ".cc", ".h", ".txt", ".toml", ".cfg", ".json", ".yaml", ".yml", ".sh"}

# Built from pieces so that this file does not match itself.
OUTSIDE_REFERENCES = {
    "research notes by file": re.compile(r"(?<![\w/.-])" + "notes" + r"/[\w.-]+\.md"),
    "an issue number": re.compile(r"\b" + "issue" + r" #?[0-9]+", re.IGNORECASE),
    "a person by role": re.compile(r"\b" + "[Hh]elper" + r" [A-Z]\b"),
}
DOC_CITATION = re.compile(r'(?<![\w/.-])docs/([\w.-]+\.md)`?(?:,\s*\\?"([^"\\]+)\\?")?')
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _text_files() -> list[Path]:
    files = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            files.append(top)
            continue
        for path in sorted(top.rglob("*")):
            rel = path.relative_to(ROOT)
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS & set(rel.parts):
                files.append(path)
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _one_line(text: str) -> str:
    """A section title as written, joined across line breaks and comment markers, without code quotes."""
    return " ".join(re.sub(r"\s*\n\s*(?://|#)?\s*", " ", text).replace("`", "").split())


def _prose(path: Path) -> list[tuple[int, str]]:
    """``(first line, text)`` pieces in which a file's citations are written.

    Python: every string constant (adjacent literals joined, as the parser joins them) and every comment, so a
    citation split over string pieces reads as it will be printed. Other files: the whole text.
    """
    text = _read(path)
    if path.suffix != ".py":
        return [(1, text)]
    pieces = [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    pieces += [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT]
    return pieces


def _sections(doc: Path) -> set[str]:
    return {_one_line(m.group(1)) for m in HEADING.finditer(_read(doc))}


def test_scanned_tree_is_not_empty():
    files = {p.relative_to(ROOT).as_posix() for p in _text_files()}
    assert {"README.md", "tests/test_repository.py", "docs/architecture.md"} <= files


def test_every_cited_doc_and_section_exists():
    problems = []
    for path in _text_files():
        for first, text in _prose(path):
            for m in DOC_CITATION.finditer(text):
                problems += _unresolved(
                    m, f"{path.relative_to(ROOT)}:{first + text.count(chr(10), 0, m.start())}"
                )
    assert not problems, "citations that do not resolve:\n" + "\n".join(problems)


def _unresolved(m: re.Match, where: str) -> list[str]:
    doc = ROOT / "docs" / m.group(1)
    if not doc.is_file():
        return [f"{where}: docs/{m.group(1)} does not exist"]
    if m.group(2) is not None and _one_line(m.group(2)) not in _sections(doc):
        return [f'{where}: docs/{m.group(1)} has no section "{_one_line(m.group(2))}"']
    return []


def test_docs_exist_with_their_cited_sections():
    """The four documents and the section titles the rest of the repository cites them by."""
    want = {
        "bitsandbytes-formats.md": [
            "Code tables",
            "Serialized layout",
            "4-bit packing and blocks",
            "Dequantization",
            "Quantization",
            "Double quantization",
            "CPU and CUDA rounding",
            "What the forward passes compute",
            "bitsandbytes CPU defects",
            "int8 paths",
        ],
        "peft-oft.md": [
            "Versions of the OFT parameterization",
            "The OFT math",
            "Merging and unmerging",
            "Adapter files",
            "Where oftjax differs from PEFT",
        ],
        "oracle.md": [],
        "architecture.md": ["Layers", "Public API", "The same numerics", "CPU kernels"],
    }
    for name, titles in want.items():
        doc = ROOT / "docs" / name
        assert doc.is_file(), f"docs/{name} is missing"
        missing = sorted(set(titles) - _sections(doc))
        assert not missing, f"docs/{name} lacks the sections {missing}"


@pytest.mark.parametrize("kind", sorted(OUTSIDE_REFERENCES), ids=str)
def test_no_references_outside_the_repository(kind):
    pattern = OUTSIDE_REFERENCES[kind]
    hits = []
    for path in _text_files():
        for number, line in enumerate(_read(path).splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, f"{kind}: cite docs/ instead:\n" + "\n".join(hits)
