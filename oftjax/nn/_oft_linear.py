"""``OFTLinear``: named OFT adapters over a frozen float, int8 or 4-bit linear (PEFT's ``oft.layer.Linear``).

The wrapper adopts the base layer's state under the base's own attribute names (``kernel``/``bias`` for a
float base, ``weight``/``bias`` for a quantized one), so a checkpoint maps onto it exactly as onto the base,
and adds ``oft_R[adapter]`` (an ``OFTParam`` ``[R, b(b-1)/2]``, PEFT's ``oft_R.<adapter>.weight``). The
forward is PEFT's input-centric OFTv2 (reference: PEFT 0.21.2 ``src/peft/tuners/oft/layer.py``)::

    y = base(x BD(R_a) BD(R_b) ...)      # active adapters in order, x cast to the adapter dtype and back

Where we differ from PEFT, on purpose:

* ``module_dropout`` works: in training (``deterministic=False``, nnx ``model.train()``), ``int(p * r)``
  random blocks become the identity on every call (PEFT builds this layer but never calls it since 0.16);
  ``model.eval()`` turns it off.
* with several adapters merged, the merge follows the forward order (see ``oftjax.merge``).
* rotate-the-input vs rotate-the-kernel is chosen from static shapes (``rotate="auto"``); both give the
  same values (within fp32 rounding) and the same gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax import oft, quant
from oftjax.nn._base import base_kind, in_out_features
from oftjax.nn._rotated_matmul import rotate_chain, rotated_matmul
from oftjax.nn._variables import OFTParam

ROTATE_MODES = ("auto", "input", "weight")


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """Static settings of one adapter on one layer (hashable: part of the module's graph definition).

    Attributes:
      r: number of rotation blocks applied, ``in_features // block_size`` (also with ``block_share``).
      block_size: ``b``.
      coft, eps: COFT projection (``eps / sqrt(#stored blocks)`` radius per block).
      block_share: one stored block shared by all ``r`` blocks.
      use_cayley_neumann, num_cayley_neumann_terms: Neumann series instead of exact Cayley.
      legacy_neumann: PEFT 0.16-0.17 Neumann series (adapters saved before PEFT 0.18).
      module_dropout: block dropout probability in training.
    """

    r: int
    block_size: int
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    legacy_neumann: bool = False
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1 or self.block_size < 1:
            raise ValueError(
                f"AdapterSettings: r and block_size must be >= 1; got r={self.r}, b={self.block_size}"
            )
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"AdapterSettings: module_dropout must be in [0, 1]; got {self.module_dropout}")

    @property
    def num_stored(self) -> int:
        """Rows of the parameter: 1 with block_share, else r."""
        return 1 if self.block_share else self.r

    @property
    def param_shape(self) -> tuple[int, int]:
        """``[R, b(b-1)/2]``, PEFT's ``oft_R.weight`` shape."""
        return (self.num_stored, self.block_size * (self.block_size - 1) // 2)

    @classmethod
    def from_config(cls, config: Any, in_features: int) -> AdapterSettings:
        """Settings for a layer with ``in_features`` inputs from an ``OFTConfig`` (PEFT's per-layer r/b rule).

        A block size (or r) that does not divide ``in_features`` is adjusted with PEFT's warning.
        """
        r, b = oft.resolve_block_size(in_features, config.r, config.oft_block_size)
        return cls(
            r=r,
            block_size=b,
            coft=bool(config.coft),
            eps=float(config.eps),
            block_share=bool(config.block_share),
            use_cayley_neumann=bool(config.use_cayley_neumann),
            num_cayley_neumann_terms=int(config.num_cayley_neumann_terms),
            legacy_neumann=bool(getattr(config, "legacy_neumann", False)),
            module_dropout=float(config.module_dropout),
        )


def rotation_from_vec(vec: jax.Array, s: AdapterSettings) -> jax.Array:
    """Rotation blocks ``[r, b, b]`` from (already COFT-projected) parameters, as ``s`` says."""
    return oft.rotation_blocks(
        vec,
        block_size=s.block_size,
        num_blocks=s.r,
        use_cayley_neumann=s.use_cayley_neumann,
        num_terms=s.num_cayley_neumann_terms,
        legacy=s.legacy_neumann,
        block_share=s.block_share,
    )


class OFTLinear(nnx.Module):
    """A frozen linear layer with named OFT adapters (PEFT's ``oft.layer.Linear``).

    Build it with ``OFTLinear(base)`` then ``add_adapter``, or let ``oftjax.surgery.apply_oft`` do both.

    Args:
      base: ``nnx.Linear`` (or a layer with the same ``kernel``/``bias`` state), ``Linear8bit`` or
        ``Linear4bit``. Its variables are adopted (shared, not copied) under the same attribute names.
      rotate: "input" rotates activations (``tokens * d_in * b``), "weight" rotates the kernel
        (``d_in * d_out * b``), "auto" (default) picks the cheaper one from static shapes.

    Attributes:
      oft_R: ``nnx.Dict`` adapter name -> ``OFTParam`` ``[R, b(b-1)/2]``.
      active_adapters: names applied in the forward, in order.
      merged_adapters: names folded into the base weight (most recent last).
      deterministic: True turns module_dropout off (``model.eval()`` sets it, ``model.train()`` clears it).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = OFTLinear(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
      >>> layer.add_adapter("default", AdapterSettings(r=2, block_size=4))
      >>> x = jnp.ones((2, 8))
      >>> bool((layer(x) == layer.base_forward(x)).all())  # identity at init
      True
    """

    def __init__(self, base: nnx.Module, *, rotate: str = "auto"):
        if isinstance(base, OFTLinear):
            raise TypeError("OFTLinear: the base layer is already an OFTLinear; add an adapter to it instead")
        if rotate not in ROTATE_MODES:
            raise ValueError(f"OFTLinear: rotate must be one of {ROTATE_MODES}; got {rotate!r}")
        kind = base_kind(base)
        nodes = getattr(base, "_pytree__nodes", {})
        for name, value in vars(base).items():
            if name.startswith("_pytree__") or name.startswith("_object__"):
                continue
            setattr(self, name, nnx.data(value) if nodes.get(name, False) else value)
        self.base_type = type(base)
        self.base_kind = kind
        self.in_features, self.out_features = in_out_features(base, kind)
        self.rotate = rotate
        self.oft_R = nnx.Dict()
        self.oft_settings: tuple[tuple[str, AdapterSettings], ...] = ()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self.deterministic = False
        self.oft_rngs = nnx.data(None)

    # ----------------------------------------------------------------------------------------------------
    # adapter management

    @property
    def adapters(self) -> dict[str, AdapterSettings]:
        """Adapter name -> static settings, in insertion order."""
        return dict(self.oft_settings)

    def add_adapter(
        self,
        name: str,
        settings: AdapterSettings,
        *,
        init_weights: bool = True,
        rngs: nnx.Rngs | None = None,
        param_dtype: Any = jnp.float32,
        activate: bool = True,
    ) -> None:
        """Add a named adapter (zeros = identity when ``init_weights``, else ``N(0, 0.1)`` as PEFT).

        Raises ValueError if ``name`` exists or the block layout does not tile ``in_features``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string; got {name!r}")
        if name in self.adapters:
            raise ValueError(
                f"adapter {name!r} already exists on this layer; delete it first or pick another name"
            )
        if settings.r * settings.block_size != self.in_features:
            raise ValueError(
                f"adapter {name!r}: r={settings.r} blocks of size {settings.block_size} do not tile "
                f"in_features={self.in_features}"
            )
        needs_rngs = (not init_weights) or settings.module_dropout > 0
        if needs_rngs and rngs is None:
            raise ValueError(
                f"adapter {name!r}: init_weights=False and module_dropout > 0 need rngs=nnx.Rngs(...)"
            )
        if init_weights:
            value = jnp.zeros(settings.param_shape, param_dtype)
        else:
            value = (0.1 * jax.random.normal(rngs.params(), settings.param_shape, jnp.float32)).astype(
                param_dtype
            )
        self.oft_R[name] = OFTParam(value)
        self.oft_settings = (*self.oft_settings, (name, settings))
        if settings.module_dropout > 0 and self.oft_rngs is None:
            self.oft_rngs = rngs["dropout"].fork()
        if activate and name not in self.active_adapters:
            self.active_adapters = (*self.active_adapters, name)

    def set_active_adapters(self, names: str | Sequence[str]) -> None:
        """Activate these adapters, applied in the given order (PEFT's ``set_adapter``)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; this layer has {list(self.adapters)}")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter (its parameters, settings, and from the active set). It must not be merged."""
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this layer has {list(self.adapters)}")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        del self.oft_R[name]
        self.oft_settings = tuple((n, s) for n, s in self.oft_settings if n != name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base layer only inside the context (PEFT's ``disable_adapter``: unmerges first)."""
        if self.merged_adapters:
            from oftjax.nn._merge import unmerge_layer

            unmerge_layer(self)
        previous = self.adapters_disabled
        self.adapters_disabled = True
        try:
            yield
        finally:
            self.adapters_disabled = previous

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=...)`` support: True turns module_dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    # ----------------------------------------------------------------------------------------------------
    # math

    def rotation_blocks(self, name: str, *, training: bool = False) -> jax.Array:
        """Rotation blocks ``[r, b, b]`` of an adapter, in the parameter dtype.

        With COFT the parameters are projected and the projected values written back into ``oft_R[name]``
        (PEFT projects in place); the gradient passes straight through. With ``training`` and
        ``module_dropout > 0`` (and ``deterministic`` False), random blocks become the identity.
        """
        s = self.adapters[name]
        param = self.oft_R[name]
        vec = param[...]
        if s.coft:
            vec = oft.coft_project(vec, s.eps)
            param[...] = jax.lax.stop_gradient(vec)
        R = rotation_from_vec(vec, s)
        if training and s.module_dropout > 0 and not self.deterministic:
            if self.oft_rngs is None:
                raise ValueError(
                    f"adapter {name!r}: module_dropout > 0 in training needs rngs (none were given)"
                )
            R = oft.dropout_blocks(R, s.module_dropout, self.oft_rngs(), block_share=s.block_share)
        return R

    def delta_weight(self, name: str) -> jax.Array:
        """The dense block-diagonal rotation ``[d, d]`` of an adapter (PEFT's ``get_delta_weight``)."""
        return oft.block_diag(self.rotation_blocks(name))

    def forward_adapters(self) -> tuple[str, ...]:
        """The adapters the forward applies: active, not merged, none when disabled."""
        if self.adapters_disabled:
            return ()
        return tuple(n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters)

    def base_forward(self, x: jax.Array) -> jax.Array:
        """The base layer's own forward on these variables."""
        return self.base_type.__call__(self, x)

    def uses_weight_path(self, x_shape: tuple[int, ...], names: Sequence[str]) -> bool:
        """Whether the forward rotates the kernel (else the inputs), from static shapes."""
        if self.rotate != "auto" or not names:
            return self.rotate == "weight" and bool(names)
        if not self._weight_path_ok():
            return False
        tokens = 1
        for s in x_shape[:-1]:
            tokens *= int(s)
        # input path: tokens * d_in * b per adapter; weight path: d_in * d_out * b per adapter.
        return self.out_features < tokens

    def _weight_path_ok(self) -> bool:
        return self.base_kind != "float" or issubclass(self.base_type, nnx.Linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        names = self.forward_adapters()
        if not names:
            return self.base_forward(x)
        rotations = tuple(self.rotation_blocks(n, training=True) for n in names)
        if self.uses_weight_path(x.shape, names):
            if not self._weight_path_ok():
                raise ValueError(f"rotate='weight' is not available for base type {self.base_type.__name__}")
            return self._weight_path_forward(x, rotations)
        return self.base_forward(rotate_chain(x, rotations).astype(x.dtype))

    def _weight_path_forward(self, x: jax.Array, rotations: tuple[jax.Array, ...]) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        if self.base_kind == "float":
            # nnx.Linear's own dtype promotion, then x @ (BD K) + bias.
            x_c, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
            y = rotated_matmul(x_c, rotations, kernel)
            return y + bias if bias is not None else y
        cd = self.compute_dtype
        w = self.dequantized_weight()
        y = rotated_matmul(x.astype(cd), rotations, w.T)
        return _finish(y, bias, cd, x.dtype)

    def dequantized_weight(self, dtype: Any = None) -> jax.Array:
        """Quantized bases: the dense ``[out, in]`` weight in the compute dtype (as the forward uses it)."""
        return quant.dequantize(self.weight.get_value(), self.compute_dtype if dtype is None else dtype)


def _finish(y: jax.Array, bias: jax.Array | None, cd: Any, out_dtype: Any) -> jax.Array:
    if bias is not None:
        y = y + bias.astype(cd)
    return y.astype(out_dtype)
