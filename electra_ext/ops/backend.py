"""Which implementation an electra_ext op runs.

    "kernels"   the compiled kernel for the tensors' device (CPU or CUDA); the reference where none exists (a
                build without CUDA kernels, or a GPU older than compute capability 8.0, with a warning)
    "emulated"  for CPU tensors, the CUDA kernels' device code run by the SIMT emulation (slow, exact as
                written: how CPU-only CI tests the CUDA kernels); needs a build with the emulation
    "reference" the pure-PyTorch reference (electra_ext/ops/reference.py)

Each op takes `backend=` per call; the default comes from the environment variable ELECTRA_EXT_BACKEND
(default "kernels"), read once at import. From the environment, "emulated" applies to CPU tensors only, so
CUDA tensors keep their kernels; asked for per call with tensors on another device, it is an error.

The emulated device is an sm_90 (H100): where a launcher picks kernels per architecture, the emulation runs the
Hopper ones. ELECTRA_EXT_EMULATED_SM="80" makes it an sm_80 (A100) instead, for testing the other kernels, and
"86" an RTX 3090 (the consumer GPUs' 99 KiB of shared memory per block); the emulation reads it at every launch.
ELECTRA_EXT_WGMMA="0" keeps every device, emulated or real, on the mma.sync kernels where it would take the
Hopper (wgmma) ones; also read at every launch.
"""
import os
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

from electra_ext._extension import BUILD_INFO

BACKENDS = ("kernels", "emulated", "reference")


def _backend_from_environment() -> str:
    value = os.environ.get("ELECTRA_EXT_BACKEND", "kernels")
    if value not in BACKENDS:
        raise ValueError(f"ELECTRA_EXT_BACKEND must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


DEFAULT_BACKEND = _backend_from_environment()

# Settings the compiled launchers read at every launch (csrc/cuda/attention_forward.cu), with their values, the
# default last: a value they would not recognise fails here, at import, instead of being taken as the default.
LAUNCH_SETTINGS = {"ELECTRA_EXT_EMULATED_SM": ("80", "86", "90"), "ELECTRA_EXT_WGMMA": ("0", "1")}


def _check_launch_settings():
    for name, values in LAUNCH_SETTINGS.items():
        if os.environ.get(name, values[-1]) not in values:
            raise ValueError(f"{name} must be {' or '.join(values)} (or unset: {values[-1]}); "
                             f"got {os.environ[name]!r}")


_check_launch_settings()


def has_values(tensor) -> bool:
    """Whether eager checks can read `tensor`'s values on the host: not in a compiled graph, and not a meta or fake
    tensor (shape-only runs: the meta device, FakeTensorMode)."""
    return not (torch.compiler.is_compiling() or tensor.device.type == "meta" or is_fake(tensor))


def has_kernel(op, device_type: str) -> bool:
    """Whether `op` has a compiled kernel for `device_type` ("cpu", "cuda") in this build of electra_ext."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), dispatch_key)


def resolve(op, backend, device_type: str) -> str:
    """The implementation to run for `op` on `device_type`: "kernels", "emulated" or "reference"."""
    if backend is None:
        backend = DEFAULT_BACKEND
        if backend == "emulated" and device_type != "cpu":
            backend = "kernels"
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None; got {backend!r}")
    if backend == "emulated":
        if device_type != "cpu":
            raise ValueError(f"backend='emulated' runs the CUDA kernels on the CPU: it needs CPU tensors, "
                             f"got {device_type} tensors")
        if not BUILD_INFO.WITH_EMULATION:
            raise ValueError("backend='emulated' needs electra_ext built with the SIMT emulation (the CUDA "
                             "toolkit's headers must be found at build time: set CUDA_HOME)")
    if backend == "kernels" and not has_kernel(op, device_type):
        return "reference"
    return backend


# The CUDA kernels are built for sm_80 and sm_90, with compute_90 PTX that newer GPUs compile at load time (setup.py);
# their mma.sync bf16 tiles and cp.async copies need compute capability 8.0, so a V100 (7.0) or T4 (7.5) has no
# code to run and takes the reference instead.
MIN_CUDA_CAPABILITY = (8, 0)
_CUDA_KERNELS_RUN_ON = {}  # torch.device -> bool: a dictionary lookup per call instead of a properties query


def cuda_kernels_run_on(device: torch.device) -> bool:
    """Whether the CUDA `device` can run the compiled kernels. Warns when it cannot (once per device), and the ops
    run the references there."""
    runs = _CUDA_KERNELS_RUN_ON.get(device)
    if runs is None:
        properties = torch.cuda.get_device_properties(device)
        runs = _CUDA_KERNELS_RUN_ON[device] = (properties.major, properties.minor) >= MIN_CUDA_CAPABILITY
        if not runs:
            warnings.warn(f"electra_ext: {device} is {properties.name}, compute capability {properties.major}."
                          f"{properties.minor}; electra_ext's CUDA kernels need {MIN_CUDA_CAPABILITY[0]}."
                          f"{MIN_CUDA_CAPABILITY[1]} or newer, so its ops run their PyTorch references there "
                          f"(slower, more memory)")
    return runs


class Selector:
    """Resolves `op`'s implementation per call. The defaults (backend=None) are resolved once per device type at
    import, so that torch.compile traces a dictionary lookup, not the dispatcher query."""

    def __init__(self, op):
        self.op = op
        self.defaults = {device: resolve(op, None, device) for device in ("cpu", "cuda")}

    def __call__(self, backend, device: torch.device) -> str:
        if backend is None and device.type in self.defaults:
            implementation = self.defaults[device.type]
        else:
            implementation = resolve(self.op, backend, device.type)
        if implementation == "kernels" and device.type == "cuda" and not cuda_kernels_run_on(device):
            return "reference"
        return implementation
