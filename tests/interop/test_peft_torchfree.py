"""The PEFT adapter paths run where importing torch (or bitsandbytes/peft/transformers) fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "bitsandbytes", "peft", "transformers"}:
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
        raise SystemExit("torch import was not blocked")
    except ImportError:
        pass

    import numpy as np
    from flax import nnx
    from interop import peft

    src, work = sys.argv[1], sys.argv[2]
    config, tensors = peft.read_adapter(src)
    peft.write_adapter(work + "/copy", config, tensors)
    peft.adapter_to_jax(src, work + "/jax")
    peft.adapter_to_peft(work + "/jax", work + "/back")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.lin0 = nnx.Linear(10, 20, rngs=rngs)
            self.lin1 = nnx.Linear(20, 2, rngs=rngs)

    model = MLP(nnx.Rngs(0))
    assert peft.load_adapter(model, src) == ["lin0", "lin1"]
    peft.save_adapter(model, work + "/saved", config=config)
    _, back = peft.read_adapter(work + "/back")
    _, saved = peft.read_adapter(work + "/saved")
    for k in tensors:
        assert np.array_equal(back[k], tensors[k]) and np.array_equal(saved[k], tensors[k]), k
    oracle = {"torch", "peft", "transformers", "bitsandbytes"}
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in oracle)
    assert not leaked, leaked
    print("TORCH-FREE OK")
    """
)


def test_peft_paths_without_torch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {
            "base_model.model.lin0.oft_R.weight": rng.normal(0, 0.1, (2, 10)).astype(np.float32),
            "base_model.model.lin1.oft_R.weight": rng.normal(0, 0.1, (2, 45)).astype(np.float32),
        },
        str(src / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (src / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "OFT",
                "peft_version": "0.21.2",
                "r": 2,
                "oft_block_size": 0,
                "target_modules": ["lin0", "lin1"],
                "use_cayley_neumann": True,
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(src), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE OK" in proc.stdout
