"""The training loop: batches by step, progress bar, metrics, periodic eval and checkpoints, resume.

The loop never waits for the device between steps. Each step's metrics (device scalars) start their copy to
the host as soon as the step is dispatched and are read together once a window of ``cfg.log_every`` steps is
complete, or earlier where the loop must wait anyway (an evaluation, a checkpoint, the last step) and after
the first step of a run (so its compilation is timed alone). Meanwhile the host prepares and dispatches the
next steps, so the device always has work queued. ``tokens_per_s`` is therefore a window's throughput: its
tokens divided by the wall time from the end of the previous window to the arrival of its last metrics, the
same figure on every step of the window.

Multi-process runs (``oftjax.train.initialize``): every process runs this loop over the global mesh; each
places only its rows of each batch (``global_batch``), all read the same replicated metrics, and process 0
alone writes ``metrics.jsonl``, the plot, checkpoints and the adapter and shows progress.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from oftjax.train._batches import PackedData
from oftjax.train._checkpoint import (
    latest_checkpoint,
    remove_partial_checkpoints,
    restore_train_state,
    save_checkpoint,
)
from oftjax.train._config import TrainConfig
from oftjax.train._distributed import barrier, is_primary, multi_process
from oftjax.train._log import MetricsLog, plot_loss
from oftjax.train._sharding import global_batch
from oftjax.train._step import Trainer

__all__ = ["FitResult", "TrainingDiverged", "eval_batches", "fit"]


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or rose far above its start; ``fit`` stopped the run (message: why, and
    which checkpoint and adapter were kept). ``step`` is the first bad step (from 1), ``checkpoint`` the kept
    checkpoint directory or None."""

    def __init__(self, message: str, *, step: int, loss: float, checkpoint: Path | None = None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


class _Guard:
    """Divergence test over the records as they arrive: a non-finite loss, or the mean of the last
    ``WINDOW`` losses above ``factor`` times the mean of the run's first ``WINDOW`` (single batches vary too
    much to compare one loss with another)."""

    WINDOW = 3

    def __init__(self, factor: float):
        self.factor = factor
        self.first: list[float] = []
        self.recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)

    def check(self, records: list[dict]) -> None:
        for r in records:
            loss = r["loss"]
            if not math.isfinite(loss):
                raise TrainingDiverged(f"step {r['step']}: the loss is {loss}", step=r["step"], loss=loss)
            if len(self.first) < self.WINDOW:
                self.first.append(loss)
            self.recent.append(loss)
            start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
            if len(self.first) == self.WINDOW and now > self.factor * start:
                raise TrainingDiverged(
                    f"step {r['step']}: the loss (mean of the last {self.WINDOW} steps) rose to {now:.3f}, "
                    f"more than {self.factor:g}x its start ({start:.3f}, the first {self.WINDOW} steps)",
                    step=r["step"],
                    loss=loss,
                )


@dataclasses.dataclass
class FitResult:
    """What ``fit`` did: the trained model, per-step records, and first/last losses."""

    model: nnx.Module
    records: list[dict]
    start_step: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    seconds: float


