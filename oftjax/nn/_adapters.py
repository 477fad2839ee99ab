"""Named-adapter management shared by the OFT layers (``OFTLinear``, ``OFTEmbed``): PEFT's ``OFTLayer``.

``OFTAdapters`` holds the frozen base layer as its child ``base_layer`` (PEFT's attribute name, so the base's
state sits at ``<module>.base_layer.kernel``, ``.base_layer.weight``, ...) and the named adapters in one
``nnx.Dict`` of ``OFTParam`` ``[R, b(b-1)/2]``, whose attribute name is PEFT's (``oft_R`` for linears,
``oft_embedding_R`` for embeddings: ``PARAM_NAME``). It builds the rotation blocks; each layer's ``__call__``
applies them (input side for linears, output side for embeddings: ``ROTATES_OUTPUT``).
Reference: PEFT 0.21.2 ``src/peft/tuners/oft/layer.py`` (``OFTLayer``, ``OFTRotationModule``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax import oft
from oftjax.nn._base import base_ops
from oftjax.nn._forward import rotation_from_vec
from oftjax.nn._merge import unmerge_layer
from oftjax.nn._settings import AdapterSettings
from oftjax.nn._variables import OFTParam


class FrozenRotation(nnx.Variable):
    """Rotation blocks ``[r, b, b]`` computed once for inference (``OFTAdapters.freeze_rotations``): not a
    ``Param`` (never trained) and never saved with an adapter."""


class OFTAdapters(nnx.Module):
    """Base of the OFT layers: the wrapped base layer plus named adapters (add, activate, disable, delete).

    Subclasses set ``PARAM_NAME`` (PEFT's attribute name for the adapter dict) and ``ROTATES_OUTPUT``, check
    the base type and call ``OFTAdapters.__init__``, and define ``__call__``.

    Attributes:
      base_layer: the frozen base module (its own state names below ``base_layer``).
      in_features: the rotated dimension (``BaseLayer.in_features`` of the base).
      out_features: the base's output dimension.
      active_adapters: names applied in the forward, in order.
      merged_adapters: names folded into the base weight (in the order applied to it).
      deterministic: True turns module_dropout off (``model.eval()`` sets it, ``model.train()`` clears it).
    """

    PARAM_NAME: ClassVar[str] = "oft_R"
    ROTATES_OUTPUT: ClassVar[bool] = False  # the rotation acts on the base's output (embeddings)

    def __init__(self, base: nnx.Module):
        ops = base_ops(base)
        self.base_layer = base
        self.in_features, self.out_features = int(ops.in_features), int(ops.out_features)
        setattr(self, self.PARAM_NAME, nnx.Dict())
        self.oft_settings: tuple[tuple[str, AdapterSettings], ...] = ()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self.deterministic = False
        self.oft_rngs = nnx.data(None)
        self.frozen_rotations = nnx.data(None)

    @property
    def rotation_params(self) -> nnx.Dict:
        """Adapter name -> ``OFTParam`` (``self.oft_R`` or ``self.oft_embedding_R``)."""
        return getattr(self, self.PARAM_NAME)

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

        ``rngs`` is needed for a random init, and gives the randomness of training-time block dropout
        (``module_dropout > 0``); without it such an adapter still runs in inference (``model.eval()``),
        which is how a loaded adapter is used: dropout randomness is a training concern.

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
        if not init_weights and rngs is None:
            raise ValueError(f"adapter {name!r}: init_weights=False (a random init) needs rngs=nnx.Rngs(...)")
        if init_weights:
            value = jnp.zeros(settings.param_shape, param_dtype)
        else:
            value = (0.1 * jax.random.normal(rngs.params(), settings.param_shape, jnp.float32)).astype(
                param_dtype
            )
        self.rotation_params[name] = OFTParam(value)
        self.oft_settings = (*self.oft_settings, (name, settings))
        if settings.module_dropout > 0 and self.oft_rngs is None and rngs is not None:
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
        del self.rotation_params[name]
        self.oft_settings = tuple((n, s) for n, s in self.oft_settings if n != name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base layer only inside the context (PEFT's ``disable_adapter``: unmerges first)."""
        if self.merged_adapters:
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

    @jax.named_scope("oft_build")
    def rotation_blocks(self, name: str, *, training: bool = False) -> jax.Array:
        """Rotation blocks ``[r, b, b]`` of an adapter, in the parameter dtype.

        With COFT the parameters are projected and the projected values written back into the parameter
        (PEFT projects in place); the gradient passes straight through. With ``training`` and
        ``module_dropout > 0`` (and ``deterministic`` False), random blocks become the identity.
        """
        if self.frozen_rotations is not None and name in self.frozen_rotations:
            return self.frozen_rotations[name][...]
        s = self.adapters[name]
        param = self.rotation_params[name]
        vec = param[...]
        if s.coft:
            vec = oft.coft_project(vec, s.eps)
            param[...] = jax.lax.stop_gradient(vec)
        R = rotation_from_vec(vec, s)
        if training and s.module_dropout > 0 and not self.deterministic:
            if self.oft_rngs is None:
                raise ValueError(
                    f"adapter {name!r}: module_dropout={s.module_dropout} drops blocks in training, which "
                    "needs randomness: call model.eval() for inference, or give rngs=nnx.Rngs(...) when "
                    "adding or loading the adapter to train it"
                )
            R = oft.dropout_blocks(R, s.module_dropout, self.oft_rngs(), block_share=s.block_share)
        return R

    def freeze_rotations(self) -> None:
        """Compute the forward adapters' rotation blocks once and reuse them until ``unfreeze_rotations``.

        For inference that calls the layer many times with the same parameters (decoding one token at a
        time: ``oftjax.generate`` does it inside its jitted function, so the blocks are built once per call,
        not once per token). Dropout does not apply to frozen blocks; training must not freeze.
        """
        blocks = {n: FrozenRotation(self.rotation_blocks(n)) for n in self.forward_adapters()}
        self.frozen_rotations = nnx.Dict(blocks)

    def unfreeze_rotations(self) -> None:
        """Build the rotation blocks from the parameters on every call again (the default)."""
        self.frozen_rotations = nnx.data(None)

    def delta_weight(self, name: str) -> jax.Array:
        """The dense block-diagonal rotation ``[d, d]`` of an adapter (PEFT's ``get_delta_weight``)."""
        return oft.block_diag(self.rotation_blocks(name))

    def forward_adapters(self) -> tuple[str, ...]:
        """The adapters the forward applies: active, not merged, none when disabled."""
        if self.adapters_disabled:
            return ()
        return tuple(n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters)
