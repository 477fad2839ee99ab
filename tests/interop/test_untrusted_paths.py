"""Every file a checkpoint or adapter names is read inside its root: no ``..``, absolute paths, symlinks
leaving it, special files, or sizes the file and the config cannot hold (interop/_paths.py, _safetensors.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from interop import hf, peft
from interop._io import InteropError
from tests.interop import _hostile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return _hostile.build_fixtures(tmp_path_factory.mktemp("hostile") / "fx")


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(src, tmp_path / name, symlinks=True))


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    return secret


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _write_index(path: Path, index: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_weight_map_entry_leaving_the_root_is_refused_unread(fx, tmp_path, where):
    ckpt = _copy(fx.checkpoints["sharded"], tmp_path)
    index = _index(ckpt)
    shard = next(iter(index["weight_map"].values()))
    secret = _secret(tmp_path)
    shutil.move(ckpt / shard, secret)
    entry = "../outside/secret.safetensors" if where == "dotdot" else str(secret)
    index["weight_map"] = {k: (entry if v == shard else v) for k, v in index["weight_map"].items()}
    _write_index(ckpt, index)
    with _hostile.opened_files() as opened, pytest.raises(InteropError) as e:
        hf.read_checkpoint(ckpt)
    assert "model.safetensors.index.json" in str(e.value) and "weight_map" in str(e.value)
    assert entry in str(e.value)
    assert str(secret) not in [os.path.realpath(p) for p in opened]


def test_symlinked_weights_are_refused_unless_allowed_inside_the_root(fx, tmp_path):
    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    secret = _secret(tmp_path)
    shutil.move(ckpt / "model.safetensors", secret)
    os.symlink(secret, ckpt / "model.safetensors")
    for allow in (False, True):  # a link leaving the root is refused even when links are allowed
        with _hostile.opened_files() as opened, pytest.raises(InteropError, match="symbolic link"):
            hf.read_checkpoint(ckpt, allow_symlinks=allow)
        assert _hostile.outside(opened, ckpt, (tmp_path,)) == []
    # a link inside the root: refused by default, read with allow_symlinks=True
    (ckpt / "model.safetensors").unlink()
    (ckpt / "blobs").mkdir()
    shutil.move(secret, ckpt / "blobs" / "weights")
    os.symlink("blobs/weights", ckpt / "model.safetensors")
    with pytest.raises(InteropError, match="allow_symlinks"):
        hf.read_checkpoint(ckpt)
    _, weights = hf.read_checkpoint(ckpt, allow_symlinks=True)
    assert "model.embed_tokens" in weights


def test_hugging_face_cache_snapshot_links_into_its_blobs(fx, tmp_path):
    """The HF cache keeps a snapshot's files as links into ../../blobs: read them there, nowhere else."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in fx.checkpoints["float"].iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        os.symlink(f"../../blobs/{f.name}", snap / f.name)
    _, weights = hf.read_checkpoint(snap)
    assert "model.embed_tokens" in weights
    secret = _secret(tmp_path)
    shutil.copy(repo / "blobs" / "model.safetensors", secret)
    (snap / "model.safetensors").unlink()
    os.symlink(secret, snap / "model.safetensors")
    with pytest.raises(InteropError, match="outside"):
        hf.read_checkpoint(snap)


def test_extra_file_linked_outside_is_not_copied(fx, tmp_path):
    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("password")
    os.symlink(secret, ckpt / "tokenizer.json")
    with _hostile.opened_files() as opened, pytest.raises(InteropError, match="tokenizer.json"):
        hf.checkpoint_to_jax(ckpt, tmp_path / "out")
    assert str(secret) not in opened and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "outside"]


def test_symlinked_adapter_subfolder_is_not_converted(fx, tmp_path):
    adapter = _copy(fx.adapter, tmp_path)
    victim = tmp_path / "victim"
    shutil.move(adapter / "other", victim)
    os.symlink(victim, adapter / "other")
    with _hostile.opened_files() as opened, pytest.raises(InteropError, match="symbolic link"):
        peft.adapter_to_jax(adapter, tmp_path / "out")
    assert _hostile.outside(opened, adapter, (tmp_path,)) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../victim", "/abs/victim", "..", "a/../../victim"])
