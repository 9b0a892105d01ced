// Host launchers of the generator-head kernels (torch-free; design and napkin math in gen_head_device.cuh).
// Compiled by nvcc for the GPU (namespace cuda) and by the host compiler for the SIMT emulation (namespace
// emulated, through csrc/emulated/gen_head.cpp).
#include <algorithm>
#include <cstdint>

#include "cuda/gen_head_device.cuh"
#include "cuda/gen_head_launch.h"

namespace electra_ext::ELECTRA_BACKEND {
namespace {

namespace dev = gen_head_device;

constexpr int64_t kMaxGridY = 65535;

bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// What every launch needs of the inputs: 16-byte aligned rows of h and weight (cp.async), hidden a multiple
// of 8, a grid that fits.
bool inputs_launchable(const GenHeadInputs& in, int64_t row_blocks) {
  return in.hidden > 0 && in.hidden % 8 == 0 && in.h_row_stride % 8 == 0 && aligned_16(in.h) &&
         aligned_16(in.weight) && in.vocab > 0 && in.vocab <= kGenHeadMaxVocab && row_blocks <= kMaxGridY;
}

// Splits that cover the vocabulary's tiles.
bool splits_cover(GenHeadSplits splits, int64_t vocab) {
  const int64_t tiles = (vocab + dev::kTileColumns - 1) / dev::kTileColumns;
  return splits.splits > 0 && splits.tiles_per_split > 0 && int64_t(splits.splits) * splits.tiles_per_split >= tiles;
}

// Blocks of `kernel` the current device runs at once (its SMs times the occupancy); 0 when the query fails.
template <typename Kernel>
int64_t resident_blocks(Kernel* kernel, size_t shared_bytes) {
  int device = 0, per_multiprocessor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, dev::kThreads, shared_bytes) !=
          cudaSuccess) {
    return 0;
  }
  return int64_t(per_multiprocessor) * device_attribute(cudaDevAttrMultiProcessorCount, device);
}

template <typename T>
GenHeadSplits forward_splits(int64_t rows, int64_t vocab) {
  return gen_head_vocab_splits((rows + dev::kBlockRows - 1) / dev::kBlockRows, vocab,
                               resident_blocks(dev::forward_kernel<T>, dev::kLogitTileSharedBytes));
}

template <typename T>
cudaError_t launch_forward(const GenHeadForwardArgs& args, cudaStream_t stream) {
  const int64_t row_blocks = (args.in.rows + dev::kBlockRows - 1) / dev::kBlockRows;
  launch_kernel(dev::forward_kernel<T>, dim3(args.splits.splits, static_cast<unsigned>(row_blocks)),
                dim3(dev::kThreads), dev::kLogitTileSharedBytes, stream, args);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const int64_t merge_blocks = (args.in.rows + dev::kMergeThreads - 1) / dev::kMergeThreads;
  launch_kernel(dev::merge_kernel, dim3(static_cast<unsigned>(merge_blocks)), dim3(dev::kMergeThreads), 0, stream,
                args);
  return cudaGetLastError();
}

// The grad_h GEMM's output is only chunk rows x hidden (Base: 1,024 x 768, 192 tiles of 64 x 64) against a k
// of V = 30,522: one block per tile leaves an SM 1 or 2 blocks of 4 warps for 954 stages. So k is split until
// the tiles times the splits fill the blocks the device holds at once (SMs x occupancy: 5 per SM, 660 on an
// H100, so Base gets 3 splits), each split writing float32 partials that reduce_k_splits_kernel adds in order.
// At most kMaxGradHSplits: the partials are splits x rows x hidden floats, and 4 keep the ELECTRA-Small
// backward's peak (89.5 MB above its inputs at d18a559, +2 MB) under 5% of the eager head's (1,930 MB).
constexpr int64_t kMaxGradHSplits = 4;

template <typename T>
int64_t grad_h_resident_blocks() {
  return resident_blocks(dev::gemm_kernel<T, false, T>, dev::kGemmSharedBytes<false>);
}

int64_t grad_h_splits(int64_t rows, int64_t hidden, int64_t resident) {
  const int64_t tiles =
      ((rows + dev::kGemmTile - 1) / dev::kGemmTile) * ((hidden + dev::kGemmTile - 1) / dev::kGemmTile);
  return std::clamp<int64_t>(resident / tiles, 1, kMaxGradHSplits);
}

