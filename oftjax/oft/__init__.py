"""Pure-JAX OFT math (PEFT's OFTv2): skew parameters, Cayley maps, COFT, block rotations and merges.

No flax here; ``oftjax.nn`` builds the modules on top. Reference: PEFT 0.21.2 ``tuners/oft/layer.py``.
"""

from ._adjust import adjust_oft_parameters as adjust_oft_parameters
from ._adjust import resolve_block_size as resolve_block_size
from ._blocks import block_diag as block_diag
from ._blocks import cayley_neumann_blocks as cayley_neumann_blocks
from ._blocks import dropout_blocks as dropout_blocks
from ._blocks import inverse_blocks as inverse_blocks
from ._blocks import merge_rotation as merge_rotation
from ._blocks import merge_rotation_kernel as merge_rotation_kernel
from ._blocks import rotate_blocks as rotate_blocks
from ._blocks import rotate_input as rotate_input
from ._blocks import rotation_blocks as rotation_blocks
from ._blocks import unmerge_rotation as unmerge_rotation
from ._blocks import unmerge_rotation_kernel as unmerge_rotation_kernel
from ._cayley import cayley as cayley
from ._cayley import cayley_neumann as cayley_neumann
from ._coft import coft_eps as coft_eps
from ._coft import coft_project as coft_project
from ._skew import block_size_from_param_shape as block_size_from_param_shape
from ._skew import num_elements as num_elements
from ._skew import skew_from_vec as skew_from_vec
from ._skew import triu_indices as triu_indices
from ._skew import vec_from_skew as vec_from_skew

__all__ = [
    "adjust_oft_parameters",
    "block_diag",
    "block_size_from_param_shape",
    "cayley_neumann_blocks",
    "cayley",
    "cayley_neumann",
    "coft_eps",
    "coft_project",
    "dropout_blocks",
    "inverse_blocks",
    "merge_rotation",
    "merge_rotation_kernel",
    "num_elements",
    "resolve_block_size",
    "rotate_blocks",
    "rotate_input",
    "rotation_blocks",
    "skew_from_vec",
    "triu_indices",
    "unmerge_rotation",
    "unmerge_rotation_kernel",
    "vec_from_skew",
]
