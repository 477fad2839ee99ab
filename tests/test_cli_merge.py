"""``oftjax merge``: a PEFT OFT adapter folded into a float or bitsandbytes base, written as a complete HF
checkpoint that transformers (+ bitsandbytes) loads without a warning and that computes the adapted model:
float bases to fp32 rounding, quantized bases within what one more quantization of every weight costs; the
reported requantization error is the one in the written weights; bad inputs refused before loading."""

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
import transformers

from interop import oracle
from interop.hf_model import load_model
from interop.peft import load_adapter
from oftjax import oft_layers
from oftjax.cli import main
from oftjax.nn import base_ops, module_at
from oftjax.nn._merge import merged_weight
from oftjax.train import quantize_model
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
SIDE = {"tokenizer_config.json": '{"eos_token": "</s>"}', "chat_template.jinja": "{{ messages }}"}
BNB = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def _hf_model(seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():  # every parameter drawn (norms around 1), as the parity tests do
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A float checkpoint with side files, its bnb versions (quantized by transformers on load), and a
    PEFT OFT adapter with random rotations made by PEFT."""
    import peft

    root = tmp_path_factory.mktemp("merge")
    model = _hf_model()
    model.save_pretrained(root / "float")
    for name, text in SIDE.items():
        (root / "float" / name).write_text(text)
    oracle.use_default_cpu_dequant()
    for name, kw in BNB.items():
        qcfg = transformers.BitsAndBytesConfig(**kw, bnb_4bit_compute_dtype=torch.float32)
        q = transformers.AutoModelForCausalLM.from_pretrained(
            root / "float", quantization_config=qcfg, dtype=torch.float32, device_map="cpu"
        )
        oracle.disable_cpu_repacking(q)
        q.save_pretrained(root / name)  # before any forward (docs/oracle.md)
    cfg = peft.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS, init_weights=False)
    peft.get_peft_model(_hf_model(), cfg).save_pretrained(root / "adapter")
    return root


IDS = np.random.default_rng(1).integers(0, TINY_LLAMA["vocab_size"], size=(4, 24))


def _torch_logits(model) -> np.ndarray:
    return oracle.causal_lm_outputs(model, torch.as_tensor(IDS))[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _load_without_warnings(path):
    """transformers (+ bitsandbytes) loads the merged checkpoint: no missing, unexpected or mismatched key,
    and nothing logged at WARNING or above."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="cpu", output_loading_info=True
        )
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    assert not records, [r.getMessage() for r in records]
    return model


