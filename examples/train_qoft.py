"""Train QOFT on a quantized checkpoint with the Python API (no torch needed), and save a PEFT adapter.

1. Build a small Llama, quantize its linears to NF4 with double quantization (bitsandbytes' format) and save
   it as an HF checkpoint: transformers + bitsandbytes load that directory as they load their own.
2. Load it back (the weights stay packed), apply OFT to the attention and MLP projections, and train only the
   rotations with optax on text (default: this repository's Python sources, else the standard library's).
3. Save the adapter in PEFT format: ``PeftModel.from_pretrained(bnb_model, OUT / "adapter")`` loads it.

Usage: python examples/train_qoft.py [--steps 60] [--out runs/example_qoft] [--data PATH]
Finishes in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

from flax import nnx

from interop.hf import load_model, save_model
from interop.peft import save_adapter
from oftjax import OFTConfig
from oftjax.cli import keep_freed_memory
from oftjax.data import ByteTokenizer, pack, read_texts, split, tokenize
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.surgery import apply_oft, trainable_count
from oftjax.train import TrainConfig, fit, quantize_model

CONFIG = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("runs/example_qoft"))
    p.add_argument("--data", type=Path, default=None)
    a = p.parse_args()
    # a training process: let glibc reuse XLA's per-step buffers instead of faulting them in every step
    # (oftjax/cli/_malloc.py); must come before JAX's first computation
    print(keep_freed_memory())
    if a.out.exists():
        shutil.rmtree(a.out)  # an example: always start fresh

    # 1. a quantized HF checkpoint (random weights here; any Llama/Mistral/Qwen2 bnb checkpoint works alike)
    model = LlamaForCausalLM(ModelConfig.from_hf(CONFIG), rngs=nnx.Rngs(0))
    quantize_model(model, "nf4", double_quant=True)
    save_model(model, a.out / "base-nf4")

    # 2. load it (packed NF4 stays packed), add OFT, train the rotations only
    model = load_model(a.out / "base-nf4")
    config = OFTConfig(
        r=0,
        oft_block_size=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    paths = apply_oft(model, config, rngs=nnx.Rngs(0))
    print(f"OFT on {len(paths)} layers, {trainable_count(model):,} trainable parameters")
    src = a.data or (Path(__file__).resolve().parents[1] / "oftjax")
    if not src.exists():
        src = Path(sysconfig.get_paths()["stdlib"])
    tok = ByteTokenizer()
    texts = [t for _, t in read_texts(src, max_bytes=400_000)]
    data = pack(tokenize(texts, tok), 128, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    train, held_out = split(data, 0.05)
    cfg = TrainConfig(steps=a.steps, learning_rate=1e-2, batch_size=8, seq_len=128, eval_every=20)
    result = fit(
        model,
        cfg,
        train,
        eval_data=held_out,
        output_dir=a.out,
        write_adapter=lambda m, path: save_adapter(m, path, force=True, config=config),
    )
    print(f"eval loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}")

    # 3. the PEFT adapter is in OUT/adapter (also metrics.jsonl, loss.png, checkpoints/)
    print(
        f"wrote {a.out / 'adapter'}; load it in torch with PeftModel.from_pretrained on {a.out / 'base-nf4'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
