"""Helpers shared by the op tests: the devices to run on and the error measure of the numerical standards."""
import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
REQUIRES_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")

# Every op test runs on each target: the CPU kernel, the CUDA kernel's device code under the SIMT emulation
# (CPU tensors, never skipped: CI must run it), and the CUDA kernel, which skips (with a reason) without a GPU.
TARGETS = [
    "cpu",
    "emulated",
    pytest.param("cuda", marks=REQUIRES_CUDA),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the absolute difference when expected is zero)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference
