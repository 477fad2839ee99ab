"""Fuzz: hostile mutations of valid checkpoints and adapters through the Python API and ``oftjax convert``.

Valid fixtures are built from a tiny Llama without torch (tests/interop/_hostile.py: float, NF4 with double
quantization, int8 and sharded HF checkpoints, a JAX checkpoint, a PEFT adapter with a subfolder adapter and
its JAX adapter directory). Each mutation (tests/interop/_mutations.py, a fixed seed) damages a copy of one
of them, which then goes through the API loader (``load_model``, ``load_adapter``, ``load_jax_adapter``,
``checkpoint_to_hf``) and through the command line (``oftjax convert``, in the direction that reads it).
For every mutation each path must end in one of two ways:

* an error: the API raises a ``ValueError`` (``InteropError`` is one) whose one-line message names a file of
  the mutated directory; the command exits 1 with one line on stderr and writes nothing;
* success, and the result computes the unmutated model's logits exactly (a converted directory is read back
  first). A mutated config.json or adapter config that still means a valid *different* model (another
  ``ModelConfig`` or adapter math: ``rms_norm_eps`` 1e-5 -> 0.5) is another checkpoint, not a corrupt one:
  its outputs are not compared.

Never a traceback, a hang (60 s per mutation, enforced here), a crash, a leftover temporary, or an opened file
outside the directory (an audit hook on "open" records every path; the bait files the mutations link to, a
secret beside the fixtures and ``/etc/hostname``, must never be opened). The mutations run in one worker
process (this file run as a script) that streams a JSON line per mutation.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60
DEFAULT_COUNT = 160
SLOW_COUNT = 1500
TARGETS = ("float", "nf4", "int8", "sharded", "jax_ckpt", "adapter", "jax_adapter")
CLI = {
    "jax_ckpt": "checkpoint-to-hf",
    "adapter": "adapter-to-jax",
    "jax_adapter": "adapter-to-peft",
}  # the checkpoints: checkpoint-to-jax
# adapter fields that change what the adapter computes in inference (the rest: bookkeeping, target selection
# checked against the file's tensors, training-only dropout)
ADAPTER_MATH = ("r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann",
                "num_cayley_neumann_terms", "legacy_neumann", "bias", "fan_in_fan_out")  # fmt: skip


# ------------------------------------------------------------------------------------------- the test


def _run_worker(tmp_path: Path, seed: int, count: int, timeout: float = TIMEOUT_S, **extra) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(tmp_path / "base"), "seed": seed, "count": count, **extra}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    errors = tmp_path / "worker.err"  # a file, not a pipe: a full pipe would stop the worker
    with open(errors, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err
        )
    results, started, buffer = [], None, b""
    deadline = time.monotonic() + 300  # fixtures and references, before the first mutation
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                what = f"mutation {started}" if started else "the fixtures"
                pytest.fail(f"hang: no progress within the time allowed, during {what}")
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                msg = json.loads(line)
                if "start" in msg:
                    started = msg
                    deadline = time.monotonic() + timeout
                elif "done" in msg:
                    results.append({**started, **msg})
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        err = errors.read_text(errors="replace")[-3000:]
        pytest.fail(f"worker died (status {proc.returncode}) during {started}: {err}")
    return results


def _check(results: list[dict], count: int) -> None:
    assert len(results) == count, f"{len(results)} of {count} mutations reported"
    bad = [r for r in results if r["problems"]]
    lines = [f"#{r['start']} {r['target']} {r['desc']}: {r['problems']}" for r in bad[:25]]
    assert not bad, f"{len(bad)} of {count} mutations misbehaved:\n" + "\n".join(lines)
    outcomes = {"error": 0, "ok": 0}
    for r in results:
        for path in ("api", "cli"):
            outcomes["ok" if r[path] == "ok" else "error"] += 1
    assert (
        outcomes["error"] > count // 2
    )  # the mutations do hurt (a harness that loads nothing proves nothing)


def test_fuzz_mutations_end_in_one_line_errors_or_equal_outputs(tmp_path):
    _check(_run_worker(tmp_path, seed=0, count=DEFAULT_COUNT), DEFAULT_COUNT)


@pytest.mark.parametrize("sabotage", ["hang", "crash"])
def test_the_harness_reports_a_hang_and_a_crash(tmp_path, sabotage):
    """The worker told to hang (or die) in a mutation: the test fails, naming it, instead of waiting."""
    with pytest.raises(
        pytest.fail.Exception, match=f"{sabotage if sabotage == 'hang' else 'died'}.*sabotage"
    ):
        _run_worker(tmp_path, seed=0, count=1, timeout=3, sabotage=sabotage)


@pytest.mark.slow
def test_fuzz_many_more_mutations(tmp_path):
    _check(_run_worker(tmp_path, seed=1, count=SLOW_COUNT), SLOW_COUNT)


# ------------------------------------------------------------------------------------------ the worker

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


@contextlib.contextmanager
def _recording():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


class _Worker:
    """Builds the fixtures and their reference logits, then runs mutations and reports each."""

    def __init__(self, base: Path):
        import jax.numpy as jnp
        from flax import nnx

        from tests.interop import _hostile

        self.base = base
        fixtures = _hostile.build_fixtures(base / "fixtures")
        self.fixtures = fixtures
        self.dirs = {**fixtures.checkpoints, "jax_ckpt": fixtures.jax_checkpoint, "adapter": fixtures.adapter,
                     "jax_adapter": fixtures.jax_adapter}  # fmt: skip
        secret = base / "outside" / "secret.safetensors"
        secret.parent.mkdir(parents=True)
        shutil.copy(fixtures.checkpoints["float"] / "model.safetensors", secret)
        self.bait = [secret, Path("/etc/hostname")]
        self.ids = jnp.asarray(_hostile.INPUT_IDS)
        self.forward = nnx.jit(lambda model, ids: model(ids))
        self.refs = {name: self.logits_of(self.load(path)) for name, path in fixtures.checkpoints.items()}
        for name in ("default", "other"):
            self.refs[f"adapter:{name}"] = self.logits_of(self.with_adapter(fixtures.adapter, name))

    def load(self, path: Path):
        from interop import hf

        return hf.load_model(path)

    def logits_of(self, model):
        import numpy as np

        return np.asarray(self.forward(model, self.ids))

    def with_adapter(self, path: Path, name: str, *, jax_format: bool = False):
        from interop import peft

        model = self.load(self.fixtures.checkpoints["float"])
        if jax_format:
            peft.load_jax_adapter(model, path, [name])
        else:
            peft.load_adapter(model, path, name)
        model.eval()  # inference: a mutated module_dropout must not matter
        return model

    # ------------------------------------------------------------------ one mutation

    def run(self, i: int, seed: int) -> None:
        from tests.interop._mutations import copy_fixture, mutate

        rng = random.Random(seed * 1_000_003 + i)
        target = rng.choice(TARGETS)
        work = self.base / f"m{i}"
        src = copy_fixture(self.dirs[target], work / "src")
        desc = mutate(rng, src, self.bait)
        adapter = "other" if "other/" in desc else "default"
        print(json.dumps({"start": i, "target": target, "desc": desc}), flush=True)
        listing = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
        compare = self.same_meaning(target, src, desc)
        problems: list[str] = []
        with _recording() as opened:
            api = self.api(target, src, work / "api", adapter, compare, problems)
            cli = self.cli(target, src, work, adapter, compare, problems)
        problems += self.outside(opened, work)
        if sorted(str(p.relative_to(src)) for p in src.rglob("*")) != listing:
            problems.append("the source directory changed")
        print(json.dumps({"done": i, "api": api, "cli": cli, "problems": problems}), flush=True)
        shutil.rmtree(work, ignore_errors=True)

    def api(self, target: str, src: Path, out: Path, adapter: str, compare: bool, problems: list) -> str:
        from interop import hf

        try:
            if target == "jax_ckpt":
                model, ref = self.load(hf.checkpoint_to_hf(src, out)), "nf4"
            elif target in ("adapter", "jax_adapter"):
                name = adapter if target == "adapter" else "default"
                model, ref = (
                    self.with_adapter(src, name, jax_format=target == "jax_adapter"),
                    f"adapter:{name}",
                )
            else:
                model, ref = self.load(src), target
            logits = self.logits_of(model)
        except Exception as e:  # judged below: ValueError, one line, naming the directory
            problems += self.judge_error(e, src.parent, "api")
            return f"error: {type(e).__name__}: {str(e)[:200]}"
        if compare and not _equal(logits, self.refs[ref]):
            problems.append("api: loaded, but the logits differ from the unmutated model's")
        return "ok"

    def cli(self, target: str, src: Path, work: Path, adapter: str, compare: bool, problems: list) -> str:
        from oftjax.cli import main

        (work / "cli").mkdir()
        out = work / "cli" / "out"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["convert", CLI.get(target, "checkpoint-to-jax"), str(src), str(out), "-q"])
        text = err.getvalue()
        if status == 1:
            if text.count("\n") != 1 or "Traceback" in text or not text.startswith("oftjax convert"):
                problems.append(f"cli: exit 1 but stderr is not one line: {text[:300]!r}")
            if any((work / "cli").iterdir()):
                problems.append(f"cli: failed but left {sorted(p.name for p in (work / 'cli').iterdir())}")
            return f"error: {text.strip()[:200]}"
        if status != 0:
            problems.append(f"cli: exit status {status}: {text[:300]!r}")
            return f"status {status}"
        self.reload(target, out, work / "reload", adapter, compare, problems)
        return "ok"

    def reload(self, target: str, out: Path, back: Path, adapter: str, compare: bool, problems: list) -> None:
        """A converted directory computes the unmutated model's logits."""
        from interop import hf

        try:
            if target == "jax_ckpt":
                logits, ref = self.logits_of(self.load(out)), "nf4"
            elif target == "adapter":
                logits, ref = (
                    self.logits_of(self.with_adapter(out, adapter, jax_format=True)),
                    f"adapter:{adapter}",
                )
            elif target == "jax_adapter":
                logits, ref = self.logits_of(self.with_adapter(out, "default")), "adapter:default"
            else:
                logits, ref = self.logits_of(self.load(hf.checkpoint_to_hf(out, back))), target
        except Exception as e:
            problems.append(f"cli: converted, but the output does not load: {type(e).__name__}: {e}"[:400])
            return
        if compare and not _equal(logits, self.refs[ref]):
            problems.append("cli: converted, but the output's logits differ from the unmutated model's")

    @staticmethod
    def judge_error(e: Exception, where: Path, path: str) -> list[str]:
        msg = str(e)
        if not isinstance(e, ValueError):
            return [f"{path}: {type(e).__name__} (not a ValueError): {msg[:300]}"]
        if "\n" in msg.strip():
            return [f"{path}: the message is not one line: {msg[:300]!r}"]
        if str(where) not in msg:
            return [f"{path}: the message names no file of the directory: {msg[:300]}"]
        return []

    def outside(self, opened: list[str], work: Path) -> list[str]:
        allowed = (os.path.realpath(work), os.path.realpath(self.base / "fixtures"))
        base = os.path.realpath(self.base)
        bait = {os.path.realpath(b) for b in self.bait}
        bad = sorted(
            {p for p in opened if p in bait or (p.startswith(base + os.sep) and not p.startswith(allowed))}
        )
        return [f"opened outside the directory: {bad}"] if bad else []

    # ------------------------------------------------------------------ what a mutated config means

    def same_meaning(self, target: str, src: Path, desc: str) -> bool:
        """False when a mutated config still describes a valid model or adapter, another one: then its
        outputs may differ. True otherwise (outputs must equal the unmutated model's when it loads)."""
        if _another_offset(desc):
            return False
        pristine = self.dirs[target]
        for rel in ("config.json", "adapter_config.json", "other/adapter_config.json", "oftjax_adapter.json",
                    "oftjax_checkpoint.json"):  # fmt: skip
            if not desc.startswith(f"json_value: {rel}:"):
                continue
            try:
                before = json.loads((pristine / rel).read_text())
                after = json.loads((src / rel).read_text())
                return _meaning(rel, before) == _meaning(rel, after)
            except Exception:  # the mutated file means nothing valid: it must be refused
                return True
        return True


