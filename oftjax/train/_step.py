"""The jitted train and eval steps over any NNX model whose trainable variables have one type (OFTParam).

The model and its ``nnx.Optimizer(model, tx, wrt=OFTParam)`` live as one ``(graphdef, state)`` pair; a step is
a pure function ``state, batch -> state, metrics`` under ``jax.jit`` with the state donated (updated in place,
no second copy of the frozen weights) and, on a mesh, explicit in/out shardings. Gradient accumulation is an
explicit ``lax.scan`` over micro-batches that sums per-token losses and divides once by the total number of
predicted tokens, so k micro-batches give the same update as one big batch (up to fp32 summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from oftjax.train._config import TrainConfig, make_optimizer, make_schedule
from oftjax.train._loss import causal_lm_loss_sum, head_loss_sum
from oftjax.train._sharding import shard_batch, state_shardings

__all__ = ["Trainer", "default_wrt", "jit_train_step"]


def default_wrt() -> Any:
    """The trainable-variable filter: ``oftjax.nn.OFTParam``."""
    from oftjax.nn import OFTParam

    return OFTParam


def _forward(model: Any, batch: dict) -> jax.Array:
    """``model(input_ids, ...)`` with the batch's attention mask or segment ids (any callable with
    ``CausalLM.__call__``'s arguments: the model, or its ``hidden_states``)."""
    if "segment_ids" in batch:  # packed examples: each attends to itself, positions restart per example
        from oftjax.models import segment_mask, segment_positions

        seg = batch["segment_ids"]
        return model(batch["input_ids"], attention_mask=segment_mask(seg), positions=segment_positions(seg))
    if "attention_mask" in batch:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return model(batch["input_ids"])


