"""Causal-LM decoders in Flax NNX, built from an HF config: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3
(text) and Phi-3 (``_families.py``; docs/model-families.md).

One decoder (``CausalLM``; ``LlamaForCausalLM``, ``Gemma2ForCausalLM``, ... are its names) takes its pieces
from the config's family. Module paths match HF/PEFT names; parameters carry partitioning metadata over the
mesh axes ``AXIS_DATA`` ("data") and ``AXIS_FSDP`` ("fsdp"). Load and save HF checkpoints with
``interop.hf.load_model`` / ``save_model``.
"""

from oftjax.models._config import ModelConfig as ModelConfig
from oftjax.models._config_keys import UnsupportedConfigError as UnsupportedConfigError
from oftjax.models._config_rope import RopeConfig as RopeConfig
from oftjax.models._decoder import CausalLM as CausalLM
from oftjax.models._decoder import Gemma2ForCausalLM as Gemma2ForCausalLM
from oftjax.models._decoder import Gemma3ForCausalLM as Gemma3ForCausalLM
from oftjax.models._decoder import LlamaForCausalLM as LlamaForCausalLM
from oftjax.models._decoder import MistralForCausalLM as MistralForCausalLM
from oftjax.models._decoder import Phi3ForCausalLM as Phi3ForCausalLM
from oftjax.models._decoder import Qwen2ForCausalLM as Qwen2ForCausalLM
from oftjax.models._decoder import Qwen3ForCausalLM as Qwen3ForCausalLM
from oftjax.models._decoder import causal_mask as causal_mask
from oftjax.models._decoder import linear_modules as linear_modules
from oftjax.models._decoder import norm_modules as norm_modules
from oftjax.models._decoder import segment_mask as segment_mask
from oftjax.models._decoder import segment_positions as segment_positions
from oftjax.models._families import MODEL_TYPES as MODEL_TYPES
from oftjax.models._kv_cache import KVCache as KVCache
from oftjax.models._layers import AXIS_DATA as AXIS_DATA
from oftjax.models._layers import AXIS_FSDP as AXIS_FSDP
from oftjax.models._layers import RMSNorm as RMSNorm
from oftjax.models._rope import long_factor_length as long_factor_length

__all__ = [
    "AXIS_DATA",
    "AXIS_FSDP",
    "CausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "KVCache",
    "LlamaForCausalLM",
    "MODEL_TYPES",
    "MistralForCausalLM",
    "ModelConfig",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "RMSNorm",
    "RopeConfig",
    "UnsupportedConfigError",
    "causal_mask",
    "linear_modules",
    "long_factor_length",
    "norm_modules",
    "segment_mask",
    "segment_positions",
]
