"""``oftjax train`` / ``parity`` inputs: Hub ids from the local cache, the config key policy, --dtype, chat
and instruction rows (bad rows named, truncation counted), the held-out verdict, the divergence guard."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from interop.hf_model import save_model
from oftjax.cli import build_parser, main
from oftjax.models import LlamaForCausalLM, ModelConfig
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture (its tokenizer and template)

TINY = {
    "model_type": "llama", "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}  # fmt: skip
# SmolLM2's vocabulary, so that the checkpoint can carry its real tokenizer and chat template
CHAT = {**TINY, "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
FAST = ["--quiet", "--oft-block-size", "16", "--target-modules", "q_proj,v_proj", "--save-every", "0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "tiny"
    save_model(LlamaForCausalLM(ModelConfig.from_hf(TINY), rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, smollm2_dir):  # noqa: F811
    """A tiny Llama with SmolLM2's tokenizer files and chat template."""
    path = tmp_path_factory.mktemp("inputs") / "chat"
    save_model(LlamaForCausalLM(ModelConfig.from_hf(CHAT), rngs=nnx.Rngs(0)), path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [_chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)]
ROWS += [{"prompt": "Spell 'cat' backwards: ", "completion": "tac"}, {"text": "A plain text row."}]
LONG = _chat("Tell me about the garbage collector.", "It frees unreachable cycles. " * 40)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


# ------------------------------------------------------------------------------------------------ --model


def _fake_hub_cache(root, repo, checkpoint):
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return entry / "snapshots" / commit


