// Fused multi-head attention on the CPU: a tiled online-softmax forward (FlashAttention) and a backward that
// recomputes the probabilities from the saved log-sum-exp (FlashAttention-2). Layout: csrc/cuda/attention_launch.h.
//
// Napkin math (B = 4, T = 512, H = 12, D = 64, float32, 2 AVX2 cores of an AMD EPYC): the forward is
// 4 B H T^2 D = 3.2 GFLOP of matrix products and B H T^2 = 12.6 M exponentials, on 4 x 6.3 MB of q, k, v and out.
// oneDNN's float32 brgemm runs our tiles at 75-90 GFLOP/s per core (measured; about the peak of two 8-lane FMAs per
// cycle), so the products alone take ~39 ms on one core, ~20 ms on two. Everything else is overhead to keep small;
// measured on one core: the softmax (row max, exponential and sum; 8-lane AVX2 with FMA, ~0.55 ns per score)
// 7 ms, K^T 2 ms. The backward issues five products (8 GFLOP, ~95 ms on one core), 7 ms of element-wise work and
// ~6 ms of packing, transposes and delta. SDPA's CPU flash kernel issues the same products (through MKL's
// sgemm, at the same rate), so any margin over it comes from the element-wise work and from never computing
// padded keys (SDPA takes padding as a mask). A [T, T] score matrix per head (1 MB) is never stored.
//
// Forward tiling: a task is a run of 64-query blocks of one (sequence, head), the whole sequence when there are
// at least 8 tasks per thread (float32; at most 256 rows for other dtypes, see Memory). Key blocks of 128 are its
// outer loop: each one's K^T panel [D, 128] (and float32 V block, for bfloat16 and float16) is built once per
// task and used by all its query blocks, so no thread holds a whole sequence's K^T (that was 128 KB per thread at
// T = 512, and made the forward's scratch 2.2x SDPA's); built per query block instead, the K^T copies took 9 of
// 71 ms on one core. Per (key block, query block) it computes the 64 x 128 score tile (32 KB, L1/L2-resident)
// with one product, exponentiates it against the running row maximum, rescales the accumulator rows whose
// maximum moved and adds P V with a second product (64 x 128 x 64 each; 128 x 128 measured 1% faster, 128 x 256
// and 64 x 256 the same within noise). The accumulator is the float32 output itself (no [tokens, D] buffer), a
// float32 buffer of the task's rows for other dtypes. Tasks are handed out dynamically, longest first:
// at::parallel_for's static split gave one thread 3.2x the other's work with lengths 512, 400, 300, 200.
//
// Backward tiling: one task per (sequence, head), its query blocks the outer loop (as in SDPA's CPU kernel), so a
// thread holds one query block's operands, not a whole sequence's. It works on transposed [64 keys, 128 queries]
// tiles: S^T = K Q^T and dP^T = V dO^T, so that dV += (P o M)^T dO, dK += dS^T Q and dQ^T += K^T dS^T take every
// operand as stored (no tile is transposed) and the element-wise step runs along query rows, where lse and delta are
// contiguous. Per query block, Q^T and dO^T are built once; per (query block, key block), K^T [D, 64] is built again
// (T / 128 times per key block, 4 at T = 512: measured on one core, the backward took 84.9-86.4 ms so and 83.1-84.7
// with each K^T built once, a timing-only variant: ~2%). float32 q, k, v and dO are read in place with the fused QKV's
// token stride (2304 floats): forward + backward took 61-63 ms so (2 threads), 63 ms with contiguous copies of every
// block; the backward alone on one core 83.5-88.4 ms against 85.6-86.8. 128 x 64 tiles instead of 64 x 64 took the
// three accumulating products from 64 to 54 ms (one core). dQ^T accumulates over key blocks in the task's panel, dK
// and dV over query blocks in the float32 gradients themselves (in float32 buffers of the sequence's rows for other
// dtypes), each in a fixed order: results are bitwise the same for any number of threads. delta = rowsum(dO o O) is
// computed per query block, not through a [tokens, H, D] float32 temporary.
//
// Memory: per thread, the forward's float32 scratch at T = 512, D = 64 is 68 KB for float32 (K^T panel 32 KB,
// score tile 32 KB, row maxima and sums 4 KB) and 178 KB for bfloat16 (plus float32 V and q blocks, 48 KB, and
// the accumulator of 256 rows, 64 KB), against 148 KB and 212 KB in SDPA's CPU flash kernel (a 64 x 512 score
// tile, a 64 x 64 accumulator, and for bfloat16 a bfloat16 copy of the score tile). The backward's is 177 KB for
// float32 (Q^T, dO^T and dQ^T panels 96 KB, K^T 16 KB, two tiles 64 KB) and 529 KB for bfloat16 (plus float32
// copies of the q, dO, k and v blocks, 96 KB, and the sequence's dK and dV accumulators, 256 KB), against SDPA's
// 256 KB and 384 KB (two 64 x 512 tiles, and their bfloat16 copies). Forward + backward at this shape, 2 threads,
// peaks 24.3 MiB above its inputs in float32 (SDPA 24.4) and 12.8 in bfloat16 (SDPA 12.9); the gradients and the
// output alone are 24.0 and 12.0 (benchmarks/cpu_attention_compare.py, SDPA given separate q, k, v leaves). Each
// further thread adds its scratch, so in bfloat16 more threads hold more than SDPA (8: 16.0 against 15.3 MiB): our
// float32 dK and dV accumulators, where SDPA rounds dK and dV into the bfloat16 gradients after every 64 queries
// (its dK and dV errors against float64 are 2.3x ours).
//
// Products go through ATen's cpublas::brgemm (oneDNN's JIT brgemm on AVX2 CPUs, else MKL's sgemm). The kernels'
// bodies (attention_cpu_kernels.h) are compiled twice, for baseline x86-64 and with AVX2 + FMA, and the build is
// chosen once per process (ELECTRA_EXT_CPU_ISA=baseline forces the baseline one).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_checks.h"
#include "common/philox.h"
#include "cpu/cpu_isa.h"
#include "cpu/emulated_call.h"
#if defined(ELECTRA_EXT_WITH_EMULATION)
#include "cpu/attention_emulated.h"
#endif

