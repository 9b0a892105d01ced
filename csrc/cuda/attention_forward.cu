// STUB: replaced by the attention forward kernel.
#include "cuda/attention_launch.h"
#include "simt/simt.cuh"

namespace electra_ext::ELECTRA_BACKEND {
cudaError_t attention_forward(const AttentionForwardArgs&, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace electra_ext::ELECTRA_BACKEND
