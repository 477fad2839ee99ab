"""OFT on embeddings (PEFT >= 0.19 ``oft_embedding_R``) vs PEFT 0.21.2: layer math and the Llama path.

1. A small torch model (``nn.Embedding`` 30x16 -> ``nn.Linear`` 16->5), both targeted, against the same
   NNX model with ``apply_oft``: forward, gradients of both rotations, COFT-projected parameters, merged
   tables and weights, unmerge; block_share; two adapters chained on the embedding (PEFT merges embeddings
   in forward order, so there the merged weights agree too).
2. A tiny transformers ``LlamaForCausalLM`` with ``target_modules=["embed_tokens", "q_proj"]``: a PEFT adapter
   trained a few steps and saved with ``save_pretrained`` gives the same logits in JAX through
   ``interop.hf.load_model`` + ``interop.peft.load_adapter``; ``save_adapter`` output loads in
   ``PeftModel.from_pretrained`` with no missing or unexpected keys and gives the same logits again. PEFT's
   ``save_pretrained`` also writes the base table (``embed_tokens.base_layer.weight``) when embed_tokens is
   targeted; we read it (into the embedding, as PEFT) and write it the same way.

torch is imported at module top: without the oracle these tests fail, never skip.
"""

from __future__ import annotations

import copy
import warnings

import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
import transformers
from flax import nnx
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from interop import peft
from interop.hf_model import load_model
from oftjax import merge, unmerge
from oftjax.config import OFTConfig
from oftjax.nn import OFTEmbed, OFTParam
from oftjax.surgery import apply_oft, set_adapter
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

FWD, GRAD = TOL["fp32_forward"], TOL["fp32_grad"]
VOCAB, DIM, OUT = 30, 16, 5


class TorchEmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.lin = nn.Linear(DIM, OUT)

    def forward(self, ids):
        return self.lin(self.emb(ids))


class EmbNet(nnx.Module):
    """The same model in NNX, weights copied from ``tm``."""

    def __init__(self, tm: TorchEmbNet):
        self.emb = nnx.Embed(VOCAB, DIM, rngs=nnx.Rngs(0))
        self.emb.embedding[...] = jnp.asarray(tm.emb.weight.detach().numpy())
        self.lin = nnx.Linear(DIM, OUT, rngs=nnx.Rngs(0))
        self.lin.kernel[...] = jnp.asarray(tm.lin.weight.detach().numpy().T)
        self.lin.bias[...] = jnp.asarray(tm.lin.bias.detach().numpy())

    def __call__(self, ids):
        return self.lin(self.emb(ids))


def _rot(module: nn.Module, adapter: str) -> nn.Module:
    """PEFT's rotation module of a layer (``oft_embedding_R`` on embeddings, ``oft_R`` on linears)."""
    return module.oft_embedding_R[adapter] if len(module.oft_embedding_R) else module.oft_R[adapter]


def _jax_param(jm: EmbNet, path: str, adapter: str):
    layer = getattr(jm, path)
    return layer.rotation_params[adapter]


def _copy(pm, jm, adapter="default"):
    for path in ("emb", "lin"):
        src = getattr(pm.base_model.model, path)
        _jax_param(jm, path, adapter)[...] = jnp.asarray(_rot(src, adapter).weight.detach().numpy())


CASES = {
    "b4-neumann": dict(oft_block_size=4),
    "r2-exact": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    "b6-adjusted": dict(oft_block_size=6),  # 16 % 6 != 0: PEFT adjusts to b=8 on both layers
    "coft": dict(r=4, oft_block_size=0, coft=True, eps=1e-2),
    "block-share": dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False),
    "coft-block-share": dict(r=2, oft_block_size=0, coft=True, eps=1e-2, block_share=True),
}