namespace electra_ext {
namespace {

constexpr int64_t kForwardQueryRows = 64;
constexpr int64_t kForwardKeyColumns = 128;
// bfloat16 and float16: rows per forward task, whose float32 accumulator (64 KB at D = 64) each thread holds; a
// longer task would copy K^T and V fewer times (256 rows: twice per sequence and head at T = 512).
constexpr int64_t kReducedTaskRows = 256;
constexpr int64_t kBackwardQueryRows = 128;
constexpr int64_t kBackwardKeyColumns = 64;
// Independent partial maxima and sums: float addition is not associative, so the compiler vectorises a row
// reduction only when it is written as 8 separate lanes (two SSE registers).
constexpr int64_t kLanes = 8;

static_assert(kForwardKeyColumns % philox::kDropoutColumnsPerCall == 0 &&
                  kBackwardKeyColumns % philox::kDropoutColumnsPerCall == 0,
              "key blocks start on a dropout Philox call's 16 columns");

// C[m, n] = A[m, k] B[k, n] (+ C when accumulate), row-major float32 with leading dimensions.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// e^x for x <= 88, 0 below -87 (e^-87 = 1.6e-38 is next to the smallest normal float): Cephes' expf (range
// reduction by ln 2, degree-6 polynomial; at most 8e-8 relative error, measured on [-87, 88]). std::exp is a
// scalar libm call (~10 ns); this vectorises (~1 ns per 4 lanes) because every select is on integers: without
// -fno-trapping-math, GCC keeps float comparisons and the arithmetic they guard in branches.
inline float exp_vectorizable(float x) {
  constexpr float kLowest = -87.0f;
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const uint32_t x_bits = bits_of(x);
  // As unsigned integers, negative floats order by magnitude above every positive float: x < -87, -inf included.
  const bool underflows = x_bits > bits_of(kLowest);
  const float clamped = float_of(underflows ? bits_of(kLowest) : x_bits);
  const float n = (clamped * 1.44269504088896341f + kRoundingShift) - kRoundingShift;
  // ln 2 = 0.693359375 - 2.12194440e-4 in two parts, so n * ln 2 is subtracted without rounding error.
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float power_of_two = float_of(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return float_of(bits_of(p * power_of_two) & (underflows ? 0u : ~0u));
}

// multipliers[j] = dropout_scale where dropout keeps (row, first_column + j) of (batch, head), else 0;
// first_column a multiple of 16 (one Philox call per 16 columns).
void dropout_multipliers(const AttentionInputs& in, int64_t batch, int64_t head, int64_t row, int64_t first_column,
                         int64_t columns, float* multipliers) {
  constexpr int64_t kPerCall = philox::kDropoutColumnsPerCall;
  for (int64_t chunk = 0; kPerCall * chunk < columns; ++chunk) {
    const uint32_t keep = philox::dropout_keep_bits(
        philox::attention_dropout_words(in.seed, static_cast<uint32_t>(batch), static_cast<uint32_t>(head),
                                        static_cast<uint32_t>(row),
                                        static_cast<uint32_t>(first_column / kPerCall + chunk)),
        in.dropout_threshold);
    for (int64_t c = 0; c < kPerCall && kPerCall * chunk + c < columns; ++c) {
      multipliers[kPerCall * chunk + c] = (keep >> c) & 1u ? in.dropout_scale : 0.0f;
    }
  }
}

// One head of a [tokens, heads, head_dim] tensor with unit stride along head_dim.
template <typename scalar_t>
struct HeadRows {
  const scalar_t* data;
  int64_t token_stride;

  HeadRows(const at::Tensor& t, int64_t head)
      : data(t.data_ptr<scalar_t>() + head * t.stride(1)), token_stride(t.stride(0)) {}
  const scalar_t* row(int64_t token) const { return data + token * token_stride; }
};

// Whether float_rows reads a [tokens, heads, head_dim] tensor in place: float32 whose token stride the BLAS takes
// as a leading dimension (an expanded tensor's token stride of 0 is not one).
template <typename scalar_t>
bool reads_in_place(int64_t token_stride, int64_t head_dim) {
  return std::is_same_v<scalar_t, float> && token_stride >= head_dim;
}

// `count` rows from `token` on as a row-major float32 matrix with leading dimension *ld: read in place where
// reads_in_place says so (the token stride is the leading dimension), else converted into `buffer`.
template <typename scalar_t>
const float* float_rows(const HeadRows<scalar_t>& rows, int64_t token, int64_t count, int64_t head_dim,
                        float* buffer, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (reads_in_place<scalar_t>(rows.token_stride, head_dim)) {
      *ld = rows.token_stride;
      return rows.row(token);
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* source = rows.row(token + i);
    for (int64_t d = 0; d < head_dim; ++d) buffer[i * head_dim + d] = static_cast<float>(source[d]);
  }
  *ld = head_dim;
  return buffer;
}

// transposed[d, i] = rows[token + i, d] as float32, leading dimension ld.
template <typename scalar_t>
void transposed_float_rows_scalar(const HeadRows<scalar_t>& rows, int64_t token, int64_t count, int64_t head_dim,
                                  float* transposed, int64_t ld) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* source = rows.row(token + i);
    for (int64_t d = 0; d < head_dim; ++d) transposed[d * ld + i] = static_cast<float>(source[d]);
  }
}

template <typename scalar_t>
void store_rows(const float* source, int64_t count, int64_t head_dim, float scale, scalar_t* destination,
                int64_t destination_stride) {
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t d = 0; d < head_dim; ++d) {
      destination[i * destination_stride + d] = static_cast<scalar_t>(source[i * head_dim + d] * scale);
    }
  }
}

