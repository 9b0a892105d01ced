"""The timing harness every benchmark shares, and the run facts summarize.py prints in its header."""

import subprocess

import pytest
import torch
from torch.utils._pytree import tree_leaves

# One disc_head call on the small shape moves ~8 MB: ~3 µs at an H100's ~3 TB/s copy speed, less than
# one synchronize round trip (~10 µs). 50 back-to-back calls per timed round keep that round trip
# under ~7% of the round even there, while a base-shape fwd_bwd round stays within tens of ms.
CUDA_REPS = 50
# CPU calls take milliseconds to seconds, far above timer overhead; one call per round keeps the
# CI run (--benchmark-disable, a single round) short.
CPU_REPS = 1
# One untimed round compiles torch.compile providers and fills the CUDA caching allocator.
WARMUP_ROUNDS = 1


def nvidia_driver_version():
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
        machine_info["cuda_runtime"] = torch.version.cuda
        machine_info["nvidia_driver"] = nvidia_driver_version()


def peak_cuda_bytes(call):
    """The peak allocation during one call: (beyond what was allocated before it (the inputs), in all)."""
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - allocated_before, peak


@pytest.fixture
def timed_benchmark(benchmark, request):
    """Returns run(call, device=, shape=, mode=, bytes_per_call=, reps=None, measure_peak=True, **info).

    Each timed round makes `reps` back-to-back calls (default CUDA_REPS or CPU_REPS), then waits for the
    device, so a round covers the device's work and not only the launches; summarize.py divides the round
    median by `reps`.
    """
    rounds = request.config.getoption("benchmark_min_rounds")

    def run(call, *, device, shape, mode, bytes_per_call, reps=None, measure_peak=True, **info):
        reps = reps or (CUDA_REPS if device == "cuda" else CPU_REPS)

        def timed_round():
            for _ in range(reps):
                call()
            if device == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{device} {shape} {mode}"
        benchmark.pedantic(timed_round, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)
        benchmark.extra_info.update(
            info, device=device, shape=shape, mode=mode, bytes=bytes_per_call, reps=reps
        )
        if device == "cuda" and measure_peak:
            above_inputs, peak = peak_cuda_bytes(call)
            benchmark.extra_info.update(peak_bytes_above_inputs=above_inputs, peak_bytes=peak)
        # A time is only worth recording for a call that computed numbers (CI runs each case once, untimed).
        results = [t for t in tree_leaves(call()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert all(torch.isfinite(t).all() for t in results), f"{shape} {mode}: a result is not finite"

    return run
