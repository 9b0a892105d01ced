"""Helpers shared by the op tests: the devices to run on, the error measure of the numerical standards, a check that
the kernels (not the references) ran, and the baseline (non-AVX2) build of the CPU kernels."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class KernelsRan(TorchDispatchMode):
    """Inside `with KernelsRan("gen_head", "gen_head_backward"):` the block must call those electra_ext ops (forward
    and backward): an op that silently took its PyTorch reference instead (a dtype or device check gone wrong) would
    make a kernel-against-reference test compare the reference with itself, and pass."""

    def __init__(self, *op_names: str):
        super().__init__()
        self.expected, self.called = set(op_names), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "electra_ext":
            self.called.add(func._opname)
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exception):
        result = super().__exit__(*exception)
        if exception[0] is None:
            assert self.expected <= self.called, f"the kernels did not run: {sorted(self.expected - self.called)}"
        return result


def run_with_cpu_isa(probe: str, isa: str) -> subprocess.CompletedProcess:
    """Runs the Python code `probe` (with tests/ on the path) in a subprocess with ELECTRA_EXT_CPU_ISA=isa: the
    CPU kernels' build (AVX2 + FMA or baseline x86-64) is chosen once per process."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ELECTRA_EXT_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", probe], env=env, cwd=here, capture_output=True, text=True,
                          timeout=600)


def run_on_baseline_cpu_build(probe: str) -> None:
    """Runs `probe` on the CPU kernels' baseline x86-64 build; fails with the subprocess's error output."""
    result = run_with_cpu_isa(probe, "baseline")
    assert result.returncode == 0, result.stderr[-4000:]
