"""Parsing the plain-text Python reference that ships with Python (``pydoc_data.topics``) into entries.

Each topic is the text ``help("with")`` prints: a title underlined with ``*``, sections underlined with
``=``, ``-`` or ``~``, prose paragraphs at indent 0, indented code and grammar blocks, and definitions (an
unindented signature such as ``str.center(width[, fillchar])`` followed by its indented description).
``parse_topic`` turns one topic into ``Entry`` objects: the topic's overview, each section, each definition,
and the first grammar block. Text is formatted for a chat answer: wrapped prose lines joined, list items on
their own lines, ``"literal"`` quoting turned into Markdown backticks, code in fenced blocks.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

_UNDERLINE = re.compile(r"^([*=\-~^])\1+$")
_LIST_ITEM = re.compile(r"^(\* |\d+\. )")
# A signature names something with a dot or a call: str.center(width), object.__dict__, class dict(...).
_SIGNATURE = re.compile(
    r"^(class |classmethod |staticmethod |abstractmethod )?[A-Za-z_][\w.]*(\(.*\)|\.\w+)$"
)
_LITERAL = re.compile(r'"([^"\s][^"\n]*?)"')
_FOOTNOTE_REF = re.compile(r" \[\d+\]")
_ASIDE = {"Note:", "Warning:", "See also:", "Caution:", "Tip:", "Important:"}
# Version notes differ between Python releases and read badly as an answer: left out.
_VERSION_NOTES = ("New in version", "Changed in version", "Deprecated since version", "Added in version")


@dataclasses.dataclass(frozen=True)
class Block:
    """A paragraph: its lines with the common indentation removed, and that indentation."""

    lines: tuple[str, ...]
    indent: int


@dataclasses.dataclass(frozen=True)
class Entry:
    """Something to ask about. ``kind``: "overview", "section", "definition", "command" or "grammar"."""

    topic: str
    kind: str
    subject: str
    paragraphs: tuple[str, ...]


def blocks_of(text: str) -> list[Block]:
    """Split on blank lines; stop at the footnotes."""
    out = []
    for chunk in re.split(r"\n[ \t]*\n", text.split("-[ Footnotes ]-")[0]):
        lines = [line.rstrip() for line in chunk.split("\n") if line.strip()]
        if lines:
            indent = min(len(line) - len(line.lstrip(" ")) for line in lines)
            out.append(Block(tuple(line[indent:] for line in lines), indent))
    return out


def heading(block: Block) -> str | None:
    """The title of a heading block (a line and its underline of the same length), else None."""
    if block.indent == 0 and len(block.lines) == 2 and _UNDERLINE.match(block.lines[1]):
        return block.lines[0]
    return None


def is_definition(block: Block, following: Block | None, topic: str) -> bool:
    """Unindented signatures (or, in the pdb topic, command lines) followed by an indented block."""
    if block.indent != 0 or following is None or following.indent < 3:
        return False
    if topic == "debugger":
        return len(block.lines) <= 3 and all(len(x) <= 40 and not x.endswith((".", ":")) for x in block.lines)
    return all(_SIGNATURE.match(line) for line in block.lines)


def prose(block: Block) -> str:
    """Join wrapped lines; list items start their own line; literals in backticks; footnote marks gone."""
    items: list[str] = []
    for line in block.lines:
        if not items or _LIST_ITEM.match(line):
            items.append(line.strip())
        elif re.search(r"\w-$", items[-1]):  # "built-" + "in": a hyphenated word cut by the wrap
            items[-1] += line.strip()
        else:
            items[-1] += " " + line.strip()
    text = re.sub(r"(?<=\S)  +", " ", "\n".join(items))  # the reference's two spaces after a sentence
    return _LITERAL.sub(r"`\1`", _FOOTNOTE_REF.sub("", text))


def code(block: Block) -> str:
    return "```\n" + textwrap.dedent("\n".join(block.lines)) + "\n```"


def format_blocks(blocks: list[Block], base_indent: int) -> list[str]:
    """Paragraphs of a section or description: prose at ``base_indent``, deeper blocks as code; asides
    (``Note:`` and the like, with their indented body) and version notes are left out."""
    out: list[str] = []
    skipping_aside = False
    for block in blocks:
        if block.indent <= base_indent:
            skipping_aside = block.lines == (block.lines[0],) and block.lines[0] in _ASIDE
            if skipping_aside or block.lines[0].startswith(_VERSION_NOTES):
                continue
            out.append(code(block) if block.lines[0].startswith(">>>") else prose(block))
        elif not skipping_aside:
            out.append(code(block))
    return out


def parse_topic(topic: str, text: str) -> list[Entry]:
    """The entries of one topic: overview, sections, definitions (or pdb commands) and its grammar."""
    blocks = blocks_of(text)
    entries: list[Entry] = []
    title = heading(blocks[0]) if blocks else None
    if title is None:
        return entries
    section, body = title, []
    i = 1
    while i < len(blocks):
        block, nxt = blocks[i], blocks[i + 1] if i + 1 < len(blocks) else None
        if heading(block) is not None:
            _add_section(entries, topic, section, body, is_overview=section == title)
            section, body = heading(block), []
        elif is_definition(block, nxt, topic):
            end = i + 1
            while end < len(blocks) and blocks[end].indent >= 3:
                end += 1
            kind = "command" if topic == "debugger" else "definition"
            paragraphs = format_blocks(list(blocks[i + 1 : end]), base_indent=3)
            entries.append(Entry(topic, kind, block.lines[0], tuple(paragraphs)))
            i = end
            continue
        else:
            body.append(block)
        i += 1
    _add_section(entries, topic, section, body, is_overview=section == title)
    grammar = next((b for b in blocks if b.indent >= 3 and any("::=" in line for line in b.lines)), None)
    if grammar is not None:
        entries.append(Entry(topic, "grammar", title, (code(grammar),)))
    return entries


def _add_section(
    entries: list[Entry], topic: str, title: str, body: list[Block], *, is_overview: bool
) -> None:
    paragraphs = format_blocks(body, base_indent=0)
    if paragraphs and not paragraphs[0].startswith("```"):
        entries.append(Entry(topic, "overview" if is_overview else "section", title, tuple(paragraphs)))
