"""The embedded default of ``oftjax train`` (no arguments, no download).

1. Text found on every machine that runs Python, tokenized byte-level (``oftjax.data.ByteTokenizer``):
   the standard library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``, sorted path order, up to
   ``DATA_BYTES`` characters) pretrain the base; the language documentation that ships inside the standard
   library as ``pydoc_data.topics`` (the text of ``help("assert")`` etc., ~0.5 MB of English prose) is the
   different slice OFT fine-tunes on: code -> documentation, a shift the adapter visibly learns. Where a
   distribution strips ``pydoc_data``, the odd-numbered source files are the fine-tuning slice instead
   (and the even-numbered ones pretrain).
2. Base model: a small Llama (``BASE_CONFIG``: hidden 128, 2 layers, GQA 4/2 heads, byte vocabulary 259).
   It is not pretrained anywhere, so it is pretrained here briefly (full-parameter AdamW in JAX) and cached
   as an HF checkpoint in ``<output>/base`` (``interop.hf.save_model``; transformers loads it).
3. Fine-tuning: the base is quantized to NF4 with double quantization (bitsandbytes' format and CPU rounding,
   as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
   would), OFT (block size 32, Cayley-Neumann, all attention and MLP projections) is applied, and only the
   rotations train on the other slice. Outputs: ``<output>/adapter`` (PEFT format), ``metrics.jsonl``,
   ``loss.png``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = [
    "BASE_CONFIG",
    "DATA_BYTES",
    "DEFAULT_OUTPUT",
    "FINETUNE",
    "PRETRAIN",
    "OFT_BLOCK_SIZE",
    "REAL_MODEL",
    "TARGET_MODULES",
    "default_texts",
    "stdlib_dir",
]

DEFAULT_OUTPUT = "runs/default"
DATA_BYTES = 2_000_000

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}

# Pretraining of the base (full parameters) and the OFT fine-tuning: TrainConfig fields.
PRETRAIN = {"steps": 300, "learning_rate": 3e-3, "warmup_steps": 20, "batch_size": 16, "seq_len": 128}
FINETUNE = {"steps": 150, "learning_rate": 1e-2, "warmup_steps": 10, "batch_size": 8, "seq_len": 128}
# ``oftjax train --model``: a pretrained checkpoint. The toy's rate destroys a real model; this one comes from
# the learning-rate sweep on SmolLM2-135M-Instruct (NF4 + OFT, the pydoc chat set) in benchmarks/RESULTS.md.
REAL_MODEL = {"steps": 100, "learning_rate": 3e-4, "batch_size": 4, "seq_len": 512}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OFT_BLOCK_SIZE = 32


def stdlib_dir() -> Path:
    """The Python standard library's source directory (the default data)."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_texts(max_bytes: int = DATA_BYTES) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """``(pretrain texts, fine-tune texts, description of the fine-tune slice)`` as ``[(name, text)]``."""
    from oftjax.data import read_texts

    sources = [
        (n, t) for n, t in read_texts(stdlib_dir(), max_bytes=max_bytes) if not n.startswith("pydoc_data")
    ]
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return sources[0::2], sources[1::2], "odd-numbered standard library sources"
    docs = sorted((f"pydoc_data.topics[{k!r}]", v) for k, v in topics.items() if v.strip())
    return sources, docs, "the Python documentation in pydoc_data.topics"
