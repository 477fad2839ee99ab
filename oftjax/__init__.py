"""oftjax: quantized orthogonal fine-tuning (PEFT's OFTv2) for JAX over bitsandbytes formats.

Example:
    >>> import oftjax
    >>> cfg = oftjax.OFTConfig(r=0, oft_block_size=32, target_modules=["q_proj", "v_proj"])
    >>> # paths = oftjax.apply_oft(model, cfg, rngs=nnx.Rngs(0)); oftjax.merge(model)
"""

__version__ = "0.1.0"

from oftjax import quant as quant
from oftjax.config import OFTConfig as OFTConfig
from oftjax.merging import MergeReport as MergeReport
from oftjax.merging import merge as merge
from oftjax.merging import unmerge as unmerge
from oftjax.nn import OFTParam as OFTParam
from oftjax.nn import QuantWeight as QuantWeight
from oftjax.surgery import apply_oft as apply_oft
from oftjax.surgery import delete_adapter as delete_adapter
from oftjax.surgery import disable_adapters as disable_adapters
from oftjax.surgery import oft_layers as oft_layers
from oftjax.surgery import set_adapter as set_adapter

__all__ = [
    "MergeReport",
    "OFTConfig",
    "OFTParam",
    "QuantWeight",
    "apply_oft",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "oft_layers",
    "quant",
    "set_adapter",
    "unmerge",
]
