"""Every value a checkpoint or adapter file holds is type- and range-checked, the key named; nothing wrong is
accepted and no bare Python error escapes (interop/bnb.py, _hf_config.py, _peft_format.py, oftjax/config)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from interop import hf, peft
from interop._io import InteropError
from interop._safetensors import SafetensorsFile, write_safetensors
from oftjax.config import OFTConfig
from tests.interop import _hostile

ROOT = Path(__file__).resolve().parents[2]
P = "base_model.model."
V = "model.layers.1.self_attn.v_proj"
QS = V + ".weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return _hostile.build_fixtures(tmp_path_factory.mktemp("values") / "fx")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def _rewrite(path: Path, mutate, name: str = "model.safetensors") -> None:
    f = SafetensorsFile(path / name)
    tensors = {k: f.get(k) for k in f.keys()}
    f.close()
    mutate(tensors)
    write_safetensors(path / name, tensors)


def _quant_state(tensors: dict, **changes) -> None:
    qs = json.loads(tensors[QS].tobytes())
    qs.update(changes)
    tensors[QS] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()


def _edit_json(path: Path, mutate) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def _relabel(path: Path, key: str, dtype: str) -> None:
    """Give tensor ``key`` of model.safetensors another dtype of the same size in the header (same bytes)."""
    import struct

    data = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[key]["dtype"] = dtype
    blob = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def _qc(path: Path, **changes) -> None:
    _edit_json(path / "config.json", lambda c: c["quantization_config"].update(changes))


CHECKPOINT_CASES = {
    "blocksize-float": ("nf4", lambda p: _rewrite(p, lambda t: _quant_state(t, blocksize=64.0)), "blocksize"),
    "nested-offset-huge": (
        "nf4",
        lambda p: _rewrite(p, lambda t: _quant_state(t, nested_offset=1e308)),
        "nested_offset",
    ),
    "nested-offset-negative": (
        "nf4",
        lambda p: _rewrite(p, lambda t: _quant_state(t, nested_offset=-0.5)),
        "nested_offset",
    ),
    "compute-dtype-int8": ("nf4", lambda p: _qc(p, bnb_4bit_compute_dtype="int8"), "bnb_4bit_compute_dtype"),
    "load-in-4bit-string": ("nf4", lambda p: _qc(p, load_in_4bit="yes"), "load_in_4bit"),
    "double-quant-int": ("nf4", lambda p: _qc(p, bnb_4bit_use_double_quant=1), "bnb_4bit_use_double_quant"),
    "threshold-string": ("int8", lambda p: _qc(p, llm_int8_threshold="6"), "llm_int8_threshold"),
    "skip-modules-int": ("int8", lambda p: _qc(p, llm_int8_skip_modules=5), "llm_int8_skip_modules"),
    "int8-without-scb": (
        "int8",
        lambda p: _rewrite(
            p, lambda t: [t.pop(k) for k in list(t) if k.startswith(V + ".") and k != V + ".weight"]
        ),
        f"{V}.weight",
    ),
    "weight-map-value-int": (
        "sharded",
        lambda p: _edit_json(
            p / "model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": 5})
        ),
        "weight_map",
    ),
    "weight-map-list": (
        "sharded",
        lambda p: _edit_json(p / "model.safetensors.index.json", lambda i: i.update(weight_map=[1])),
        "weight_map",
    ),
    "float-as-int32": ("float", lambda p: _relabel(p, "model.norm.weight", "I32"), "model.norm.weight"),
    "renamed-tensor": (
        "float",
        lambda p: _rewrite(p, lambda t: t.update({"model.normx.weight": t.pop("model.norm.weight")})),
        "model.norm",
    ),
    "missing-required-key": (
        "nf4",
        lambda p: _edit_json(p / "config.json", lambda c: c.pop("hidden_size")),
        "hidden_size",
    ),
    "config-dtype-list": (
        "float",
        lambda p: _edit_json(p / "config.json", lambda c: c.update(dtype=[1])),
        "dtype",
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES), ids=list(CHECKPOINT_CASES))
def test_bad_checkpoint_values_are_refused_naming_the_key(fx, tmp_path, case):
    variant, mutate, key = CHECKPOINT_CASES[case]
    ckpt = _copy(fx.checkpoints[variant], tmp_path)
    mutate(ckpt)
    for call in (lambda: hf.load_model(ckpt), lambda: hf.checkpoint_to_jax(ckpt, tmp_path / "out")):
        with pytest.raises(InteropError) as e:
            call()
        assert key in str(e.value) and str(ckpt) in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


@pytest.mark.parametrize(
    "key, value",
    [("rms_norm_eps", -1.0), ("rms_norm_eps", "1e-6"), ("hidden_size", 64.5), ("vocab_size", True),
     ("tie_word_embeddings", "false"), ("num_hidden_layers", -2), ("rope_theta", float("nan"))],
)  # fmt: skip
def test_bad_model_config_values_are_refused_naming_the_key(fx, tmp_path, key, value):
    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(InteropError) as e:
        hf.load_model(ckpt)
    assert key in str(e.value) and "config.json" in str(e.value)


def test_checkpoint_with_no_tensors_is_refused(fx, tmp_path):
    ckpt = _copy(fx.checkpoints["float"], tmp_path)
    write_safetensors(ckpt / "model.safetensors", {})
    with pytest.raises(InteropError, match="no tensors"):
        hf.checkpoint_to_jax(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


JAX_CHECKPOINT_CASES = {
    "tensor-name-int": (lambda m: m["modules"]["lm_head"]["weight"].update(tensor=5), "lm_head.weight"),
    "tensors-list": (lambda m: m["modules"][V]["weight"].update(tensors=["packed"]), f"{V}.weight"),
    "blocksize-float": (lambda m: m["modules"][V]["weight"].update(blocksize=64.0), "blocksize"),
    "shape-strings": (lambda m: m["modules"][V]["weight"].update(shape=["32", "64"]), "shape"),
    "modules-list": (lambda m: m.update(modules=[]), "modules"),
    "kind-list": (lambda m: m["modules"]["lm_head"]["weight"].update(kind=[1]), "lm_head.weight"),
}


@pytest.mark.parametrize("case", list(JAX_CHECKPOINT_CASES), ids=list(JAX_CHECKPOINT_CASES))
def test_bad_jax_checkpoint_values(fx, tmp_path, case):
    ckpt = _copy(fx.jax_checkpoint, tmp_path)
    mutate, key = JAX_CHECKPOINT_CASES[case]
    _edit_json(ckpt / "oftjax_checkpoint.json", mutate)
    with pytest.raises(InteropError) as e:
        hf.checkpoint_to_hf(ckpt, tmp_path / "out")
    assert key in str(e.value) and "oftjax_checkpoint.json" in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_offset_tensor_must_be_finite(fx, tmp_path):
    ckpt = _copy(fx.jax_checkpoint, tmp_path)

    def mutate(t):
        t[V + ".weight.offset"] = np.array(np.inf, np.float32)

    _rewrite(ckpt, mutate, "weights.safetensors")
    with pytest.raises(InteropError, match="offset"):
        hf.read_jax_checkpoint(ckpt)


ADAPTER_CASES = {
    "peft-version-int": (lambda c: c.update(peft_version=5), "peft_version"),
    "eps-nan-coft": (lambda c: c.update(eps=float("nan"), coft=True), "eps"),
    "eps-inf": (lambda c: c.update(eps=float("inf")), "eps"),
    "r-float": (lambda c: c.update(r=2.0), "r"),
    "bias-int": (lambda c: c.update(bias=1), "bias"),
    "target-invalid-regex": (lambda c: c.update(target_modules="(q_proj"), "target_modules"),
    "target-dict": (lambda c: c.update(target_modules={"a": 1}), "target_modules"),
    "layers-pattern-regex": (
        lambda c: c.update(layers_pattern="(a+)+", layers_to_transform=[0]),
        "layers_pattern",
    ),
    "modules-to-save-regex": (lambda c: c.update(modules_to_save=["("]), "modules_to_save"),
    "dropout-nan": (lambda c: c.update(module_dropout=float("nan")), "module_dropout"),
    "terms-huge": (lambda c: c.update(num_cayley_neumann_terms=2**70), "num_cayley_neumann_terms"),
    "terms-bool": (lambda c: c.update(num_cayley_neumann_terms=True), "num_cayley_neumann_terms"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES), ids=list(ADAPTER_CASES))
def test_bad_adapter_config_values_are_refused_naming_the_key(fx, tmp_path, case):
    adapter = _copy(fx.adapter, tmp_path)
    mutate, key = ADAPTER_CASES[case]
    _edit_json(adapter / "adapter_config.json", mutate)
    with pytest.raises(InteropError) as e:
        peft.read_adapter(adapter)
    assert key in str(e.value) and "adapter_config.json" in str(e.value), str(e.value)


def test_stray_oft_s_in_a_current_adapter_is_refused(fx, tmp_path):
    adapter = _copy(fx.adapter, tmp_path)
    stray = P + "model.layers.0.self_attn.q_proj.oft_s"
    _rewrite(adapter, lambda t: t.update({stray: np.ones((64, 1), np.float32)}), "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "converted exactly" claim either
        with pytest.raises(InteropError, match="oft_s"):
            peft.read_adapter(adapter)


JAX_ADAPTER_CASES = {
    "entry-list": (lambda m: m["adapters"].update(default=[1]), "default"),
    "entry-string": (lambda m: m["adapters"].update(default="x"), "default"),
    "keys-string": (lambda m: m["adapters"]["default"].update(keys="abc"), "keys"),
    "keys-ints": (lambda m: m["adapters"]["default"].update(keys=[1, 2]), "keys"),
    "extras-list": (lambda m: m["adapters"]["default"].update(peft_extras=[1]), "peft_extras"),
    "config-list": (lambda m: m["adapters"]["default"].update(config=[1]), "config"),
    "peft-version-int": (lambda m: m["adapters"]["default"]["config"].update(peft_version=5), "peft_version"),
}


@pytest.mark.parametrize("case", list(JAX_ADAPTER_CASES), ids=list(JAX_ADAPTER_CASES))
def test_bad_jax_adapter_values(fx, tmp_path, case):
    adapter = _copy(fx.jax_adapter, tmp_path)
    mutate, key = JAX_ADAPTER_CASES[case]
    _edit_json(adapter / "oftjax_adapter.json", mutate)
    with pytest.raises(InteropError) as e:
        peft.adapter_to_peft(adapter, tmp_path / "out")
    assert key in str(e.value) and "oftjax_adapter.json" in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_catastrophic_target_regex_does_not_hang(fx, tmp_path):
    adapter = _copy(fx.adapter, tmp_path)
    _edit_json(adapter / "adapter_config.json", lambda c: c.update(target_modules="(.*)*Z"))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            from interop import hf, peft
            from oftjax.config import OFTConfig
            model = hf.load_model({str(fx.checkpoints["float"])!r})
            print(peft.load_adapter(model, {str(adapter)!r}))
            cfg = OFTConfig(target_modules="(a|a)*Z")
            print(cfg.is_target("a" * 200), cfg.is_target("a" * 200 + "Z"))
        """),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False True"


