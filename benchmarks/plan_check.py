"""``oftjax plan`` against measured memory, on models that train on this CPU.

For each case, one subprocess with the case's device count (simulated CPU devices) plans the step
(``oftjax.train.plan_memory`` over abstract shapes) and then trains the same model for real (random weights,
quantized, OFT applied, ``Trainer`` on the same mesh, pure-JAX kernels) and measures:
  * state per device: the bytes of device 0's shards of the training state (what the plan's frozen,
    rotation and optimizer parts predict);
  * the step's memory: the peak growth, during one step, of the bytes the process holds from malloc
    (glibc's ``mallinfo2``: mapped blocks plus arena blocks in use), sampled every 0.2 ms by a thread while
    the step runs. XLA:CPU allocates a step's buffers through malloc afresh for every execution, and every
    simulated device lives in this process, so it is compared with the devices' planned temporaries and
    outputs not written in place. (The resident set is no measure here: the host reclaims and shares pages
    behind a process's back, and glibc serves a step from memory an earlier step freed.)

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


class _MallocPeak:
    """The peak of malloc'd bytes (``mallinfo2``: ``hblkhd + uordblks``) while a ``with`` block runs."""

    def __init__(self):
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]  # fmt: skip

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        self._info = libc.mallinfo2

    def now(self) -> int:
        info = self._info()
        return info.hblkhd + info.uordblks

    def __enter__(self):
        import threading

        self.before = self.peak = self.now()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.now())
                self._stop.wait(0.0002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


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
    growths = []
    for _ in range(3):
        b = batch()
        with _MallocPeak() as peak:
            jax.block_until_ready(trainer.train_step(b))
        growths.append(peak.peak - peak.before)
    return {"plan": plan, "state": state, "growth": max(growths)}


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
          "measured malloc peak growth MiB | plan vs measured |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