// Sequences must lie inside the tokens and fit max_seqlen, which sizes the loops (the shared checks do not read
// starts and seqlens, which live on the GPU for the CUDA kernels).
void check_cpu_dtype(const char* op, const at::Tensor& q) {
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": the CPU kernel takes float32, bfloat16 or float16, got ", dtype);
}

int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

// The padded layout's padding tokens (b * max_seqlen + seqlens[b] .. (b + 1) * max_seqlen - 1) of an output
// allocated uninitialised (attention_output), contiguous and viewed as [outer, tokens, inner], set to zero: the
// CPU kernels write the sequences' rows only.
void zero_padding_tokens(const AttentionInputs& in, at::Tensor& t, int64_t outer) {
  if (!in.padded_layout) return;
  const int64_t tokens = in.q.size(0), inner_bytes = t.numel() / (outer * tokens) * t.element_size();
  const int32_t* lengths = in.seqlens.data_ptr<int32_t>();
  char* base = static_cast<char*>(t.data_ptr());
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t b = 0; b < in.batch; ++b) {
      const int64_t first = b * in.max_seqlen + lengths[b];
      std::memset(base + (o * tokens + first) * inner_bytes, 0, (in.max_seqlen - lengths[b]) * inner_bytes);
    }
  }
}

namespace portable {
#include "cpu/attention_cpu_kernels.h"
}  // namespace portable

#if ELECTRA_EXT_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define ELECTRA_EXT_CPU_AVX2_BODY
#include "cpu/attention_cpu_kernels.h"
#undef ELECTRA_EXT_CPU_AVX2_BODY
}  // namespace avx2
#pragma GCC pop_options
#endif

template <typename scalar_t>
void attention_forward(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
#if ELECTRA_EXT_CPU_AVX2
  if (cpu_isa::use_avx2()) return avx2::attention_forward_kernel<scalar_t>(in, out, lse);
#endif
  portable::attention_forward_kernel<scalar_t>(in, out, lse);
}

