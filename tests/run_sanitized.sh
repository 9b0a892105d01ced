#!/usr/bin/env bash
# Runs the CPU kernels' tests under AddressSanitizer and UndefinedBehaviorSanitizer (issue 9). The emulated
# CUDA kernels are covered torch-free by ctest (tests/native); this covers the ATen side: the CPU kernels,
# their checks and the op registration, through the same pytest tests as the normal build.
#
# How: a copy of the package is built in place with ELECTRA_EXT_SANITIZE=1 (CPU-only, -O1, any finding
# aborts) under build/sanitized/, and pytest imports that copy. Python is not built with ASan, so libasan
# must be preloaded; libstdc++ is preloaded with it because python does not link it, and ASan's
# __cxa_throw interceptor only finds the real one if libstdc++ is loaded when ASan starts (without it the
# first C++ exception, e.g. a TORCH_CHECK, aborts with "CHECK failed: ... real___cxa_throw").
# Leak checking is off: the interpreter and torch keep allocations alive until exit by design.
#
# Run it inside the environment the README's test command makes (about 3 minutes on 2 cores; the build
# is incremental on later runs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work="$repo/build/sanitized"
mkdir -p "$work"
rm -rf "$work/csrc" "$work/electra_ext"
# cp -p keeps modification times, so the build directory left by an earlier run is reused.
cp -pr "$repo/setup.py" "$repo/pyproject.toml" "$repo/csrc" "$repo/electra_ext" "$work/"
rm -f "$work"/electra_ext/_C*.so
(cd "$work" &&
  ELECTRA_EXT_SANITIZE=1 ELECTRA_EXT_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" python setup.py -q build_ext --inplace)

export LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1
cd "$work"  # python -m puts the working directory first on sys.path: the sanitized copy is imported
python - <<'PY'
import os
import subprocess

import electra_ext

library = electra_ext._C.__file__
assert library.startswith(os.getcwd()), f"imported {library}, not the sanitized build in {os.getcwd()}"
linked = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
for runtime in ("libasan", "libubsan"):
    assert runtime in linked, f"{library} is not linked with {runtime}"
print(f"run_sanitized: testing {library} (ASan + UBSan)")
PY
# The CPU kernels only: the emulated ones take minutes under ASan here and run under it in ctest already. The
# op tests, the bad-input table and the property tests call the kernels directly; the model tests call them as
# training does (real vocabulary, dropout, every op in one backward). Not the torch.compile tests (a minute of
# inductor, no kernel path the others miss).
# --capture=sys: pytest captures Python's output only, so a sanitizer report (written to file descriptor 2
# just before the abort) reaches the terminal instead of a capture file that dies with the process.
python -m pytest -q -p no:cacheprovider --capture=sys \
  "$repo/tests/test_attention.py" "$repo/tests/test_gen_head.py" "$repo/tests/test_disc_head.py" \
  "$repo/tests/test_bad_inputs.py" "$repo/tests/test_op_properties.py" "$repo/tests/test_pretraining.py" \
  "$repo/tests/test_hf_parity.py" -k "not emulated and not cuda and not graph_breaks"
