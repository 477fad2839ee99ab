"""Golden files: the bytes ``save_adapter``, ``save_jax_adapter`` and ``save_model`` write for tiny models.

Every input is fixed (model init, quantization with bitsandbytes' CPU rounding, ``N(0, 0.1)`` rotations from
fixed seeds), so the files written must not change when the modules or the interop code are restructured:
a changed hash means adapters or checkpoints saved before the change are no longer what we write now.
Merged checkpoints are not pinned here: their bytes go through fp32 matmuls whose rounding depends on the
CPU's instruction set (tests/test_merge.py checks merges against their math instead).

Regenerate (only after a deliberate format change, with the reason in the commit message)::

    python -m tests.interop.test_golden_files
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from flax import nnx

from interop import hf_model, peft
from oftjax import apply_oft
from oftjax.config import OFTConfig
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.train import quantize_model
from tests._tiny import TINY_LLAMA

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _quantized_llama(quant: str) -> LlamaForCausalLM:
    """Tiny Llama: quantized ("nf4" with double quantization, "int8") or float; OFT on q, v, the embedding."""
    model = LlamaForCausalLM(ModelConfig(**TINY_LLAMA, head_dim=16), rngs=nnx.Rngs(0))
    if quant != "none":
        quantize_model(model, quant, double_quant=True)
    apply_oft(
        model, OFTConfig(oft_block_size=16, target_modules=TARGETS, init_weights=False), rngs=nnx.Rngs(1)
    )
    return model


def _qwen2_with_biases() -> LlamaForCausalLM:
    """Tiny float Qwen2 (q/k/v biases) with two adapters; the first trains the OFT layers' biases."""
    model = LlamaForCausalLM(
        ModelConfig(**TINY_LLAMA, head_dim=16, model_type="qwen2", qkv_bias=True), rngs=nnx.Rngs(2)
    )
    first = OFTConfig(r=4, oft_block_size=0, target_modules=TARGETS, init_weights=False, bias="oft_only")
    apply_oft(model, first, rngs=nnx.Rngs(3))
    second = OFTConfig(oft_block_size=8, target_modules=["k_proj"], init_weights=False)
    apply_oft(model, second, adapter_name="other", rngs=nnx.Rngs(4))
    return model


def write_files(root: Path) -> None:
    """Write every pinned file under ``root``."""
    for quant in ("nf4", "int8", "none"):
        model = _quantized_llama(quant)
        peft.save_adapter(model, root / f"adapter_{quant}")
        hf_model.save_model(model, root / f"checkpoint_{quant}")
    model = _qwen2_with_biases()
    peft.save_adapter(model, root / "adapter_qwen2")
    peft.save_adapter(model, root / "adapter_qwen2", adapter_name="other")
    peft.save_jax_adapter(model, root / "native_qwen2")
    hf_model.save_model(model, root / "checkpoint_qwen2")


def _canonical(path: Path) -> bytes:
    """A file's bytes; a safetensors file's with its header's JSON keys sorted.

    ``safetensors.numpy.save`` (what adapter files are written with) orders the ``__metadata__`` keys
    differently from one process to the next; everything else in the file is compared byte for byte.
    """
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    return header.encode() + b"\0" + data[8 + n :]


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (safetensors headers canonicalized)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(_canonical(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# "<file> <sha256>" per line, as ``python -m tests.interop.test_golden_files`` prints them.
_GOLDEN_LINES = """
adapter_int8/adapter_config.json dd87d354387b8e7cd8c32c7b0a1460cbb72e0c9eb679d718c44488e216677f11
adapter_int8/adapter_model.safetensors 6a8280e35dff3d0ba9bdce4120d17ee4e1c40e6ea66a2a41b6dfa175e78b4a48
adapter_nf4/adapter_config.json dd87d354387b8e7cd8c32c7b0a1460cbb72e0c9eb679d718c44488e216677f11
adapter_nf4/adapter_model.safetensors 6a8280e35dff3d0ba9bdce4120d17ee4e1c40e6ea66a2a41b6dfa175e78b4a48
adapter_none/adapter_config.json dd87d354387b8e7cd8c32c7b0a1460cbb72e0c9eb679d718c44488e216677f11
adapter_none/adapter_model.safetensors 6a8280e35dff3d0ba9bdce4120d17ee4e1c40e6ea66a2a41b6dfa175e78b4a48
adapter_qwen2/adapter_config.json 69a8ed157a6dc467fc3227cd0b5c0cf36ebd5d5d42e4176c627e93a4531567ac
adapter_qwen2/adapter_model.safetensors f54c9b35d8ff09cccb3bed5cfa7269317f84c5d40dbddbb496f7d1b2265a5fd1
adapter_qwen2/other/adapter_config.json 7f408dc7d2728d7b34b70e7da7b43719d2bf8fb5081737650e1c130a4260370e
adapter_qwen2/other/adapter_model.safetensors c5b012f3acee3fd8e7d606ac77ee033342abb3571d167d9ddaf6e26638ef9e88
checkpoint_int8/config.json 438822dfc580b2ca180c5e4a7360b0f653fd9870c3d2140e7bc4ac8a2bbd758f
checkpoint_int8/model.safetensors d0fc54faffb41459648cc0b54478b85645c0c7ada28415164ad754b7b3abf3e5
checkpoint_nf4/config.json 65a94b51b4522b0c5f95110c0e8a9186db67f88651f2daf5d1f72268226fa291
checkpoint_nf4/model.safetensors 035927972bb8ba7ef3bd352cffb93e950af22d33e156cfc299b7d7363a50d235
checkpoint_none/config.json 29d5c336cdb6066233cad2b92846ae67f300d6352405134a1f59f62204daaca3
checkpoint_none/model.safetensors 677cba44bce891a386f30f3fdfdf5022c2ea044610727f6adc75dfc6a156c657
checkpoint_qwen2/config.json 35b112c175d13e37da3886389c30a7b39150a45417f088db35db3f0ef6a651c7
checkpoint_qwen2/model.safetensors 537db6696d27e1e69ef0a6646fa4afbf69562927671384eeebfde15d96841d53
native_qwen2/oftjax_adapter.json e1426ef7a0c0cb625acad71bbb75815b5809e040b6df17f3268fafb19ca529dc
native_qwen2/oftjax_adapter.safetensors 504cb66fd46746238e1e89264f94c6db01568fdf483e9449281a77be76c9eb0d
"""
GOLDEN: dict[str, str] = dict(line.split() for line in _GOLDEN_LINES.strip().splitlines())


def test_saved_files_are_byte_identical_to_the_golden_hashes(tmp_path):
    write_files(tmp_path)
    got = file_hashes(tmp_path)
    assert sorted(got) == sorted(GOLDEN), "the set of written files changed"
    changed = sorted(k for k in GOLDEN if got[k] != GOLDEN[k])
    assert not changed, f"files whose bytes changed: {changed}"


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with tempfile.TemporaryDirectory() as d:
        write_files(Path(d))
        for name, digest in file_hashes(Path(d)).items():
            print(name, digest)
