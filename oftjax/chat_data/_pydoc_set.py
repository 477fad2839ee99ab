"""A small real instruction set, made offline from the Python reference that ships with Python.

``pydoc_data.topics`` holds the text that ``help("with")`` prints for 79 topics of the language reference.
Each topic becomes chat rows (``_pydoc_text.py`` parses it): a question about the topic, each of its
sections, each definition (``str.center(width[, fillchar])``, ``object.__len__(self)``, pdb commands),
answered with the first paragraphs of the reference text; topics with a grammar also get a two-turn chat
whose follow-up asks for it. Questions come from a few templates, picked by a CRC-32 of the subject, so the
set is the same on every run of the same Python.

Held-out evaluation rows are split **by topic**, never by row: topics that share a paragraph (``else`` and
``if`` print the same text) form one group, and whole groups go to eval, in CRC-32 order, until about 12% of
the rows are held out. ``compound`` and ``specialnames`` are left out: they are chapters whose sections are
topics of their own, and would tie most topics into one group.

The built set ships in ``oftjax/chat_data/pydoc_chat/`` (``train.jsonl``, ``eval.jsonl`` and
``build.json``, which records the Python version that made it); rebuild with
``python -m oftjax.chat_data build-pydoc-set OUT_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from oftjax.chat_data._pydoc_text import Entry, parse_topic

GENERATOR_VERSION = 1
PACKAGED = Path(__file__).parent / "pydoc_chat"
BUILD_INFO = "build.json"
EXCLUDED_TOPICS = ("compound", "specialnames")
EVAL_FRACTION = 0.12
MAX_ANSWER_CHARS = 1000
SHARED_PARAGRAPH_CHARS = 80  # shorter paragraphs ("For example:") do not tie topics together
SYSTEM_PROMPT = "You are a helpful assistant who answers questions about the Python language."
_PROPER = {"Python", "Boolean", "Unicode", "ASCII", "C"}

_STATEMENT_QUESTIONS = (
    "What does the {s} statement do in Python?",
    "How does the {s} statement work in Python?",
    "Can you explain Python's {s} statement?",
    "When would I use the {s} statement in Python?",
)
_TOPIC_QUESTIONS = (
    "Can you explain {s} in Python?",
    "Tell me about {s} in Python.",
    "What should I know about {s} in Python?",
    "How does Python handle {s}?",
)
_CALL_QUESTIONS = (
    "What does `{s}` do in Python?",
    "Explain `{s}`.",
    "How does `{s}` behave?",
    "What is `{s}` used for?",
)
_ATTRIBUTE_QUESTIONS = ("What is `{s}` in Python?", "What does the attribute `{s}` hold?")
_COMMAND_QUESTIONS = ("What does the pdb command `{s}` do?", "How do I use `{s}` in the Python debugger?")
_SECTION_FOLLOW_UPS = ("And what about {s}?", "Can you also explain {s}?", "How does {s} fit in?")
_DEFINITION_FOLLOW_UPS = ("And `{s}`?", "What about `{s}`?", "How about `{s}`?")
_GRAMMAR_QUESTIONS = (
    "What is its grammar?",
    "Can you show me the grammar?",
    "What does the formal syntax look like?",
)


def _pick(options: Sequence[str], key: str) -> str:
    return options[zlib.crc32(key.encode("utf-8")) % len(options)]


def subject(title: str) -> str:
    """A title as it reads inside a sentence: literals in backticks, Title Case words lowercased."""
    text = re.sub(r'"([^"]+)"', r"`\1`", title)
    text = re.sub(r"\*(\w+)\*", r"`\1`", text)
    words = [
        w.lower() if w[:1].isupper() and w[1:].islower() and w not in _PROPER else w for w in text.split()
    ]
    text = " ".join(words)
    return "the " + text if text.startswith("`") else text


def question(entry: Entry) -> str:
    """The user's question about an entry (a template picked by the entry's subject)."""
    key = f"{entry.topic}/{entry.subject}"
    if entry.kind == "command":
        return _pick(_COMMAND_QUESTIONS, key).format(s=entry.subject)
    if entry.kind == "definition":
        sig = re.sub(r"^(class|classmethod|staticmethod|abstractmethod) ", "", entry.subject)
        return _pick(_CALL_QUESTIONS if "(" in sig else _ATTRIBUTE_QUESTIONS, key).format(s=sig)
    statement = re.fullmatch(r'The "([\w ]+)" statement', entry.subject)
    if statement:
        return _pick(_STATEMENT_QUESTIONS, key).format(s=f"`{statement.group(1)}`")
    return _pick(_TOPIC_QUESTIONS, key).format(s=subject(entry.subject))


def answer(paragraphs: Sequence[str]) -> str:
    """The first paragraphs up to ``MAX_ANSWER_CHARS`` (at least one); a paragraph that ends with ":"
    keeps the block it introduces."""
    chosen: list[str] = []
    for i, paragraph in enumerate(paragraphs):
        size = sum(len(p) + 2 for p in chosen) + len(paragraph)
        if chosen and size > MAX_ANSWER_CHARS and not chosen[-1].endswith(":"):
            break
        chosen.append(paragraph)
        if size > MAX_ANSWER_CHARS and i > 0:
            break
    if len(chosen) > 1 and chosen[-1].endswith(":"):
        chosen.pop()
    return "\n\n".join(chosen)


def _chat(turns: Sequence[str], key: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if zlib.crc32(key.encode()) % 3 == 0 else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def topic_rows(topic: str, entries: Sequence[Entry]) -> list[dict]:
    """The rows of one topic; every answer is the final (trained) turn of exactly one row.

    Overviews are single-turn. About half of the sections (by CRC-32) follow up on the overview and about
    half of the definitions on the definition before them, as two-turn chats; the others are single-turn.
    A grammar the overview's answer does not show is asked for as a follow-up to the overview.
    """
    rows = []
    overview = next((e for e in entries if e.kind == "overview"), None)
    previous: Entry | None = None
    for entry in entries:
        key = f"{topic}/{entry.kind}/{entry.subject}"
        if entry.kind == "grammar":
            if overview is None or entry.paragraphs[0] in answer(overview.paragraphs):
                continue  # nothing to follow up on, or the first answer already shows the grammar
            last = (
                _pick(_GRAMMAR_QUESTIONS, key),
                "The Python reference gives this grammar:\n\n" + entry.paragraphs[0],
            )
            context = overview
        else:
            text = answer(entry.paragraphs)
            if not text.strip():
                continue
            context = overview if entry.kind == "section" else previous
            follow_up = entry.kind != "overview" and context is not None and zlib.crc32(key.encode()) % 2 == 1
            last = (follow_up_question(entry) if follow_up else question(entry), text)
            if entry.kind in ("definition", "command"):
                previous = entry
            if not follow_up:
                context = None
        turns = (question(context), answer(context.paragraphs), *last) if context is not None else last
        rows.append({"messages": _chat(turns, key), "topic": topic})
    return rows


def follow_up_question(entry: Entry) -> str:
    """A second question in the same chat (about a section or the next definition)."""
    key = f"{entry.topic}/{entry.subject}"
    if entry.kind == "section":
        return _pick(_SECTION_FOLLOW_UPS, key).format(s=subject(entry.subject))
    name = re.sub(r"^(class|classmethod|staticmethod|abstractmethod) ", "", entry.subject)
    return _pick(_DEFINITION_FOLLOW_UPS, key).format(s=name)


def topic_groups(topics: Mapping[str, str]) -> dict[str, str]:
    """Each topic's group: the first (sorted) topic it shares a long paragraph with, transitively."""
    parent = {t: t for t in topics}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    owner: dict[str, str] = {}
    for topic in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[topic]):
            text = " ".join(paragraph.split())
            if len(text) < SHARED_PARAGRAPH_CHARS:
                continue
            if text in owner:
                a, b = sorted((root(owner[text]), root(topic)))
                parent[b] = a
            else:
                owner[text] = topic
    return {t: root(t) for t in topics}


