"""Shared test fixtures: the real medical data in $PEFT_JAX_DATA and a quiet JAX."""
import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The folder of real public data (../shared/data in CI); skips the test when absent."""
    root = os.environ.get("PEFT_JAX_DATA")
    if not root or not pathlib.Path(root).is_dir():
        pytest.skip("needs the real data folder: set PEFT_JAX_DATA (CI sets it to ../shared/data)")
    return pathlib.Path(root)
