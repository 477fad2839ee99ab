"""Chat data: token ids and loss masks equal transformers' on the real SmolLM2 tokenizer; bad rows named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oftjax.chat_data import (
    ChatDataError,
    ChatTemplate,
    ChatTokenizer,
    load_chat_data,
    overlap_mask,
    padded_arrays,
)
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture

LONG = " ".join(
    f"Sentence {i} explains one more detail of the garbage collector, its generations and thresholds."
    for i in range(60)
)
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}


def chat(*turns: tuple[str, str], system: dict | None = None) -> dict:
    messages = [system] if system else []
    messages += [{"role": role, "content": content} for role, content in turns]
    return {"messages": messages}


ROWS = [
    chat(("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")),
    chat(("user", "Hi"), ("assistant", "Hello! How can I help you today?"), system=SYSTEM),
    chat(
        ("user", "Name a prime number."),
        ("assistant", "7 is prime."),
        ("user", "And an even one?"),
        ("assistant", "2 is the only even prime."),
    ),
    chat(
        ("user", "Count to three."),
        ("assistant", "One, two, three."),
        ("user", "Now backwards."),
        ("assistant", "Three, two, one."),
        ("user", "In French?"),
        ("assistant", "Trois, deux, un."),
        system=SYSTEM,
    ),
    chat(
        ("user", "Traduis « bonjour » en japonais."),
        ("assistant", "« Bonjour » se dit こんにちは (konnichiwa)."),
    ),
    chat(("user", "Emoji for a cat?"), ("assistant", "🐱 or 🐈 — both work. 😺")),
    chat(("user", "كيف حالك؟"), ("assistant", "أنا بخير، شكراً!")),
    chat(("user", "Wie schreibt man Straße?"), ("assistant", "Mit ß: Straße; in der Schweiz: Strasse.")),
    chat(("user", "中文怎么说“谢谢”？"), ("assistant", "“谢谢”（xièxie）。")),
    chat(("user", "Summarize the garbage collector."), ("assistant", LONG)),
    chat(("user", LONG), ("assistant", "That is a long description of generations.")),
    chat(
        ("user", "Write a Python function that adds two numbers."),
        ("assistant", "```python\ndef add(a, b):\n    return a + b\n```\nCall it as `add(1, 2)`."),
    ),
    chat(("user", "Indentation:\n\tTab\n    spaces"), ("assistant", "Tabs\tand  double  spaces are kept.")),
    chat(("user", "Trailing spaces   "), ("assistant", "  Leading spaces in the answer.")),
    chat(("user", "Windows line ends?\r\nYes."), ("assistant", "CRLF\r\nkept as is.")),
    chat(("user", "What is <|im_end|>?"), ("assistant", "It ends a turn in this chat format.")),
    chat(("user", "JSON please"), ("assistant", '{"a": [1, 2, {"b": null}], "c": "d\\"e"}')),
    chat(("user", "Math: ∑ᵢ xᵢ² ≤ ∞?"), ("assistant", "Yes, for finite vectors ∑ xᵢ² < ∞.")),
    chat(("user", "Say nothing but OK."), ("assistant", "OK")),
    chat(("user", ""), ("assistant", "You sent an empty message.")),
    chat(("user", "Hi"), ("assistant", "Hey."), system={"role": "system", "content": ""}),
    chat(
        ("user", "First question?"),
        ("assistant", "First answer."),
        ("user", "Second?"),
        ("assistant", "Second answer, part one."),
        ("assistant", "Part two, a second assistant message."),
    ),
    chat(
        ("user", "Jinja-looking text: {{ x }} {% if %}"), ("assistant", "Printed literally: {{ x }} {% if %}")
    ),
    chat(("user", "Numbers 1234567890 and 3.14159"), ("assistant", "1,234,567,890 and π ≈ 3.14159.")),
    chat(("user", "Mixed 한국어 and English"), ("assistant", "안녕하세요 means hello.")),
    {"prompt": "Give a synonym for 'quick'.", "completion": "Fast."},
    {"prompt": "Translate 'cat' to Spanish.", "completion": "Gato."},
    {"prompt": "List three colors.", "completion": "Red, green and blue."},
    {"prompt": "", "completion": "An answer to an empty prompt."},
    {
        "prompt": "Explain recursion in one line ✨",
        "completion": "A function that calls itself on a smaller input.",
    },
    {"prompt": "Long answer please.", "completion": LONG},
    {"text": "Plain text rows are trained on every token."},
    {"text": "Unicode text: naïve café, 東京, 🚀."},
    {"text": LONG},
    {
        "id": 7,
        "source": "extra keys are ignored",
        **chat(("user", "Extra row keys?"), ("assistant", "Ignored.")),
    },
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def _reference(hf_tokenizer, row: dict) -> tuple[list[int], list[bool]]:
    """transformers' ids; the mask from the rule, computed independently on the rendered prefix strings."""
    if "text" in row:
        ids = hf_tokenizer(row["text"])["input_ids"] + [hf_tokenizer.eos_token_id]
        return ids, [True] * len(ids)
    messages = _messages(row)
    ids = hf_tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    last_prompt = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
    prompt = hf_tokenizer.apply_chat_template(
        messages[: last_prompt + 1], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # The prompt's tokens start the chat's, except that an answer starting with spaces merges the prompt's
    # final newline into a token that straddles the boundary ("\n " in "assistant\n  Leading"): that token
    # holds answer text, so it is a target.
    common = next(
        (i for i, (a, b) in enumerate(zip(ids, prompt_ids, strict=False)) if a != b), len(prompt_ids)
    )
    assert common >= len(prompt_ids) - 1, "only the prompt's last token may merge with the answer"
    return ids, [False] * common + [True] * (len(ids) - common)


def test_every_row_matches_transformers(rows_file: Path, smollm2_dir: Path, hf_tokenizer):  # noqa: F811
    assert len(ROWS) >= 30
    data = load_chat_data(rows_file, smollm2_dir, seq_len=4096)
    assert [e.source for e in data.examples] == [f"{rows_file}:{i}" for i in range(1, len(ROWS) + 1)]
    for row, example in zip(ROWS, data.examples, strict=True):
        ids, mask = _reference(hf_tokenizer, row)
        assert example.input_ids.tolist() == ids, example.source
        assert example.loss_mask.tolist() == mask, example.source
        assert example.input_ids.dtype == np.int32 and example.loss_mask.dtype == bool
    report = data.report
    assert (report.rows, report.examples, report.truncated, report.skipped) == (len(ROWS), len(ROWS), 0, [])
    assert report.loss_tokens == sum(int(e.loss_mask.sum()) for e in data.examples) < report.tokens


def test_the_answer_and_end_of_turn_are_the_targets(smollm2_dir: Path, tmp_path: Path, hf_tokenizer):  # noqa: F811
    tok = ChatTokenizer.from_checkpoint(smollm2_dir)
    data = load_chat_data(_write(tmp_path, ROWS[2:3]), tok, seq_len=4096)
    example = data.examples[0]
    text = hf_tokenizer.decode(example.input_ids[example.loss_mask])
    assert text == "2 is the only even prime.<|im_end|>\n"  # the final answer only, not the first one


def _write(folder: Path, rows: list, name: str = "rows.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# A template with generation markers: SmolLM2's, with the assistant's content and end of turn marked.
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generation_markers_give_transformers_assistant_mask(smollm2_dir: Path, tmp_path: Path, hf_tokenizer):  # noqa: F811
    base = ChatTokenizer.from_checkpoint(smollm2_dir)
    template = ChatTemplate(GENERATION_TEMPLATE, base.template.special_tokens)
    tok = ChatTokenizer(base.tokenizer, template, base.template.special_tokens)
    data = load_chat_data(_write(tmp_path, ROWS), tok, seq_len=4096)
    checked = 0
    for row, example in zip(ROWS, data.examples, strict=True):
        if "text" in row:
            continue
        ref = hf_tokenizer.apply_chat_template(
            _messages(row),
            chat_template=GENERATION_TEMPLATE,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert example.input_ids.tolist() == ref["input_ids"], example.source
        assert example.loss_mask.astype(int).tolist() == ref["assistant_masks"], example.source
        checked += 1
    assert checked >= 30
    multi = data.examples[2]  # every assistant turn is marked, the first answer included
    assert hf_tokenizer.decode(multi.input_ids[multi.loss_mask]) == (
        "7 is prime.<|im_end|>2 is the only even prime.<|im_end|>"
    )


def test_loss_on_all_and_truncation_report(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    path = _write(tmp_path, ROWS)
    full = load_chat_data(path, smollm2_dir, seq_len=4096, loss_on="all")
    assert all(e.loss_mask.all() for e in full.examples)
    lengths = [e.input_ids.size for e in full.examples]
    seq_len = 64
    cut = load_chat_data(path, smollm2_dir, seq_len=seq_len, loss_on="all")
    assert cut.report.truncated == sum(n > seq_len for n in lengths) > 0
    assert cut.report.truncated_tokens == sum(max(n - seq_len, 0) for n in lengths)
    assert all(e.input_ids.size <= seq_len for e in cut.examples)
    assert f"truncated at seq_len {seq_len}" in cut.report.summary()


def test_truncation_that_cuts_the_whole_answer_drops_the_row(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    rows = [chat(("user", LONG), ("assistant", "Short answer.")), ROWS[0]]
    data = load_chat_data(_write(tmp_path, rows), smollm2_dir, seq_len=100)
    assert (data.report.examples, data.report.truncated, data.report.no_loss_tokens) == (1, 1, 1)
    assert "1 dropped with no target token left after truncation" in data.report.summary()


def test_padded_arrays(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    tok = ChatTokenizer.from_checkpoint(smollm2_dir)
    data = load_chat_data(_write(tmp_path, ROWS[:3]), tok, seq_len=64)
    ids, mask = padded_arrays(data.examples, 64, tok.pad_id)
    assert ids.shape == mask.shape == (3, 64) and ids.dtype == np.int32
    n = data.examples[0].input_ids.size
    assert (ids[0, :n] == data.examples[0].input_ids).all() and (ids[0, n:] == tok.pad_id).all()
    assert not mask[0, n:].any() and tok.pad_id == 2  # SmolLM2's pad token is <|im_end|>


def test_overlap_mask_counts_a_token_cut_by_the_boundary():
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert overlap_mask(offsets, [(4, 7)]).tolist() == [False, True, True, False]
    assert overlap_mask(offsets, [(0, 3), (9, 10)]).tolist() == [True, False, False, True]
    assert overlap_mask(offsets, []).tolist() == [False] * 4


def test_json_array_file_with_line_numbers(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    path = _write(tmp_path, [], name="rows.json")
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ROWS[:3]) + "\n]\n", encoding="utf-8")
    data = load_chat_data(path, smollm2_dir, seq_len=4096)
    assert [e.source for e in data.examples] == [f"{path}:{i}" for i in (2, 3, 4)]
    path.write_text("[\n" + json.dumps(ROWS[0]) + ",\n" + json.dumps("not a row") + "\n]", encoding="utf-8")
    with pytest.raises(ChatDataError, match=r"rows.json:3: a row must be a JSON object, got a string"):
        load_chat_data(path, smollm2_dir, seq_len=4096)
    path.write_text("[\n" + json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "]", encoding="utf-8")
    with pytest.raises(ChatDataError, match=r"rows.json:3: invalid JSON array \(expected ',' or ']'"):
        load_chat_data(path, smollm2_dir, seq_len=4096, skip_bad_rows=True)


OK = ROWS[0]
BAD_ROWS = [
    ("not-object", [1, 2], "a row must be a JSON object, got an array"),
    (
        "no-format",
        {"question": "x"},
        "no 'messages', 'prompt'/'completion' or 'text' key (keys: ['question'])",
    ),
    ("ambiguous", {"text": "a", **OK}, "ambiguous row: it has ['messages', 'text']"),
    ("missing-completion", {"prompt": "x"}, "missing key 'completion'"),
    ("missing-prompt", {"completion": "x"}, "missing key 'prompt'"),
    ("prompt-type", {"prompt": 3, "completion": "x"}, "'prompt' must be a string, got a number"),
    ("empty-completion", {"prompt": "x", "completion": "  "}, "empty completion"),
    ("empty-text", {"text": ""}, "empty text"),
    ("text-type", {"text": ["a"]}, "'text' must be a string, got an array"),
    ("messages-type", {"messages": "hi"}, "'messages' must be a list, got a string"),
    ("messages-empty", {"messages": []}, "'messages' is empty"),
    ("message-type", {"messages": ["hi"]}, "messages[0] must be an object, got a string"),
    ("missing-role", {"messages": [{"content": "hi"}]}, "messages[0] is missing key(s) ['role']"),
    (
        "missing-content",
        {"messages": [{"role": "user", "content": None}]},
        "messages[0] is missing key(s) ['content']",
    ),
    (
        "extra-key",
        {"messages": [{"role": "user", "content": "a", "name": "bob"}]},
        "messages[0] has unsupported key(s) ['name']",
    ),
    (
        "role-type",
        {"messages": [{"role": 1, "content": "a"}]},
        "messages[0].role must be a string, got a number",
    ),
    (
        "unknown-role",
        chat(("user", "a"), ("tool", "b"), ("assistant", "c")),
        "messages[1].role 'tool' is not one of ['system', 'user', 'assistant']",
    ),
    (
        "content-type",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        "messages[0].content must be a string, got an array",
    ),
    (
        "late-system",
        chat(("user", "a"), ("system", "b"), ("assistant", "c")),
        "messages[1] is a system message after the first message",
    ),
    ("empty-assistant", chat(("user", "a"), ("assistant", " \n")), "messages[1] is an empty assistant turn"),
    ("no-user", chat(("assistant", "a")), "no user turn"),
    (
        "ends-with-user",
        chat(("user", "a"), ("assistant", "b"), ("user", "c")),
        "the last message (messages[2]) is a 'user' turn",
    ),
]


@pytest.mark.parametrize("row,reason", [(r, m) for _, r, m in BAD_ROWS], ids=[i for i, _, _ in BAD_ROWS])
def test_bad_row_names_file_line_and_reason(smollm2_dir: Path, tmp_path: Path, row, reason):  # noqa: F811
    path = _write(tmp_path, [OK, OK, row])
    with pytest.raises(ChatDataError) as err:
        load_chat_data(path, smollm2_dir, seq_len=4096)
    assert err.value.source == f"{path}:3"
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}:3: ")


def test_non_utf8_and_invalid_json_lines(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    path = _write(tmp_path, [OK])
    path.write_bytes(
        path.read_bytes() + b'{"text": "caf\xe9"}\n' + b"\n" + b'{"text": "unterminated\n' + path.read_bytes()
    )
    with pytest.raises(ChatDataError, match=r"rows.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_chat_data(path, smollm2_dir, seq_len=4096)
    data = load_chat_data(path, smollm2_dir, seq_len=4096, skip_bad_rows=True)
    assert data.report.rows == 4 and data.report.examples == 2  # the blank line 3 is not a row
    assert [s for s, _ in data.report.skipped] == [f"{path}:2", f"{path}:4"]
    assert data.report.skipped[1][1].startswith("invalid JSON (Unterminated string")
    assert "2 bad rows skipped (first: " in data.report.summary()


def test_skip_bad_rows_counts_every_case(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    path = _write(tmp_path, [OK] + [row for _, row, _ in BAD_ROWS] + [OK])
    data = load_chat_data(path, smollm2_dir, seq_len=4096, skip_bad_rows=True)
    assert data.report.examples == 2 and len(data.report.skipped) == len(BAD_ROWS)
    assert [reason for _, reason in data.report.skipped][0] == "a row must be a JSON object, got an array"


def test_template_refusal_is_a_bad_row(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    base = ChatTokenizer.from_checkpoint(smollm2_dir)
    strict = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'user' and m['content'] == 'forbidden' %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}",
        origin="strict.jinja",
    )
    tok = ChatTokenizer(base.tokenizer, strict, base.template.special_tokens)
    path = _write(tmp_path, [chat(("user", "forbidden"), ("assistant", "x"))])
    with pytest.raises(
        ChatDataError, match=r"rows.jsonl:1: the chat template \(strict.jinja\) refused the row: no"
    ):
        load_chat_data(path, tok, seq_len=4096)
    # This template's generation prompt ">" is not a prefix of the chat: the answer cannot be located.
    path = _write(tmp_path, [chat(("user", "fine"), ("assistant", "x"))])
    with pytest.raises(ChatDataError, match="does not render the prompt turns"):
        load_chat_data(path, tok, seq_len=4096)


def test_file_level_errors(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(ChatDataError, match="data path not found"):
        load_chat_data(tmp_path / "absent.jsonl", smollm2_dir, seq_len=64)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ChatDataError, match="Parquet is not supported"):
        load_chat_data(tmp_path / "data.parquet", smollm2_dir, seq_len=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChatDataError, match=r"no \.jsonl or \.json file"):
        load_chat_data(empty, smollm2_dir, seq_len=64)
    (empty / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ChatDataError, match="no usable example"):
        load_chat_data(empty, smollm2_dir, seq_len=64)
    with pytest.raises(ValueError, match="loss_on must be one of"):
        load_chat_data(empty, smollm2_dir, seq_len=64, loss_on="prompt")


def test_template_environment_matches_transformers(hf_tokenizer):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "  {{ m | tojson }}\n{% endfor %}{{ ns.n }} {{ bos_token }}{{ dict(a=1) | tojson }}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "skip", "content": "x"}]
    ours, _ = ChatTemplate(template, {"bos_token": hf_tokenizer.bos_token}).render(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == theirs and "<b>é</b>" in ours  # tojson does not escape HTML or non-ASCII
    with pytest.raises(Exception, match="underscore|_x"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
