// The primitive self-tests under the SIMT emulation (the GPU build is test_primitives.cu itself).
#include "test_primitives.cu"
