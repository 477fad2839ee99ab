"""PEFT's layer filter (``layers_to_transform`` / ``layers_pattern``) of ``OFTConfig.is_target``."""

from __future__ import annotations

import re


def layer_selected(path: str, indexes: int | tuple[int, ...], patterns: str | tuple[str, ...] | None) -> bool:
    """Whether the layer index of ``path`` is among ``indexes`` (PEFT's ``check_target_module_exists``).

    The index is the first number after ``<pattern>.`` (a plain name, checked by ``OFTConfig``), or after
    any segment when no pattern is set.

    Example:
        >>> layer_selected("model.layers.1.self_attn.q_proj", (1,), "layers")
        True
    """
    match = None
    if patterns is None or len(patterns) == 0:
        # Lazy .*? takes the first numbered segment (the layer), not e.g. an expert index further on.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes
