import logging
import os

import pytest

# Tests that run under torch.use_deterministic_algorithms(True) on a GPU compute their references with cuBLAS,
# which some torch releases refuse there unless cuBLAS's workspace is fixed (read when cuBLAS first starts).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from op_testing import TARGETS


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


@pytest.fixture
def device(target):
    """Where the test's tensors live: the emulated CUDA kernels take CPU tensors."""
    return "cuda" if target == "cuda" else "cpu"


@pytest.fixture
def backend(target):
    """The `backend=` argument that selects the target's implementation."""
    return "emulated" if target == "emulated" else None


@pytest.fixture
def warnings_of():
    """The messages electra_ext's loggers emit during the test (with or without pytest's logging plugin)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("electra_ext")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