def test_adapter_name_leaving_the_root_is_refused_before_reading(fx, tmp_path, name):
    adapter = _copy(fx.adapter, tmp_path / "root", "adapter")
    shutil.copytree(fx.adapter / "other", tmp_path / "root" / "victim")
    model = hf.load_model(fx.checkpoints["float"])
    for call in (
        lambda: peft.read_adapter(adapter, adapter_name=name),
        lambda: peft.load_adapter(model, adapter, adapter_name=name),
    ):
        with _hostile.opened_files() as opened, pytest.raises(InteropError, match="adapter name"):
            call()
        assert _hostile.outside(opened, adapter, (tmp_path,)) == []


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a hang fails the test instead of blocking the session)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "index_entry"])
def test_fifo_in_place_of_weights_is_refused_not_opened(fx, tmp_path, name):
    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    (ckpt / "model.safetensors").unlink()
    if name == "index_entry":
        (ckpt / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}})
        )
        name = "pytorch_model-00001-of-00001.bin"
    os.mkfifo(ckpt / name)
    proc = _run(
        f"""
        from interop import hf
        from interop._io import InteropError
        try:
            hf.read_checkpoint({str(ckpt)!r})
        except InteropError as e:
            print("refused:", e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "not a regular file" in proc.stdout and name in proc.stdout


def _sparse_checkpoint(fx, tmp_path: Path, rows: int) -> Path:
    """The float checkpoint with one more tensor whose header declares ``rows`` x 4096 float32 (a sparse
    file: no disk, no memory, until something reads it)."""
    from interop._safetensors import SafetensorsFile

    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    f = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: f.get(k) for k in f.keys()}
    f.close()
    del tensors["model.embed_tokens.weight"]
    header = {}
    offset = 0
    for k, v in sorted(tensors.items()):
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    end = offset + rows * 4096 * 4
    header["model.embed_tokens.weight"] = {
        "dtype": "F32",
        "shape": [rows, 4096],
        "data_offsets": [offset, end],
    }
    blob = json.dumps(header).encode()
    with open(ckpt / "model.safetensors", "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for _, v in sorted(tensors.items()):
            out.write(v.tobytes())
        out.truncate(8 + len(blob) + end)
    return ckpt


def test_oversized_tensor_is_refused_before_it_is_read(fx, tmp_path):
    ckpt = _sparse_checkpoint(fx, tmp_path, rows=131072)  # a 2 GiB embedding table, sparse on disk
    # peak RSS of the child: VmHWM starts afresh at exec (getrusage's ru_maxrss keeps the parent's peak
    # across fork + exec on Linux, so it would measure pytest)
    proc = _run(
        f"""
        from interop import hf
        from interop._io import InteropError
        try:
            hf.load_model({str(ckpt)!r})
        except InteropError as e:
            print("refused:", e)
        try:
            hf.checkpoint_to_jax({str(ckpt)!r}, {str(tmp_path / "out")!r})
        except InteropError as e:
            print("refused:", e)
        status = open("/proc/self/status").read()
        print("peak MB", int(status.split("VmHWM:")[1].split()[0]) / 1024)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["refused", "refused"], proc.stdout
    assert all("model.embed_tokens.weight" in line and "[131072, 4096]" in line for line in lines[:2])
    assert float(lines[2].split()[-1]) < 300, proc.stdout  # the interpreter with JAX: ~230 MB
    assert not (tmp_path / "out").exists()


def test_shape_overflowing_int64_is_refused_on_read_and_write(tmp_path):
    from interop._safetensors import SafetensorsFile, write_safetensors

    header = json.dumps({"x": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(InteropError, match="'x'.*shape"):
        SafetensorsFile(tmp_path / "x.safetensors")

    class Huge:
        shape, dtype = (2**32, 2**32), np.dtype(np.float32)

    with pytest.raises(InteropError, match="'x'"):
        write_safetensors(tmp_path / "y.safetensors", {"x": Huge()})


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "more": 1}, "more"),
        ([1, 2], "entry"),
    ],
    ids=["float-dim", "bool-dim", "float-offset", "str-offset", "list-dtype", "unknown-key", "list-entry"],
)
def test_header_fields_are_type_checked(tmp_path, entry, match):
    from interop._safetensors import SafetensorsFile

    header = json.dumps({"x": entry}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(InteropError, match=match) as e:
        SafetensorsFile(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(e.value) and "'x'" in str(e.value)


@pytest.mark.parametrize(
    "text",
    ['{"a": ' * 100_000 + "1" + "}" * 100_000, '{"a": ' + "9" * 5000 + "}", '{"a": 1, "a": 2}'],
    ids=["deep", "long-int", "duplicate-key"],
)
def test_hostile_json_is_one_clear_error(tmp_path, text):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(InteropError, match="adapter_config.json"):
        peft.read_adapter(adapter)
    header = text.encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    from interop._safetensors import SafetensorsFile

    with pytest.raises(InteropError, match="x.safetensors"):
        SafetensorsFile(tmp_path / "x.safetensors")


@pytest.mark.parametrize("lost", ["adapter_config.json", "other/adapter_config.json"])
def test_adapter_weights_without_their_config_are_refused_not_dropped(fx, tmp_path, lost):
    adapter = _copy(fx.adapter, tmp_path)
    (adapter / lost).unlink()
    with pytest.raises(InteropError, match="without its adapter_config.json"):
        peft.adapter_to_jax(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    name = "other" if lost.startswith("other/") else "default"
    model = hf.load_model(fx.checkpoints["float"])
    with pytest.raises(InteropError, match="adapter_config.json"):
        peft.load_adapter(model, adapter, name)  # never another adapter of the directory in its place
