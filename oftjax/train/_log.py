"""Run outputs: ``metrics.jsonl`` (one JSON object per step) and ``loss.png`` (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax

__all__ = ["MetricsLog", "plot_loss", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (empty list when it does not exist).

    A last line without its newline is a write cut short (a crash, ``kill -9``): it is dropped, and the
    run resumes from its checkpoint as if it had never been written. Any other line that is not a JSON
    object is damage: a ValueError naming ``file:line``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "metrics.jsonl").write_text('{"step": 1}\\n{"step": 2, "lo')
        ...     read_metrics(Path(tmp) / "metrics.jsonl")
        [{'step': 1}]
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if number == len(lines):  # the last line has no newline: a write cut short
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl``; ``truncate(step)`` drops records after ``step`` (used on resume).

    In a multi-process run only process 0 writes (every process holds the same records).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.writes = jax.process_index() == 0
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, step: int) -> None:
        if not self.writes:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, *records: dict) -> None:
        """Append ``records``, one JSON line each."""
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def plot_loss(
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    title: str = "loss",
    initial_eval: float | None = None,
) -> Path:
    """Plot train loss (raw and a 10-step moving average) and eval loss against step into a PNG.

    ``initial_eval`` (the eval loss before the first step) is drawn at step 0. Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if initial_eval is not None:
        evals.insert(0, (0, initial_eval))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=0.8, alpha=0.45)
        if len(train) >= 10:
            steps, losses = zip(*train, strict=True)
            k = 10
            avg = [sum(losses[i - k + 1 : i + 1]) / k for i in range(k - 1, len(losses))]
            ax.plot(steps[k - 1 :], avg, label="train loss (10-step mean)", lw=1.6, color="C0")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".png", dir=out_path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
