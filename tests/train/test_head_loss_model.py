"""The trainer's loss on a CausalLM: the output head and the loss computed together in chunks equal the
logits' loss, value and rotation gradients: tied, untied and soft-capped heads, all batch layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.config import OFTConfig
from oftjax.models import CausalLM, ModelConfig, segment_mask, segment_positions
from oftjax.nn import OFTParam
from oftjax.surgery import apply_oft
from oftjax.train import causal_lm_loss_sum, quantize_model
from oftjax.train._step import batch_loss_sum
from tests.tolerances import TOL

BASE = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 64}  # fmt: skip
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(model_type="llama", tied=True, quant=None, **kw):
    cfg = ModelConfig.from_hf({"model_type": model_type, **BASE, "tie_word_embeddings": tied, **kw})
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    table = model.model.embed_tokens.embedding
    table.set_value(table[...] * 30.0)  # logits of several units, so that a soft-cap of 2 binds
    if quant is not None:
        quantize_model(model, quant, skip=())
    apply_oft(
        model, OFTConfig(oft_block_size=16, target_modules=TARGETS, init_weights=False), rngs=nnx.Rngs(1)
    )
    return model


def _batch(layout):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BASE["vocab_size"], size=(3, 20)).astype(np.int32)
    batch = {"input_ids": ids, "loss_mask": rng.random((3, 20)) > 0.2}
    if layout == "padded":
        batch["attention_mask"] = np.arange(20)[None] >= np.array([[0], [5], [9]])
    elif layout == "packed":
        batch["segment_ids"] = (
            np.repeat(np.array([[1, 1, 2, 2, 0]]), 4, axis=1).repeat(3, axis=0).astype(np.int32)
        )
    return batch


def _logits_loss(model, batch):
    """The unfused reference: the model's logits, then ``causal_lm_loss_sum``."""
    kw = {}
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        kw = {"attention_mask": segment_mask(seg), "positions": segment_positions(seg)}
    elif "attention_mask" in batch:
        kw = {"attention_mask": batch["attention_mask"]}
    return causal_lm_loss_sum(model(batch["input_ids"], **kw), batch["input_ids"], batch["loss_mask"])


def _value_and_rotation_grads(loss, model, batch):
    fn = nnx.jit(nnx.value_and_grad(lambda m, b: loss(m, b)[0], argnums=nnx.DiffState(0, OFTParam)))
    value, grads = fn(model, batch)
    return float(value), jax.tree.leaves(grads)


@pytest.mark.parametrize(
    "model_type, tied, extra, layout",
    [
        ("llama", True, {}, "plain"),
        ("llama", True, {}, "padded"),
        ("llama", True, {}, "packed"),
        ("llama", False, {}, "plain"),
        ("gemma2", True, {"final_logit_softcapping": 2.0}, "plain"),
    ],
    ids=["tied", "tied-padded", "tied-packed", "untied", "softcapped"],
)
def test_fused_head_loss_equals_the_logits_loss(model_type, tied, extra, layout):
    model = _model(model_type, tied, **extra)
    assert model.matrix_head() is not None  # the trainer takes the fused path for this model
    batch = _batch(layout)
    got, got_g = _value_and_rotation_grads(batch_loss_sum, model, batch)
    ref, ref_g = _value_and_rotation_grads(_logits_loss, model, batch)
    tol = TOL["fused_head_loss"]
    np.testing.assert_allclose(got, ref, rtol=tol.rtol)
    assert len(got_g) == len(ref_g) == 2 * len(TARGETS)
    for g, r in zip(got_g, ref_g, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=TOL["fp32_grad"].rtol, atol=1e-5 * scale
        )


def test_softcap_is_applied_in_the_fused_head():
    capped = _model("gemma2", True, final_logit_softcapping=2.0)
    uncapped = _model("gemma2", True)
    batch = _batch("plain")
    logits = uncapped(batch["input_ids"])
    assert float(jnp.max(jnp.abs(logits))) > 4.0  # the cap binds on these logits
    a, _ = batch_loss_sum(capped, batch)
    b, _ = batch_loss_sum(uncapped, batch)
    assert abs(float(a) - float(b)) > 0.1 * abs(float(b))


def test_quantized_or_adapted_head_takes_the_logits_path():
    quantized = _model("llama", False, quant="nf4")
    assert quantized.matrix_head() is None
    batch = _batch("plain")
    np.testing.assert_allclose(
        float(batch_loss_sum(quantized, batch)[0]), float(_logits_loss(quantized, batch)[0]), rtol=0
    )
    adapted = _model("llama", False)
    apply_oft(adapted, OFTConfig(oft_block_size=16, target_modules=["lm_head"]), adapter_name="head")
    assert adapted.matrix_head() is None