// k_splits > 1: k in that many parts (fewer when k has fewer chunks), partials in args.partials.
template <typename T, bool kATransposed, typename Out>
cudaError_t launch_gemm(dev::GemmArgs<Out> args, int64_t k_splits, cudaStream_t stream) {
  const int64_t blocks_n = (args.n + dev::kGemmTile - 1) / dev::kGemmTile;
  const int64_t blocks_m = (args.m + dev::kGemmTile - 1) / dev::kGemmTile;
  if (blocks_m > kMaxGridY) return cudaErrorInvalidValue;
  const int64_t chunks = (args.k + dev::kGemmChunk - 1) / dev::kGemmChunk;
  const int64_t wanted = std::clamp<int64_t>(k_splits, 1, chunks > 0 ? chunks : 1);
  const int64_t chunks_per_split = (chunks + wanted - 1) / wanted;
  const int64_t splits = chunks_per_split > 0 ? (chunks + chunks_per_split - 1) / chunks_per_split : 1;
  args.k_per_split = chunks_per_split * dev::kGemmChunk;
  launch_kernel(dev::gemm_kernel<T, kATransposed, Out>,
                dim3(static_cast<unsigned>(blocks_n), static_cast<unsigned>(blocks_m), static_cast<unsigned>(splits)),
                dim3(dev::kThreads), dev::kGemmSharedBytes<kATransposed>, stream, args);
  if (splits == 1) return cudaGetLastError();
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if constexpr (std::is_same<Out, T>::value) {
    const int64_t pairs = args.m * args.n / 2;
    launch_kernel(dev::reduce_k_splits_kernel<T>,
                  dim3(static_cast<unsigned>((pairs + dev::kReduceThreads - 1) / dev::kReduceThreads)),
                  dim3(dev::kReduceThreads), 0, stream, args, static_cast<int>(splits));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const GenHeadBackwardArgs& args, cudaStream_t stream) {
  const GenHeadInputs& in = args.in;
  const int64_t vocab_padded = gen_head_vocab_padded(in.vocab);
  const int64_t resident = resident_blocks(dev::grad_logits_kernel<T>, dev::kLogitTileSharedBytes);
  const int64_t gemm_resident = grad_h_resident_blocks<T>();
  for (int64_t first_row = 0; first_row < in.rows; first_row += args.chunk_rows) {
    const int64_t rows = in.rows - first_row < args.chunk_rows ? in.rows - first_row : args.chunk_rows;
    const int64_t row_blocks = (rows + dev::kBlockRows - 1) / dev::kBlockRows;
    const GenHeadSplits splits = gen_head_vocab_splits(row_blocks, in.vocab, resident);
    launch_kernel(dev::grad_logits_kernel<T>, dim3(splits.splits, static_cast<unsigned>(row_blocks)),
                  dim3(dev::kThreads), dev::kLogitTileSharedBytes, stream, args, first_row, splits);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    const dev::GemmOperand grad_logits{args.grad_logits, vocab_padded, rows, vocab_padded};
    const T* const h = static_cast<const T*>(in.h) + first_row * in.h_row_stride;
    // grad_h[chunk] = s G weight: [rows x V] [V x hidden].
    const dev::GemmArgs<T> grad_h{rows,
                                  in.hidden,
                                  vocab_padded,
                                  grad_logits,
                                  dev::GemmOperand{in.weight, in.hidden, in.vocab, in.hidden},
                                  static_cast<T*>(args.grad_h) + first_row * in.hidden,
                                  args.grad_scale,
                                  false,
                                  0,
                                  args.grad_h_partials};
    // As many as the partials hold: gen_head_grad_h_partial_floats sized them for the largest chunk.
    const int64_t k_splits =
        std::min(grad_h_splits(rows, in.hidden, gemm_resident), args.grad_h_partial_floats / (rows * in.hidden));
    if (cudaError_t err = launch_gemm<T, false>(grad_h, k_splits, stream); err != cudaSuccess) return err;
    // grad_weight += s Gᵀ h[chunk]: [V x rows] [rows x hidden].
    const dev::GemmArgs<float> grad_weight{in.vocab,
                                           in.hidden,
                                           rows,
                                           grad_logits,
                                           dev::GemmOperand{h, in.h_row_stride, rows, in.hidden},
                                           args.grad_weight,
                                           args.grad_scale,
                                           true,
                                           0,
                                           nullptr};
    if (cudaError_t err = launch_gemm<T, true>(grad_weight, 1, stream); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

GenHeadSplits gen_head_forward_splits(int64_t rows, int64_t vocab, FloatType dtype) {
  return dtype == FloatType::kFloat16 ? forward_splits<__half>(rows, vocab)
                                      : forward_splits<__nv_bfloat16>(rows, vocab);
}

int64_t gen_head_grad_h_partial_floats(int64_t chunk_rows, int64_t hidden, FloatType dtype) {
  const int64_t resident =
      dtype == FloatType::kFloat16 ? grad_h_resident_blocks<__half>() : grad_h_resident_blocks<__nv_bfloat16>();
  const int64_t splits = grad_h_splits(chunk_rows, hidden, resident);
  return splits > 1 ? splits * chunk_rows * hidden : 0;
}

// cudaErrorInvalidValue for a dtype other than fp16/bf16 or inputs that break the contract's layout.
cudaError_t gen_head_forward(const GenHeadForwardArgs& args, cudaStream_t stream) {
  if (args.in.rows == 0) return cudaSuccess;
  const int64_t row_blocks = (args.in.rows + dev::kBlockRows - 1) / dev::kBlockRows;
  if (!inputs_launchable(args.in, row_blocks) || !splits_cover(args.splits, args.in.vocab) || args.seed == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (args.in.dtype) {
    case FloatType::kFloat16: return launch_forward<__half>(args, stream);
    case FloatType::kBFloat16: return launch_forward<__nv_bfloat16>(args, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t gen_head_backward(const GenHeadBackwardArgs& args, cudaStream_t stream) {
  if (args.in.rows == 0) return cudaSuccess;
  if (args.chunk_rows <= 0 || args.chunk_rows % dev::kBlockRows != 0 ||
      !inputs_launchable(args.in, args.chunk_rows / dev::kBlockRows) ||
      !aligned_16(args.grad_logits) || !aligned_16(args.grad_h) || !aligned_16(args.grad_weight) ||
      !aligned_16(args.grad_h_partials)) {
    return cudaErrorInvalidValue;
  }
  switch (args.in.dtype) {
    case FloatType::kFloat16: return launch_backward<__half>(args, stream);
    case FloatType::kBFloat16: return launch_backward<__nv_bfloat16>(args, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace electra_ext::ELECTRA_BACKEND
