"""Multi-process training for real: two OS processes with 4 CPU devices each over jax.distributed (gloo).

Against one process with 8 devices (this test process): the same per-step losses and adapter, resume of a
2-process checkpoint on 1 process and of a 1-process checkpoint on 2 processes (on other mesh shapes), and
a run whose process is killed ends on the other process, non-zero, within the heartbeat timeout.

Each test launches two fresh processes (start-up, compilation, the run: 15-20 s on 2 CPU cores); the
default suite runs three of them, ``-m slow`` adds the OFT 2x4 equality and the coordinator's death.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from oftjax.train import fit, make_mesh, read_metrics
from tests.tolerances import TOL
from tests.train._distributed_run import config, data, write_adapter
from tests.train._tiny import TinyLM

WORKER = Path(__file__).with_name("_distributed_worker.py")
HEARTBEAT = 5  # seconds: how long a dead process goes unnoticed (the bound the kill test checks)
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, name: str, **spec) -> list[subprocess.Popen]:
    """Start the two processes of a run; their output goes to ``<name>.<i>.log`` under ``tmp_path``."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    spec = {"coordinator": f"127.0.0.1:{_free_port()}", "num_processes": 2, "heartbeat": HEARTBEAT, **spec}
    procs = []
    for i in range(2):
        log = (tmp_path / f"{name}.{i}.log").open("w")
        arg = json.dumps({**spec, "process_id": i})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), arg], env=env, stdout=log, stderr=log))
    return procs


def _run_two(tmp_path: Path, name: str, timeout: float = 240, **spec) -> dict:
    procs = _launch(tmp_path, name, **spec)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"{name}.{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], (
        f"exit codes {codes}\n--- process 0:\n{logs[0][-3000:]}\n--- 1:\n{logs[1][-3000:]}"
    )
    return json.loads((Path(spec["output_dir"]) / "result.json").read_text())


def _one(out: Path, mesh: tuple[int, int], wrt=None, **kw):
    train, evald = data()
    return fit(
        TinyLM(vocab=259),
        config(),
        train,
        eval_data=evald,
        output_dir=out,
        wrt=wrt,
        mesh=make_mesh(*mesh),
        write_adapter=write_adapter,
        progress=False,
        **kw,
    )


def _assert_close(actual, expected):
    tol = TOL["sharded_step"]
    np.testing.assert_allclose(actual, expected, rtol=tol.rtol, atol=tol.atol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 1-process runs: ``(losses, final values)`` per (mesh, trained variables)."""
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
    runs = {}

    def run(mesh: tuple[int, int], wrt: str):
        if (mesh, wrt) not in runs:
            out = tmp_path_factory.mktemp("one-process")
            res = _one(out, mesh, wrt=nnx.Param if wrt == "all" else None)
            runs[mesh, wrt] = [r["loss"] for r in res.records], _final(res.model, out)
        return runs[mesh, wrt]

    return run


def _final(model, out: Path) -> dict:
    return {"adapter": np.load(out / "adapter" / "scale.npy"), "kernel": np.asarray(model.proj.kernel[...])}


def test_two_processes_train_as_one_and_resume_on_one(tmp_path, reference):
    """Full fine-tuning over an FSDP axis that spans both processes (kernels sharded across them, gathered
    into checkpoints): the same losses and parameters as one process; then the 2-process checkpoint of
    step 3 resumes on one process, on another mesh shape (8x1), to the same end."""
    losses, final = reference((1, 8), "all")
    out = tmp_path / "run"
    result = _run_two(tmp_path, "two", output_dir=str(out), mesh=[1, 8], wrt="all")
    assert result["process_count"] == 2
    _assert_close([r["loss"] for r in result["records"]], losses)
    _assert_close(np.load(out / "adapter" / "scale.npy"), final["adapter"])
    # written once, by process 0: one line per step, checkpoints at 3 and 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    shutil.rmtree(out / "checkpoints" / "step_00000006")
    rest = _one(out, (8, 1), wrt=nnx.Param, resume=True)
    assert rest.start_step == 3
    _assert_close([r["loss"] for r in read_metrics(out / "metrics.jsonl")], losses)
    _assert_close(np.asarray(rest.model.proj.kernel[...]), final["kernel"])


def test_one_process_checkpoint_resumes_on_two_processes(tmp_path, reference):
    """OFT training (rotations replicated, frozen kernels sharded within each process on a 2x4 mesh)."""
    losses, final = reference((2, 4), "oft")
    out = tmp_path / "run"
    _one(out, (1, 8), stop_after=3)
    rest = _run_two(tmp_path, "rest", output_dir=str(out), mesh=[2, 4], resume=True)
    assert rest["start_step"] == 3
    _assert_close([r["loss"] for r in read_metrics(out / "metrics.jsonl")], losses)
    _assert_close(np.load(out / "adapter" / "scale.npy"), final["adapter"])


@pytest.mark.slow
def test_two_processes_train_oft_as_one(tmp_path, reference):
    losses, final = reference((2, 4), "oft")
    out = tmp_path / "run"
    result = _run_two(tmp_path, "two", output_dir=str(out), mesh=[2, 4])
    _assert_close([r["loss"] for r in result["records"]], losses)
    _assert_close(np.load(out / "adapter" / "scale.npy"), final["adapter"])


@pytest.mark.parametrize(
    "victim", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["worker-dies", "coordinator-dies"]
)
def test_a_killed_process_ends_the_run(tmp_path, victim):
    """The survivor exits non-zero with a message within the heartbeat timeout (plus start-up slack)."""
    out = tmp_path / "run"
    cfg = {"steps": 400, "save_every": 0, "eval_every": 0, "log_every": 1}
    procs = _launch(
        tmp_path, "kill", output_dir=str(out), mesh=[2, 4], config=cfg, die_at_step=5, die_process=victim
    )
    survivor = procs[1 - victim]
    try:
        assert procs[victim].wait(timeout=120) == -9
        killed = time.monotonic()
        code = survivor.wait(timeout=HEARTBEAT + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / f"kill.{1 - victim}.log").read_text()
    assert code != 0
    assert waited < HEARTBEAT + 30
    assert "another process of this run stopped" in log or "another task died" in log, log[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--coordinator", "127.0.0.1:1"], "go together"),
        (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes must be"),
        (
            ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in 0 .. 1",
        ),
        (["--distributed", "--heartbeat-timeout", "0"], "--heartbeat-timeout must be"),
        (["--distributed"], "a multi-process run needs --model"),
    ],
    ids=["incomplete", "count", "index", "heartbeat", "no-model"],
)
def test_multi_process_flag_errors(argv, message, tmp_path, capsys):
    from oftjax.cli import main

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_oftjax_train_on_two_processes(tmp_path):
    """``oftjax train --coordinator ...`` on two processes equals the same command on one 8-device process."""
    from interop.hf_model import save_model
    from oftjax.cli import main
    from oftjax.models import LlamaForCausalLM, ModelConfig
    from tests._tiny import TINY_LLAMA

    model_dir = tmp_path / "tiny"
    config = ModelConfig.from_hf({"model_type": "llama", **TINY_LLAMA, "vocab_size": 259})
    save_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), model_dir)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["train", "--model", str(model_dir), "--data", str(text), "--quiet", "--seq-len", "32",
              "--batch-size", "8", "--oft-block-size", "16", "--steps", "4", "--save-every", "2",
              "--mesh", "2x4", "--cpu-kernels", "off"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oftjax.cli",
                *common,
                "--output",
                str(tmp_path / "two"),
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    _assert_close([r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")], one)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "summary.json").is_file()
