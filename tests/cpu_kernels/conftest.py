"""Every CPU-kernel test starts with the registry as it found it and must leave it so."""

import jax
import pytest

from oftjax import _registry


@pytest.fixture(autouse=True)
def _registry_left_as_found():
    before = _registry.current()
    yield
    after = _registry.current()
    if after != before:
        _registry.install(before, replace=True)
        jax.clear_caches()
        pytest.fail(f"the test left replacements installed: {sorted(after)} (was {sorted(before)})")
