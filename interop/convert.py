"""``oftjax convert``: PEFT adapters and bnb HF checkpoints <-> JAX directories, both directions.

Subcommands (each takes ``SRC DST`` and ``--force`` to replace an existing DST):
  * ``adapter-to-jax``    PEFT OFT adapter dir -> JAX adapter dir  (``interop.peft.adapter_to_jax``)
  * ``adapter-to-peft``   JAX adapter dir -> PEFT OFT adapter dir  (``interop.peft.adapter_to_peft``)
  * ``checkpoint-to-jax`` HF dir (float / bnb 8-bit / bnb 4-bit) -> JAX checkpoint dir
    (``interop.hf.checkpoint_to_jax``; quantized tensors copied byte for byte, tensor by tensor)
  * ``checkpoint-to-hf``  JAX checkpoint dir -> HF dir that transformers loads
    (``interop.hf.checkpoint_to_hf``; ``--max-shard-size``)

Outputs are built in a temporary sibling directory and renamed when complete (nothing is written on error).
Inputs are untrusted: files are read only inside SRC (``--allow-symlinks`` follows links that stay inside
it). Errors exit with status 1 and one line on stderr, without a traceback (``OFTJAX_DEBUG=1`` shows it).
Conversions rename and copy tensors with numpy; torch is never imported.

Wiring: ``add_subparser(subparsers)`` registers ``convert`` and sets ``func`` on the parsed namespace; the
caller exits with ``args.func(args)``. ``main(argv)`` runs the command alone (tests, ``python -m
interop.convert``).

Example:
  $ oftjax convert checkpoint-to-jax llama-nf4 llama-nf4-jax
  $ oftjax convert checkpoint-to-hf llama-nf4-jax llama-nf4-hf --force
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from interop._io import InteropError

_ERRORS = (InteropError, FileExistsError, FileNotFoundError, ValueError, TypeError, OSError)


def _adapter_to_jax(args: argparse.Namespace) -> None:
    from interop import peft

    peft.adapter_to_jax(args.src, args.dst, force=args.force, allow_symlinks=args.allow_symlinks)


def _adapter_to_peft(args: argparse.Namespace) -> None:
    from interop import peft

    peft.adapter_to_peft(args.src, args.dst, force=args.force, allow_symlinks=args.allow_symlinks)


def _checkpoint_to_jax(args: argparse.Namespace) -> None:
    from interop import hf

    hf.checkpoint_to_jax(
        args.src, args.dst, force=args.force, progress=not args.quiet, allow_symlinks=args.allow_symlinks
    )


def _checkpoint_to_hf(args: argparse.Namespace) -> None:
    from interop import hf

    hf.checkpoint_to_hf(
        args.src,
        args.dst,
        force=args.force,
        progress=not args.quiet,
        max_shard_size=args.max_shard_size,
        allow_symlinks=args.allow_symlinks,
    )


_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "adapter-to-jax": (_adapter_to_jax, "PEFT OFT adapter directory -> JAX adapter directory"),
    "adapter-to-peft": (_adapter_to_peft, "JAX adapter directory -> PEFT OFT adapter directory"),
    "checkpoint-to-jax": (
        _checkpoint_to_jax,
        "HF checkpoint directory (float, bnb 8-bit or 4-bit) -> JAX checkpoint directory",
    ),
    "checkpoint-to-hf": (_checkpoint_to_hf, "JAX checkpoint directory -> HF checkpoint directory"),
}


def _run(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            handler(args)
        except Exception as e:  # one line, never a traceback (OFTJAX_DEBUG=1 re-raises)
            if os.environ.get("OFTJAX_DEBUG"):
                raise
            msg = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, _ERRORS):
                msg = f"{type(e).__name__}: {msg}"
            print(f"oftjax convert {args.convert_command}: error: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"oftjax convert {args.convert_command}: interrupted (nothing written)", file=sys.stderr)
            return 130
        if not args.quiet:
            print(f"wrote {args.dst}")
        return 0

    return run


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert`` and its subcommands on an ``argparse`` subparsers object; return its parser.

    Example:
      >>> parser = argparse.ArgumentParser(prog="oftjax")
      >>> _ = add_subparser(parser.add_subparsers(dest="command", required=True))
      >>> args = parser.parse_args(["convert", "checkpoint-to-jax", "src", "dst"])
      >>> args.convert_command
      'checkpoint-to-jax'
    """
    parser = subparsers.add_parser(
        "convert",
        help="convert PEFT adapters and bnb HF checkpoints to and from JAX adapter/checkpoint directories",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")
    for name, (handler, help_) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("src", help="input directory")
        p.add_argument("dst", help="output directory (must not exist unless --force)")
        p.add_argument("--force", action="store_true", help="replace DST if it exists")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line")
        p.add_argument(
            "--allow-symlinks",
            action="store_true",
            help="follow symbolic links inside SRC (never those leaving it; a Hugging Face cache snapshot's "
            "links into its blobs are always followed)",
        )
        if name == "checkpoint-to-hf":
            p.add_argument(
                "--max-shard-size",
                default="5GB",
                help="largest safetensors shard, e.g. 5GB, 500MB (default: %(default)s)",
            )
        p.set_defaults(func=_run(handler))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``convert`` with ``argv`` (without the leading ``convert``); return the exit status."""
    parser = argparse.ArgumentParser(prog="oftjax")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
