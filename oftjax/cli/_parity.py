"""``oftjax parity``: the same model + adapter in torch (transformers + bitsandbytes + PEFT) and in JAX."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parity_parser", "run_parity"]


def add_parity_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("parity", help="torch vs JAX logits table for a model + PEFT adapter")
    p.set_defaults(func=run_parity)
    return p


def run_parity(args: argparse.Namespace) -> int:
    raise NotImplementedError
