"""``--model``: a checkpoint directory, or a Hub id (``org/name``) found in the local Hugging Face cache.

Nothing is downloaded: a Hub id is resolved through ``huggingface_hub.snapshot_download`` with
``local_files_only=True`` (what ``HF_HUB_OFFLINE=1`` does), in the cache that ``HF_HUB_CACHE`` names when
set (read at call time), else ``huggingface_hub``'s default (``~/.cache/huggingface/hub``, or under
``HF_HOME``). An id that is not cached is a one-line error saying where it looked and how to get it.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     resolve_model(d) == Path(d)
    True
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["HUB_ID", "ModelNotFound", "resolve_model"]

# org/name[@revision], as the Hub spells repository ids (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<revision>[\w.\-/]+))?$")


class ModelNotFound(FileNotFoundError):
    """``--model`` is neither a directory nor a Hub id in the local cache (the message says which and why)."""


def _cache_dir() -> str:
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return env
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_model(spec: str | os.PathLike) -> Path:
    """The checkpoint directory that ``spec`` names.

    Args:
      spec: an existing path (returned as is), or ``org/name`` / ``org/name@revision`` looked up offline in
        the local Hugging Face cache.

    Raises:
      ModelNotFound: the path does not exist and ``spec`` is not a cached Hub id.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    match = HUB_ID.match(text)
    if match is None:
        raise ModelNotFound(f"{text}: no such checkpoint directory (nor a Hub id of the form org/name)")
    return _from_cache(text, match.group("repo"), match.group("revision"))


def _from_cache(text: str, repo: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - tokenizers depends on huggingface_hub
        raise ModelNotFound(
            f"{text}: not a directory, and resolving a Hub id needs huggingface_hub (pip install "
            f"huggingface_hub) ({e})"
        ) from e
    cache = _cache_dir()
    try:
        found = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelNotFound(
            f"{text}: not a directory, and the Hub model {repo} is not in the local Hugging Face cache "
            f"({cache}); nothing is downloaded: fetch it where there is a network (huggingface-cli download "
            f"{repo}) into that cache, or pass a checkpoint directory"
        ) from None
    return Path(found)
