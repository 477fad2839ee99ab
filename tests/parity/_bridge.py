"""Move models and OFT parameters between torch (PEFT + bitsandbytes) and JAX for the parity tests.

Deliberately tiny and in-memory: the file formats are interop's job (tests/interop). torch is imported at
module top: without the oracle these tests must fail, never skip.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import nnx
from torch import nn

from interop import oracle
from oftjax import quant
from oftjax.config import OFTConfig
from oftjax.nn import Linear4bit, Linear8bit, OFTLinear


class TorchMLP(nn.Module):
    """PEFT's test MLP (test_custom_models.py): lin0 10->20, ReLU, Dropout, lin1 20->2, LogSoftmax."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class JaxMLP(nnx.Module):
    """The same MLP in NNX (dropout is off: the torch model runs in eval mode)."""

    def __init__(self, tm: TorchMLP):
        self.lin0 = _nnx_linear(tm.lin0)
        self.lin1 = _nnx_linear(tm.lin1)

    def __call__(self, x):
        return jax.nn.log_softmax(self.lin1(jax.nn.relu(self.lin0(x))), axis=-1)


def _nnx_linear(lin: nn.Linear) -> nnx.Linear:
    out = nnx.Linear(lin.in_features, lin.out_features, use_bias=lin.bias is not None, rngs=nnx.Rngs(0))
    out.kernel[...] = jnp.asarray(lin.weight.detach().numpy().T)
    if lin.bias is not None:
        out.bias[...] = jnp.asarray(lin.bias.detach().numpy())
    return out


class TorchQuantNet(nn.Module):
    """One bnb layer ``lin0`` (Linear8bitLt or Linear4bit) over a float weight."""

    def __init__(self, kind: str, in_f: int, out_f: int, seed: int = 0, compute_dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out_f, in_f, generator=g) * 0.05
        bias = torch.randn(out_f, generator=g) * 0.1
        self.lin0 = bnb_layer(kind, w, bias, compute_dtype)

    def forward(self, X):
        return self.lin0(X)


def bnb_layer(
    kind: str, w: torch.Tensor, bias: torch.Tensor | None, compute_dtype=torch.float32
) -> nn.Module:
    """A bnb layer quantizing ``w`` [out, in] on the CPU (kind: int8, nf4, fp4, nf4-dq, fp4-dq)."""
    out_f, in_f = w.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        qt, _, dq = kind.partition("-")
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, compress_statistics=dq == "dq",
            quant_type=qt,
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            w.clone(), requires_grad=False, quant_type=qt, compress_statistics=dq == "dq", blocksize=64
        )
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone())
    layer = layer.to("cpu")
    oracle.disable_cpu_repacking(layer)
    return layer


def quant_weight_from_bnb(layer: nn.Module) -> quant.Int8Weight | quant.FourBitWeight:
    """The layer's quantized weight as an oftjax.quant pytree (same bytes)."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        SCB = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return quant.Int8Weight(
            jnp.asarray(layer.weight.data.numpy()), jnp.asarray(SCB.numpy()), dtype=np.dtype("float32")
        )
    return four_bit_from_params(layer.weight)


def four_bit_from_params(weight: Any) -> quant.FourBitWeight:
    qs = weight.quant_state
    kw = dict(
        shape=tuple(int(s) for s in qs.shape),
        dtype=np.dtype(str(qs.dtype).removeprefix("torch.")),
        blocksize=int(qs.blocksize),
        quant_type=qs.quant_type,
    )
    packed = jnp.asarray(
        weight.data.view(torch.uint8).numpy() if weight.data.dtype != torch.uint8 else weight.data
    )
    if qs.nested:
        return quant.FourBitWeight(
            packed,
            jnp.asarray(qs.absmax.numpy()),
            jnp.asarray(qs.state2.absmax.numpy()),
            jnp.asarray(np.float32(qs.offset.item())),
            **kw,
        )
    return quant.FourBitWeight(packed, jnp.asarray(qs.absmax.numpy()), **kw)


class JaxQuantNet(nnx.Module):
    def __init__(self, tq: TorchQuantNet):
        q = quant_weight_from_bnb(tq.lin0)
        bias = jnp.asarray(tq.lin0.bias.detach().numpy())
        if isinstance(q, quant.Int8Weight):
            self.lin0 = Linear8bit(q, bias)
        else:
            cd = jnp.dtype(str(tq.lin0.compute_dtype).removeprefix("torch."))
            self.lin0 = Linear4bit(q, bias, compute_dtype=cd)

    def __call__(self, x):
        return self.lin0(x)


def configs(**kw: Any) -> tuple[peft.OFTConfig, OFTConfig]:
    """The same OFT config for PEFT and for oftjax."""
    return peft.OFTConfig(**kw), OFTConfig(**kw)


def peft_oft_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's OFT layers by module path relative to the wrapped model (e.g. "lin0")."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "oft_R") and len(module.oft_R):
            out[name.removeprefix("base_model.model.")] = module
    return out


def jax_layer(model: nnx.Module, path: str) -> OFTLinear:
    node = model
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def copy_adapter(peft_model: nn.Module, model: nnx.Module, adapter: str = "default") -> None:
    """Copy PEFT's ``oft_R.<adapter>.weight`` of every layer into the JAX layers (same module paths)."""
    for path, module in peft_oft_layers(peft_model).items():
        if adapter in module.oft_R:
            jax_layer(model, path).oft_R[adapter][...] = jnp.asarray(
                module.oft_R[adapter].weight.detach().numpy()
            )


def peft_params(peft_model: nn.Module, adapter: str = "default") -> dict[str, np.ndarray]:
    return {
        p: m.oft_R[adapter].weight.detach().numpy().copy()
        for p, m in peft_oft_layers(peft_model).items()
        if adapter in m.oft_R
    }


def peft_grads(peft_model: nn.Module, adapter: str = "default") -> dict[str, np.ndarray]:
    out = {}
    for p, m in peft_oft_layers(peft_model).items():
        w = m.oft_R[adapter].weight
        # No grad at all when the rotation does not depend on it (Neumann t=1: R = I).
        out[p] = np.zeros(tuple(w.shape), np.float32) if w.grad is None else w.grad.numpy().copy()
    return out


def jax_params(model: nnx.Module, paths: list[str], adapter: str = "default") -> dict[str, np.ndarray]:
    return {p: np.asarray(jax_layer(model, p).oft_R[adapter][...]) for p in paths}


def to_torch(x: jax.Array) -> torch.Tensor:
    return torch.from_numpy(np.array(x))
