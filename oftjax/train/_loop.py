"""The training loop: batches by step, progress bar, metrics, periodic eval and checkpoints, resume."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from oftjax.train._batches import PackedData, batch_at
from oftjax.train._checkpoint import latest_checkpoint, restore_train_state, save_checkpoint
from oftjax.train._config import TrainConfig
from oftjax.train._log import MetricsLog, plot_loss
from oftjax.train._step import Trainer

__all__ = ["FitResult", "eval_batches", "fit"]


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
    return [
        {
            "input_ids": data.input_ids[i * bs : (i + 1) * bs],
            "loss_mask": data.loss_mask[i * bs : (i + 1) * bs],
        }
        for i in range(n)
    ]


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
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps; write ``metrics.jsonl``, ``loss.png`` and checkpoints.

    Batches come from ``batch_at(train_data, step, ...)``, so a run resumed from the checkpoint of step k sees
    the same batches, in the same order, as an uninterrupted run. ``write_adapter(model, dir)`` writes the
    adapter into each checkpoint and, at the end, to ``output_dir/adapter``. ``stop_after=k`` ends the run
    after step k with a checkpoint (an interruption that ``resume=True`` continues; the schedule still spans
    ``cfg.steps``).

    Example:
      >>> result = fit(model, TrainConfig(steps=20), data, output_dir="runs/x")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, cfg, wrt=wrt, mesh=mesh)
    log = MetricsLog(output_dir / "metrics.jsonl")
    start = 0
    if resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        state, meta = restore_train_state(ckpt, trainer.state, trainer.wrt)
        trainer.load_state(state)
        start = int(meta["step"])
        log.truncate(start)
    elif log.path.exists():
        log.truncate(0)
    evals = eval_batches(eval_data, cfg) if eval_data is not None and len(eval_data) else []
    eval_before = trainer.eval_loss(evals) if evals and start == 0 else None

    def adapter_writer(path: Path) -> None:
        if write_adapter is not None:
            write_adapter(trainer.model, path)

    records: list[dict] = []
    t_start = time.perf_counter()
    tokens_per_batch = cfg.batch_size * train_data.seq_len
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(
        range(start, end),
        desc=desc,
        initial=start,
        total=cfg.steps,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    eval_after = None
    for step in bar:
        batch = batch_at(train_data, step, cfg.batch_size, seed=cfg.seed)
        lr = trainer.learning_rate(step)
        t0 = time.perf_counter()
        metrics = trainer.train_step(batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        dt = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens_per_batch / dt,
            "grad_norm": float(metrics["grad_norm"]),
        }
        done = step + 1
        if evals and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            record["eval_loss"] = eval_after = trainer.eval_loss(evals)
        log.write(record)
        records.append(record)
        if progress and (done % max(cfg.log_every, 1) == 0 or done == cfg.steps):
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            save_checkpoint(
                output_dir, done, trainer.state, trainer.wrt, config=cfg, write_adapter=adapter_writer
            )
    bar.close()
    model = trainer.model
    if write_adapter is not None:
        write_adapter(model, output_dir / "adapter")
    plot_loss(log.path, output_dir / "loss.png", title=plot_title, initial_eval=eval_before)
    return FitResult(model, records, start, eval_before, eval_after, time.perf_counter() - t_start)
