"""The real SmolLM2 checkpoint through the command line: ``oftjax parity`` passes in float32 (base, NF4, int8,
a trained adapter) and in bfloat16 against torch bfloat16; int8 in eval mode (LLM.int8 on both sides, the
default) and in train mode, and on the 8-bit checkpoints of the LLM.int8 model tests; ``oftjax train`` on
the packaged chat set improves the held-out loss and writes an adapter that ``PeftModel.from_pretrained``
loads on transformers + bitsandbytes with logits within 1e-4 (relative) of ours.

The default suite runs these on the real checkpoint cut to its first two decoder layers (real weights, real
tokenizer and chat template, the 49,152-token tied vocabulary) with short runs; the full 30-layer model runs
under ``-m slow`` (see each test for its time on the 2-core development machine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from interop import oracle
from oftjax.cli import main
from oftjax.cli._parity import LLM_INT8_TOLERANCE, TOLERANCE, compare, jax_outputs
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture
from tests.parity.test_int8_eval_parity import int8_dirs  # noqa: F401 - 8-bit checkpoints of a tiny Llama
from tests.tolerances import TOL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def smollm2_2layers(tmp_path_factory, smollm2_dir: Path) -> Path:  # noqa: F811
    """SmolLM2-135M-Instruct cut to its first two decoder layers (bf16 like the checkpoint), its tokenizer."""
    torch = oracle.require("torch")
    transformers = oracle.require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    path = tmp_path_factory.mktemp("smollm2") / "two-layers"
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, path / name)
    return path


def _parity(capsys, model: Path, *extra: str) -> str:
    status = main(["parity", "--model", str(model), *extra])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "  PASS: " in out
    return out


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_parity_float32_two_layers(smollm2_2layers, quant, capsys):
    out = _parity(capsys, smollm2_2layers, "--quant", quant)
    assert "float32" in out


EVAL_LINE = "int8 layers: LLM.int8 (eval mode) on both sides (--int8-mode eval)"
TRAIN_LINE = "int8 layers: dequantize, then float matmul (train mode) on both sides (--int8-mode train)"


def test_parity_int8_runs_llm_int8_by_default_two_layers(smollm2_2layers, capsys):
    """8-bit: LLM.int8 on both sides unless asked otherwise, with its limits and the SDPA-vs-eager scale."""
    out = _parity(capsys, smollm2_2layers, "--quant", "int8")
    assert EVAL_LINE in out and "torch SDPA vs eager" in out
    assert f"(limit {LLM_INT8_TOLERANCE.rtol:g})" in out


def test_parity_int8_train_mode_two_layers(smollm2_2layers, capsys):
    """``--int8-mode train``: the dequantize-then-matmul forward of training, judged by the float32 limits."""
    out = _parity(capsys, smollm2_2layers, "--quant", "int8", "--int8-mode", "train")
    assert TRAIN_LINE in out and "SDPA" not in out
    assert f"(limit {TOLERANCE['float32'].rtol:g})" in out


@pytest.mark.parametrize("name", ["default", "skip-modules"])
def test_parity_int8_eval_on_8bit_checkpoints(int8_dirs, name, capsys):  # noqa: F811
    """The 8-bit checkpoints of the LLM.int8 model tests (threshold 6; threshold 2 with outlier columns in
    most layers and skipped modules), loaded as saved on both sides: LLM.int8 agrees within the model-level
    bound of those tests, far inside the command's default limits."""
    path, _ = int8_dirs[name]
    limit = TOL["llm_int8_logits"].atol  # x max |logit|: the command's relative error
    out = _parity(capsys, path, "--rtol", f"{limit:g}", "--min-top1", "0.99", "--per-layer")
    assert EVAL_LINE in out
    assert "(int8)" in out.splitlines()[0]


def test_parity_bfloat16_two_layers(smollm2_2layers, capsys):
    out = _parity(capsys, smollm2_2layers, "--quant", "nf4", "--dtype", "bfloat16")
    assert "torch vs its fp32" in out and f"(limit {TOLERANCE['bfloat16'].rtol:g})" in out


