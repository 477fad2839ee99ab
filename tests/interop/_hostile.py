"""Valid files to attack, built from a tiny oftjax Llama without torch, and a record of the files opened.

``build_fixtures(root)`` writes, under ``root``, HF checkpoints of one tiny Llama (float32, NF4 with double
quantization, int8, and a sharded float one), the JAX checkpoint of the NF4 one, a PEFT OFT adapter (with a
second adapter in a subfolder) and its JAX adapter directory. ``reference_logits`` gives what loading them
must produce. ``opened_files()`` records every path the process opens (``sys.addaudithook`` on "open"), so a
test can check that nothing outside a root was read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests._tiny import TINY_LLAMA

INPUT_IDS = np.array([[1, 5, 9, 3, 77, 2, 11, 4]], dtype=np.int32)
CHECKPOINTS = ("float", "nf4", "int8", "sharded")


@dataclasses.dataclass(frozen=True)
class Fixtures:
    """The valid directories (each name -> path) the hostile tests and the fuzz test start from."""

    root: Path
    checkpoints: dict[str, Path]
    jax_checkpoint: Path
    adapter: Path
    jax_adapter: Path


def model_config():
    from oftjax.models import ModelConfig

    return ModelConfig.from_hf({"model_type": "llama", "max_position_embeddings": 64, **TINY_LLAMA})


def tiny_model(seed: int = 0):
    from oftjax.models import LlamaForCausalLM

    return LlamaForCausalLM(model_config(), rngs=nnx.Rngs(seed))


def _adapter_model():
    """The tiny model with a random OFT adapter "default" (q_proj, v_proj) and "other" (up_proj)."""
    from oftjax import OFTConfig, apply_oft

    model = tiny_model()
    apply_oft(model, OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(1))
    apply_oft(
        model,
        OFTConfig(oft_block_size=16, target_modules=["up_proj"]),
        adapter_name="other",
        rngs=nnx.Rngs(2),
    )
    rng = np.random.default_rng(3)
    for _, layer in _oft_layers(model):
        for param in layer.rotation_params.values():
            param[...] = jnp.asarray(rng.normal(0, 0.05, param[...].shape), param[...].dtype)
    return model


def _oft_layers(model):
    from oftjax.surgery import oft_layers

    return oft_layers(model)


def build_fixtures(root: Path) -> Fixtures:
    """Write every valid directory under ``root`` (a few seconds; no torch)."""
    from interop import hf, peft
    from interop.hf_model import save_model
    from oftjax.train import quantize_model

    root.mkdir(parents=True, exist_ok=True)
    checkpoints = {}
    for name in CHECKPOINTS:
        model = tiny_model()
        if name in ("nf4", "int8"):
            quantize_model(model, name, double_quant=True)
        shard = 40_000 if name == "sharded" else "5GB"
        checkpoints[name] = root / f"ckpt_{name}"
        save_model(model, checkpoints[name], max_shard_size=shard)
    (checkpoints["float"] / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    jax_checkpoint = hf.checkpoint_to_jax(checkpoints["nf4"], root / "jax_ckpt_nf4")
    model = _adapter_model()
    adapter = root / "adapter"
    peft.save_adapter(model, adapter)
    peft.save_adapter(model, adapter, "other")
    jax_adapter = peft.adapter_to_jax(adapter, root / "jax_adapter")
    return Fixtures(root, checkpoints, jax_checkpoint, adapter, jax_adapter)


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(INPUT_IDS)), dtype=np.float32)


_REFERENCE: dict[Path, dict[str, np.ndarray]] = {}


def reference_logits(fixtures: Fixtures) -> dict[str, np.ndarray]:
    """Logits of every checkpoint alone, and of the float checkpoint with each adapter (computed once)."""
    from interop import hf, peft

    if fixtures.root in _REFERENCE:
        return _REFERENCE[fixtures.root]
    out = _REFERENCE[fixtures.root] = {
        name: logits(hf.load_model(path)) for name, path in fixtures.checkpoints.items()
    }
    for name in ("default", "other"):
        model = hf.load_model(fixtures.checkpoints["float"])
        peft.load_adapter(model, fixtures.adapter, name)
        out[f"adapter:{name}"] = logits(model)
    return out


_OPENED: list[list[str]] = []


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED[-1].append(os.fsdecode(args[0]))


_HOOKED = False


@contextlib.contextmanager
def opened_files() -> Iterator[list[str]]:
    """Collect the paths opened inside the block (an audit hook, installed once per process)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_hook)
        _HOOKED = True
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def outside(paths: list[str], root: Path, allowed: tuple[Path, ...] = ()) -> list[str]:
    """Of ``paths``, those under ``allowed`` (e.g. the test's tmp dir) that are not inside ``root``."""
    real_root = os.path.realpath(root)
    bad = []
    for p in paths:
        real = os.path.realpath(p)
        if any(real.startswith(os.path.realpath(a) + os.sep) for a in allowed) and not (
            real == real_root or real.startswith(real_root + os.sep)
        ):
            bad.append(p)
    return bad
