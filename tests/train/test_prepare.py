"""quantize_model: float linears -> bnb-format Linear4bit/Linear8bit in place (lm_head kept float)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax import quant
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.nn import Linear4bit, Linear8bit
from oftjax.train import quantize_model

CFG = ModelConfig.from_hf(
    {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
)  # fmt: skip


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"], ids=["nf4", "fp4", "int8"])
def test_quantizes_every_linear_but_lm_head(kind):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    w = np.asarray(model.model.layers[0].mlp.down_proj.kernel[...]).T
    paths = quantize_model(model, kind, double_quant=True)
    assert len(paths) == 7 and "lm_head" not in paths and "model.layers.0.self_attn.q_proj" in paths
    assert type(model.lm_head) is nnx.Linear
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear8bit if kind == "int8" else Linear4bit)
    q = layer.weight.get_value()
    if kind == "int8":
        expect = quant.quantize_int8(jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(q.CB), np.asarray(expect.CB))
    else:
        expect = quant.quantize_4bit(jnp.asarray(w), quant_type=kind, compress_statistics=True)
        assert q.compress_statistics and q.quant_type == kind and q.blocksize == 64
        np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(expect.packed))
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 64)


def test_errors():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant must be one of"):
        quantize_model(model, "int4")
    assert quantize_model(model, "none") == []
    quantize_model(model, "nf4")
    with pytest.raises(ValueError, match="no float nnx.Linear"):
        quantize_model(model, "nf4")
