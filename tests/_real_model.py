"""The real pretrained checkpoint (SmolLM2-135M-Instruct, bf16) as a session fixture.

Import the fixture into a test module (``from tests._real_model import smollm2_dir  # noqa: F401``). It
builds the checkpoint on first use (about a minute, cached afterwards: see ``interop/real_model.py``) and
FAILS, never skips, when it cannot: the message says which package or file is missing and the command to run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from interop.real_model import RealModelError, RealModelUnavailable, build_smollm2

BUILD_COMMAND = "pip install -e '.[oracle,test]' && python -m interop.real_model"


@functools.lru_cache(maxsize=1)
def _build() -> Path:
    # One build or verification per process, however many modules import the fixture.
    return build_smollm2()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint directory (config, bf16 safetensors, tokenizer, template)."""
    try:
        return _build()
    except (RealModelUnavailable, RealModelError) as e:
        pytest.fail(
            f"the real SmolLM2 checkpoint is needed and could not be built: {e}\n"
            f"build it with: {BUILD_COMMAND}  (add --force to rebuild a damaged cache)",
            pytrace=False,
        )
