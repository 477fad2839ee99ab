"""The memory planner: abstract compile, breakdown that adds up to XLA's figures, state bytes exact, CLI."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.cli import main
from oftjax.cli._plan import parse_memory
from oftjax.config import OFTConfig
from oftjax.models import CausalLM, ModelConfig
from oftjax.surgery import apply_oft
from oftjax.train import TrainConfig, Trainer, make_mesh, plan_memory, quantize_model
from tests._tiny import TINY_LLAMA

HF = {"model_type": "llama", **TINY_LLAMA}
CONFIG = ModelConfig.from_hf(HF)
STATE_PARTS = ("frozen_packed", "frozen_float", "rotations", "optimizer")


def _build(remat: bool = False):
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0), remat=remat)
    quantize_model(model, "nf4", double_quant=True)
    apply_oft(model, OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


CFG = TrainConfig(steps=4, batch_size=8, seq_len=32)


@functools.cache
def _plan(mesh: tuple[int, int], remat: bool = False):
    return plan_memory(lambda: _build(remat), CFG, make_mesh(*mesh))


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("141 GB") == 141 * 10**9
    assert parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("4096") == 4096
    with pytest.raises(Exception, match="80GB or 80GiB"):
        parse_memory("lots")


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4), (1, 8)], ids=["1x1", "2x4", "1x8"])
def test_plan_adds_up_to_xla_and_allocates_nothing(mesh):
    live = len(jax.live_arrays())
    plan = _plan(mesh)
    assert len(jax.live_arrays()) == live  # abstract shapes only
    assert plan.devices == mesh[0] * mesh[1] and plan.platform == "cpu"
    state_and_batch = sum(getattr(plan, k) for k in (*STATE_PARTS, "batch"))
    assert state_and_batch == plan.xla["argument"]
    assert plan.activations + plan.temporaries == plan.xla["temp"]
    assert plan.total == plan.xla["argument"] + plan.xla["temp"] + plan.xla["output"] - plan.xla["alias"]
    assert plan.rotations > 0 and plan.optimizer == pytest.approx(2 * plan.rotations, rel=0.01)


def test_fsdp_shards_the_frozen_weights():
    one, eight = _plan((1, 1)), _plan((1, 8))
    # the packed 4-bit bytes and the float kernels (embeddings, lm_head) shard over fsdp; the rotations and
    # the optimizer state are replicated
    assert eight.frozen_packed < one.frozen_packed / 4
    assert eight.frozen_float < one.frozen_float / 4
    assert eight.rotations == one.rotations and eight.optimizer == one.optimizer


def test_remat_keeps_fewer_activations():
    assert _plan((1, 1), remat=True).activations < _plan((1, 1)).activations


def test_planned_state_equals_the_trainers_state_on_device():
    plan = _plan((2, 4))
    trainer = Trainer(_build(), CFG, mesh=make_mesh(2, 4))
    device = jax.devices()[0]
    shards = [s for x in jax.tree.leaves(trainer.state) for s in x.addressable_shards if s.device == device]
    measured = sum(
        np.asarray(
            jax.random.key_data(s.data) if jnp.issubdtype(s.data.dtype, jax.dtypes.prng_key) else s.data
        ).nbytes
        for s in shards
    )
    assert sum(getattr(plan, k) for k in STATE_PARTS) == measured


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF))
    return path


def test_oftjax_plan_table_and_verdict(config_file, capsys):
    argv = ["plan", "--model", str(config_file), "--batch", "8", "--seq", "32", "--mesh", "2x4",
            "--oft-block-size", "16", "--dtype", "float32"]  # fmt: skip
    assert main([*argv, "--device-memory", "100kB"]) == 3
    out = capsys.readouterr().out
    assert "mesh 2x4 (compiled for 8 cpu devices)" in out and "does not fit" in out
    for label in ("frozen packed weights", "rotations", "optimizer state", "activations", "temporaries"):
        assert label in out
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mesh"] == [2, 4] and plan["total"] > 0 and plan["parameters"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "2by4"], "DATAxFSDP"),
        (["--batch", "6", "--grad-accum", "4"], "not divisible"),
        (["--seq", "1"], "--seq must be >= 2"),
    ],
    ids=["mesh", "accum", "seq"],
)
def test_oftjax_plan_argument_errors(config_file, argv, message, capsys):
    assert main(["plan", "--model", str(config_file), "--batch", "8", "--seq", "32", *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_oftjax_plan_simulates_devices_this_host_lacks(config_file, capsys):
    """16 devices from a process that has 8: compiled in a subprocess for 16 simulated CPU devices."""
    argv = ["plan", "--model", str(config_file), "--batch", "16", "--seq", "32", "--mesh", "2x8",
            "--oft-block-size", "16"]  # fmt: skip
    assert main(argv) == 0
    assert "compiled for 16 simulated CPU devices" in capsys.readouterr().out
