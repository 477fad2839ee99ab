"""Llama-family decoders (Llama, Mistral, Qwen2) in Flax NNX, built from an HF config.

Module paths match HF/PEFT names; parameters carry partitioning metadata over the mesh axes ``AXIS_DATA``
("data") and ``AXIS_FSDP`` ("fsdp"). Load and save HF checkpoints with ``interop.hf.load_model`` /
``save_model``.
"""

from oftjax.models._config import ModelConfig as ModelConfig
from oftjax.models._config import UnsupportedConfigError as UnsupportedConfigError
from oftjax.models._llama import AXIS_DATA as AXIS_DATA
from oftjax.models._llama import AXIS_FSDP as AXIS_FSDP
from oftjax.models._llama import LlamaForCausalLM as LlamaForCausalLM
from oftjax.models._llama import MistralForCausalLM as MistralForCausalLM
from oftjax.models._llama import Qwen2ForCausalLM as Qwen2ForCausalLM
from oftjax.models._llama import RMSNorm as RMSNorm
from oftjax.models._llama import causal_mask as causal_mask
from oftjax.models._llama import segment_mask as segment_mask

__all__ = [
    "AXIS_DATA",
    "AXIS_FSDP",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "ModelConfig",
    "Qwen2ForCausalLM",
    "RMSNorm",
    "UnsupportedConfigError",
    "causal_mask",
    "segment_mask",
]
