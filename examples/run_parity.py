"""Run ``oftjax parity``: the same bnb-quantized model + OFT adapter in torch and in JAX, side by side.

1. transformers builds a tiny Llama, saves it, and bitsandbytes quantizes it on load (NF4 + double quant);
   transformers saves that bnb checkpoint.
2. ``oftjax train`` fine-tunes an OFT adapter on it for a few steps (the checkpoint stays packed in JAX).
3. ``oftjax parity`` loads the checkpoint + adapter in transformers + bitsandbytes + PEFT and in JAX and
   prints the table (logits and per-layer errors, top-1 agreement); exit status 0 means within tolerance.

Needs the torch oracle (pip install -e '.[oracle]'). Usage: python examples/run_parity.py [--device cuda]
Finishes in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from interop import oracle
from oftjax.cli import main as oftjax


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/example_parity"))
    p.add_argument("--device", default="cpu", help="torch device for the oracle: cpu or cuda")
    a = p.parse_args()
    torch = oracle.require("torch")
    transformers = oracle.require("transformers")
    if a.out.exists():
        shutil.rmtree(a.out)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=272,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(a.out / "float")
    oracle.use_default_cpu_dequant()
    qmodel = transformers.LlamaForCausalLM.from_pretrained(
        a.out / "float",
        quantization_config=oracle.bnb_config("nf4", double_quant=True),
        device_map="cpu",
        dtype=torch.float32,
    )
    qmodel.save_pretrained(a.out / "nf4dq")
    status = oftjax(
        [
            "train",
            "--model",
            str(a.out / "nf4dq"),
            "--output",
            str(a.out / "run"),
            "--steps",
            "30",
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            "--max-data-bytes",
            "300000",
            "--quiet",
        ]
    )
    if status:
        return status
    return oftjax(
        [
            "parity",
            "--model",
            str(a.out / "nf4dq"),
            "--adapter",
            str(a.out / "run" / "adapter"),
            "--per-layer",
            "--device",
            a.device,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
