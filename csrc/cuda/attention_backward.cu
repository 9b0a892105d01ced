// STUB: replaced by the attention backward kernel.
#include "cuda/attention_launch.h"
#include "simt/simt.cuh"

namespace electra_ext::ELECTRA_BACKEND {
cudaError_t attention_backward(const AttentionBackwardArgs&, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace electra_ext::ELECTRA_BACKEND
