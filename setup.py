"""Builds electra_ext._C: CPU kernels always, CUDA kernels (sm_80, sm_90, compute_90 PTX) when torch and nvcc allow.

ELECTRA_EXT_CUDA=0 forces a CPU-only build; ELECTRA_EXT_CUDA=1 fails unless the CUDA kernels build.
Unset, CUDA is built whenever torch is a CUDA build and nvcc is found.
ELECTRA_EXT_SANITIZE=1 builds the host code (CPU kernels, emulation, glue) with AddressSanitizer and
UndefinedBehaviorSanitizer, for tests/run_sanitized.sh; such a _C only loads with libasan preloaded.
"""
import glob
import os
import shutil
import sys

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. The `nvcc` on PATH here can be a wrapper
# script, from which torch would guess /usr/local and fail to link, so point at the toolkit first.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# With no GPU present torch cannot detect an architecture and raises; sm_80 (A100, and by binary compatibility
# the RTX 30xx/40xx, A10, L4) and sm_90 (H100/H200) are the targets, and compute_90 PTX (+PTX: 12% more object
# code, no more build time) lets newer GPUs (Blackwell) compile the kernels when they are loaded instead of failing
# with "no kernel image is available". "8.0;9.0a" builds the Hopper (wgmma) attention kernels instead of sm_90.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    request = os.environ.get("ELECTRA_EXT_CUDA", "").strip()
    if request not in ("", "0", "1"):
        raise ValueError(f"ELECTRA_EXT_CUDA must be 0, 1 or unset, got {request!r}")
    if request == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append(f"nvcc not found (CUDA_HOME={CUDA_HOME!r}, nvcc on PATH: {shutil.which('nvcc')!r})")
    if problems and request == "1":
        raise RuntimeError("ELECTRA_EXT_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems


def want_sanitizers() -> bool:
    request = os.environ.get("ELECTRA_EXT_SANITIZE", "").strip()
    if request not in ("", "0", "1"):
        raise ValueError(f"ELECTRA_EXT_SANITIZE must be 0, 1 or unset, got {request!r}")
    return request == "1"


def builds_sm90a() -> bool:
    """Whether TORCH_CUDA_ARCH_LIST names sm_90a, Hopper's arch-specific target: then the launchers take the wgmma
    kernels on compute capability 9.0. Not with 9.0 as well: which of the two a 9.0 device would load is not ours
    to choose, and the launchers must know which code is there."""
    arches = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")
    if "9.0a" in arches and any(arch in ("9.0", "9.0+PTX") for arch in arches):
        raise ValueError(f"TORCH_CUDA_ARCH_LIST names both 9.0 and 9.0a ({os.environ['TORCH_CUDA_ARCH_LIST']!r}): "
                         "name one (9.0a builds the Hopper wgmma kernels)")
    return "9.0a" in arches


def cuda_include_dir():
    """The CUDA toolkit's headers: the SIMT emulation compiles the device code against them (no libraries)."""
    include = os.path.join(CUDA_HOME or os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    return include if os.path.exists(os.path.join(include, "cuda_fp16.h")) else None


def write_build_info(with_cuda: bool, with_emulation: bool, with_sm90a: bool) -> None:
    # Read at import time: an extension compiled against one torch must not be loaded next to another.
    with open(os.path.join(HERE, "electra_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"WITH_EMULATION = {with_emulation!r}\n")
        # sm_90a code: the wgmma attention kernels run on compute capability 9.0 (the mma.sync ones elsewhere).
        f.write(f"WITH_SM90A = {with_sm90a!r}\n")


def extension():
    with_cuda = want_cuda()
    sm90a = with_cuda and builds_sm90a()  # before anything is written: a bad TORCH_CUDA_ARCH_LIST stops here
    emulation_include = cuda_include_dir()
    write_build_info(with_cuda, emulation_include is not None, sm90a)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std= flag: torch's own flags pick C++17 or C++20 and the sources compile as both.
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header code: compiled without -fopenmp, its `#pragma omp parallel` vanishes, every
        # CPU kernel runs on the calling thread, and the ATen ops a kernel calls from its "parallel" body each
        # fork and join torch's pool on their own (gen_head: ~20 ms per op on a loaded 2-core machine).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if want_sanitizers():
        # -O1 keeps ASan's reports exact and the build short; any finding aborts (no recovery).
        sanitizer_flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                           "-fno-omit-frame-pointer"]
        cxx_flags = [flag for flag in cxx_flags if flag != "-O3"] + ["-O1", "-g"] + sanitizer_flags
        link_flags += sanitizer_flags
    include_dirs = [os.path.join(HERE, "csrc")]
    if emulation_include is None:
        sources = [source for source in sources if not source.endswith("_emulated.cpp")]
    else:
        sources += sorted(glob.glob("csrc/simt/*.cpp") + glob.glob("csrc/emulated/*.cpp"))
        include_dirs.append(emulation_include)
        cxx_flags.append("-DELECTRA_EXT_WITH_EMULATION")
    if not with_cuda:
        return CppExtension("electra_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags), with_cuda
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if sm90a:
        nvcc_flags.append("-DELECTRA_EXT_SM90A")
    return CUDAExtension("electra_ext._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=link_flags), with_cuda


ext, WITH_CUDA = extension()
print(f"electra_ext: building with CUDA kernels: {WITH_CUDA}, with the SIMT emulation: {cuda_include_dir() is not None}")
setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
