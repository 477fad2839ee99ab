"""End to end across frameworks: a tiny Llama saved by transformers, quantized by bitsandbytes (nf4 + DQ).

1. JAX -> torch: ``oftjax train`` on the bnb checkpoint for a few dozen steps; the adapter it writes loads
   with ``PeftModel.from_pretrained`` on the transformers + bitsandbytes model and gives our logits;
   ``oftjax parity`` agrees (exit 0).
2. torch -> JAX: an adapter trained a few steps by PEFT on the bnb model loads in JAX with the same logits.
3. ``@pytest.mark.gpu``: the same comparisons against CUDA bitsandbytes.
"""

import json

import numpy as np
import pytest
import torch
import transformers

from interop import oracle
from interop.hf_model import load_model
from interop.peft import load_adapter
from oftjax.cli import main
from oftjax.cli._parity import jax_outputs
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

SEQ = 32


def _tiny_config() -> transformers.LlamaConfig:
    # vocab 272 >= the byte tokenizer's 259; in_features 64/128 are multiples of the 4-bit blocksize
    return transformers.LlamaConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_config())
    model.save_pretrained(root / "float")
    oracle.use_default_cpu_dequant()
    qmodel = transformers.LlamaForCausalLM.from_pretrained(
        root / "float", quantization_config=oracle.bnb_config("nf4", double_quant=True), device_map="cpu",
        dtype=torch.float32,
    )  # fmt: skip
    qmodel.save_pretrained(root / "nf4dq")
    text = root / "text"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 60)
    return root


def _ids(seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, 259, size=(batch, SEQ)).astype(np.int64)


def _jax_logits(model_dir, adapter_dir, ids):
    model = load_model(model_dir)
    load_adapter(model, adapter_dir)
    return jax_outputs(model, ids)[0]


def test_oftjax_trained_adapter_loads_in_peft(dirs, kernels, tmp_path, capsys):
    qdir, run = dirs / "nf4dq", tmp_path / "run"
    on_off = "on" if kernels == "cpu_kernels" else "off"
    argv = ["train", "--model", str(qdir), "--data", str(dirs / "text"), "--output", str(run), "--quiet",
            "--cpu-kernels", on_off,
            "--steps", "24", "--seq-len", str(SEQ), "--batch-size", "4", "--oft-block-size", "16",
            "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lr", "2e-2",
            "--save-every", "12", "--eval-every", "12"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quant"] == "nf4"  # the bnb checkpoint kept its own format
    assert summary["train_loss_last"] < summary["train_loss_first"]
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "OFT" and cfg["oft_block_size"] == 16

    ids = _ids()
    torch_model = oracle.load_causal_lm(qdir, adapter=run / "adapter")
    ref, _ = oracle.causal_lm_outputs(torch_model, ids)
    base_ref, _ = oracle.causal_lm_outputs(oracle.load_causal_lm(qdir), ids)
    assert np.abs(ref - base_ref).max() > 1e-2, "the trained adapter must change the logits"
    ours = _jax_logits(qdir, run / "adapter", ids)
    tol = TOL["e2e_logits_cpu"]
    np.testing.assert_allclose(ours, ref, rtol=tol.rtol, atol=tol.atol)
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) == 1.0

    capsys.readouterr()
    assert main(["parity", "--model", str(qdir), "--adapter", str(run / "adapter"), "--per-layer"]) == 0
    table = capsys.readouterr().out
    assert "PASS" in table and "layer 1 output" in table


def _peft_train(qdir, adapter_dir, steps=5, device="cpu"):
    peft = oracle.require("peft")
    model = oracle.load_causal_lm(qdir, device=device)
    cfg = peft.OFTConfig(
        r=0, oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
        init_weights=True,
    )  # fmt: skip
    model = peft.get_peft_model(model, cfg)
    oracle.disable_cpu_repacking(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.as_tensor(_ids(seed=1, batch=4), device=device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(adapter_dir)
    return losses


def test_peft_trained_adapter_loads_in_jax(dirs, tmp_path):
    qdir, adapter = dirs / "nf4dq", tmp_path / "peft_adapter"
    losses = _peft_train(qdir, adapter)
    assert losses[-1] < losses[0]
    ids = _ids(seed=2)
    ref, _ = oracle.causal_lm_outputs(oracle.load_causal_lm(qdir, adapter=adapter), ids)
    base_ref, _ = oracle.causal_lm_outputs(oracle.load_causal_lm(qdir), ids)
    assert np.abs(ref - base_ref).max() > 1e-2, "the PEFT adapter must change the logits"
    tol = TOL["e2e_logits_cpu"]
    np.testing.assert_allclose(_jax_logits(qdir, adapter, ids), ref, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.gpu
def test_parity_against_cuda_bitsandbytes(dirs, capsys):
    assert torch.cuda.is_available(), "the gpu marker needs CUDA torch + CUDA bitsandbytes"
    qdir, adapter = dirs / "nf4dq", dirs / "peft_adapter_cuda"
    _peft_train(qdir, adapter, device="cuda")
    ids = _ids(seed=3)
    ref, _ = oracle.causal_lm_outputs(oracle.load_causal_lm(qdir, adapter=adapter, device="cuda"), ids)
    tol = TOL["e2e_logits_cuda"]
    np.testing.assert_allclose(_jax_logits(qdir, adapter, ids), ref, rtol=tol.rtol, atol=tol.atol)
    capsys.readouterr()
    status = main(["parity", "--model", str(qdir), "--adapter", str(adapter), "--device", "cuda",
                   "--per-layer", "--rtol", str(tol.rtol)])  # fmt: skip
    print(capsys.readouterr().out)
    assert status == 0


@pytest.mark.slow
def test_main_job_no_arguments(tmp_path, capsys, monkeypatch):
    """`oftjax train` with no arguments: <= 5 minutes, loss falls clearly, outputs; torch agrees with it."""
    import time

    from oftjax.train import read_metrics

    monkeypatch.chdir(tmp_path)  # the default --output is runs/default, relative to the working directory
    t0 = time.perf_counter()
    assert main([]) == 0
    elapsed = time.perf_counter() - t0
    run = tmp_path / "runs" / "default"
    assert elapsed < 300, f"the main job took {elapsed:.0f} s"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quant"] == "nf4" and summary["bytes_per_frozen_param"] <= 0.52
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary
    assert len(read_metrics(run / "metrics.jsonl")) == 150
    assert (run / "loss.png").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    # transformers quantizes the cached float base with bitsandbytes itself; PEFT loads our adapter on it
    assert (
        main(["parity", "--model", str(run / "base"), "--quant", "nf4", "--adapter", str(run / "adapter")])
        == 0
    )
    assert "PASS" in capsys.readouterr().out
