"""Convert a PEFT OFT adapter to JAX and back, and check nothing changed.

1. Make a PEFT adapter: with torch installed, PEFT itself trains one for a few steps on a tiny transformers
   Llama and saves it (``save_pretrained``); without torch, one is written from a JAX model.
2. PEFT dir -> JAX adapter dir (``interop.peft.adapter_to_jax``, numpy + safetensors only; also
   ``oftjax convert adapter-to-jax``), then -> PEFT dir again (``adapter_to_peft``).
3. The round trip gives identical tensors; the adapter also attaches to the JAX model (``load_adapter``) and
   ``save_adapter`` writes the same tensors back.

Usage: python examples/convert_adapter.py [--out runs/example_convert]   (seconds on a CPU)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from interop.hf import load_model, save_model
from interop.peft import adapter_to_jax, adapter_to_peft, load_adapter, read_adapter, save_adapter
from oftjax import OFTConfig
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.surgery import apply_oft

CONFIG = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_adapter(out: Path) -> Path:
    base = out / "base"
    try:
        import torch
        import transformers
        from peft import OFTConfig as PeftOFTConfig
        from peft import get_peft_model
    except ImportError:
        print("torch/peft not installed: writing the adapter from a JAX model instead")
        model = LlamaForCausalLM(ModelConfig.from_hf(CONFIG), rngs=nnx.Rngs(0))
        save_model(model, base)
        apply_oft(
            model, OFTConfig(oft_block_size=16, target_modules=TARGETS, init_weights=False), rngs=nnx.Rngs(1)
        )
        return save_adapter(model, out / "peft")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(base)
    model = get_peft_model(
        model, PeftOFTConfig(oft_block_size=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out / "peft")
    print("PEFT trained and saved an OFT adapter")
    return out / "peft"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/example_convert"))
    a = p.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    src = peft_adapter(a.out)
    adapter_to_jax(src, a.out / "jax")
    adapter_to_peft(a.out / "jax", a.out / "peft_again")
    (_, t0), (cfg1, t1) = read_adapter(src), read_adapter(a.out / "peft_again")
    assert sorted(t0) == sorted(t1) and all(np.array_equal(t0[k], t1[k]) for k in t0), "round trip changed"
    print(
        f"PEFT -> JAX -> PEFT: {len(t0)} tensors identical; "
        f"config {sorted(cfg1.target_modules)}, b={cfg1.oft_block_size}"
    )

    model = load_model(a.out / "base")
    paths = load_adapter(model, src)
    save_adapter(model, a.out / "peft_from_model")
    _, t2 = read_adapter(a.out / "peft_from_model")
    assert all(np.array_equal(t0[k], t2[k]) for k in t0), "load_adapter/save_adapter changed the tensors"
    print(f"attached to {len(paths)} layers of the JAX model and saved back: identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