template <typename scalar_t>
void attention_backward(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                        const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
#if ELECTRA_EXT_CPU_AVX2
  if (cpu_isa::use_avx2()) {
    return avx2::attention_backward_kernel<scalar_t>(in, grad_out, out, lse, grad_q, grad_k, grad_v);
  }
#endif
  portable::attention_backward_kernel<scalar_t>(in, grad_out, out, lse, grad_q, grad_k, grad_v);
}

std::tuple<at::Tensor, at::Tensor> attention_aten(const at::Tensor& q, const c10::optional<at::Tensor>& k,
                                                  const c10::optional<at::Tensor>& v,
                                                  const c10::optional<at::Tensor>& starts,
                                                  const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen,
                                                  double dropout_p, double softmax_scale,
                                                  const c10::optional<at::Tensor>& seed) {
  constexpr const char* op = "attention";
  AttentionInputs in =
      prepare_attention_inputs(op, q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  check_cpu_dtype(op, in.q);
  make_layout_explicit(in);
  at::Tensor out = attention_output(in, in.q.sizes(), in.q.options());
  at::Tensor lse = attention_output(in, {in.q.size(1), in.q.size(0)}, in.q.options().dtype(at::kFloat));
  if (in.q.size(0) == 0 || in.batch == 0 || in.max_seqlen == 0) return {caller_rows(in, out), lse};
  AT_DISPATCH_SWITCH(in.q.scalar_type(), "attention_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { attention_forward<scalar_t>(in, out, lse); })
                         AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(
                             [&] { attention_forward<scalar_t>(in, out, lse); }));
  zero_padding_tokens(in, out, 1);
  zero_padding_tokens(in, lse, in.q.size(1));
  return {caller_rows(in, out), lse};
}

at::Tensor attention_backward_aten(
    const at::Tensor& grad_out_in, const at::Tensor& q, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v,
    const at::Tensor& out, const at::Tensor& lse_in, const c10::optional<at::Tensor>& starts,
    const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen, double dropout_p, double softmax_scale,
    const c10::optional<at::Tensor>& seed) {
  constexpr const char* op = "attention_backward";
  AttentionInputs in =
      prepare_attention_inputs(op, q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  const auto [grad_out_rows, out_rows] = attention_backward_rows(op, in, grad_out_in, out, lse_in);
  check_cpu_dtype(op, in.q);
  make_layout_explicit(in);
  const at::Tensor grad_out = unit_last_stride(grad_out_rows);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor out_contiguous = unit_last_stride(out_rows);
  at::Tensor grad_qkv = attention_grad_qkv(in);
  if (in.q.size(0) == 0 || in.batch == 0 || in.max_seqlen == 0) return caller_rows(in, grad_qkv);
  at::Tensor grad_q = grad_qkv.select(1, 0), grad_k = grad_qkv.select(1, 1), grad_v = grad_qkv.select(1, 2);
#define ELECTRA_ATTENTION_BACKWARD_KERNEL \
  [&] { attention_backward<scalar_t>(in, grad_out, out_contiguous, lse, grad_q, grad_k, grad_v); }
  AT_DISPATCH_SWITCH(in.q.scalar_type(), "attention_backward_cpu",
                     AT_DISPATCH_CASE(at::kFloat, ELECTRA_ATTENTION_BACKWARD_KERNEL)
                         AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(ELECTRA_ATTENTION_BACKWARD_KERNEL));
#undef ELECTRA_ATTENTION_BACKWARD_KERNEL
  zero_padding_tokens(in, grad_qkv, 1);
  return caller_rows(in, grad_qkv);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& k,
                                                 const c10::optional<at::Tensor>& v,
                                                 const c10::optional<at::Tensor>& starts,
                                                 const c10::optional<at::Tensor>& seqlens,
                                                 int64_t max_seqlen, double dropout_p, double softmax_scale,
                                                 const c10::optional<at::Tensor>& seed, bool emulated) {
  if (!emulated) return attention_aten(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  ELECTRA_EXT_EMULATED("attention",
                       attention_emulated(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed));
}

at::Tensor attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& starts, const c10::optional<at::Tensor>& seqlens,
    int64_t max_seqlen, double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed, bool emulated) {
  if (!emulated) {
    return attention_backward_aten(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen, dropout_p,
                                   softmax_scale, seed);
  }
  ELECTRA_EXT_EMULATED("attention_backward",
                       attention_backward_emulated(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen,
                                                   dropout_p, softmax_scale, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace electra_ext
