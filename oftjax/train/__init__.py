"""Training with optax: causal-LM loss, the jitted step, the loop with metrics/checkpoints/resume, sharding.

The step trains exactly the variables of one type (``oftjax.nn.OFTParam`` by default) through
``nnx.Optimizer(model, tx, wrt=OFTParam)``; see ``Trainer`` and ``fit``. Multi-process runs join with
``initialize`` (``jax.distributed``) and train over a mesh spanning every process.
"""

from oftjax.train._batches import PackedData as PackedData
from oftjax.train._batches import batch_at as batch_at
from oftjax.train._batches import batch_rows as batch_rows
from oftjax.train._batches import num_batches_per_epoch as num_batches_per_epoch
from oftjax.train._checkpoint import latest_checkpoint as latest_checkpoint
from oftjax.train._checkpoint import remove_partial_checkpoints as remove_partial_checkpoints
from oftjax.train._checkpoint import restore_train_state as restore_train_state
from oftjax.train._checkpoint import save_checkpoint as save_checkpoint
from oftjax.train._config import TrainConfig as TrainConfig
from oftjax.train._config import make_optimizer as make_optimizer
from oftjax.train._config import make_schedule as make_schedule
from oftjax.train._distributed import initialize as initialize
from oftjax.train._distributed import is_primary as is_primary
from oftjax.train._log import MetricsLog as MetricsLog
from oftjax.train._log import plot_loss as plot_loss
from oftjax.train._log import read_metrics as read_metrics
from oftjax.train._loop import FitResult as FitResult
from oftjax.train._loop import eval_batches as eval_batches
from oftjax.train._loop import fit as fit
from oftjax.train._loss import causal_lm_loss as causal_lm_loss
from oftjax.train._loss import causal_lm_loss_sum as causal_lm_loss_sum
from oftjax.train._loss import head_chunk_rows as head_chunk_rows
from oftjax.train._loss import head_loss_sum as head_loss_sum
from oftjax.train._memory import MemoryPlan as MemoryPlan
from oftjax.train._memory import plan_memory as plan_memory
from oftjax.train._prepare import QUANT_CHOICES as QUANT_CHOICES
from oftjax.train._prepare import quantize_model as quantize_model
from oftjax.train._sharding import batch_sharding as batch_sharding
from oftjax.train._sharding import global_batch as global_batch
from oftjax.train._sharding import make_mesh as make_mesh
from oftjax.train._sharding import shard_batch as shard_batch
from oftjax.train._sharding import state_shardings as state_shardings
from oftjax.train._step import Trainer as Trainer
from oftjax.train._step import default_wrt as default_wrt

__all__ = [
    "FitResult",
    "MemoryPlan",
    "MetricsLog",
    "PackedData",
    "QUANT_CHOICES",
    "TrainConfig",
    "Trainer",
    "batch_at",
    "batch_rows",
    "batch_sharding",
    "causal_lm_loss",
    "causal_lm_loss_sum",
    "head_chunk_rows",
    "head_loss_sum",
    "default_wrt",
    "eval_batches",
    "fit",
    "global_batch",
    "initialize",
    "is_primary",
    "latest_checkpoint",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "num_batches_per_epoch",
    "plan_memory",
    "plot_loss",
    "quantize_model",
    "read_metrics",
    "remove_partial_checkpoints",
    "restore_train_state",
    "save_checkpoint",
    "shard_batch",
    "state_shardings",
]
