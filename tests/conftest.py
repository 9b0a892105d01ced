import pytest

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
