"""apply_rope's roll form equals HF's ``x * cos + rotate_half(x) * sin`` (same products; XLA may contract
either product into an FMA, so compiled results differ in the last bits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.models._rope import apply_rope, rotate_half
from tests.tolerances import TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_apply_rope_equals_rotate_half_form(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 5, 3, 8)).astype(dtype)
    cos = jax.random.normal(keys[1], (2, 5, 8)).astype(dtype)
    sin = jax.random.normal(keys[2], (2, 5, 8)).astype(dtype)
    ref = jax.jit(lambda x, c, s: x * c[:, :, None, :] + rotate_half(x) * s[:, :, None, :])(x, cos, sin)
    ours = jax.jit(apply_rope)(x, cos, sin)
    tol = TOL["fp32_forward"] if dtype == jnp.float32 else TOL["bf16_forward"]
    np.testing.assert_allclose(
        np.asarray(ours.astype(jnp.float32)),
        np.asarray(ref.astype(jnp.float32)),
        rtol=tol.rtol,
        atol=tol.atol,
    )
    # Without jit (no FMA contraction across the two products) the two forms agree bit for bit.
    eager_ref = x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]
    np.testing.assert_array_equal(np.asarray(apply_rope(x, cos, sin)), np.asarray(eager_ref))
