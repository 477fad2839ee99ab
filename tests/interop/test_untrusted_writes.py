"""Writers: an empty directory is a fine destination and a non-empty one needs ``force``; nothing is left
behind by a replaced output or a crashed writer; invalid write options are refused (interop/_io.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from interop import convert, hf, peft
from interop._io import atomic_write_bytes, output_dir
from tests.interop import _hostile


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return _hostile.build_fixtures(tmp_path_factory.mktemp("writes") / "fx")


def test_save_model_and_save_adapter_accept_an_empty_directory_and_refuse_a_used_one(fx, tmp_path):
    model = hf.load_model(fx.checkpoints["float"])
    peft.load_adapter(model, fx.adapter)
    for save, files in (
        (lambda p, **kw: hf.save_model(model, p, **kw), ["config.json", "model.safetensors"]),
        (
            lambda p, **kw: peft.save_adapter(model, p, **kw),
            ["adapter_config.json", "adapter_model.safetensors"],
        ),
    ):
        empty = tmp_path / f"empty{len(files[0])}"
        empty.mkdir()
        save(empty)
        assert sorted(p.name for p in empty.iterdir()) == files
        used = tmp_path / f"used{len(files[0])}"
        used.mkdir()
        (used / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="exists and is not empty"):
            save(used)
        assert [p.name for p in used.iterdir()] == ["notes.txt"]
        save(used, force=True)
        assert set(files) <= {p.name for p in used.iterdir()}


def test_save_adapter_next_to_another_adapter_of_the_same_save(fx, tmp_path):
    """PEFT keeps non-default adapters in subfolders of one save directory: either order works."""
    model = hf.load_model(fx.checkpoints["float"])
    peft.load_adapter(model, fx.adapter)
    peft.load_adapter(model, fx.adapter, "other")
    peft.save_adapter(model, tmp_path / "save", "other")
    peft.save_adapter(model, tmp_path / "save")
    assert peft.list_adapters(tmp_path / "save") == ["default", "other"]


def test_replacing_a_file_with_force_leaves_nothing_behind(fx, tmp_path):
    dst = tmp_path / "dst"
    dst.write_text("a file in the way")
    hf.checkpoint_to_jax(fx.checkpoints["nf4"], dst, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert convert.main(["checkpoint-to-jax", str(fx.checkpoints["nf4"]), str(dst), "--force", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_leftovers_of_a_crashed_writer_are_cleaned_at_the_next_write(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".out.{dead}.x1.tmp").mkdir()
    (tmp_path / f".out.{dead}.x1.tmp" / "half.safetensors").write_bytes(b"half")
    (tmp_path / ".out.old").mkdir()
    (tmp_path / f".f.bin.{dead}.x2.tmp").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}.x3.tmp"  # another writer of this process, still at work
    live.mkdir()
    with output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    atomic_write_bytes(tmp_path / "f.bin", b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "f.bin", live.name])


def test_max_shard_size_must_be_positive(fx, tmp_path, capsys):
    for size in ("0", "0GB", "-5", "1e400"):
        assert (
            convert.main(
                ["checkpoint-to-hf", str(fx.jax_checkpoint), str(tmp_path / "o"), "--max-shard-size", size]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert "max_shard_size" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="max_shard_size"):
        hf.write_checkpoint(tmp_path / "o", {}, {"a": {"weight": np.zeros(2)}}, max_shard_size=0)
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
