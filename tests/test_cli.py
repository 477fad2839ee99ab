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


def test_the_command_runs_with_the_block_cache_and_the_same_values(tiny_dir, text_file, tmp_path):
    # `oftjax train` (a process of its own) starts again with the block cache preloaded, here for blocks from
    # 256 KiB so the tiny run's buffers go through it; the same run in this process (where the cache cannot
    # be loaded any more) gives the same losses bit for bit
    import os
    import platform
    import subprocess
    import sys

    assert platform.libc_ver()[0] == "glibc", "the block cache needs glibc: run this suite on Linux"
    common = ["train", "--model", str(tiny_dir), "--data", str(text_file), "--quiet", "--seq-len", "32",
              "--batch-size", "4", "--oft-block-size", "16", "--steps", "3", "--quant", "nf4"]  # fmt: skip
    env = {**os.environ, "OFTJAX_BLOCK_CACHE_MIN": str(1 << 18)}
    cmd = [sys.executable, "-m", "oftjax.cli", *common, "--output", str(tmp_path / "cmd")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert main([*common, "--output", str(tmp_path / "here")]) == 0
    cmd_summary = json.loads((tmp_path / "cmd" / "summary.json").read_text())
    here_summary = json.loads((tmp_path / "here" / "summary.json").read_text())
    assert cmd_summary["malloc"] == (
        "block cache: freed blocks of 0.25 MiB and more stay mapped for reuse; "
        "JAX runs CPU programs synchronously (one step buffer at a time)"
    )
    assert here_summary["malloc"].startswith("not applied: the block cache is preloaded when a process")
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("cmd", "here")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


# ------------------------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", str(2**70)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--max-grad-norm", "inf"], "--max-grad-norm"),
        (["--warmup-steps", "-5"], "--warmup-steps"),
        (["--eval-fraction", "1.5"], "--eval-fraction"),
        (["--eval-fraction", "nan"], "--eval-fraction"),
        (["--seq-len", "1"], "--seq-len"),
        (["--save-every", "-1"], "--save-every"),
        (["--target-modules", "nonexistent"], "nonexistent"),
        (["--target-modules", "model"], "--target-modules"),
    ],
)
def test_the_default_job_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    """No pretraining, no run.json, no directory: every argument is checked first."""
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--quiet", *argv]) == 1
    err = _err(capsys)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_output_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--output", str(tmp_path / "file" / "sub"), "--quiet"]) == 1
    err = _err(capsys)
    assert "not a directory" in err and err.count("\n") == 1


def test_data_folder_with_a_fifo_or_device_is_refused(tiny_dir, tmp_path, capsys):
    import os

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("text " * 500)
    os.mkfifo(data / "pipe.txt")
    args = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "run"),
        "--quiet",
    ]
    assert main(args) == 1
    assert "pipe.txt" in _err(capsys)
    (data / "pipe.txt").unlink()
    os.symlink("/dev/zero", data / "zero.txt")
    assert main(args) == 1
    assert "zero.txt" in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_internal_errors_are_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    import oftjax.cli._train_args as train_args

    def broken(args):
        raise OverflowError("something deep inside")

    monkeypatch.setattr(train_args, "_run", broken)  # what `train` runs, bound when the parser is built
    assert main(["train", "--output", str(tmp_path / "run")]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "OverflowError: something deep inside" in err and "OFTJAX_DEBUG" in err
    monkeypatch.setenv("OFTJAX_DEBUG", "1")
    with pytest.raises(OverflowError):
        main(["train", "--output", str(tmp_path / "run")])


def test_parity_refuses_a_device_it_does_not_have_and_huge_inputs(tiny_dir, capsys):
    import torch

    if not torch.cuda.is_available():
        assert main(["parity", "--model", str(tiny_dir), "--device", "cuda"]) == 1
        err = _err(capsys)
        assert "--device cuda" in err and err.count("\n") == 1
    assert main(["parity", "--model", str(tiny_dir), "--device", "tpu"]) == 1
    assert "--device" in _err(capsys)
    assert main(["parity", "--model", str(tiny_dir), "--seq-len", "100000"]) == 1
    err = _err(capsys)
    assert "--seq-len" in err and "128" in err


def test_every_train_argument_is_a_resume_key_or_said_not_to_change_the_result():
    from oftjax.cli._train_args import NOT_RESUME_KEYS, RESUME_KEYS

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    dests = {a.dest for a in train._actions if a.dest != "help"}
    assert dests == set(RESUME_KEYS) | set(NOT_RESUME_KEYS)
    assert not set(RESUME_KEYS) & set(NOT_RESUME_KEYS)
    for key in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_fraction", "dtype", "cpu_kernels"):
        assert key in RESUME_KEYS


def test_resume_checks_every_setting_and_survives_a_crash(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_dir), "--data", str(text_file), "--output", str(out), "--quiet",
              "--seq-len", "32", "--batch-size", "4", "--oft-block-size", "16", "--steps", "2",
              "--save-every", "1", "--eval-every", "0", "--target-modules", "q_proj"]  # fmt: skip
    assert main(common) == 0
    for flag, value in [("--warmup-steps", "1"), ("--weight-decay", "0.1"), ("--max-grad-norm", "0.5"),
                        ("--eval-fraction", "0.2"), ("--dtype", "bfloat16")]:  # fmt: skip
        assert main([*common, "--resume", flag, value]) == 1
        assert f"changed settings ['{flag[2:].replace('-', '_')}']" in _err(capsys)
    # a crash left a torn metrics line and the temporaries of interrupted writes: resume goes on
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    (out / f".adapter.{_dead_pid()}.abc.tmp").mkdir()
    (out / ".base.x1y2.tmp").mkdir()
    (out / ".run.json.x1y2.tmp").write_text("{")
    assert main([*common, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # run.json lost or damaged: the settings cannot be checked, so resuming is refused
    (out / "run.json").write_text("")
    assert main([*common, "--resume"]) == 1
    err = _err(capsys)
    assert "run.json" in err and err.count("\n") == 1
    (out / "run.json").unlink()
    assert main([*common, "--resume"]) == 1
    assert "run.json" in _err(capsys)


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip


def test_read_metrics_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a write cut short: the last line only
    assert read_metrics(path) == [{"step": 1}]
