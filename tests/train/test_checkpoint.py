"""Checkpoints after crashes: partial directories removed, incomplete checkpoints skipped, atomic metadata."""

from __future__ import annotations

import json

import pytest

from oftjax.train import fit, latest_checkpoint, read_metrics, remove_partial_checkpoints
from tests.train._distributed_run import config, data
from tests.train._tiny import TinyLM


def _fit(out, **kw):
    train, _ = data()
    return fit(TinyLM(vocab=259), config(), train, output_dir=out, progress=False, **kw)


@pytest.fixture
def run(tmp_path):
    """A run stopped after step 6 with checkpoints 3 and 6."""
    _fit(tmp_path)
    return tmp_path


def test_a_killed_writer_leaves_only_a_tmp_directory_that_the_next_start_removes(run):
    root = run / "checkpoints"
    partial = root / ".step_00000009.k3j2x.tmp"
    partial.mkdir()
    (partial / "train_state.safetensors").write_bytes(b"\x00" * 10)
    other = root / "notes.txt"  # not oftjax's: left alone
    other.write_text("mine")
    assert latest_checkpoint(run).name == "step_00000006"
    _fit(run, resume=True)
    assert not partial.exists() and other.read_text() == "mine"
    assert remove_partial_checkpoints(run) == []


@pytest.mark.parametrize("damage", ["tensors-cut-short", "metadata-cut-short", "metadata-other-step"])
def test_resume_skips_an_incomplete_checkpoint(run, damage):
    newest = run / "checkpoints" / "step_00000006"
    if damage == "tensors-cut-short":
        data_file = newest / "train_state.safetensors"
        data_file.write_bytes(data_file.read_bytes()[:-7])
    elif damage == "metadata-cut-short":
        meta = newest / "trainer.json"
        meta.write_text(meta.read_text()[:20])
    else:
        (newest / "trainer.json").write_text(json.dumps({"format": 1, "step": 5}))
    with pytest.warns(UserWarning, match="step_00000006: incomplete checkpoint"):
        assert latest_checkpoint(run).name == "step_00000003"
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        rest = _fit(run, resume=True)
    assert rest.start_step == 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_failed_write_leaves_no_checkpoint_and_no_tmp(tmp_path):
    def broken_adapter(model, path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _fit(tmp_path, write_adapter=broken_adapter)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    assert [p.name for p in root.iterdir()] == []


def test_metadata_is_whole_json_and_no_temporary_file_is_left(run):
    ckpt = latest_checkpoint(run)
    assert sorted(p.name for p in ckpt.iterdir()) == ["train_state.safetensors", "trainer.json"]
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["format"] == 1 and meta["config"]["steps"] == 6
