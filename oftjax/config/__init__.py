"""``OFTConfig``: PEFT's OFT configuration as a frozen dataclass, with PEFT's target-module matching.

Field names, defaults and validation follow PEFT 0.21.2 (``src/peft/tuners/oft/config.py`` and the
``PeftConfig`` base in ``src/peft/config.py``); module matching follows ``check_target_module_exists`` in
``src/peft/tuners/tuners_utils.py``. ``to_dict`` / ``from_dict`` read and write ``adapter_config.json``
contents. One field is ours: ``legacy_neumann`` (the PEFT 0.16-0.17 Cayley-Neumann series), which is never
written to JSON; it is encoded as a ``peft_version`` below 0.18, exactly how PEFT tells the two apart.

A config may come from an untrusted file: every field is type- and range-checked with its name, and the
regular expressions PEFT runs with ``re`` (a string ``target_modules`` / ``exclude_modules``,
``modules_to_save`` inside PEFT's pattern) are checked when the config is built and matched in linear time
(``_patterns``), so no pattern can hang target selection. ``layers_pattern`` is a plain name.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from oftjax.config._patterns import PatternError as PatternError
from oftjax.config._patterns import compile_pattern as compile_pattern
from oftjax.config._targets import layer_selected
from oftjax.config._values import (
    PLAIN_NAME,
    check_pattern,
    checked_int,
    is_before_018,
    parse_version,
    save_pattern,
    str_collection,
)

__all__ = ["DEFAULT_TARGET_MODULES", "PEFT_VERSION", "OFTConfig", "PatternError", "compile_pattern"]

#: The PEFT version whose OFT math and file format we reproduce; written as ``peft_version`` by default.
PEFT_VERSION = "0.21.2"
#: The most Cayley-Neumann terms a config may ask for (each one is traced into every forward).
MAX_NEUMANN_TERMS = 64
#: Written as ``peft_version`` for ``legacy_neumann`` adapters (last release with the old series).
LEGACY_PEFT_VERSION = "0.17.1"

#: PEFT's ``TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING`` for the architectures oftjax models.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
}

_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_BIAS = ("none", "all", "oft_only")
_ALL_LINEAR = "all-linear"

_V014_MESSAGE = (
    "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible "
    "with the latest version of OFT. Please retrain your adapter weights with newer PEFT versions. "
    "Alternatively, downgrade PEFT to version 0.13.0 to use the old adapter weights."
)


@dataclasses.dataclass(frozen=True)
class OFTConfig:
    """PEFT's ``OFTConfig`` (0.21.2 field names and defaults), immutable.

    Exactly one of ``r`` (blocks per layer) and ``oft_block_size`` must be non-zero; the other follows
    from each layer's ``in_features`` (see ``oftjax.oft.resolve_block_size``). List-valued
    ``target_modules`` / ``exclude_modules`` are stored as frozensets (PEFT stores sets), a string is a
    regex that must match the full module path.

    Attributes:
        r: number of OFT blocks per layer (0: derive from ``oft_block_size``).
        oft_block_size: block size (0: derive from ``r``).
        module_dropout: probability of replacing a block by the identity in training. PEFT builds but never
            applies it (a no-op since 0.16); oftjax applies it.
        target_modules: names (exact path or ``.``-boundary suffix), a full-match regex, or ``"all-linear"``.
        exclude_modules: same rules; matches are never adapted.
        layers_to_transform: layer index or indices to adapt (only with a list ``target_modules``, as PEFT).
        layers_pattern: name(s) of the layer list (e.g. ``"layers"``) in front of the index.
        bias: ``"none"``, ``"all"`` or ``"oft_only"``: which base biases are trained and saved.
        init_weights: ``True``: zeros (identity rotation); ``False``: ``normal(0, 0.1)``.
        coft: constrained OFT (project the parameters to radius ``eps / sqrt(#blocks)`` every forward).
        eps: COFT radius.
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: Neumann series (approximates exact Cayley *transposed*) instead of exact Cayley.
        num_cayley_neumann_terms: number of series terms.
        legacy_neumann: (oftjax) the PEFT 0.16-0.17 series; written to JSON as ``peft_version`` "0.17.1".
        fan_in_fan_out, modules_to_save, task_type, base_model_name_or_path, revision, inference_mode,
            peft_version: PEFT bookkeeping fields, kept for round trips.

    Example:
        >>> from oftjax import OFTConfig
        >>> cfg = OFTConfig(oft_block_size=32, target_modules=["q_proj", "v_proj"])
        >>> cfg.is_target("model.layers.0.self_attn.q_proj"), cfg.is_target("model.layers.0.mlp.up_proj")
        (True, False)
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: str | frozenset[str] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: str | frozenset[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_version: str | None = None
    legacy_neumann: bool = False

    def __post_init__(self) -> None:
        # each step normalises (frozen: through object.__setattr__) or refuses with the field named
        self._normalize_sizes()
        self._normalize_target_lists()
        self._check_switches()
        self._normalize_numbers()
        self._check_task_type()
        self._normalize_layer_selection()
        self._check_peft_version()
        self._check_peft_rules()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _normalize_sizes(self) -> None:
        self._set("r", checked_int("r", self.r, 0))
        self._set("oft_block_size", checked_int("oft_block_size", self.oft_block_size, 0))
        # each term is a matrix product traced into the forward: PEFT's default is 5, the series converges
        # long before MAX_NEUMANN_TERMS, and a file asking for 2**70 must not hang the loader
        terms = checked_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms, 1, MAX_NEUMANN_TERMS)
        self._set("num_cayley_neumann_terms", terms)

    def _normalize_target_lists(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = str_collection(name, getattr(self, name))
            if isinstance(value, str) and value.lower() != _ALL_LINEAR:
                check_pattern(name, value)
            self._set(name, value)

    def _check_switches(self) -> None:
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"OFTConfig.{name}: expected True or False; got {getattr(self, name)!r}")
        for name in ("inference_mode", "legacy_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"OFTConfig.{name}: expected True or False; got {getattr(self, name)!r}")
        if self.bias not in _BIAS:
            raise ValueError(f"OFTConfig.bias: expected one of {_BIAS}; got {self.bias!r}")

    def _normalize_numbers(self) -> None:
        if isinstance(self.module_dropout, bool) or not isinstance(self.module_dropout, (int, float)):
            raise TypeError(
                f"OFTConfig.module_dropout: expected a float in [0, 1]; got {self.module_dropout!r}"
            )
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"OFTConfig.module_dropout: must be in [0, 1]; got {self.module_dropout}")
        self._set("module_dropout", float(self.module_dropout))
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"OFTConfig.eps: COFT radius must be a finite float >= 0; got {eps!r}")
        self._set("eps", float(self.eps))

    def _check_task_type(self) -> None:
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(_TASK_TYPES)}."
            )

    def _normalize_layer_selection(self) -> None:
        """``modules_to_save``, ``layers_to_transform`` and ``layers_pattern`` as tuples (or one int/str)."""
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise TypeError(
                    f"OFTConfig.modules_to_save: expected a list of module names; got the string "
                    f"{self.modules_to_save!r} (wrap it in a list)"
                )
            if not isinstance(self.modules_to_save, Iterable) or not all(
                isinstance(m, str) for m in self.modules_to_save
            ):
                raise TypeError(
                    f"OFTConfig.modules_to_save: expected a list of names; got {self.modules_to_save!r:.80}"
                )
            self._set("modules_to_save", tuple(self.modules_to_save))
            for module in self.modules_to_save:
                check_pattern("modules_to_save", save_pattern(module))
        ltt = self.layers_to_transform
        if ltt is not None and not (isinstance(ltt, int) and not isinstance(ltt, bool)):
            if not isinstance(ltt, Iterable) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ltt
            ):
                raise TypeError(
                    f"OFTConfig.layers_to_transform: expected an int or a list of ints; got {ltt!r}"
                )
            self._set("layers_to_transform", tuple(ltt))
        lp = self.layers_pattern
        if lp is not None and not isinstance(lp, str):
            if not isinstance(lp, Iterable) or not all(isinstance(p, str) for p in lp):
                raise TypeError(
                    f"OFTConfig.layers_pattern: expected a string or a list of strings; got {lp!r}"
                )
            lp = tuple(lp)
            self._set("layers_pattern", lp)
        for pattern in (lp,) if isinstance(lp, str) else lp or ():
            if not PLAIN_NAME.fullmatch(pattern):
                raise ValueError(
                    f"OFTConfig.layers_pattern: {pattern!r:.80} is not a module name such as 'layers' "
                    "(letters, digits, '_', '.', '-')"
                )

    def _check_peft_version(self) -> None:
        if self.peft_version is not None:
            if not isinstance(self.peft_version, str):
                raise TypeError(
                    f"OFTConfig.peft_version: expected a version string; got {self.peft_version!r}"
                )
            parse_version(self.peft_version)

    def _check_peft_rules(self) -> None:
        """PEFT's checks, in PEFT's order and wording, plus what to change."""
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                "Set layers_to_transform (e.g. [0, 1]) or drop layers_pattern."
            )
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                f"oft_block_size = {self.oft_block_size}. Set one of them (e.g. oft_block_size=32)."
            )
        if not (self.r != 0) ^ (self.oft_block_size != 0):
            raise ValueError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), "
                "but not both simultaneously, because r x oft_block_size == in_features. "
                f"Set the other one to 0 (e.g. OFTConfig(r={self.r}, oft_block_size=0))."
            )
        if self.legacy_neumann and self.peft_version is not None and not is_before_018(self.peft_version):
            raise ValueError(
                f"OFTConfig: legacy_neumann=True (the PEFT 0.16-0.17 series) contradicts peft_version "
                f"{self.peft_version!r} (>= 0.18 uses the new series). Drop one of them."
            )

    # ------------------------------------------------------------------ target selection

    @property
    def is_all_linear(self) -> bool:
        """``target_modules == "all-linear"``: every linear layer except the output layer (callers filter)."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == _ALL_LINEAR

    def with_default_targets(self, model_type: str) -> OFTConfig:
        """A copy with PEFT's default ``target_modules`` for ``model_type`` when none are set.

        Example:
            >>> from oftjax import OFTConfig
            >>> sorted(OFTConfig().with_default_targets("llama").target_modules)
            ['q_proj', 'v_proj']
        """
        if self.target_modules is not None:
            return self
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"OFTConfig: no default target_modules for model_type {model_type!r} "
                f"(known: {sorted(DEFAULT_TARGET_MODULES)}); set target_modules explicitly"
            )
        return dataclasses.replace(self, target_modules=frozenset(DEFAULT_TARGET_MODULES[model_type]))

    def is_excluded(self, path: str) -> bool:
        """Whether ``exclude_modules`` or ``modules_to_save`` keep ``path`` unadapted (PEFT's rules)."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if compile_pattern(ex).fullmatch(path):
                    return True
            elif path in ex or any(path.endswith(f".{key}") for key in ex):
                return True
        # PEFT never adapts a module that modules_to_save wraps.
        if self.modules_to_save and any(
            compile_pattern(save_pattern(m)).match(path) for m in self.modules_to_save
        ):
            return True
        return False

    def is_target(self, path: str) -> bool:
        """Whether the module at dotted ``path`` is adapted (PEFT's ``check_target_module_exists``).

        - ``exclude_modules`` / ``modules_to_save`` matches are never targets.
        - String ``target_modules``: a full match on the whole path, as ``re.fullmatch`` (in linear time:
          ``_patterns``; ``layers_to_transform`` is then ignored, as in PEFT). ``"all-linear"`` matches every
          path: the caller restricts it to linear layers and drops the output layer.
        - List: exact path, or a suffix on a ``.`` boundary (``"q_proj"`` matches ``"...attn.q_proj"``, not
          ``"...attn.xq_proj"``). Then, with ``layers_to_transform``, the layer index is the first number
          after ``<layers_pattern>.`` (or after any segment when no pattern is set) and must be selected.
          An exact-path match skips the layer filter, as in PEFT.

        Raises:
            ValueError: if ``target_modules`` is None (use ``with_default_targets``).

        Example:
            >>> from oftjax import OFTConfig
            >>> cfg = OFTConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
            >>> [cfg.is_target(f"model.layers.{i}.self_attn.q_proj") for i in (0, 1)]
            [False, True]
        """
        if self.target_modules is None:
            raise ValueError(
                "OFTConfig.target_modules is None: set target_modules (e.g. ['q_proj', 'v_proj']) or use "
                "config.with_default_targets(model_type)"
            )
        if self.is_excluded(path):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            if self.is_all_linear:
                return True
            return compile_pattern(targets).fullmatch(path)
        if path in targets:
            return True
        found = any(path.endswith(f".{key}") for key in targets)
        indexes = self.layers_to_transform
        using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, tuple) else True)
        if not (found and using_indexes):
            return found
        return layer_selected(path, indexes, self.layers_pattern)

    # ------------------------------------------------------------------ adapter_config.json

    @property
    def effective_peft_version(self) -> str:
        """``peft_version`` for JSON: the stored one, else 0.17.1 (legacy series) or ``PEFT_VERSION``."""
        if self.peft_version is not None:
            return self.peft_version
        return LEGACY_PEFT_VERSION if self.legacy_neumann else PEFT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """``adapter_config.json`` contents with PEFT's field names (JSON types; sets as sorted lists).

        Example:
            >>> from oftjax import OFTConfig
            >>> d = OFTConfig(target_modules=["v_proj", "q_proj"]).to_dict()
            >>> d["peft_type"], d["target_modules"], d["oft_block_size"]
            ('OFT', ['q_proj', 'v_proj'], 32)
        """

        def jsonable(value: Any) -> Any:
            if isinstance(value, frozenset):
                return sorted(value)
            if isinstance(value, tuple):
                return list(value)
            return value

        out: dict[str, Any] = {
            "task_type": self.task_type,
            "peft_type": "OFT",
            "auto_mapping": None,
            "peft_version": self.effective_peft_version,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "inference_mode": self.inference_mode,
        }
        for f in dataclasses.fields(self):
            if f.name in out or f.name == "legacy_neumann":
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter config") -> OFTConfig:
        """Build from ``adapter_config.json`` contents (PEFT field names); the inverse of ``to_dict``.

        - ``peft_type`` must be ``"OFT"``; unknown keys are an error naming them.
        - No ``oft_block_size`` (PEFT <= 0.13 adapters): PEFT's error.
        - ``use_cayley_neumann`` with ``peft_version`` missing or < 0.18 (PEFT 0.16-0.17 adapters): PEFT warns
          and computes the new series anyway; we set ``legacy_neumann=True`` so the rotation is the trained
          one, and warn.

        Args:
            data: the JSON dict.
            source: where it came from, for error messages (e.g. the file path).

        Example:
            >>> from oftjax import OFTConfig
            >>> import dataclasses
            >>> cfg = OFTConfig(r=2, oft_block_size=0, target_modules="lin0")
            >>> OFTConfig.from_dict(cfg.to_dict()) == dataclasses.replace(cfg, peft_version="0.21.2")
            True
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: expected a JSON object; got {type(data).__name__}")
        kwargs = dict(data)
        peft_type = kwargs.pop("peft_type", "OFT")
        if peft_type != "OFT":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; oftjax reads OFT adapters only ('OFT')")
        kwargs.pop("auto_mapping", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown OFT config keys {unknown}; expected a subset of {sorted(known)}"
            )
        if "oft_block_size" not in kwargs:
            raise ValueError(f"{source}: no 'oft_block_size'. {_V014_MESSAGE}")
        version = kwargs.get("peft_version")
        if version is not None and not isinstance(version, str):
            raise TypeError(
                f"{source}: OFTConfig.peft_version: expected a version string; got {version!r:.80}"
            )
        if (
            kwargs.get("use_cayley_neumann", False)
            and "legacy_neumann" not in kwargs
            and (kwargs.get("peft_version") is None or is_before_018(kwargs["peft_version"]))
        ):
            kwargs["legacy_neumann"] = True
            warnings.warn(
                f"{source}: use_cayley_neumann=True with peft_version {kwargs.get('peft_version')!r} "
                "(missing or < 0.18): using the PEFT 0.16-0.17 Cayley-Neumann series (legacy_neumann=True), "
                "which this adapter was trained with. PEFT >= 0.18 would warn and use the new series.",
                stacklevel=2,
            )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from err