def _another_offset(desc: str) -> bool:
    """A quant_state ``nested_offset`` set to another finite float32: another valid checkpoint (the offset is
    data, as a weight is), so its outputs differ."""
    import ast

    import numpy as np

    if "quant_state" not in desc or "set ['nested_offset'] = " not in desc:
        return False
    try:
        value = ast.literal_eval(desc.rsplit(" = ", 1)[1])
    except (ValueError, SyntaxError):
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value))) and float(np.float32(value)) == value


def _equal(a, b) -> bool:
    import numpy as np

    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def _meaning(rel: str, data: dict):
    """What a config file says that changes the outputs (raises when it is invalid)."""
    from interop._hf_config import validate_quantization_config
    from oftjax.config import OFTConfig
    from oftjax.models import ModelConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if rel.endswith("adapter_config.json"):
            config = OFTConfig.from_dict({k: v for k, v in data.items() if k != "auto_mapping"})
            return tuple(getattr(config, f) for f in ADAPTER_MATH)
        if rel == "oftjax_adapter.json":
            return tuple(
                (name, tuple(getattr(OFTConfig(**e["config"]), f) for f in ADAPTER_MATH))
                for name, e in data["adapters"].items()
            )
        if rel == "oftjax_checkpoint.json":
            data = data["config"]
        qc = data.get("quantization_config")
        quant = None if qc is None else tuple(sorted(map(str, validate_quantization_config(qc).items())))
        return ModelConfig.from_hf(data), quant, data.get("dtype", data.get("torch_dtype"))


def _worker_main(spec_path: str) -> None:
    sys.addaudithook(_audit)
    spec = json.loads(Path(spec_path).read_text())
    if "sabotage" in spec:  # the harness's own test: misbehave at once
        print(json.dumps({"start": 0, "target": "-", "desc": f"sabotage: {spec['sabotage']}"}), flush=True)
        if spec["sabotage"] == "hang":
            time.sleep(3600)
        os.abort()
    warnings.simplefilter("ignore")
    worker = _Worker(Path(spec["base"]))
    for i in range(spec["count"]):
        worker.run(i, spec["seed"])


if __name__ == "__main__":
    _worker_main(sys.argv[1])