PATTERNS = [
    r".*\.(q|v)_proj",
    r"model\.layers\.[01]\.self_attn\.\w+",
    r"(?i).*Q_PROJ",
    r"[^.]+\.layers\.\d+\..*",
    r"(model\.)?layers\.1\..*",
    r".*_proj{1,2}",
    r"a{0}.*",
    r"(?:x|y)*.*k_proj",
    r".*(?<!q)_proj",
    r"\A.*\Z",
]
_NAMES = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "up_proj"), ("mlp", "down_projj")]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_target_regex_matches_like_re_fullmatch(pattern):
    import re

    paths = [f"model.layers.{i}.{blk}.{name}" for i in (0, 1, 2) for blk, name in _NAMES]
    paths += ["lm_head", "model.embed_tokens", "", "q_proj"]
    try:
        cfg = OFTConfig(target_modules=pattern)
    except ValueError as e:  # a construct matching in linear time cannot express: refused, named
        assert "target_modules" in str(e) and pattern in str(e)
        return
    assert [cfg.is_target(p) for p in paths] == [re.fullmatch(pattern, p) is not None for p in paths]


def test_eps_must_be_finite():
    with pytest.raises(ValueError, match="eps"):
        OFTConfig(coft=True, eps=math.nan)


def test_module_dropout_adapter_loads_without_rngs(fx, tmp_path):
    adapter = _copy(fx.adapter, tmp_path)
    _edit_json(adapter / "adapter_config.json", lambda c: c.update(module_dropout=0.1))
    model = hf.load_model(fx.checkpoints["float"])
    assert peft.load_adapter(model, adapter)  # inference needs no dropout randomness
    with pytest.raises(ValueError, match=r"eval\(\)"):  # training does: the error says how to get either
        _hostile.logits(model)
    model.eval()
    np.testing.assert_array_equal(_hostile.logits(model), _hostile.reference_logits(fx)["adapter:default"])


ENGINE_PATTERNS = [
    r"(a|ab)*c",
    r"(a*)*b",
    r"^a$",
    r"a$",
    r"\bq\w*",
    r"(?i:A)b",
    r"[a-c]{2,3}d?",
    r"(.*)*Z",
    r".*?x",
] + [r"(a|b|)+c", r"x|", r"\d+\.\D", r"[\s\S]*", r"(?s).", r"(?m)^a$", r"\Ba", r"a\b"]


@pytest.mark.parametrize("pattern", ENGINE_PATTERNS)
def test_linear_time_matcher_answers_as_re_does(pattern):
    import random
    import re

    from oftjax.config._patterns import compile_pattern

    compiled = compile_pattern(pattern)
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice("abcxyzqkvZ._01\n AB") for _ in range(rng.randint(0, 8)))
        assert compiled.fullmatch(s) == (re.fullmatch(pattern, s) is not None), (pattern, s)
        assert compiled.match(s) == (re.match(pattern, s) is not None), (pattern, s)