def _train(model: Path, out: Path, *extra: str) -> dict:
    argv = ["train", "--model", str(model), "--data", "pydoc-chat", "--output", str(out), "--quiet"]
    assert main([*argv, "--save-every", "0", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _peft_logits_match(model: Path, adapter: Path) -> None:
    """``PeftModel.from_pretrained`` on transformers + bitsandbytes NF4 gives our logits (1e-4 relative)."""
    from interop.hf_model import load_model
    from interop.peft import load_adapter
    from oftjax.train import quantize_model

    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 48)).astype(np.int64)
    ours = load_model(model, dtype="float32")
    quantize_model(ours, "nf4", double_quant=True)
    load_adapter(ours, adapter)
    torch_model = oracle.load_causal_lm(model, quant="nf4", adapter=adapter, attn_implementation="eager")
    assert type(torch_model).__name__.startswith("PeftModel")
    got = compare(jax_outputs(ours, ids)[0], oracle.causal_lm_outputs(torch_model, ids)[0], top1=True)
    assert got["max_rel"] <= TOLERANCE["float32"].rtol and got["top1"] >= TOLERANCE["float32"].min_top1, got


def test_train_on_the_chat_set_then_peft_loads_the_adapter_two_layers(smollm2_2layers, tmp_path, capsys):
    summary = _train(
        smollm2_2layers, tmp_path / "run", "--steps", "2", "--seq-len", "128", "--batch-size", "2"
    )
    assert summary["data"]["train"]["rows"] == 223 and summary["data"]["eval"]["rows"] == 37
    assert np.isfinite(summary["eval_loss_before"]) and np.isfinite(summary["eval_loss_after"])
    _peft_logits_match(smollm2_2layers, tmp_path / "run" / "adapter")
    out = _parity(capsys, smollm2_2layers, "--quant", "nf4", "--adapter", str(tmp_path / "run" / "adapter"))
    assert "+ double quant" in out


# ------------------------------------------------------------------------------ the whole model (-m slow)


@pytest.fixture(scope="module")
def trained_smollm2(smollm2_dir, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    """``oftjax train --model SmolLM2 --data pydoc-chat`` with the real-model defaults, 20 steps."""
    out = tmp_path_factory.mktemp("smollm2-run") / "run"
    return out, _train(smollm2_dir, out, "--steps", "20", "--eval-every", "0")


@pytest.mark.slow
def test_smollm2_train_improves_eval_and_peft_loads_the_adapter(smollm2_dir, trained_smollm2, capsys):  # noqa: F811
    out, summary = trained_smollm2
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert summary["eval_improved"] is True
    _peft_logits_match(smollm2_dir, out / "adapter")


@pytest.mark.slow
@pytest.mark.parametrize(
    "quant, dtype", [("none", "float32"), ("nf4", "float32"), ("int8", "float32"), ("none", "bfloat16"),
                     ("nf4", "bfloat16")],
    ids=["base-fp32", "nf4-fp32", "int8-fp32", "base-bf16", "nf4-bf16"],
)  # fmt: skip
def test_smollm2_parity(smollm2_dir, quant, dtype, capsys):  # noqa: F811
    out = _parity(capsys, smollm2_dir, "--quant", quant, "--dtype", dtype)
    assert (EVAL_LINE in out) == (quant == "int8")


@pytest.mark.slow
def test_smollm2_parity_int8_train_mode(smollm2_dir, capsys):  # noqa: F811
    assert TRAIN_LINE in _parity(capsys, smollm2_dir, "--quant", "int8", "--int8-mode", "train")


@pytest.mark.slow
def test_smollm2_parity_with_the_trained_adapter(smollm2_dir, trained_smollm2, capsys):  # noqa: F811
    out, _ = trained_smollm2
    _parity(capsys, smollm2_dir, "--quant", "nf4", "--adapter", str(out / "adapter"))
