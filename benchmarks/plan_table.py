"""The memory planner's table for large models: Llama-3.1-8B, Qwen2.5-32B and Llama-3.1-70B on 1-8 devices.

Runs ``oftjax plan --json`` for each published config in benchmarks/configs on FSDP meshes of 1, 2, 4 and 8
devices (for simulated CPU devices when this host has fewer) and prints a markdown table per device against
80 GB and 141 GB. Appends each plan as one JSON line to ``--out`` as it arrives, and reuses the lines already
there (an interrupted run continues).

A full-depth compile of these models for XLA:CPU takes 6 minutes (Llama-3.1-8B, 1 device) to about an hour
(70B, 8 devices) on 2 cores, so by default (``--depths 1 2``) the step is compiled with the first 1 and 2
decoder layers of each model and every figure is extrapolated linearly to the full depth: the layers are
identical, so each adds the same state, residuals and (in XLA's buffer assignment) temporaries.
``--depths full`` compiles the real depth instead; benchmarks/RESULTS.md compares the two where both ran.

Run: ``python benchmarks/plan_table.py [--batch 8 --seq 2048] [--out runs/plan_table.jsonl]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("Llama-3.1-8B", "Qwen2.5-32B", "Llama-3.1-70B")
DEVICES = (1, 2, 4, 8)
SIZES = (80e9, 141e9)


def _compile(config: Path, devices: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "oftjax.cli", "plan", "--model", str(config),
           "--batch", str(args.batch), "--seq", str(args.seq), "--mesh", f"1x{devices}", "--remat",
           "--dtype", "bfloat16", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _plan(model: str, devices: int, args: argparse.Namespace) -> dict:
    """The plan at full depth: compiled, or extrapolated from the depths ``args.depths``."""
    if args.depths == ["full"]:
        return _compile(CONFIGS / f"{model}.json", devices, args)
    hf = json.loads((CONFIGS / f"{model}.json").read_text())
    (a, b), depth = (int(d) for d in args.depths), hf["num_hidden_layers"]
    plans = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (a, b):
            path = Path(tmp) / f"{model}-{layers}.json"
            path.write_text(json.dumps({**hf, "num_hidden_layers": layers}))
            plans.append(_compile(path, devices, args))
    lo, hi = plans
    out = {**hi, "extrapolated_from": [a, b]}
    for k, v in hi.items():
        if isinstance(v, int) and k not in ("devices",):
            out[k] = round(lo[k] + (v - lo[k]) * (depth - a) / (b - a))
    for k in hi["xla"]:
        out["xla"][k] = round(lo["xla"][k] + (hi["xla"][k] - lo["xla"][k]) * (depth - a) / (b - a))
    out["total"] = out["xla"]["argument"] + out["xla"]["temp"] + out["xla"]["output"] - out["xla"]["alias"]
    return out  # "parameters" too: each layer adds the same count


def _row(model: str, plan: dict) -> str:
    gb = 1e9
    state = sum(plan[k] for k in ("frozen_packed", "frozen_float", "rotations", "optimizer", "batch"))
    low = state + plan["activations"]
    fits = " / ".join(
        f"{'yes' if low <= s else 'no'}, {'yes' if plan['total'] <= s else 'no'}" for s in SIZES
    )
    return (
        f"| {model} | {plan['devices']} | {plan['frozen_packed'] / gb:.1f} | "
        f"{plan['frozen_float'] / gb:.1f} | "
        f"{(plan['rotations'] + plan['optimizer']) / gb:.2f} | {plan['activations'] / gb:.1f} | "
        f"{plan['temporaries'] / gb:.1f} | {low / gb:.1f} | {plan['total'] / gb:.1f} | {fits} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("runs/plan_table.jsonl"))
    p.add_argument("--depths", nargs="+", default=["1", "2"], help="two layer counts, or 'full'")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--devices", nargs="+", type=int, default=list(DEVICES))
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done[r["model"], r["devices"], r["batch"], r["seq"], r.get("depths", "full")] = r["plan"]
    depths = " ".join(args.depths)
    for model in args.models:
        for devices in args.devices:
            key = (model, devices, args.batch, args.seq, depths)
            if key not in done:
                done[key] = _plan(model, devices, args)
                record = {"model": model, "devices": devices, "batch": args.batch, "seq": args.seq}
                with args.out.open("a") as f:
                    f.write(json.dumps({**record, "depths": depths, "plan": done[key]}) + "\n")
            print(_row(model, done[key]), flush=True)
    print(f"\nbatch {args.batch} x {args.seq} tokens, NF4 + double quant, OFT block 32 on every projection, "
          "bfloat16, remat, FSDP over the devices; GB = 1e9 bytes per device")  # fmt: skip
    print(
        "| model | devices | packed weights | float weights | rotations + Adam | activations | XLA:CPU "
        "temporaries | state + activations | XLA:CPU total | fits 80 GB / 141 GB (state + act., total) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = [(m, d, args.batch, args.seq, depths) for m in args.models for d in args.devices]
    print("\n".join(_row(k[0], done[k]) for k in keys))


if __name__ == "__main__":
    main()
