"""``python -m oftjax.chat_data``: build the packaged Python-reference chat set, or check a data file.

python -m oftjax.chat_data build-pydoc-set OUT_DIR
python -m oftjax.chat_data check DATA --model CHECKPOINT_DIR [--seq-len N] [--loss-on all]
    [--skip-bad-rows]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oftjax.chat_data._encode import LOSS_ON
from oftjax.chat_data._load import load_chat_data
from oftjax.chat_data._pydoc_set import build_pydoc_set
from oftjax.chat_data._rows import ChatDataError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oftjax.chat_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-pydoc-set", help="write train.jsonl, eval.jsonl and build.json to OUT_DIR")
    build.add_argument("out_dir", type=Path)
    check = sub.add_parser("check", help="validate and encode a data file; print the report")
    check.add_argument("data", type=Path, help="a .jsonl / .json file or a folder of them")
    check.add_argument("--model", type=Path, required=True, help="checkpoint directory (tokenizer, template)")
    check.add_argument("--seq-len", type=int, default=2048)
    check.add_argument("--loss-on", choices=LOSS_ON, default="assistant")
    check.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows and count them")
    args = parser.parse_args(argv)
    if args.command == "build-pydoc-set":
        paths = build_pydoc_set(args.out_dir)
        for name in ("train", "eval", "build"):
            print(f"{name}: {paths[name]}")
        return 0
    try:
        data = load_chat_data(
            args.data,
            args.model,
            seq_len=args.seq_len,
            loss_on=args.loss_on,
            skip_bad_rows=args.skip_bad_rows,
        )
    except (ChatDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(data.report.summary())
    for source, reason in data.report.skipped:
        print(f"skipped {source}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
