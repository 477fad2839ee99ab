"""A checkpoint's chat template, rendered with jinja2 the way transformers' ``apply_chat_template`` does.

The environment matches transformers 5 (``utils/chat_template_utils.py``) so that the same template and
messages give the same string: a sandboxed immutable environment with ``trim_blocks`` and ``lstrip_blocks``,
the ``loopcontrols`` extension, the ``{% generation %}`` block (it records the character spans of the
assistant's generated text, which transformers turns into ``return_assistant_tokens_mask``), a ``tojson``
filter that does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace`` (which refuses underscore names). The template sees ``messages``, ``tools`` and ``documents``
(both None), ``add_generation_prompt``, and the tokenizer's named special tokens as strings (``bos_token``,
``eos_token``, ...), like transformers' ``special_tokens_map``.

Where the template comes from: ``chat_template.jinja`` in the checkpoint directory, else
``tokenizer_config.json``'s ``chat_template`` (a string, or a list / dict of named templates: "default").
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens passed to the template.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")

Span = tuple[int, int]


class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %} ... {% endgeneration %}``: renders its body and records its character span."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self._tracking: contextvars.ContextVar[Any] = contextvars.ContextVar("generation_spans", default=None)
        environment.extend(track_generation=self.track)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)  # everything rendered before this block
            spans.append((start, start + len(text)))
        return text

    @contextlib.contextmanager
    def track(self, blocks: list[str], spans: list[Span]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` without underscore attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - jinja's own signature trick keeps `self=` usable
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    """The template's ``dict``: building dicts only, no attribute access to the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` in an environment like transformers' (see the module docstring)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template and the special-token strings it is rendered with.

    Example:
      >>> t = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}")
      >>> t.render([{"role": "user", "content": "hi"}])
      ('user: hi\\n', [])
    """

    def __init__(
        self, source: str, special_tokens: Mapping[str, str] | None = None, *, origin: str = "<str>"
    ):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.origin = origin
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))
        try:
            self._template = compile_template(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(
                f"{origin}: the chat template does not compile ({e.message}, line {e.lineno})"
            ) from e

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint directory (None when it has none); see the module docstring."""
        model_dir = Path(model_dir)
        config = read_tokenizer_config(model_dir)
        tokens = special_tokens(model_dir)
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), tokens, origin=str(jinja_file))
        source = _default_template(config.get("chat_template"), model_dir / "tokenizer_config.json")
        if source is None:
            return None
        return cls(source, tokens, origin=str(model_dir / "tokenizer_config.json"))

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False):
        """Render ``messages``; return ``(text, spans)``, the ``{% generation %}`` character spans in order.

        Raises:
          jinja2.exceptions.TemplateError: the template refused the messages (its ``raise_exception``).
        """
        blocks: list[str] = []
        spans: list[Span] = []
        variables = dict(self.special_tokens)
        variables.update(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
        with self._template.environment.track_generation(blocks, spans):
            for block in self._template.generate(**variables):
                blocks.append(block)
        return "".join(blocks), spans


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` as a dict ({} when absent).

    Raises:
      ValueError: the file is not a JSON object (the file named).
    """
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def special_tokens(model_dir: Path) -> dict[str, str]:
    """The named special tokens as strings: ``tokenizer_config.json`` (strings or ``{"content": ...}``),
    its ``extra_special_tokens`` when a dict, then ``special_tokens_map.json`` for names still missing."""
    config = read_tokenizer_config(model_dir)
    sources = [config]
    extra = config.get("extra_special_tokens")
    legacy = model_dir / "special_tokens_map.json"
    if legacy.is_file():
        sources.append(json.loads(legacy.read_text(encoding="utf-8")))
    names = list(SPECIAL_TOKEN_NAMES) + (list(extra) if isinstance(extra, dict) else [])
    out: dict[str, str] = {}
    for name in names:
        for source in sources + ([extra] if isinstance(extra, dict) else []):
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[name] = value
                break
    return out


def _default_template(value: Any, origin: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    named = value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(named, dict) and isinstance(named.get("default"), str):
        return named["default"]
    raise ValueError(f"{origin}: chat_template has no 'default' template (names: {sorted(map(str, named))})")