def eval_batches(data: PackedData, cfg: TrainConfig) -> list[dict]:
    """The fixed evaluation batches: the first ``cfg.eval_batches`` batches of ``data`` in order."""
    bs = min(cfg.batch_size, len(data))
    n = min(cfg.eval_batches, len(data) // bs)
    return [data.batch(slice(i * bs, (i + 1) * bs)) for i in range(n)]


class _Window:
    """The steps dispatched since the last fetch, their metrics on their way to the host."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.started = time.perf_counter()
        self.steps: list[int] = []
        self.metrics: list[dict[str, jax.Array]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        for value in metrics.values():
            value.copy_to_host_async()  # starts the copy; returns at once
        self.steps.append(step)
        self.metrics.append(metrics)

    def fetch(self) -> list[dict]:
        """The window's records (``step`` counted from 1): the one wait for the device in this window."""
        metrics = jax.device_get(self.metrics)
        tokens_per_s = self.tokens_per_step * len(self.steps) / (time.perf_counter() - self.started)
        return [
            {
                "step": step + 1,
                "loss": float(m["loss"]),
                "lr": float(m["lr"]),
                "tokens_per_s": tokens_per_s,
                "grad_norm": float(m["grad_norm"]),
            }
            for step, m in zip(self.steps, metrics, strict=True)
        ]


@dataclasses.dataclass
class _Run:
    """One ``fit`` call's fixed parts: what the step loop reads and writes besides the steps themselves."""

    trainer: Trainer
    cfg: TrainConfig
    data: PackedData
    evals: list[dict]
    log: MetricsLog
    bar: Any
    output_dir: Path
    write_adapter: Callable[[Path], None]
    guard: _Guard | None = None

    def due(self, done: int, start: int, end: int) -> tuple[bool, bool, bool]:
        """``(fetch, evaluate, save)`` after step ``done`` (counted from 1) of a run over ``(start, end]``."""
        cfg = self.cfg
        evaluate = bool(self.evals) and (
            bool(cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        )
        save = bool(cfg.save_every and done % cfg.save_every == 0) or done == end
        window_full = bool(cfg.log_every and done % cfg.log_every == 0)
        return evaluate or save or window_full or done in (start + 1, end), evaluate, save

    def steps(self, start: int, end: int) -> tuple[list[dict], float | None]:
        """Run steps ``start`` .. ``end - 1``; return their records and the last evaluation's loss."""
        cfg, trainer = self.cfg, self.trainer
        records: list[dict] = []
        eval_after = None
        window = _Window(cfg.batch_size * self.data.seq_len)
        for step in range(start, end):
            batch = global_batch(self.data, step, cfg.batch_size, seed=cfg.seed, mesh=trainer.mesh)
            window.add(step, trainer.train_step(batch))
            fetch, evaluate, save = self.due(step + 1, start, end)
            if not fetch:
                continue
            arrived = window.fetch()
            if self.guard is not None:
                try:
                    self.guard.check(arrived)
                except TrainingDiverged:
                    self.log.write(*arrived)  # the bad steps stay on record; nothing after them is saved
                    raise
            if evaluate:
                arrived[-1]["eval_loss"] = eval_after = trainer.eval_loss(self.evals)
            self.log.write(*arrived)
            records.extend(arrived)
            last = arrived[-1]
            self.bar.set_postfix(
                loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}", refresh=False
            )
            self.bar.update(len(arrived))  # the bar shows the steps whose metrics arrived
            if save:
                save_checkpoint(
                    self.output_dir,
                    step + 1,
                    trainer.state,
                    trainer.wrt,
                    config=cfg,
                    write_adapter=self.write_adapter,
                )
            window = _Window(window.tokens_per_step)
        return records, eval_after


def _start_step(trainer: Trainer, log: MetricsLog, output_dir: Path, resume: bool) -> int:
    """The step to start from: the latest checkpoint's (loaded into ``trainer``) when resuming, else 0.

    The remains of a checkpoint that a killed run was writing are removed first (by process 0, before any
    process looks for the latest checkpoint).
    """
    if is_primary():
        remove_partial_checkpoints(output_dir)
    barrier("partial checkpoints removed")
    if resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        state, meta = restore_train_state(ckpt, trainer.state, trainer.wrt)
        trainer.load_state(state)
        start = int(meta["step"])
        log.truncate(start)
        return start
    if log.path.exists():
        log.truncate(0)
    return 0


def fit(
    model: nnx.Module,
    cfg: TrainConfig,
    train_data: PackedData,
    *,
    output_dir: str | Path,
    eval_data: PackedData | None = None,
    wrt: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    write_adapter: Callable[[nnx.Module, Path], None] | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    plot_title: str = "OFT fine-tuning loss",
    stop_after: int | None = None,
    divergence_factor: float | None = 2.0,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps; write ``metrics.jsonl``, ``loss.png`` and checkpoints.

    Batches come from ``batch_at(train_data, step, ...)``, so a run resumed from the checkpoint of step k sees
    the same batches, in the same order, as an uninterrupted run. ``write_adapter(model, dir)`` writes the
    adapter into each checkpoint and, at the end, to ``output_dir/adapter``. ``stop_after=k`` ends the run
    after step k with a checkpoint (an interruption that ``resume=True`` continues; the schedule still spans
    ``cfg.steps``). Metrics reach the host, ``metrics.jsonl`` and the progress bar once per ``cfg.log_every``
    steps (see the module docstring): the loop itself never waits for a step to finish.

    In a multi-process run every process calls ``fit`` with the same arguments and a ``mesh`` over all
    processes' devices; process 0 writes the outputs (see the module docstring).

    ``divergence_factor=f`` (None: off) stops a run whose loss is not finite, or whose mean over the last 3
    steps exceeds f times its mean over the first 3, with ``TrainingDiverged``: the checkpoints whose
    parameters gave a bad loss are removed, the adapter of the last good one is copied to
    ``output_dir/adapter`` (none when no checkpoint came before), ``metrics.jsonl`` keeps the bad steps.
    Checked on the steps' metrics as they arrive (every ``log_every`` steps), before any evaluation or
    checkpoint of that window.

    Example:
      >>> result = fit(model, TrainConfig(steps=20), data, output_dir="runs/x")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    if multi_process() and mesh is None:
        raise ValueError(
            f"a {jax.process_count()}-process run needs a mesh over all processes' devices (make_mesh())"
        )
    if is_primary():
        output_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, cfg, wrt=wrt, mesh=mesh)
    log = MetricsLog(output_dir / "metrics.jsonl")
    start = _start_step(trainer, log, output_dir, resume)
    evals = eval_batches(eval_data, cfg) if eval_data is not None and len(eval_data) else []
    eval_before = trainer.eval_loss(evals) if evals and start == 0 else None

    def adapter_writer(path: Path) -> None:
        if write_adapter is not None:
            write_adapter(trainer.model, path)

    t_start = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(
        desc=desc,
        initial=start,
        total=cfg.steps,
        disable=not (progress and is_primary()),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    guard = _Guard(divergence_factor) if divergence_factor else None
    run = _Run(trainer, cfg, train_data, evals, log, bar, output_dir, adapter_writer, guard)
    try:
        records, eval_after = run.steps(start, end)
    except TrainingDiverged as e:
        raise _diverged(e, output_dir, write_adapter is not None) from None
    finally:
        bar.close()
    model = trainer.model
    if is_primary():
        if write_adapter is not None:
            write_adapter(model, output_dir / "adapter")
        plot_loss(log.path, output_dir / "loss.png", title=plot_title, initial_eval=eval_before)
    barrier("outputs written")
    return FitResult(model, records, start, eval_before, eval_after, time.perf_counter() - t_start)


def _diverged(e: TrainingDiverged, output_dir: Path, has_adapter: bool) -> TrainingDiverged:
    """Keep the last good checkpoint and its adapter; the error that says so.

    The parameters of checkpoint ``n`` are those that computed step ``n + 1``'s loss, so a first bad step
    ``d`` condemns the checkpoints from ``d - 1`` on. Process 0 alone edits the run directory.
    """
    if not is_primary():
        message = f"training diverged at {e} (process 0 reports what was kept)"
        return TrainingDiverged(message, step=e.step, loss=e.loss)
    root = output_dir / "checkpoints"
    for ckpt in sorted(root.glob("step_*")) if root.is_dir() else []:
        if ckpt.name[5:].isdigit() and int(ckpt.name[5:]) >= e.step - 1:
            shutil.rmtree(ckpt, ignore_errors=True)
    good = latest_checkpoint(output_dir)
    kept = "no checkpoint was saved before it, so no adapter was written"
    if good is None:
        shutil.rmtree(output_dir / "adapter", ignore_errors=True)
    else:
        kept = f"kept the last good checkpoint {good}"
        if has_adapter and (good / "adapter").is_dir():
            tmp = output_dir / ".adapter.diverged.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(good / "adapter", tmp)
            shutil.rmtree(output_dir / "adapter", ignore_errors=True)
            tmp.rename(output_dir / "adapter")
            kept += f" and its adapter in {output_dir / 'adapter'}"
    message = f"training diverged at {e}; {kept}. Lower the learning rate."
    return TrainingDiverged(message, step=e.step, loss=e.loss, checkpoint=good)
