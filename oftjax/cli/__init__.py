"""The ``oftjax`` command: ``train`` (the main job), ``generate``, ``merge``, ``parity`` (torch vs JAX
table), ``plan``, ``convert``.

Examples:
  $ oftjax train                                   # embedded default: no download, a few minutes on a CPU
  $ oftjax train --model tiny-llama --quant nf4 --data notes/ --steps 200 --output runs/mine
  $ oftjax generate --model runs/default/base --quant nf4 --adapter runs/default/adapter --prompt "The"
  $ oftjax generate --model HuggingFaceTB/SmolLM2-135M-Instruct --chat --prompt "What is a tuple?"
  $ oftjax merge --model runs/default/base --quant nf4 --adapter runs/default/adapter --output merged
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

__all__ = ["build_parser", "console", "keep_freed_memory", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``oftjax`` command."""
    from oftjax.cli._generate import add_generate_parser
    from oftjax.cli._merge import add_merge_parser
    from oftjax.cli._parity import add_parity_parser
    from oftjax.cli._plan import add_plan_parser
    from oftjax.cli._samples import add_sample_arguments
    from oftjax.cli._train_args import add_train_parser

    parser = argparse.ArgumentParser(
        prog="oftjax",
        description="Quantized orthogonal fine-tuning (PEFT's OFTv2) in JAX over bitsandbytes weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_sample_arguments(add_train_parser(sub))
    add_generate_parser(sub)
    add_merge_parser(sub)
    add_parity_parser(sub)
    add_plan_parser(sub)
    try:
        from interop.convert import add_subparser
    except ImportError:  # pragma: no cover - interop ships with oftjax
        pass
    else:
        add_subparser(sub)
    return parser


def console() -> int:
    """The ``oftjax`` console script and ``python -m oftjax.cli``: ``main`` in a process of its own, which
    ``oftjax train`` may start again with the block cache preloaded (``--malloc cache``, cli/_malloc.py).
    """
    return main(own_process=True)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """The ``oftjax`` command, in this process; returns (and exits with) the status code.

    Every error is one line on stderr and status 1, never a traceback: bad input says what is wrong with it,
    anything else (a defect) says its type and how to see the traceback (``OFTJAX_DEBUG=1`` re-raises).
    A ``train`` run that fails before its first checkpoint leaves no ``run.json`` it wrote.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [] or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `oftjax` alone (or with train flags) runs the main job
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv, args.own_process = argv, own_process
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print(f"oftjax {args.command}: interrupted", file=sys.stderr)
        status = 130
    except Exception as e:
        if os.environ.get("OFTJAX_DEBUG") and not isinstance(e, CLIError):
            raise
        _discard_failed_start(args)
        print(f"oftjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        status = 1
    return int(status or 0)


# Bad input: the message is the whole story (missing files, invalid configs, checkpoints or data).
_INPUT_ERRORS = (CLIError, OSError, ValueError)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, _INPUT_ERRORS):
        return msg
    return f"{type(e).__name__}: {msg} (an internal error: run with OFTJAX_DEBUG=1 for the traceback)"


def _discard_failed_start(args: argparse.Namespace) -> None:
    if args.command == "train":
        from oftjax.cli._train_args import discard_failed_start

        discard_failed_start(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