def _pair(case, seed=0):
    torch.manual_seed(seed)
    tm = TorchEmbNet().eval()
    jm = EmbNet(tm)
    kw = dict(target_modules=["emb", "lin"], init_weights=False, **case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's adjustment warning (b6-adjusted)
        pm = get_peft_model(tm, torch_peft.OFTConfig(**kw)).eval()
        assert apply_oft(jm, OFTConfig(**kw), rngs=nnx.Rngs(0)) == ["emb", "lin"]
    _copy(pm, jm)
    return pm, jm


def _ids(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(3, 7)).astype(np.int64)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_grads_merge_unmerge_match_peft(case):
    pm, jm = _pair(CASES[case])
    assert isinstance(jm.emb, OFTEmbed)
    pe = pm.base_model.model.emb
    s = jm.emb.adapters["default"]
    assert (s.r, s.block_size) == (pe.r["default"], pe.oft_block_size["default"])
    ids = _ids()
    G = np.random.default_rng(2).normal(size=(3, 7, OUT)).astype(np.float32)
    out_t = pm(torch.from_numpy(ids))
    (out_t * torch.from_numpy(G)).sum().backward()

    def loss(m):
        y = m(jnp.asarray(ids, jnp.int32))
        return jnp.sum(y * jnp.asarray(G)), y

    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, OFTParam), has_aux=True)
    (_, out_j), grads = nnx.jit(grad_fn)(jm)
    np.testing.assert_allclose(np.asarray(out_j), out_t.detach().numpy(), rtol=FWD.rtol, atol=FWD.atol)
    for path, name in (("emb", "oft_embedding_R"), ("lin", "oft_R")):
        rot = _rot(getattr(pm.base_model.model, path), "default")
        np.testing.assert_allclose(
            np.asarray(grads[path][name]["default"][...]), rot.weight.grad.numpy(),
            rtol=GRAD.rtol, atol=GRAD.atol, err_msg=path,
        )  # fmt: skip
        # COFT projected in place on both sides during the forward
        np.testing.assert_allclose(
            np.asarray(_jax_param(jm, path, "default")[...]), rot.weight.detach().numpy(),
            rtol=FWD.rtol, atol=FWD.atol, err_msg=path,
        )  # fmt: skip
    # merge: embedding W BD, linear W BD^T; then the merged models agree, then unmerge restores.
    W0 = np.asarray(jm.emb.base_layer.embedding[...]).copy()
    pm.base_model.merge_adapter()
    merge(jm)
    np.testing.assert_allclose(
        np.asarray(jm.emb.base_layer.embedding[...]), pe.get_base_layer().weight.detach().numpy(),
        rtol=FWD.rtol, atol=FWD.atol,
    )  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(jm.lin.base_layer.kernel[...]).T,
        pm.base_model.model.lin.get_base_layer().weight.detach().numpy(), rtol=FWD.rtol, atol=FWD.atol,
    )  # fmt: skip
    with torch.no_grad():
        merged_t = pm(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(
        np.asarray(jm(jnp.asarray(ids, jnp.int32))), merged_t, rtol=FWD.rtol, atol=FWD.atol
    )
    pm.base_model.unmerge_adapter()
    unmerge(jm)
    rt = TOL["oft_unmerge_roundtrip"]
    np.testing.assert_allclose(
        np.asarray(jm.emb.base_layer.embedding[...]), pe.get_base_layer().weight.detach().numpy(),
        rtol=FWD.rtol, atol=FWD.atol,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(jm.emb.base_layer.embedding[...]), W0, rtol=rt.rtol, atol=rt.atol)


def test_two_adapters_chain_and_merge_like_peft():
    """Forward e BD_a BD_b; PEFT's Embedding merges in that order too (b=8: blocks do not commute)."""
    pm, jm = _pair(dict(oft_block_size=8))
    kw2 = dict(target_modules=["emb"], init_weights=False, r=2, oft_block_size=0, use_cayley_neumann=False)
    pm.add_adapter("other", torch_peft.OFTConfig(**kw2))
    apply_oft(jm, OFTConfig(**kw2), adapter_name="other", rngs=nnx.Rngs(3))
    jm.emb.oft_embedding_R["other"][...] = jnp.asarray(
        pm.base_model.model.emb.oft_embedding_R["other"].weight.detach().numpy()
    )
    pm.base_model.set_adapter(["default", "other"])
    set_adapter(jm, ["default", "other"])
    pm.eval()
    ids = _ids(4)
    with torch.no_grad():
        want = pm(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(
        np.asarray(jm(jnp.asarray(ids, jnp.int32))), want, rtol=FWD.rtol, atol=FWD.atol
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.merge_adapter(["default", "other"])
    merge(jm, ["default", "other"])
    np.testing.assert_allclose(
        np.asarray(jm.emb.base_layer.embedding[...]),
        pm.base_model.model.emb.get_base_layer().weight.detach().numpy(),
        rtol=FWD.rtol,
        atol=FWD.atol,
    )


# ----------------------------------------------------------------------------------------------------
# tiny Llama: embed_tokens + q_proj, trained in torch, attached in JAX, saved back


def _peft_loads_cleanly(base, path):
    """``PeftModel.from_pretrained(base, path)``, asserting no missing and no unexpected adapter keys."""
    check = get_peft_model(copy.deepcopy(base), PeftConfig.from_pretrained(str(path)))
    result = set_peft_model_state_dict(check, load_peft_weights(str(path)))
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "oft_" in k], result.missing_keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, str(path))
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    return loaded.eval()


def _logits_t(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def test_llama_embed_tokens_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = torch_peft.OFTConfig(
        oft_block_size=16, target_modules=["embed_tokens", "q_proj"], init_weights=False, coft=False
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    pm.train()
    for _ in range(3):
        batch = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 8), generator=gen)
        loss = pm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(5).integers(0, TINY_LLAMA["vocab_size"], size=(2, 9)).astype(np.int64)
    want = _logits_t(pm, ids)

    model = load_model(tmp_path / "base")
    paths = peft.load_adapter(model, tmp_path / "adapter")
    assert paths == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert isinstance(model.model.embed_tokens, OFTEmbed)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=FWD.rtol, atol=FWD.atol)

    out = peft.save_adapter(model, tmp_path / "ours")
    config, tensors = peft.read_adapter(out)
    assert sorted(tensors) == sorted(load_peft_weights(str(tmp_path / "adapter")))
    for key, value in load_peft_weights(str(tmp_path / "adapter")).items():
        np.testing.assert_array_equal(tensors[key], value.numpy(), err_msg=key)
    loaded = _peft_loads_cleanly(copy.deepcopy(base), out)
    np.testing.assert_allclose(_logits_t(loaded, ids), want, rtol=FWD.rtol, atol=FWD.atol)
    # PEFT dir -> JAX-native checkpoint -> PEFT dir keeps every tensor (the base table included)
    peft.adapter_to_jax(tmp_path / "adapter", tmp_path / "native")
    back = peft.adapter_to_peft(tmp_path / "native", tmp_path / "back")
    _, again = peft.read_adapter(back)
    assert sorted(again) == sorted(tensors)
    for key in tensors:
        np.testing.assert_array_equal(again[key], tensors[key], err_msg=key)
