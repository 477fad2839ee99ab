"""TrainConfig and the optax optimizer it describes (AdamW, warmup + cosine, global-norm clipping)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

__all__ = ["TrainConfig", "make_optimizer", "make_schedule"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all plain values: saved as JSON next to checkpoints).

    Attributes:
      steps: optimizer steps.
      learning_rate: peak learning rate (after warmup).
      warmup_steps: linear warmup from 0; ``None`` means 5% of ``steps`` (at least 1).
      end_lr_ratio: the cosine decays to ``learning_rate * end_lr_ratio`` at ``steps``.
      weight_decay: AdamW decoupled weight decay (PEFT/transformers default 0).
      b1, b2, eps: Adam moments.
      max_grad_norm: global-norm clipping threshold (``None`` or 0 disables it).
      batch_size: sequences per optimizer step.
      grad_accum: micro-batches per step (``batch_size`` must divide by it); gradients are summed over the
        micro-batches and divided by the total number of predicted tokens, so the step equals one big batch.
      seq_len: tokens per sequence.
      seed: data order and any init randomness.
      log_every: steps per metrics fetch: the training loop reads the device's metrics (and writes them to
        ``metrics.jsonl`` and the progress bar) once per ``log_every`` steps, so it never waits for the device
        in between; 0 fetches only at evaluations, checkpoints and the end.
      eval_every, save_every: in steps (0 disables eval/save; the last step always saves).
      eval_batches: batches in one evaluation (of the held-out split).
    """

    steps: int = 100
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    eval_batches: int = 4

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("log_every", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return max(1, self.steps // 20)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> ``learning_rate`` over the warmup steps, then cosine to ``lr * end_lr_ratio``.

    Written out (rather than ``optax.warmup_cosine_decay_schedule``) so the step count is cast to float32
    explicitly: the schedule then works under strict dtype promotion.

    Example:
      >>> s = make_schedule(TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10))
      >>> float(s(0)), float(s(10)), round(float(s(100)), 6)
      (0.0, 1.0, 0.1)
    """
    peak = float(cfg.learning_rate)
    end = peak * float(cfg.end_lr_ratio)
    warmup = cfg.resolved_warmup
    decay = max(cfg.steps - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count).astype(jnp.float32)
        warm = peak * step / max(warmup, 1)
        frac = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (when set) then AdamW on the schedule of ``make_schedule``."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
