"""``oftjax generate``: the text of ``oftjax.generate.generate`` on the loaded model (+ adapter,
quantized), streamed for one prompt and batched for a prompts file, chat prompts through the checkpoint's
template; every argument and prompt checked before the model loads; eos ids from the checkpoint; text
decoded incrementally."""

import json
import shutil

import pytest
from flax import nnx

import oftjax
from interop.hf_model import load_model, save_model
from interop.peft import load_adapter, save_adapter
from oftjax import cpu_kernels
from oftjax.chat_data import ChatTokenizer
from oftjax.cli import main
from oftjax.data import ByteTokenizer
from oftjax.generate import SamplingConfig, TextStream, chat_prompt_ids, generate, stop_token_ids
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.train import quantize_model
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture (its tokenizer and template)

BYTES = {
    "model_type": "llama", "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
    "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
}  # fmt: skip
CHAT = {**BYTES, "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _with_adapter(config: dict, path):
    """A checkpoint and a random (not identity) PEFT OFT adapter for it: ``(model dir, adapter dir)``."""
    save_model(LlamaForCausalLM(ModelConfig.from_hf(config), rngs=nnx.Rngs(0)), path / "model")
    model = load_model(path / "model")
    cfg = oftjax.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS, init_weights=False)
    oftjax.apply_oft(model, cfg, rngs=nnx.Rngs(1))
    save_adapter(model, path / "adapter", config=cfg)
    return path / "model", path / "adapter"


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    return _with_adapter(BYTES, tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, smollm2_dir):  # noqa: F811
    model_dir, adapter = _with_adapter(CHAT, tmp_path_factory.mktemp("generate-chat"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, model_dir / name)
    return model_dir, adapter


def _ours(model_dir, adapter, prompts, n, *, quant="none"):
    """The library's greedy tokens for the same checkpoint, as the command loads it (CPU kernels on)."""
    eos, pad = stop_token_ids(model_dir)
    model = load_model(model_dir, dtype="float32")
    quantize_model(model, quant, double_quant=True)
    load_adapter(model, adapter)
    with cpu_kernels.enable():
        return generate(model, prompts, SamplingConfig(n, eos_token_ids=eos, pad_token_id=pad)).tokens


def _run(capsys, *argv):
    status = main(["generate", *argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out, err


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_one_prompt_streams_the_library_greedy_text(byte_ckpt, capsys, quant):
    model_dir, adapter = byte_ckpt
    out, err = _run(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "Orthogonal",
                    "--max-new-tokens", "20", "--quant", quant)  # fmt: skip
    tok = ByteTokenizer()
    (want,) = _ours(model_dir, adapter, [[256, *tok.encode("Orthogonal")]], 20, quant=quant)
    assert out == tok.decode(want) + "\n"  # the streamed pieces add up to the whole decoded answer
    assert "prefill 11 tokens" in err and "decode " in err and "KV cache" in err and err.count("\n") == 1


def test_a_prompts_file_is_one_batch_printed_after_each_prompt(byte_ckpt, tmp_path, capsys):
    model_dir, adapter = byte_ckpt
    texts = ["a", "rotations keep norms", "b\u00e9ta"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts) + "\n")
    out, _ = _run(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--prompts", str(path),
                  "--max-new-tokens", "12", "--quant", "nf4")  # fmt: skip
    tok = ByteTokenizer()
    want = _ours(model_dir, adapter, [[256, *tok.encode(t)] for t in texts], 12, quant="nf4")
    expected = "".join(
        f"=== prompt {i}/3 ===\n{t}\n--- answer ---\n{tok.decode(w)}\n\n"
        for i, (t, w) in enumerate(zip(texts, want, strict=True), 1)
    )
    assert out == expected


def test_chat_prompts_use_the_template_and_stop_at_the_checkpoints_eos(chat_ckpt, tmp_path, capsys):
    model_dir, adapter = chat_ckpt
    tok = ChatTokenizer.from_checkpoint(model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "Hi!"}) + "\n")
    out, _ = _run(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--prompts", str(path),
                  "--chat", "--max-new-tokens", "8")  # fmt: skip
    prompts = [chat_prompt_ids(tok, messages), chat_prompt_ids(tok, [{"role": "user", "content": "Hi!"}])]
    want = _ours(model_dir, adapter, prompts, 8)
    answers = [tok.tokenizer.decode(w, skip_special_tokens=True) for w in want]
    assert out == (
        f"=== prompt 1/2 ===\nWhy is the sky blue?\n--- answer ---\n{answers[0]}\n\n"
        f"=== prompt 2/2 ===\nHi!\n--- answer ---\n{answers[1]}\n\n"
    )


