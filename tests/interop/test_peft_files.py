"""PEFT adapter files without torch: round trips, old formats, bad input (interop/_peft_files.py,
_peft_format.py, _jax_adapter_format.py).

Files here are written byte-for-byte as PEFT writes them (keys, shapes, JSON fields: docs/peft-oft.md,
"Adapter files"); tests/parity/test_adapter_attach_parity.py uses files saved by real PEFT.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from interop import peft
from interop._io import InteropError
from oftjax.config import OFTConfig

P = "base_model.model."


def _peft_config(**overrides):
    # adapter_config.json exactly as peft 0.21.2 writes it (tiny MLP).
    raw = {
        "auto_mapping": {"base_model_class": "MLP", "parent_library": "__main__"},
        "base_model_name_or_path": None,
        "bias": "none",
        "block_share": False,
        "coft": False,
        "eps": 6e-05,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "modules_to_save": None,
        "num_cayley_neumann_terms": 5,
        "oft_block_size": 0,
        "peft_type": "OFT",
        "peft_version": "0.21.2",
        "r": 2,
        "revision": None,
        "target_modules": ["lin0", "lin1"],
        "task_type": None,
        "use_cayley_neumann": True,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not _DROP}


_DROP = object()


def _tensors(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        f"{P}lin0.oft_R.weight": rng.normal(0, 0.1, (2, 10)).astype(dtype),  # d=10, r=2, b=5
        f"{P}lin1.oft_R.weight": rng.normal(0, 0.1, (2, 45)).astype(dtype),  # d=20, r=2, b=10
    }


def _write_raw(path: Path, raw: dict, tensors: dict, metadata=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(raw))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata=metadata or {"format": "pt"})
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_read_write_round_trip_identical(tmp_path, dtype):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors(dtype=dtype))
    config, tensors = peft.read_adapter(src)
    assert config.r == 2 and config.target_modules == frozenset({"lin0", "lin1"})
    peft.write_adapter(tmp_path / "dst", config, tensors)
    config2, tensors2 = peft.read_adapter(tmp_path / "dst")
    assert config2 == config
    assert sorted(tensors2) == sorted(tensors)
    for k in tensors:
        assert tensors2[k].dtype == tensors[k].dtype
        np.testing.assert_array_equal(tensors2[k], tensors[k])
    raw = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert raw["peft_version"] == "0.21.2" and raw["peft_type"] == "OFT"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dst" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "pt"


def test_bf16_tensors_round_trip(tmp_path):
    import ml_dtypes

    src = _write_raw(tmp_path / "src", _peft_config(), _tensors(dtype=ml_dtypes.bfloat16))
    config, tensors = peft.read_adapter(src)
    peft.write_adapter(tmp_path / "dst", config, tensors)
    _, back = peft.read_adapter(tmp_path / "dst")
    for k in tensors:
        assert back[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(back[k].view(np.uint16), tensors[k].view(np.uint16))


def test_jax_adapter_round_trip_with_subfolder_adapter(tmp_path):
    src = _write_raw(
        tmp_path / "src",
        _peft_config(bias="oft_only"),
        {**_tensors(), f"{P}lin0.base_layer.bias": np.arange(20, dtype=np.float32)},
    )
    other_cfg = _peft_config(
        r=0, oft_block_size=2, block_share=True, use_cayley_neumann=False, target_modules=["lin0"]
    )
    _write_raw(src / "other", other_cfg, {f"{P}lin0.oft_R.weight": np.full((1, 1), 0.5, np.float32)})
    assert peft.list_adapters(src) == ["default", "other"]

    peft.adapter_to_jax(src, tmp_path / "jax")
    adapters, _ = peft.read_jax_adapter(tmp_path / "jax")
    assert sorted(adapters["default"][1]) == ["lin0.bias", "lin0.oft_R.default", "lin1.oft_R.default"]
    assert sorted(adapters["other"][1]) == ["lin0.oft_R.other"]

    peft.adapter_to_peft(tmp_path / "jax", tmp_path / "back")
    for name in ("default", "other"):
        c1, t1 = peft.read_adapter(src, name)
        c2, t2 = peft.read_adapter(tmp_path / "back", name)
        assert c1 == c2
        assert sorted(t1) == sorted(t2)
        for k in t1:
            np.testing.assert_array_equal(t1[k], t2[k])
    # auto_mapping (knowingly ignored by OFTConfig) survives the trip verbatim
    raw = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert raw["auto_mapping"] == {"base_model_class": "MLP", "parent_library": "__main__"}


def test_write_adapter_non_default_goes_to_subfolder(tmp_path):
    config, tensors = peft.read_adapter(_write_raw(tmp_path / "src", _peft_config(), _tensors()))
    peft.write_adapter(tmp_path / "out", config, tensors)
    peft.write_adapter(tmp_path / "out", config, tensors, adapter_name="second")
    assert (tmp_path / "out" / "second" / "adapter_model.safetensors").is_file()
    assert peft.list_adapters(tmp_path / "out") == ["default", "second"]


# ----------------------------------------------------------------------------------------------------
# versions


def test_v016_neumann_adapter_uses_legacy_series_and_says_so(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(peft_version=_DROP), _tensors())
    with pytest.warns(UserWarning, match="0.16-0.17"):
        config, _ = peft.read_adapter(src)
    assert config.legacy_neumann and config.use_cayley_neumann
    peft.write_adapter(tmp_path / "dst", config, _tensors())
    raw = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert (
        raw["peft_version"] < "0.18"
    )  # stays marked as pre-0.18 so PEFT warns rather than silently changing
    with pytest.warns(UserWarning, match="0.16-0.17"):
        assert peft.read_adapter(tmp_path / "dst")[0].legacy_neumann


def test_v016_exact_cayley_adapter_reads_quietly(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(peft_version=_DROP, use_cayley_neumann=False), _tensors())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, _ = peft.read_adapter(src)
    assert not config.legacy_neumann and not config.use_cayley_neumann


def _v015_config(**overrides):
    # PEFT 0.15.2 OFTConfig: no peft_version, use_cayley_neumann, num_cayley_neumann_terms.
    raw = _peft_config(
        peft_version=_DROP,
        use_cayley_neumann=_DROP,
        num_cayley_neumann_terms=_DROP,
        target_modules=["lin0"],
        **overrides,
    )
    return raw


def _v015_tensors(seed=0, s=None):
    rng = np.random.default_rng(seed)
    D = rng.normal(0, 0.1, (2, 5, 5)).astype(np.float32)
    oft_s = np.ones((20, 1), np.float32) if s is None else s
    return {f"{P}lin0.oft_r": D, f"{P}lin0.oft_s": oft_s}, D


def test_v015_converted_exactly_when_scale_is_one(tmp_path):
    tensors, D = _v015_tensors()
    src = _write_raw(tmp_path / "src", _v015_config(), tensors)
    with pytest.warns(UserWarning, match="0.14-0.15"):
        config, out = peft.read_adapter(src)
    assert not config.use_cayley_neumann
    assert sorted(out) == [f"{P}lin0.oft_R.weight"]
    Q = 0.5 * (D.astype(np.float64) - D.astype(np.float64).transpose(0, 2, 1))
    rows, cols = np.triu_indices(5, 1)
    np.testing.assert_array_equal(out[f"{P}lin0.oft_R.weight"], Q[:, rows, cols].astype(np.float32))


def test_v015_refused_when_scale_is_not_one(tmp_path):
    s = np.ones((20, 1), np.float32)
    s[3] = 1.01
    tensors, _ = _v015_tensors(s=s)
    src = _write_raw(tmp_path / "src", _v015_config(), tensors)
    with pytest.raises(InteropError, match=r"lin0\.oft_s.*differs from 1"):
        peft.read_adapter(src)


def test_v015_coft_refused(tmp_path):
    tensors, _ = _v015_tensors()
    src = _write_raw(tmp_path / "src", _v015_config(coft=True), tensors)
    with pytest.raises(InteropError, match="coft=true cannot be converted"):
        peft.read_adapter(src)


def test_v013_refused_with_reason(tmp_path):
    raw = _v015_config(oft_block_size=_DROP, rank_pattern={}, alpha_pattern={})
    src = _write_raw(tmp_path / "src", raw, {f"{P}lin0.oft_r": np.zeros((2, 10, 10), np.float32)})
    with pytest.raises(InteropError, match="PEFT <= 0.13.*output side"):
        peft.read_adapter(src)


# ----------------------------------------------------------------------------------------------------
# bad input: clear errors naming the file and key; nothing written


def test_truncated_safetensors(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors())
    f = src / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-17])
    with pytest.raises(InteropError, match="adapter_model.safetensors"):
        peft.read_adapter(src)


def test_corrupt_safetensors_header(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors())
    f = src / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(InteropError, match="adapter_model.safetensors"):
        peft.read_adapter(src)


def test_missing_weights_file(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors())
    os.remove(src / "adapter_model.safetensors")
    with pytest.raises(InteropError, match="adapter_model.safetensors: file not found"):
        peft.read_adapter(src)


def test_missing_directory_lists_subfolder_adapters(tmp_path):
    _write_raw(tmp_path / "root" / "other", _peft_config(), _tensors())
    with pytest.raises(InteropError, match=r"adapter_config.json: file not found.*\['other'\]"):
        peft.read_adapter(tmp_path / "root")
    assert peft.read_adapter(tmp_path / "root", "other")[0].r == 2


def test_unknown_config_key_is_named(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(lora_alpha=8), _tensors())
    with pytest.raises(InteropError, match=r"adapter_config.json.*unknown config key\(s\) \['lora_alpha'\]"):
        peft.read_adapter(src)


def test_not_an_oft_adapter(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(peft_type="LORA"), _tensors())
    with pytest.raises(InteropError, match="'peft_type' is 'LORA'"):
        peft.read_adapter(src)


@pytest.mark.parametrize(
    ("overrides", "tensor", "match"),
    [
        ({"block_share": True}, np.zeros((2, 10), np.float32), "block_share=true"),
        ({"r": 0, "oft_block_size": 2}, np.zeros((2, 10), np.float32), "oft_block_size=2 gives block size 2"),
        ({"r": 5}, np.zeros((2, 10), np.float32), "r=5 gives 5 blocks"),
        ({}, np.zeros((2, 11), np.float32), "11 is not b\\(b-1\\)/2"),
        ({}, np.zeros((2, 2, 10), np.float32), "expected \\[r or 1, b\\(b-1\\)/2\\]"),
        ({}, np.zeros((2, 10), np.int32), "expected a float dtype"),
    ],
    ids=["block_share-rows", "block_size", "rank", "not-triangular", "rank-3", "int-dtype"],
)
def test_shapes_disagreeing_with_config(tmp_path, overrides, tensor, match):
    src = _write_raw(tmp_path / "src", _peft_config(**overrides), {f"{P}lin0.oft_R.weight": tensor})
    with pytest.raises(InteropError, match=rf"adapter_model.safetensors.*lin0\.oft_R\.weight.*{match}"):
        peft.read_adapter(src)


def test_unexpected_tensor_key(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), {**_tensors(), f"{P}lin0.lora_A.weight": np.zeros(3)})
    with pytest.raises(InteropError, match=r"unexpected tensor key 'base_model.model.lin0.lora_A.weight'"):
        peft.read_adapter(src)


def test_no_rotation_tensors(tmp_path):
    src = _write_raw(
        tmp_path / "src", _peft_config(bias="oft_only"), {f"{P}lin0.base_layer.bias": np.zeros(3)}
    )
    with pytest.raises(InteropError, match="no OFT tensors"):
        peft.read_adapter(src)


def test_existing_output_without_force_writes_nothing(tmp_path):
    config, tensors = peft.read_adapter(_write_raw(tmp_path / "src", _peft_config(), _tensors()))
    out = tmp_path / "out"
    peft.write_adapter(out, config, tensors)
    before = _snapshot(out)
    changed = {k: v + 1 for k, v in tensors.items()}
    with pytest.raises(FileExistsError, match="adapter_config.json: exists"):
        peft.write_adapter(out, config, changed)
    assert _snapshot(out) == before
    peft.write_adapter(out, config, changed, force=True)
    np.testing.assert_array_equal(
        peft.read_adapter(out)[1][f"{P}lin0.oft_R.weight"], changed[f"{P}lin0.oft_R.weight"]
    )

    jax_dir = tmp_path / "jax"
    jax_dir.mkdir()
    (jax_dir / "notes.txt").write_text("mine")  # an empty directory would be fine
    with pytest.raises(FileExistsError, match="jax: exists"):
        peft.adapter_to_jax(out, jax_dir)
    assert [p.name for p in jax_dir.iterdir()] == ["notes.txt"]
    with pytest.raises(FileExistsError, match="exists"):
        peft.adapter_to_peft(jax_dir, out)
    assert _snapshot(out) != before  # the forced write above, untouched by the refused conversion


def test_invalid_tensors_write_nothing(tmp_path):
    config = OFTConfig(r=2, oft_block_size=0, target_modules=["lin0"])
    with pytest.raises(InteropError, match="r=2 gives"):
        peft.write_adapter(tmp_path / "out", config, {f"{P}lin0.oft_R.weight": np.zeros((3, 10), np.float32)})
    assert not (tmp_path / "out").exists()


def test_jax_adapter_bad_format_version(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors())
    peft.adapter_to_jax(src, tmp_path / "jax")
    meta_path = tmp_path / "jax" / "oftjax_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InteropError, match="oftjax_adapter.json: 'format_version' is 99"):
        peft.adapter_to_peft(tmp_path / "jax", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_jax_adapter_missing_tensor(tmp_path):
    src = _write_raw(tmp_path / "src", _peft_config(), _tensors())
    peft.adapter_to_jax(src, tmp_path / "jax")
    save_file(
        {"lin0.oft_R.default": np.zeros((2, 10), np.float32)},
        str(tmp_path / "jax" / "oftjax_adapter.safetensors"),
    )
    with pytest.raises(InteropError, match=r"missing tensor key\(s\) \['lin1.oft_R.default'\]"):
        peft.adapter_to_peft(tmp_path / "jax", tmp_path / "back")


def test_atomic_save_safetensors_keeps_scalar_shape(tmp_path):
    """A 0-d tensor (bnb's int8 ``weight_format``) stays 0-d through the atomic writer."""
    from interop._safetensors import atomic_save_safetensors, read_safetensors

    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(
        path, {"weight_format": np.array(0, np.uint8), "w": np.ones((2, 4), np.float32)[:, ::2]}
    )
    back = read_safetensors(path)
    assert back["weight_format"].shape == ()
    assert back["w"].shape == (2, 2)
