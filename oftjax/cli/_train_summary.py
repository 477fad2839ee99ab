"""``oftjax train``'s closing: ``summary.json`` (atomic) and the last lines, the held-out verdict last."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["run_facts", "summarize", "write_summary"]


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def run_facts(base: Any, adapter: Any) -> dict:
    """What the summary says about the base model and the adapter."""
    return {
        "base": str(base.model_dir),
        "quant": base.quant,
        "bytes_per_frozen_param": base.bytes_per_param,
        "oft_layers": len(adapter.layers),
        "trainable_params": adapter.trainable,
    }


def write_summary(out: Path, summary: dict) -> None:
    """``summary.json``, atomically (a temporary sibling renamed into place)."""
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")


def summarize(args: argparse.Namespace, base: Any, adapter: Any, res: Any, summary: dict, seconds: float):
    """``summary.json`` and the closing lines: loss of the first/last steps, eval loss, tokens/s; the last
    line says whether the held-out loss improved, and warns when it got worse.

    Tokens/s is the median over the steps after the first (whose window includes compilation) of each
    step's window throughput (see ``oftjax.train.fit``); it counts every position of a row, padding included.
    """
    import numpy as np

    out: Path = args.output
    recs = res.records
    k = max(1, min(10, len(recs) // 5))
    first = float(np.mean([r["loss"] for r in recs[:k]])) if recs else float("nan")
    last = float(np.mean([r["loss"] for r in recs[-k:]])) if recs else float("nan")
    tok_s = float(np.median([r["tokens_per_s"] for r in recs[1:]])) if len(recs) > 1 else float("nan")
    before, after = res.eval_loss_before, res.eval_loss_after
    summary.update(run_facts(base, adapter))
    summary.update(
        {
            "dtype": args.dtype,
            "learning_rate": args.lr,
            "steps": args.steps,
            "train_loss_first": first,
            "train_loss_last": last,
            "eval_loss_before": before,
            "eval_loss_after": after,
            "eval_improved": None if before is None or after is None else bool(after < before),
            "tokens_per_s": tok_s,
            "seconds": seconds,
        }
    )
    write_summary(out, summary)
    _say(
        args,
        f"done in {seconds:.0f} s: OFT train loss {first:.3f} -> {last:.3f} (mean of first/last "
        f"{k} steps); {tok_s:,.0f} tokens/s",
    )
    _say(args, f"wrote {out / 'adapter'} (PEFT adapter), {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    print(_verdict(before, after, args), flush=True)


def _verdict(before: float | None, after: float | None, args: argparse.Namespace) -> str:
    """The last line: held-out loss before -> after, improved or (a warning) worse."""
    if before is None or after is None:
        why = "a resumed run has no evaluation before its first step" if args.resume else "no held-out data"
        return f"eval loss: not measured ({why})"
    if after < before:
        return f"eval loss improved: {before:.3f} -> {after:.3f}"
    return (
        f"WARNING: eval loss got worse: {before:.3f} -> {after:.3f}; the adapter may hurt the model "
        f"(try a lower --lr than {args.lr:g}, or fewer --steps)"
    )