def pydoc_rows(topics: Mapping[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` rows from ``pydoc_data.topics`` (or the given ``{name: text}``), split by topic."""
    if topics is None:
        from pydoc_data.topics import topics as pydoc_topics

        topics = pydoc_topics
    topics = {k: v for k, v in topics.items() if k not in EXCLUDED_TOPICS}
    by_topic: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for topic in sorted(topics):
        for row in topic_rows(topic, parse_topic(topic, topics[topic])):
            trained = row["messages"][-1]["content"]  # a topic that repeats another's text adds nothing
            if trained not in seen:
                seen.add(trained)
                by_topic.setdefault(topic, []).append(row)
    groups = topic_groups(topics)
    eval_groups = _eval_groups(groups, by_topic)
    train = [r for t in sorted(by_topic) if groups[t] not in eval_groups for r in by_topic[t]]
    held_out = [r for t in sorted(by_topic) if groups[t] in eval_groups for r in by_topic[t]]
    return train, held_out


def _eval_groups(groups: Mapping[str, str], by_topic: Mapping[str, list[dict]]) -> set[str]:
    sizes: dict[str, int] = {}
    for topic, rows in by_topic.items():
        sizes[groups[topic]] = sizes.get(groups[topic], 0) + len(rows)
    total = sum(sizes.values())
    chosen: set[str] = set()
    held = 0
    for group in sorted(sizes, key=lambda g: (zlib.crc32(g.encode()), g)):
        if held >= EVAL_FRACTION * total:
            break
        if held + sizes[group] <= 1.25 * EVAL_FRACTION * total:
            chosen.add(group)
            held += sizes[group]
    return chosen


def build_pydoc_set(out_dir: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``build.json`` into ``out_dir`` (atomically, each file).

    Returns:
      ``{"train": path, "eval": path, "build": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = pydoc_rows()
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    for name, rows in (("train", train), ("eval", held_out)):
        _write_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    info = {
        "generator": GENERATOR_VERSION,
        "python": platform.python_version(),
        "source": "pydoc_data.topics",
        "rows": {"train": len(train), "eval": len(held_out)},
        "eval_topics": sorted({r["topic"] for r in held_out}),
        "sha256": {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in sorted(paths.items())},
    }
    paths["build"] = out_dir / BUILD_INFO
    _write_atomic(paths["build"], json.dumps(info, indent=2, sort_keys=True) + "\n")
    return paths


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pydoc_chat_paths() -> dict[str, Path]:
    """The packaged set: ``{"train": .../train.jsonl, "eval": .../eval.jsonl, "build": .../build.json}``."""
    return {
        "train": PACKAGED / "train.jsonl",
        "eval": PACKAGED / "eval.jsonl",
        "build": PACKAGED / BUILD_INFO,
    }
