"""``oftjax plan`` against measured memory, on models that train on this CPU.

For each case, one subprocess with the case's device count (simulated CPU devices) plans the step
(``oftjax.train.plan_memory`` over abstract shapes) and then trains the same model for real (random weights,
quantized, OFT applied, ``Trainer`` on the same mesh, pure-JAX kernels) and measures:
  * state per device: the bytes of device 0's shards of the training state (what the plan's frozen,
    rotation and optimizer parts predict);
  * the step's memory: the growth of the process's resident set during one step (the peak, ``VmHWM``,
    reset through ``/proc/self/clear_refs`` before the step, minus the resident set just before it). On a
    CPU every simulated device lives in this process, so it is compared with the devices' planned
    temporaries and outputs not written in place (XLA:CPU allocates them afresh for every execution; glibc
    maps them directly, ``MALLOC_MMAP_THRESHOLD_``, so they are faulted in anew each step).

Run: ``python benchmarks/plan_check.py [CASE ...]`` (a few minutes on 2 cores). Prints a markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
WIDE = {**SMALL, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 6}
# (name, config, batch, seq, devices, remat)
CASES = [
    ("4x512, 1 device", SMALL, 8, 256, 1, False),
    ("4x512, 1 device, remat", SMALL, 8, 256, 1, True),
    ("4x512, 1x4 FSDP", SMALL, 8, 256, 4, False),
    ("6x1024, 1 device, remat", WIDE, 4, 512, 1, True),
    ("6x1024, 2x2", WIDE, 8, 512, 4, False),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _case(spec: dict) -> dict:
    """In the subprocess: the plan, then the measured state bytes and step growth."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.models import CausalLM, ModelConfig
    from oftjax.surgery import apply_oft
    from oftjax.train import TrainConfig, Trainer, make_mesh, plan_memory, quantize_model

    config = ModelConfig.from_hf(spec["config"])
    n = spec["devices"]
    mesh = make_mesh(*((1, n) if n < 4 or spec["name"].endswith("FSDP") else (2, n // 2)))

    def build():
        model = CausalLM(config, rngs=nnx.Rngs(0), dtype=jnp.float32, remat=spec["remat"])
        quantize_model(model, "nf4", double_quant=True)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        apply_oft(model, OFTConfig(r=0, oft_block_size=32, target_modules=targets), rngs=nnx.Rngs(0))
        return model

    cfg = TrainConfig(steps=10, batch_size=spec["batch"], seq_len=spec["seq"])
    plan = plan_memory(build, cfg, mesh).as_dict()
    trainer = Trainer(build(), cfg, mesh=mesh)
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(0, config.vocab_size, (cfg.batch_size, cfg.seq_len)).astype(np.int32)
        return {"input_ids": ids, "loss_mask": np.ones_like(ids, bool)}

    for _ in range(2):  # compiled and warm
        jax.block_until_ready(trainer.train_step(batch()))
    device0 = jax.devices()[0]
    state = sum(
        s.data.nbytes
        for x in jax.tree.leaves(trainer.state)
        for s in x.addressable_shards
        if s.device == device0
    )
    b = batch()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    jax.block_until_ready(trainer.train_step(b))
    growth = _status("VmHWM") - before
    return {"plan": plan, "state": state, "growth": growth}


def main() -> None:
    rows = []
    only = sys.argv[1:]
    for name, config, batch, seq, devices, remat in CASES:
        if only and name not in only:
            continue
        spec = {
            "name": name,
            "config": config,
            "batch": batch,
            "seq": seq,
            "devices": devices,
            "remat": remat,
        }
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(ROOT),
            # every allocation over 1 MiB its own mapping: a step's buffers are faulted in afresh, never
            # served from memory an earlier step left resident (glibc's threshold otherwise adapts)
            "MALLOC_MMAP_THRESHOLD_": str(2**20),
        }
        code = (
            f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.plan_check import _case; "
        )
        code += f"print(json.dumps(_case({spec!r})))"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        p = r["plan"]
        planned_state = p["frozen_packed"] + p["frozen_float"] + p["rotations"] + p["optimizer"]
        planned_step = devices * (p["xla"]["temp"] + p["xla"]["output"] - p["xla"]["alias"])
        rows.append(
            f"| {name} | {batch}x{seq} | {planned_state / 2**20:.1f} | {r['state'] / 2**20:.1f} | "
            f"{planned_step / 2**20:.0f} | {r['growth'] / 2**20:.0f} | "
            f"{100 * (planned_step - r['growth']) / r['growth']:+.1f}% |"
        )
        print(rows[-1], flush=True)
    print("\n| case | batch | planned state/device MiB | measured | planned step MiB (all devices) | "
          "measured RSS growth MiB | plan vs measured |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
