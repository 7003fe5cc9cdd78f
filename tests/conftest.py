"""Shared test fixtures."""
import sys

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps a process-wide singleton state: a test that ran a script in-process must not leave it
    configured (e.g. without bf16) for the next test's Accelerator."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
