"""``oftjax convert`` (interop.convert.main): all four directions on real files, --force, one-line errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import peft
import pytest
import torch

from interop import convert
from interop._safetensors import SafetensorsFile
from tests.interop import _bnb_fixtures as fx


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "bnb_checkpoints"
    path.mkdir(exist_ok=True)
    return path


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory):
    torch.manual_seed(0)
    model = peft.get_peft_model(_MLP(), peft.OFTConfig(r=0, oft_block_size=8, target_modules=["fc1", "fc2"]))
    with torch.no_grad():  # a non-identity rotation, so the round trip compares real numbers
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.normal_()
    path = tmp_path_factory.mktemp("adapter") / "peft"
    model.save_pretrained(path)
    return path


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        h = SafetensorsFile(f)
        out.update({k: (h.dtype(k), h.shape(k), bytes(h.raw(k))) for k in h.keys()})
    return out


@pytest.mark.parametrize("variant", ["nf4_dq", "int8"], ids=["nf4_dq", "int8"])
def test_checkpoint_both_directions(root, tmp_path, capsys, variant):
    src = fx.quantized_dir(root, variant)
    assert convert.main(["checkpoint-to-jax", str(src), str(tmp_path / "jax")]) == 0
    assert (tmp_path / "jax" / "oftjax_checkpoint.json").is_file()
    assert (
        convert.main(
            ["checkpoint-to-hf", str(tmp_path / "jax"), str(tmp_path / "hf"), "--max-shard-size", "1GB"]
        )
        == 0
    )
    assert _tensors(src) == _tensors(tmp_path / "hf")
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'hf'}" in out.out
    assert "B/s" in out.err or "100%" in out.err  # the tqdm progress bar


def test_adapter_both_directions(peft_adapter, tmp_path):
    assert convert.main(["adapter-to-jax", str(peft_adapter), str(tmp_path / "jax"), "-q"]) == 0
    assert convert.main(["adapter-to-peft", str(tmp_path / "jax"), str(tmp_path / "peft"), "-q"]) == 0
    a, b = _tensors(peft_adapter), _tensors(tmp_path / "peft")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    ca = json.loads((peft_adapter / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "oft_block_size", "use_cayley_neumann", "module_dropout", "peft_type"):
        assert ca[key] == cb[key], key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for f in fragments:
        assert f in err[0], err[0]


@pytest.mark.parametrize("direction", ["checkpoint-to-jax", "adapter-to-jax"], ids=["checkpoint", "adapter"])
def test_existing_output_needs_force(root, peft_adapter, tmp_path, capsys, direction):
    src = fx.quantized_dir(root, "nf4") if direction.startswith("checkpoint") else peft_adapter
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    capsys.readouterr()  # drop the fixture builder's output
    assert convert.main([direction, str(src), str(dst), "-q"]) == 1
    _one_error_line(capsys, f"oftjax convert {direction}: error:", str(dst), "--force")
    assert [p.name for p in dst.iterdir()] == ["keep"]
    assert convert.main([direction, str(src), str(dst), "-q", "--force"]) == 0
    assert not (dst / "keep").exists()


def test_bad_input_exits_1_with_one_line_naming_file_and_key(root, tmp_path, capsys):
    src = fx.copy_dir(fx.quantized_dir(root, "fp4"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_shiny"] = 1
    capsys.readouterr()  # drop the fixture builder's output
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert.main(["checkpoint-to-jax", str(src), str(tmp_path / "dst")]) == 1
    _one_error_line(capsys, "config.json", "bnb_4bit_shiny")
    assert not (tmp_path / "dst").exists()
    del cfg["quantization_config"]["bnb_4bit_shiny"]
    (src / "config.json").write_text(json.dumps(cfg))
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert convert.main(["checkpoint-to-jax", str(src), str(tmp_path / "dst")]) == 1
    _one_error_line(capsys, "model.safetensors", "truncated")
    assert convert.main(["checkpoint-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 1
    _one_error_line(capsys, "oftjax_checkpoint.json", "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_add_subparser_wires_into_a_parent_parser():
    parser = argparse.ArgumentParser(prog="oftjax")
    convert.add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "checkpoint-to-hf", "a", "b", "--force", "--max-shard-size", "2GB"])
    assert (args.command, args.convert_command, args.force, args.max_shard_size) == (
        "convert", "checkpoint-to-hf", True, "2GB",
    )  # fmt: skip
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "sideways", "a", "b"])
    assert np.all(True)
