"""oftjax: quantized orthogonal fine-tuning (PEFT's OFTv2) for JAX over bitsandbytes formats."""

__version__ = "0.1.0"

from .config import OFTConfig as OFTConfig
