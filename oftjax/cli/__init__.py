"""The ``oftjax`` command: ``train`` (the main job), ``parity`` (torch vs JAX table), ``convert``.

Examples:
  $ oftjax train                                   # embedded default: no download, a few minutes on a CPU
  $ oftjax train --model tiny-llama --quant nf4 --data notes/ --steps 200 --output runs/mine
  $ oftjax parity --model runs/default/base --quant nf4 --adapter runs/default/adapter
  $ oftjax convert adapter-to-jax runs/default/adapter adapter-jax

Errors in the arguments or inputs exit with status 2 (usage) or 1 (bad input), with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from oftjax.cli._malloc import keep_freed_memory as keep_freed_memory

__all__ = ["build_parser", "keep_freed_memory", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``oftjax`` command."""
    from oftjax.cli._parity import add_parity_parser
    from oftjax.cli._train_args import add_train_parser

    parser = argparse.ArgumentParser(
        prog="oftjax",
        description="Quantized orthogonal fine-tuning (PEFT's OFTv2) in JAX over bitsandbytes weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_parity_parser(sub)
    try:
        from interop.convert import add_subparser
    except ImportError:  # pragma: no cover - interop ships with oftjax
        pass
    else:
        add_subparser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oftjax`` console script; returns (and exits with) the status code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [] or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `oftjax` alone (or with train flags) runs the main job
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CLIError as e:
        print(f"oftjax {args.command}: error: {e}", file=sys.stderr)
        status = 1
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        # bad input (missing files, invalid configs/checkpoints/data): one line; OFTJAX_DEBUG=1 re-raises
        if os.environ.get("OFTJAX_DEBUG"):
            raise
        print(f"oftjax {args.command}: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"oftjax {args.command}: interrupted", file=sys.stderr)
        status = 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
