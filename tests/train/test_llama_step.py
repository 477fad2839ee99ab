"""The train step on the real stack: Llama + NF4/int8 (packed, frozen) + OFT; sharding, bf16, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.config import OFTConfig
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.nn import OFTParam, QuantWeight
from oftjax.surgery import apply_oft
from oftjax.train import TrainConfig, Trainer, make_mesh, quantize_model
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

CFG = ModelConfig.from_hf(
    {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "max_position_embeddings": 64, "tie_word_embeddings": False}
)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(quant="nf4", dtype=jnp.float32, remat=False):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    quantize_model(model, quant, double_quant=True, compute_dtype=dtype)
    apply_oft(model, OFTConfig(oft_block_size=16, target_modules=TARGETS), rngs=nnx.Rngs(0))
    return model


def _batch(seed):
    ids = np.random.default_rng(seed).integers(0, 96, size=(8, 16)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids, bool)}


def _cfg():
    return TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=1, batch_size=8, seq_len=16)


def _losses(trainer, n=3, *, same_batch=False):
    return [float(trainer.train_step(_batch(0 if same_batch else i))["loss"]) for i in range(n)]


@pytest.mark.parametrize("quant", ["nf4", "int8"], ids=["nf4dq", "int8"])
def test_only_rotations_train_packed_weights_untouched(quant):
    model = _model(quant)
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(OFTParam)))
    assert jax.tree.leaves(nnx.state(model, QuantWeight)), "the base must hold packed quantized weights"
    trainer = Trainer(model, _cfg())
    losses = _losses(trainer, same_batch=True)
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.Not(OFTParam)))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(nnx.state(trainer.model, OFTParam)))
    assert trainer._train._cache_size() == 1


@pytest.mark.parametrize("data, fsdp", [(2, 4)], ids=["dp2-fsdp4"])
def test_sharded_llama_step_equals_single_device(data, fsdp):
    single = Trainer(_model(), _cfg())
    sharded = Trainer(_model(), _cfg(), mesh=make_mesh(data=data, fsdp=fsdp))
    up_proj = sharded.state[0]["model"]["layers"][0]["mlp"]["up_proj"]
    ((_, weight),) = nnx.to_flat_state(
        nnx.filter_state(up_proj, QuantWeight)
    )  # wherever the wrapper keeps it
    packed = weight.get_value().packed
    assert packed.sharding.spec[0] == "fsdp", "packed NF4 bytes are sharded along their first axis"
    tol = TOL["sharded_step"]
    np.testing.assert_allclose(_losses(sharded), _losses(single), rtol=tol.rtol, atol=tol.atol)


def test_bf16_compute_and_remat_track_fp32():
    ref = _losses(Trainer(_model(), _cfg()), n=2)
    bf16 = _losses(Trainer(_model(dtype=jnp.bfloat16, remat=True), _cfg()), n=2)
    tol = TOL["bf16_model_forward"]
    np.testing.assert_allclose(bf16, ref, rtol=tol.rtol, atol=tol.atol)
