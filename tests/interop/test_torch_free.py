"""The conversion paths run where ``import torch`` fails (a subprocess with ``sys.modules["torch"] =
None``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import safetensors.torch
import torch

from tests.interop import _bnb_fixtures as fx

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    from pathlib import Path
    from interop import bnb, convert, hf
    from interop._io import InteropError
    from interop._safetensors import SafetensorsFile

    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    def tensors(path):
        res = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            h = SafetensorsFile(f)
            res.update({k: bytes(h.raw(k)) for k in h.keys()})
        return res

    for name, src in args["checkpoints"].items():
        config, weights = hf.read_checkpoint(src)
        hf.write_checkpoint(out / f"{name}_hf", config, weights)
        hf.checkpoint_to_jax(src, out / f"{name}_jax")
        hf.checkpoint_to_hf(out / f"{name}_jax", out / f"{name}_back", max_shard_size="50KB")
        assert tensors(src) == tensors(out / f"{name}_hf") == tensors(out / f"{name}_back"), name
        sd = {k: SafetensorsFile(Path(src) / "model.safetensors").get(k) for k in tensors(src)}
        p = "model.layers.0.mlp.up_proj"
        if name != "float":
            layer = bnb.to_state_dict(bnb.from_state_dict(sd, p), p)
            assert all(layer[k].tobytes() == sd[k].tobytes() for k in layer)
    assert convert.main(["checkpoint-to-jax", args["checkpoints"]["nf4"], str(out / "cli_jax"), "-q"]) == 0
    assert convert.main(["checkpoint-to-hf", str(out / "cli_jax"), str(out / "cli_hf"), "-q"]) == 0
    assert convert.main(["adapter-to-jax", args["adapter"], str(out / "adapter_jax"), "-q"]) == 0
    assert convert.main(["adapter-to-peft", str(out / "adapter_jax"), str(out / "adapter_peft"), "-q"]) == 0
    try:
        hf.read_checkpoint(args["bin"])
    except InteropError as e:
        assert "needs torch" in str(e) and "pytorch_model.bin" in str(e), e
    else:
        raise AssertionError("reading a .bin without torch should fail")
    assert sys.modules["torch"] is None
    loaded = sorted(m for m in ("transformers", "bitsandbytes", "peft") if m in sys.modules)
    assert not loaded, loaded
    print("TORCH-FREE OK")
    """
)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x)


def test_conversion_paths_run_without_torch(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "bnb_checkpoints"
    root.mkdir(exist_ok=True)
    checkpoints = {v: str(fx.quantized_dir(root, v)) for v in fx.VARIANTS}
    checkpoints["float"] = str(fx.float_dir(root))
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(_MLP(), peft.OFTConfig(r=0, oft_block_size=4, target_modules=["fc"])).save_pretrained(
        adapter
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((Path(checkpoints["nf4"]) / "config.json").read_text())
    torch.save(
        safetensors.torch.load_file(Path(checkpoints["nf4"]) / "model.safetensors"),
        bin_dir / "pytorch_model.bin",
    )
    out = tmp_path / "out"
    out.mkdir()
    args = {"out": str(out), "checkpoints": checkpoints, "adapter": str(adapter), "bin": str(bin_dir)}
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(args)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH-FREE OK" in proc.stdout