def test_hub_id_resolves_in_the_local_cache(tiny_dir, text_file, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path / "hub", "org/tiny", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "run"
    argv = ["train", "--model", "org/tiny", "--data", str(text_file), "--output", str(out), *FAST]
    assert main([*argv, "--steps", "1", "--seq-len", "32", "--batch-size", "2"]) == 0
    assert json.loads((out / "run.json").read_text())["model"] == str(snapshot)
    assert main(["parity", "--model", "org/tiny", "--seq-len", "8"]) == 0


@pytest.mark.parametrize("command", ["train", "parity"])
def test_hub_id_not_in_the_cache_is_one_clear_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    extra = ["--output", str(tmp_path / "run")] if command == "train" else []
    assert main([command, "--model", "org/absent", *extra]) == 1
    err = _err(capsys)
    assert "org/absent" in err and "not in the local Hugging Face cache" in err and "empty-hub" in err
    assert "nothing is downloaded" in err


# ------------------------------------------------------------------------------------------ config policy


def _edited(tiny_dir, tmp_path, **change):
    path = tmp_path / "edited"
    shutil.copytree(tiny_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    return path


def test_unknown_config_key_warns_and_strict_config_refuses(tiny_dir, text_file, tmp_path, capsys):
    model = _edited(tiny_dir, tmp_path, logit_softcapping=30.0, _name_or_path="someone/tiny")
    argv = ["train", "--model", str(model), "--data", str(text_file), *FAST, "--seq-len", "32"]
    assert main([*argv, "--output", str(tmp_path / "strict"), "--strict-config"]) == 1
    err = _err(capsys)
    assert "logit_softcapping" in err and "_name_or_path" not in err  # metadata is never refused
    with pytest.warns(UserWarning, match="logit_softcapping"):
        assert main([*argv, "--output", str(tmp_path / "lenient"), "--steps", "1", "--batch-size", "2"]) == 0


def test_config_with_math_oftjax_lacks_is_refused_without_strict(tiny_dir, tmp_path, capsys):
    model = _edited(tiny_dir, tmp_path, hidden_act="gelu_new")
    assert main(["parity", "--model", str(model)]) == 1
    assert "hidden_act" in _err(capsys)


# ----------------------------------------------------------------------------------------------- --dtype


def test_dtype_flag_default_alias_and_help(capsys):
    parser = build_parser()
    assert parser.parse_args(["train"]).dtype == "float32"
    assert parser.parse_args(["train", "--bf16"]).dtype == "bfloat16"
    assert parser.parse_args(["parity", "--model", "m", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {float32,bfloat16}" in help_text and "slower than float32 on a CPU" in help_text


def test_bf16_run_computes_in_bf16(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--data", str(text_file), "--output", str(out), *FAST]
    assert main([*argv, "--dtype", "bfloat16", "--steps", "2", "--seq-len", "32", "--batch-size", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["dtype"] == "bfloat16" and json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    )
    assert np.isfinite(summary["train_loss_last"])


# ------------------------------------------------------------------------------------------- chat rows


def test_chat_rows_train_with_truncation_report_and_verdict(chat_dir, tmp_path, capsys):
    data = _rows(tmp_path / "train.jsonl", [*ROWS, LONG])
    held = _rows(tmp_path / "eval.jsonl", [_chat("What is 7 plus 7?", "7 plus 7 is 14."), LONG])
    out = tmp_path / "run"
    argv = ["train", "--model", str(chat_dir), "--data", str(data), "--eval-data", str(held), *FAST[1:]]
    assert main([*argv, "--output", str(out), "--steps", "4", "--seq-len", "64", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("27 rows: 27 examples" in line and "1 truncated at seq_len 64" in line for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    train_report = summary["data"]["train"]
    assert summary["data"]["kind"] == "rows" and summary["data"]["loss_on"] == "assistant"
    assert train_report["truncated"] == 1 and train_report["truncated_tokens"] > 0
    assert summary["data"]["eval"]["examples"] == 2 and summary["data"]["train_examples"] == 27
    assert summary["data"]["batching"] == "per-batch" and summary["data"]["train_rows"] == 27
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    assert summary["eval_improved"] == (after < before)
    want = "eval loss improved" if after < before else "WARNING: eval loss got worse"
    assert lines[-1].startswith(want) and f"{before:.3f} -> {after:.3f}" in lines[-1]
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_chat_rows_other_batchings(chat_dir, tmp_path, batching):
    data = _rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "run"
    argv = ["train", "--model", str(chat_dir), "--data", str(data), *FAST[1:], "--batching", batching]
    assert main([*argv, "--output", str(out), "--steps", "2", "--seq-len", "64", "--batch-size", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())["data"]
    assert summary["batching"] == batching
    assert (summary["train_rows"] < summary["train_examples"]) == (batching == "packed")


def test_the_packaged_chat_set_by_name(chat_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", str(chat_dir), "--data", "pydoc-chat", "--output", str(out), *FAST]
    assert main([*argv, "--steps", "1", "--seq-len", "128", "--batch-size", "2", "--loss-on", "all"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["rows"] == 223 and summary["data"]["eval"]["rows"] == 37
    assert summary["data"]["loss_on"] == "all" and summary["data"]["train"]["truncated"] > 0
    assert json.loads((out / "run.json").read_text())["eval_data"].endswith("eval.jsonl")


def test_bad_row_stops_with_file_line_and_reason_or_is_skipped(chat_dir, tmp_path, capsys):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}
    data = _rows(tmp_path / "rows.jsonl", [*ROWS[:2], bad, *ROWS[2:]])
    argv = ["train", "--model", str(chat_dir), "--data", str(data), *FAST, "--seq-len", "64"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 1
    assert f"{data}:3: messages[1] is an empty assistant turn" in _err(capsys)
    argv += ["--output", str(tmp_path / "b"), "--skip-bad-rows", "--steps", "1", "--batch-size", "2"]
    assert main([a for a in argv if a != "--quiet"]) == 0
    assert "1 bad rows skipped (first: " in capsys.readouterr().out
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["data"]["train"]["skipped_count"] == 1
    assert summary["data"]["train"]["skipped"] == [f"{data}:3: messages[1] is an empty assistant turn"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("rows-without-model", "chat / instruction rows need --model"),
        ("eval-kind", "give both in one kind"),
        ("eval-missing", "eval data path not found"),
        ("eval-batches", "--eval-batches must be >= 1"),
        ("no-template", "the checkpoint has no chat template"),
    ],
    ids=["rows-without-model", "eval-kind", "eval-missing", "eval-batches", "no-template"],
)
def test_data_arguments_refused(case, message, tiny_dir, chat_dir, text_file, tmp_path, capsys):
    rows = _rows(tmp_path / "rows.jsonl", ROWS)
    argv = {
        "rows-without-model": ["--data", str(rows)],
        "eval-kind": ["--model", str(chat_dir), "--data", str(rows), "--eval-data", str(text_file)],
        "eval-missing": ["--data", str(text_file), "--eval-data", str(tmp_path / "nothing.jsonl")],
        "eval-batches": ["--eval-batches", "0"],
        "no-template": ["--model", str(_no_template(chat_dir, tmp_path)), "--data", str(rows)],
    }[case]
    assert main(["train", "--output", str(tmp_path / "run"), *FAST, *argv]) == 1
    assert message in _err(capsys)


def _no_template(chat_dir, tmp_path):
    path = tmp_path / "no-template"
    shutil.copytree(chat_dir, path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# -------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_non_zero_and_says_why(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    # fit's guard itself is tested in tests/train/test_divergence.py (a random tiny model cannot diverge: its
    # loss starts at log(vocab), where a broken model also ends); here, what the command does with it
    from oftjax import train
    from oftjax.train._loop import TrainingDiverged

    def diverging_fit(model, cfg, data, *, output_dir, divergence_factor, **kw):
        assert divergence_factor == 2.0
        raise TrainingDiverged(
            "training diverged at step 7: the loss is nan; kept the last good checkpoint "
            f"{output_dir / 'checkpoints' / 'step_00000005'}. Lower the learning rate.",
            step=7,
            loss=float("nan"),
            checkpoint=output_dir / "checkpoints" / "step_00000005",
        )

    monkeypatch.setattr(train, "fit", diverging_fit)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--data", str(text_file), "--output", str(out), *FAST]
    assert main([*argv, "--seq-len", "32", "--batch-size", "2", "--lr", "0.5"]) == 1
    err = _err(capsys)
    assert "training diverged at step 7" in err and "Lower the learning rate" in err and "--lr 0.5" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"]["step"] == 7 and summary["diverged"]["checkpoint"].endswith("step_00000005")
    assert summary["quant"] == "nf4" and summary["trainable_params"] > 0