def _merge(capsys, *argv) -> str:
    status = main(["merge", *argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


def test_float_merge_is_the_adapted_model_in_transformers(ckpts, tmp_path, capsys):
    out = _merge(capsys, "--model", str(ckpts / "float"), "--adapter", str(ckpts / "adapter"), "--output",
                 str(tmp_path / "merged"))  # fmt: skip
    merged = _load_without_warnings(tmp_path / "merged").eval()
    unmerged = oracle.load_causal_lm(ckpts / "float", adapter=ckpts / "adapter")
    tol = TOL["merge_logits_fp32"].rtol
    assert _rel(_torch_logits(merged), _torch_logits(unmerged)) <= tol
    assert "float base: no requantization" in out and "into 8 layers" in out
    assert float(re.search(r"max rel err (\S+),", out).group(1)) <= tol  # its own check agrees
    for name in ("generation_config.json", *SIDE):  # a complete checkpoint: the base's side files
        assert (tmp_path / "merged" / name).read_bytes() == (ckpts / "float" / name).read_bytes()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


@pytest.mark.parametrize(
    "base, quant",
    [("nf4-dq", "none"), ("int8", "none"), ("float", "nf4")],
    ids=["nf4-dq", "int8", "float-nf4"],
)
def test_quantized_merge_loads_in_bitsandbytes_within_one_quantization(ckpts, tmp_path, capsys, base, quant):
    src = ckpts / base
    out = _merge(capsys, "--model", str(src), "--adapter", str(ckpts / "adapter"), "--output",
                 str(tmp_path / "merged"), "--quant", quant)  # fmt: skip
    kind = "int8" if base == "int8" else "nf4"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert config.get("load_in_8bit" if kind == "int8" else "load_in_4bit") is True
    _load_without_warnings(tmp_path / "merged")
    # transformers + bitsandbytes: the merged checkpoint against PEFT on the unmerged base. The bound is
    # what quantizing the float base costs (bnb's quantized base against the float one): requantizing the
    # rotated weights costs the same again, so the merged model must stay within twice that.
    merged = _torch_logits(oracle.load_causal_lm(tmp_path / "merged"))
    quant_base = ckpts / (base if quant == "none" else "nf4-dq")
    unmerged = _torch_logits(oracle.load_causal_lm(quant_base, adapter=ckpts / "adapter"))
    once = _rel(
        _torch_logits(oracle.load_causal_lm(quant_base)),
        _torch_logits(oracle.load_causal_lm(ckpts / "float")),
    )
    got = _rel(merged, unmerged)
    assert 0 < got <= TOL["merge_requantized"].rtol * once, (got, once)
    _check_reported_error(out, src, quant, ckpts / "adapter", tmp_path / "merged")


def _check_reported_error(out: str, src, quant: str, adapter, merged_dir) -> None:
    """The printed requantization error is max |W_written - W'| / max |W'| over the written weights, W' the
    rotated float weight of the unmerged layer: its max and mean over the layers."""
    model = load_model(src, dtype="float32")
    quantize_model(model, quant, double_quant=True)
    load_adapter(model, adapter)
    written = load_model(merged_dir, dtype="float32")
    errors = []
    for path, layer in oft_layers(model):
        want = np.asarray(merged_weight(layer, layer.forward_adapters()), np.float32)
        got = np.asarray(base_ops(module_at(written, path)).dense_weight(np.float32))
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    m = re.search(r"max \|W_merged\| per layer: max (\S+), mean (\S+) over (\d+) layers", out)
    assert m is not None, out
    np.testing.assert_allclose(
        [float(m.group(1)), float(m.group(2))], [max(errors), np.mean(errors)], rtol=1e-3
    )
    assert int(m.group(3)) == len(errors) == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quant", "fp4"], "already quantized (nf4)"),
        (["--adapter", "/nonexistent"], "not a PEFT adapter directory"),
        (["--batch", "0"], "--batch"),
        (["--output", "{model}/sub"], "overlaps --model"),
        (["--output", "{adapter}"], "overlaps --adapter"),
        (["--output", "{existing}"], "exists and is not empty; pass --force"),
    ],
    ids=["quant", "adapter", "batch", "inside-model", "adapter-dir", "existing"],
)
def test_bad_inputs_are_refused_before_loading(ckpts, tmp_path, capsys, monkeypatch, argv, message):
    import oftjax.cli._merge as command

    monkeypatch.setattr(command, "load_model_and_adapter", lambda args: pytest.fail("the model was loaded"))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    names = {"model": ckpts / "nf4-dq", "adapter": ckpts / "adapter", "existing": tmp_path / "existing"}
    argv = [a.format(**names) for a in argv]
    base = ["merge", "--model", str(names["model"]), "--adapter", str(names["adapter"])]
    output = [] if "--output" in argv else ["--output", str(tmp_path / "out")]
    assert main([*base, *output, *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and (tmp_path / "existing" / "keep.txt").read_text() == "mine"


def test_force_replaces_an_existing_output_and_usage_errors_exit_2(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _merge(capsys, "--model", str(ckpts / "float"), "--adapter", str(ckpts / "adapter"), "--output", str(out),
           "--force")  # fmt: skip
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(["merge", "--model", str(ckpts / "float"), "--output", str(out)])  # no --adapter
    assert e.value.code == 2


@pytest.mark.slow
def test_smollm2_merge_loads_in_transformers_with_the_adapted_logits(smollm2_dir, tmp_path, capsys):  # noqa: F811
    """The real checkpoint (bf16, tied embeddings) with a random adapter on every projection: the merged
    bf16 checkpoint against PEFT on the unmerged one, both in float32 (the bf16 rounding of the merged
    weights is the error: a bf16 ulp of the weights, 2^-8 relative, through 30 layers)."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cfg = peft.OFTConfig(r=0, oft_block_size=32, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_weights=False)  # fmt: skip
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    out = _merge(capsys, "--model", str(smollm2_dir), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged"))  # fmt: skip
    assert "into 90 layers" in out
    merged = _torch_logits(_load_without_warnings(tmp_path / "merged").eval())
    unmerged = _torch_logits(oracle.load_causal_lm(smollm2_dir, adapter=tmp_path / "adapter"))
    assert _rel(merged, unmerged) <= TOL["bf16_model_forward"].rtol
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (smollm2_dir / name).read_bytes()
    shutil.rmtree(tmp_path / "merged")
