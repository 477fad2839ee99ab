"""Every new family at small widths against transformers and PEFT, in the default suite.

Small transformers models (fixed seeds, every parameter drawn) with each family's options switched on so
they bind at 10 tokens: Qwen3 with attention biases and a windowed second layer; Gemma 2 with a
non-power-of-two ``query_pre_attn_scalar`` and soft caps small enough to bite; Gemma 3 with a hidden size
whose sqrt rounds in bfloat16, a sliding and a global layer, linear rope scaling on the global one; Phi-3 with
a window and LongRoPE whose long factors take over at 8 positions. Logits (unpadded, left-padded, shifted
positions) and PEFT OFT adapters both ways (trained a few steps in torch and loaded in JAX; built in JAX and
loaded by ``PeftModel.from_pretrained`` with no missing keys), with the CPU kernels off and on. The real
widths and the bnb formats: tests/parity/test_families_parity.py.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from interop.hf_model import load_model
from interop.peft import load_adapter, save_adapter
from oftjax import OFTConfig, apply_oft
from oftjax.nn import OFTParam
from tests.parity._family_helpers import assert_logits_close, jax_logits, peft_loads_cleanly, targets

pytestmark = pytest.mark.usefixtures("kernels")

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)
SLIDING, FULL = "sliding_attention", "full_attention"
SMALL = {
    "qwen3": dict(
        head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "gemma2": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0,
    ),
    "gemma3_text": dict(
        hidden_size=48,  # sqrt(48) = 6.928 is 6.9375 in bfloat16: the embedding scale's rounding shows
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=[SLIDING, FULL],
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        },
    ),
    "phi3": dict(
        sliding_window=5,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)],
        },
    ),
}
SEQ = 10


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model_type -> (checkpoint dir, transformers model, inputs)."""
    out = {}
    for model_type, kw in SMALL.items():
        cfg = transformers.AutoConfig.for_model(model_type, **{**BASE, **kw})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.05, generator=g)
                if "norm" in name and not model_type.startswith("gemma"):
                    p.add_(1.0)
        path = tmp_path_factory.mktemp(model_type) / "float"
        model.save_pretrained(path)
        ids = torch.randint(0, BASE["vocab_size"], (2, SEQ), generator=g)
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, :3] = 0
        out[model_type] = path, model, ids, mask
    return out


def _outputs(model, ids, mask) -> dict[str, np.ndarray]:
    shifted = torch.arange(SEQ)[None].expand(2, SEQ) + 20
    with torch.no_grad():
        return {
            "plain": model(input_ids=ids).logits.numpy(),
            "padded": model(input_ids=ids, attention_mask=mask).logits.numpy(),
            "shifted": model(input_ids=ids, position_ids=shifted).logits.numpy(),
        }


def _check(ours, want: dict[str, np.ndarray], ids, mask) -> None:
    assert_logits_close(jax_logits(ours, ids), want["plain"])
    keep = mask.numpy().astype(bool)  # transformers leaves fully masked rows undefined: real tokens only
    assert_logits_close(jax_logits(ours, ids, mask), want["padded"], keep)
    if "shifted" in want:
        shifted = torch.arange(SEQ)[None].expand(2, SEQ) + 20
        assert_logits_close(jax_logits(ours, ids, positions=shifted), want["shifted"])


@pytest.mark.parametrize("model_type", list(SMALL))
def test_logits_match_transformers(built, model_type):
    path, model, ids, mask = built[model_type]
    ours = load_model(path)
    assert ours.config.model_type == model_type
    _check(ours, _outputs(model, ids, mask), ids, mask)


def test_the_options_bind(built):
    """Guard against vacuous passes: the soft caps and windows change these models' logits."""
    path, model, ids, _ = built["gemma2"]
    capped = _outputs(model, ids, None)["plain"]
    assert np.abs(capped).max() <= 2.0  # the final cap
    ours = load_model(path)
    ours.model.layers[0].self_attn.softcap = None
    assert not np.allclose(jax_logits(ours, ids), capped, atol=1e-3)
    phi = load_model(built["phi3"][0])
    assert phi.config.window(0) == 5 and SEQ > 5
    assert phi.config.rope.original_max_position_embeddings < SEQ  # the long factors at 10 tokens


@pytest.fixture(scope="module")
def peft_adapters(built, tmp_path_factory):
    """model_type -> (a PEFT adapter trained 3 steps in torch, PEFT's logits with it), trained once."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            path, model, ids, mask = built[model_type]
            block = 12 if model_type == "gemma3_text" else 16  # 48 % 12 == 0, 64 % 12 != 0: PEFT adjusts
            cfg = peft.OFTConfig(
                r=0, oft_block_size=block, target_modules=targets(model_type), task_type="CAUSAL_LM"
            )
            trained = peft.get_peft_model(
                transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), cfg
            )
            opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=5e-2)
            for _ in range(3):
                trained(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            out = tmp_path_factory.mktemp(f"{model_type}-adapter")
            trained.eval().save_pretrained(out)
            want = _outputs(trained, ids, mask)
            del want["shifted"]
            cache[model_type] = out, want
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", list(SMALL))
def test_peft_trained_adapter_loads_in_jax(built, peft_adapters, model_type):
    path, model, ids, mask = built[model_type]
    adapter, want = peft_adapters(model_type)
    assert np.abs(want["plain"] - _outputs(model, ids, mask)["plain"]).max() > 1e-3
    ours = load_model(path)
    assert load_adapter(ours, adapter)
    _check(ours, want, ids, mask)


@pytest.mark.parametrize("model_type", list(SMALL))
def test_jax_adapter_loads_in_peft(built, model_type, tmp_path):
    path, model, ids, mask = built[model_type]
    ours = load_model(path)
    paths = apply_oft(
        ours, OFTConfig(r=0, oft_block_size=16, target_modules=targets(model_type)), rngs=nnx.Rngs(0)
    )
    assert len(paths) == 2 * len(targets(model_type))
    rng = np.random.default_rng(1)
    for _, var in nnx.to_flat_state(nnx.state(ours, OFTParam)):
        var.set_value(rng.normal(0.0, 0.1, var.shape).astype(np.float32))
    save_adapter(ours, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = _outputs(peft_loads_cleanly(base, tmp_path / "adapter"), ids, mask)
    del want["shifted"]
    assert np.abs(want["plain"] - _outputs(model, ids, mask)["plain"]).max() > 1e-3
    _check(ours, want, ids, mask)
