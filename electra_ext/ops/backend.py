"""Which implementation an electra_ext op runs.

    "kernels"   the compiled kernel for the tensors' device (CPU or CUDA); the reference where none exists
    "emulated"  for CPU tensors, the CUDA kernels' device code run by the SIMT emulation (slow, exact as
                written: how CPU-only CI tests the CUDA kernels); needs a build with the emulation
    "reference" the pure-PyTorch reference (electra_ext/ops/reference.py)

Each op takes `backend=` per call; the default comes from the environment variable ELECTRA_EXT_BACKEND
(default "kernels"), read once at import. From the environment, "emulated" applies to CPU tensors only, so
CUDA tensors keep their kernels; asked for per call with tensors on another device, it is an error.

The emulated device is an sm_90 (H100): where a launcher picks kernels per architecture, the emulation runs the
Hopper ones. ELECTRA_EXT_EMULATED_SM="80" makes it an sm_80 (A100) instead, for testing the other kernels; the
emulation reads it at every launch. ELECTRA_EXT_WGMMA="0" keeps every device, emulated or real, on the mma.sync
kernels where it would take the Hopper (wgmma) ones; also read at every launch.
"""
import os

import torch

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
LAUNCH_SETTINGS = {"ELECTRA_EXT_EMULATED_SM": ("80", "90"), "ELECTRA_EXT_WGMMA": ("0", "1")}


def _check_launch_settings():
    for name, values in LAUNCH_SETTINGS.items():
        if os.environ.get(name, values[-1]) not in values:
            raise ValueError(f"{name} must be {' or '.join(values)} (or unset: {values[-1]}); "
                             f"got {os.environ[name]!r}")


_check_launch_settings()


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


class Selector:
    """Resolves `op`'s implementation per call. The defaults (backend=None) are resolved once per device type at
    import, so that torch.compile traces a dictionary lookup, not the dispatcher query."""

    def __init__(self, op):
        self.op = op
        self.defaults = {device: resolve(op, None, device) for device in ("cpu", "cuda")}

    def __call__(self, backend, device_type: str) -> str:
        if backend is None and device_type in self.defaults:
            return self.defaults[device_type]
        return resolve(self.op, backend, device_type)
