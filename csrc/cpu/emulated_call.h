// ELECTRA_EXT_EMULATED(op, call): for an op's emulated=True path on CPU tensors, returns `call` (the CUDA kernels'
// device code through the SIMT emulation) when electra_ext was built with the emulation, and otherwise fails
// with a message that says how to get it.
#pragma once

#include <c10/util/Exception.h>

#if defined(ELECTRA_EXT_WITH_EMULATION)
#define ELECTRA_EXT_EMULATED(op, call) return call
#else
#define ELECTRA_EXT_EMULATED(op, call)                                                                       \
  TORCH_CHECK_VALUE(false, op, ": emulated=True needs electra_ext built with the SIMT emulation, which needs " \
                               "the CUDA toolkit's headers (set CUDA_HOME) at build time")
#endif
