"""The ``oftjax`` command: argument errors (one line, non-zero, nothing written) and a tiny real run."""

import json

import numpy as np
import pytest
from flax import nnx

from interop.hf_model import save_model
from oftjax.cli import build_parser, main
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.train import read_metrics

TINY = ModelConfig.from_hf(
    {"model_type": "llama", "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "max_position_embeddings": 128, "tie_word_embeddings": False}
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    save_model(LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


def _err(capsys):
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
        (["--model", "/nonexistent/model"], "no such checkpoint directory"),
        (["--data", "/nonexistent/data.txt"], "data path not found"),
        (["--mesh", "3x3"], "needs 9 devices"),
        (["--mesh", "wide"], "DATAxFSDP"),
        (["--target-modules", " , "], "--target-modules is empty"),
        (["--resume", "--force"], "exclude each other"),
    ],
    ids=["steps", "lr", "accum", "model", "data", "mesh-size", "mesh-syntax", "targets", "resume-force"],
)
def test_train_argument_errors(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *argv]) == 1
    err = _err(capsys)
    assert message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "argv",
    [["train", "--quant", "q3"], ["train", "--steps", "many"], ["parity"], ["nonsense"]],
    ids=["quant", "steps-type", "parity-needs-model", "command"],
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_existing_run_dir_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user file")
    assert main(["train", "--output", str(tmp_path), "--steps", "1"]) == 1
    assert "pass --resume" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_subcommands_registered():
    parser = build_parser()
    args = parser.parse_args(["convert", "adapter-to-jax", "a", "b"])
    assert args.command == "convert"
    args = parser.parse_args(["parity", "--model", "m", "--adapter", "a"])
    assert args.command == "parity" and args.dtype == "float32" and args.rtol is None  # from TOLERANCE
    assert parser.parse_args(["train"]).model is None  # `oftjax train` alone: the embedded default


def test_train_help_explains_the_cpu_kernels(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--cpu-kernels {on,off}" in help_text and "agree to float32 rounding" in help_text
    assert build_parser().parse_args(["train"]).cpu_kernels is None  # resolved from JAX's backend at run time


def test_tiny_run_then_resume_and_changed_settings(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_dir), "--data", str(text_file), "--output", str(out), "--quiet",
              "--seq-len", "32", "--batch-size", "4", "--oft-block-size", "16",
              "--target-modules", "q_proj,v_proj", "--save-every", "2", "--eval-every", "2"]  # fmt: skip
    assert main([*common, "--steps", "4", "--quant", "nf4"]) == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "OFT" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quant"] == "nf4" and summary["bytes_per_frozen_param"] < 0.6
    # on a CPU the run used the CPU kernels (recorded: they change float rounding) and gave the process back
    # as it found it
    from oftjax import cpu_kernels

    assert json.loads((out / "run.json").read_text())["cpu_kernels"] == "on"
    assert not cpu_kernels.enabled()
    # resuming the finished run with the same settings does nothing new; changed settings are refused
    assert main([*common, "--steps", "4", "--quant", "nf4", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert main([*common, "--steps", "4", "--quant", "fp4", "--resume"]) == 1
    assert "changed settings ['quant']" in _err(capsys)
    assert main([*common, "--steps", "4", "--quant", "nf4", "--resume", "--cpu-kernels", "off"]) == 1
    assert "changed settings ['cpu_kernels']" in _err(capsys)
    np.testing.assert_equal(recs[-1]["step"], 4)