def batch_loss_sum(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss and target count of ``batch`` (``causal_lm_loss_sum``'s pair).

    A model with a matrix output head (``CausalLM.matrix_head``) computes the head and the loss together in
    chunks (``head_loss_sum``: no ``[batch, seq, vocab]`` logits, in the forward pass or kept for the
    backward); any other model is called for its logits.
    """
    head = getattr(model, "matrix_head", None)
    spec = head() if head is not None else None
    if spec is None:
        logits = _forward(model, batch)
        with jax.named_scope("loss"):
            return causal_lm_loss_sum(logits, batch["input_ids"], batch.get("loss_mask"))
    hidden = _forward(model.hidden_states, batch)
    table, softcap = spec
    with jax.named_scope("loss"):
        return head_loss_sum(hidden, table, batch["input_ids"], batch.get("loss_mask"), softcap=softcap)


def _loss_and_grads(model: nnx.Module, wrt: Any, batch: dict, micro: int):
    """Summed loss, token count and summed gradients of the ``wrt`` variables over ``micro`` micro-batches.

    ``nnx.value_and_grad`` (not ``jax.value_and_grad`` on a merged copy) keeps NNX transforms inside the model
    (``nnx.remat``) on the right trace level and writes forward side effects (COFT's projected parameters,
    RNG counters) back into ``model``, as PEFT projects in place before the optimizer step.
    """

    grad_fn = nnx.value_and_grad(batch_loss_sum, argnums=nnx.DiffState(0, wrt), has_aux=True)
    if micro == 1:
        (total, count), grads = grad_fn(model, batch)
        return total, count, grads

    mbs = jax.tree.map(lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)
    graphdef, state = nnx.split(model)

    def body(carry, mb):
        g_acc, t_acc, c_acc, state = carry
        m = nnx.merge(graphdef, state)
        (t, c), g = grad_fn(m, mb)
        return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, c_acc + c, nnx.state(m)), None

    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, wrt))
    zero = jnp.zeros((), jnp.float32)
    (grads, total, count, state), _ = jax.lax.scan(body, (zeros, zero, zero, state), mbs)
    nnx.update(model, state)
    return total, count, grads


def _train_step(graphdef, wrt, micro: int, schedule: optax.Schedule, state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    total, count, grads = _loss_and_grads(model, wrt, batch, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    lr = schedule(optimizer.step.get_value())  # the rate this update uses (the count before it)
    # optax's Adam bias correction (``1 - b1**count``, int count) relies on implicit int->float promotion.
    with jax.numpy_dtype_promotion("standard"), jax.named_scope("optimizer"):
        optimizer.update(model, grads)
    metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.global_norm(grads), "lr": lr}
    return nnx.state((model, optimizer)), metrics


def jit_train_step(
    graphdef: Any, wrt: Any, cfg: TrainConfig, shardings: nnx.State | None = None
) -> jax.stages.Wrapped:
    """The jitted step ``state, batch -> state, metrics`` over ``nnx.split((model, optimizer))``.

    The state is donated (updated in place); with ``shardings`` (``state_shardings``) the new state keeps
    the layout. ``Trainer`` runs it; the memory planner lowers it with abstract arguments
    (``jax.ShapeDtypeStruct``) and compiles it without materializing anything.
    """
    train = functools.partial(_train_step, graphdef, wrt, cfg.grad_accum, make_schedule(cfg))
    if shardings is None:
        return jax.jit(train, donate_argnums=0)
    return jax.jit(train, donate_argnums=0, out_shardings=(shardings, None))


def _eval_step(graphdef, state, batch):
    model, _ = nnx.merge(graphdef, state)
    return batch_loss_sum(model, batch)


class Trainer:
    """One-compilation training of the ``wrt`` variables of ``model`` with optax.

    Args:
      model: any NNX module called as ``model(input_ids) -> logits [B, T, V]`` (or with ``attention_mask``
        when batches carry one; with ``attention_mask`` and ``positions`` from batches' ``segment_ids``).
      cfg: a ``TrainConfig`` (optimizer, schedule, accumulation).
      wrt: the trainable-variable filter; default ``oftjax.nn.OFTParam`` (only rotations train).
      mesh: a ("data", "fsdp") mesh (``make_mesh``); None runs on the default device.
      tx: an optax transformation replacing ``make_optimizer(cfg)``.

    The model's arrays are donated to the step: read the model only after ``sync()`` (``model`` property).

    Example:
      >>> trainer = Trainer(model, TrainConfig(steps=10))          # doctest: +SKIP
      >>> metrics = trainer.train_step({"input_ids": ids, "loss_mask": mask})  # doctest: +SKIP
      >>> model = trainer.model                                      # doctest: +SKIP
    """

    def __init__(
        self,
        model: nnx.Module,
        cfg: TrainConfig,
        *,
        wrt: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        tx: optax.GradientTransformation | None = None,
    ):
        self.cfg = cfg
        self.wrt = default_wrt() if wrt is None else wrt
        self.mesh = mesh
        if not jax.tree.leaves(nnx.state(model, self.wrt)):
            raise ValueError(
                f"the model has no trainable variables of type {self.wrt!r}; apply OFT first "
                "(oftjax.apply_oft) or pass wrt=nnx.Param for full fine-tuning"
            )
        self._model = model
        self._optimizer = nnx.Optimizer(model, tx if tx is not None else make_optimizer(cfg), wrt=self.wrt)
        self._schedule = make_schedule(cfg)
        graphdef, state = nnx.split((model, self._optimizer))
        self._graphdef = graphdef
        self._shardings = None if mesh is None else state_shardings(state, mesh)
        if self._shardings is not None:
            state = jax.device_put(state, self._shardings)
        self._train = jit_train_step(graphdef, self.wrt, cfg, self._shardings)
        self._eval = jax.jit(functools.partial(_eval_step, graphdef))
        self.state = state
        self._synced = True

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return int(self.state[1]["step"].get_value())

    def learning_rate(self, step: int | None = None) -> float:
        """The scheduled learning rate used by optimizer step ``step`` (default: the next one)."""
        return float(self._schedule(self.step if step is None else step))

    def train_step(self, batch: dict[str, np.ndarray | jax.Array]) -> dict[str, jax.Array]:
        """One optimizer step on ``batch`` (``input_ids`` [B, T], optional ``loss_mask``, ``attention_mask``
        or ``segment_ids``).

        Returns device scalars ``loss`` (mean over predicted tokens), ``tokens``, ``grad_norm`` (pre-clip) and
        ``lr`` (the scheduled rate of this update). Nothing waits for the step to finish: the arrays are
        futures until read.
        """
        self.state, metrics = self._train(self.state, shard_batch(batch, self.mesh))
        self._synced = False
        return metrics

    def eval_loss(self, batches: Iterable[dict[str, np.ndarray]]) -> float:
        """Mean next-token loss over all predicted tokens of ``batches`` (no parameter change).

        All batches are dispatched first and their sums fetched together: one wait for the device.
        """
        sums = [self._eval(self.state, shard_batch(batch, self.mesh)) for batch in batches]
        total, count = 0.0, 0.0
        for t, c in jax.device_get(sums):
            total += float(t)
            count += float(c)
        return total / max(count, 1.0)

    def sync(self) -> None:
        """Write the current state back into the model and optimizer objects."""
        if not self._synced:
            nnx.update((self._model, self._optimizer), self.state)
            self._synced = True

    @property
    def model(self) -> nnx.Module:
        """The trained model (synchronised with the latest step)."""
        self.sync()
        return self._model

    @property
    def optimizer(self) -> nnx.Optimizer:
        self.sync()
        return self._optimizer

    def load_state(self, state: nnx.State) -> None:
        """Replace the (model, optimizer) state, e.g. from a checkpoint; placed like the current one."""
        if self._shardings is not None:
            state = jax.device_put(state, self._shardings)
        self.state = state
        self._synced = False
