"""``RopeConfig``: the rotary embedding of one layer type, read from (and written back to) HF rope parameters.

Follows transformers 5.24's ``modeling_rope_utils.py``: ``rope_parameters`` (transformers 5) or the legacy
``rope_theta`` / ``rope_scaling`` spelling, the rope types "default", "linear", "llama3" and "longrope"
(Phi-3's LongRoPE: short and long per-frequency factors and a cos/sin scale). Other types and keys are
refused, naming them; ``partial_rotary_factor`` other than 1 is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from oftjax.models._config_keys import UnsupportedConfigError

ROPE_TYPES = ("default", "linear", "llama3", "longrope")

# the keys each rope type reads besides rope_type / type / rope_theta / partial_rotary_factor
_TYPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
    "longrope": frozenset(
        {"short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"}
    ),
}
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """The rotary embedding of one layer type.

    Attributes:
      rope_type: "default", "linear" (positions / factor), "llama3" (Llama 3.1 frequency smoothing) or
        "longrope" (Phi-3: frequencies divided by ``short_factor``, or by ``long_factor`` when the largest
        position reaches ``original_max_position_embeddings``; cos and sin times ``attention_factor``).
      theta: the base (HF ``rope_theta``).
      factor: linear and llama3: the scaling factor. longrope: None means max_position_embeddings /
        original_max_position_embeddings (transformers' rule), used only to derive ``attention_factor``.
      low_freq_factor, high_freq_factor: llama3.
      original_max_position_embeddings: llama3 and longrope (the pretraining length).
      short_factor, long_factor: longrope, one factor per frequency (head_dim / 2 each).
      attention_factor: longrope's cos/sin scale; None derives it from ``factor`` as transformers does.

    Example:
      >>> RopeConfig("linear", 1e4, factor=4.0).rope_type
      'linear'
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope_type {self.rope_type!r} is not implemented (one of {ROPE_TYPES})"
            )
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        if self.rope_type in ("linear", "llama3") and self.factor is None:
            raise ValueError(f"rope_parameters of type {self.rope_type!r} needs 'factor'")
        if self.rope_type in ("llama3", "longrope") and self.original_max_position_embeddings is None:
            raise ValueError(
                f"rope_parameters of type {self.rope_type!r} needs original_max_position_embeddings"
            )
        if self.rope_type == "longrope" and (
            not self.short_factor or len(self.short_factor) != len(self.long_factor)
        ):
            raise ValueError(
                "rope_parameters of type 'longrope' need short_factor and long_factor of one length "
                f"(got {len(self.short_factor)} and {len(self.long_factor)})"
            )

    def scaling(self, max_position_embeddings: int) -> float:
        """The cos/sin scale (transformers' ``attention_scaling``): 1 except for longrope.

        Example:
          >>> round(RopeConfig("longrope", short_factor=[1.0], long_factor=[2.0],
          ...     original_max_position_embeddings=4096).scaling(131072), 6)
          1.190238
        """
        if self.rope_type != "longrope":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        orig = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else max_position_embeddings / orig
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def read_rope(
    params: Mapping[str, Any],
    *,
    theta: float,
    max_position_embeddings: int,
    allowed: tuple[str, ...] = ROPE_TYPES,
    where: str = "rope_parameters",
    original_max_position_embeddings: int | None = None,
) -> RopeConfig:
    """A ``RopeConfig`` from one HF rope-parameter dict (``rope_parameters`` or legacy ``rope_scaling``).

    Args:
      params: the dict (``{}`` for the default rope).
      theta: the base when ``params`` has no ``rope_theta`` (legacy top-level key or the class default).
      max_position_embeddings: llama3/longrope ``original_max_position_embeddings`` default.
      allowed: the rope types this model type implements in transformers (Phi-3: default and longrope).
      where: the config key, for messages.
      original_max_position_embeddings: a value that overrides the dict's (Phi-3's top-level key).

    Raises:
      UnsupportedConfigError: a rope type or key that is not implemented, named.
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(f"partial_rotary_factor={partial} is not implemented (only 1.0)")
    if rope_type not in ROPE_TYPES or rope_type not in allowed:
        raise UnsupportedConfigError(
            f"{where} rope_type={rope_type!r} is not implemented (one of {tuple(t for t in allowed)})"
        )
    unknown = sorted(set(params) - _COMMON_KEYS - _TYPE_KEYS[rope_type])
    if unknown:
        raise UnsupportedConfigError(f"{where} key(s) {unknown} are not implemented for {rope_type!r}")
    out: dict[str, Any] = dict(rope_type=rope_type, theta=float(params.get("rope_theta", theta)))
    if rope_type in ("linear", "llama3", "longrope") and params.get("factor") is not None:
        out["factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["low_freq_factor"] = float(params["low_freq_factor"])
        out["high_freq_factor"] = float(params["high_freq_factor"])
    if rope_type in ("llama3", "longrope"):
        orig = original_max_position_embeddings or params.get("original_max_position_embeddings")
        out["original_max_position_embeddings"] = int(orig or max_position_embeddings)
    if rope_type == "longrope":
        out["short_factor"] = tuple(params.get("short_factor") or ())
        out["long_factor"] = tuple(params.get("long_factor") or ())
        if params.get("attention_factor") is not None:
            out["attention_factor"] = float(params["attention_factor"])
    return RopeConfig(**out)


def flat_rope_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rope dict of a config with one rope for all layers: ``rope_parameters``, else the legacy
    ``rope_scaling``, else ``{}``; a top-level ``partial_rotary_factor`` joins it."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "partial_rotary_factor" in config:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return params


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """The transformers 5 ``rope_parameters`` dict of ``rope`` (``read_rope`` inverts it).

    Example:
      >>> rope_to_hf(RopeConfig("linear", 5e5, factor=4.0))
      {'rope_type': 'linear', 'rope_theta': 500000.0, 'factor': 4.0}
    """
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.factor is not None:
        out["factor"] = rope.factor
    if rope.rope_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.rope_type in ("llama3", "longrope"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rope_type == "longrope":
        out.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    return out