def test_sampling_is_reproducible_with_its_seed(byte_ckpt, capsys):
    model_dir, adapter = byte_ckpt
    argv = ["--model", str(model_dir), "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "24",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]  # fmt: skip
    first, _ = _run(capsys, *argv, "--seed", "3")
    again, _ = _run(capsys, *argv, "--seed", "3")
    other, _ = _run(capsys, *argv, "--seed", "4")
    assert first == again and first != other


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--seed", "-1"], "--seed"),
        (["--max-new-tokens", "300"], "max_position_embeddings 256"),
        (["--chat"], "chat template"),
        (["--adapter", "/nonexistent"], "not a PEFT adapter directory"),
        (["--model", "/nonexistent/dir"], "no such checkpoint directory"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_loading(byte_ckpt, capsys, monkeypatch, argv, message):
    import oftjax.cli._generate as command

    monkeypatch.setattr(command, "load_model_and_adapter", lambda args: pytest.fail("the model was loaded"))
    model_dir, _ = byte_ckpt
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"prompt": "fine"}', "{not json"], "prompts.jsonl:2: invalid JSON"),
        (['{"text": "no prompt"}'], 'prompts.jsonl:1: expected an object with "prompt"'),
        (['{"prompt": 3}'], 'prompts.jsonl:1: "prompt" must be a string'),
        (
            ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
            "prompts.jsonl:1: the last message is the assistant's",
        ),  # fmt: skip
        (['{"messages": [{"role": "robot", "content": "q"}]}'], "prompts.jsonl:1: messages[0]"),
        (['{"messages": [{"role": "user", "content": "q"}]}'], "chat template"),
        ([], "no prompt in the file"),
    ],
    ids=["json", "keys", "type", "assistant-last", "role", "no-template", "empty"],
)
def test_bad_prompt_rows_are_named_by_file_and_line(byte_ckpt, tmp_path, capsys, monkeypatch, rows, message):
    import oftjax.cli._generate as command

    monkeypatch.setattr(command, "load_model_and_adapter", lambda args: pytest.fail("the model was loaded"))
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(r + "\n" for r in rows))
    assert main(["generate", "--model", str(byte_ckpt[0]), "--prompts", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--prompt", "a", "--prompts", "p.jsonl"],
        ["--prompt", "a", "--quant", "q3"],
        ["--prompt", "a", "--cpu-kernels", "maybe"],
    ],  # fmt: skip
    ids=["no-prompt", "both", "quant", "kernels"],
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", *argv])
    assert e.value.code == 2


def test_stop_tokens_come_from_generation_config_else_config(tmp_path):
    (tmp_path / "config.json").write_text('{"eos_token_id": 7}')
    assert stop_token_ids(tmp_path) == ((7,), 7)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 5], "pad_token_id": 0}')
    assert stop_token_ids(tmp_path) == ((2, 5), 0)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, "x"]}')
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id.*'x'"):
        stop_token_ids(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 300}')
    with pytest.raises(ValueError, match="vocab_size 259"):
        stop_token_ids(tmp_path, 259)


def test_chat_prompt_ids_are_transformers_apply_chat_template(smollm2_dir):  # noqa: F811
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok = ChatTokenizer.from_checkpoint(smollm2_dir)
    for messages in (
        [{"role": "user", "content": "Wie heißt die Hauptstadt von Österreich? 🇦🇹"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?\n\n  Tabs:\t."}],
        [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3 + 3?"},
        ],
    ):
        want = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert chat_prompt_ids(tok, messages) == list(want)


def test_streamed_text_is_the_decoded_text_with_multibyte_tokens(smollm2_dir):  # noqa: F811
    tok = ChatTokenizer.from_checkpoint(smollm2_dir).tokenizer
    text = "Grüße aus Österreich 🇦🇹 — naïve café, 東京 and 🤖🤖!"
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # a character split over tokens waits for its last byte
    byte_stream = TextStream(ByteTokenizer())
    pieces = [byte_stream.push([b]) for b in "é🤖".encode()] + [byte_stream.finish()]
    assert pieces == ["é" if i == 1 else "🤖" if i == 5 else "" for i in range(7)]


@pytest.mark.slow
def test_the_real_smollm2_answers_a_chat_question(smollm2_dir, capsys):  # noqa: F811
    question = "What is the capital of France? Answer in one word."
    out, _ = _run(
        capsys, "--model", str(smollm2_dir), "--chat", "--prompt", question, "--max-new-tokens", "16"
    )
    assert "Paris" in out, out
