"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test file, restored after it. The tiny models' ops are too small to
    share out: on a shared, busy CPU a second thread only adds waiting (2 threads ran
    test_sd15_backend.py ~5x slower than 1). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

