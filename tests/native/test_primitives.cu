// Self-tests of the tensor-core and async-copy primitives (csrc/simt/primitives.cuh, warpgroup_mma.cuh,
// bulk_reduce.cuh), each
// against a direct computation on the host. The same source runs on a GPU (built by nvcc: target
// test_primitives_cuda, run by benchmarks/gpu_check.sh) and under the SIMT emulation (test_primitives_emulated.cpp,
// in every CI run): the pair proves that the emulation computes what the hardware does.
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#if !defined(__CUDACC__)
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "simt/bulk_reduce.cuh"
#include "simt/primitives.cuh"
#include "simt/warpgroup_mma.cuh"

namespace electra_ext::ELECTRA_BACKEND::primitive_tests {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

template <typename T>
T from_float(float v);
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__half from_float<__half>(float v) { return __float2half_rn(v); }

// A device buffer holding a copy of `host`, freed with the object.
template <typename T>
struct DeviceBuffer {
  explicit DeviceBuffer(const std::vector<T>& host) : size(host.size()), data(device_alloc<T>(host.size())) {
    copy_to_device(data, host.data(), size * sizeof(T));
  }
  ~DeviceBuffer() { device_free(data); }
  std::vector<T> to_host() const {
    std::vector<T> host(size);
    copy_to_host(host.data(), data, size * sizeof(T));
    return host;
  }
  size_t size;
  T* data;
};

// One warp: fragments gathered from row-major A [16][16], B [16][8] (k x n) and C [16][8] by the documented
// layout, D = A B + C scattered back by the same layout.
template <typename T>
__global__ void mma_from_global_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, group = lane / 4, pair = lane % 4;
  uint32_t a_frag[4], b_frag[2];
  float c_frag[4], d_frag[4];
  for (int r = 0; r < 4; ++r) {
    const int i = 2 * r;
    const int row = group + 8 * ((i / 2) % 2), column = 2 * pair + 8 * (i / 4);
    a_frag[r] = pack_pair(a[row * 16 + column], a[row * 16 + column + 1]);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * pair + 8 * r;
    b_frag[r] = pack_pair(b[k * 8 + group], b[(k + 1) * 8 + group]);
  }
  for (int i = 0; i < 4; ++i) c_frag[i] = c[(group + 8 * (i / 2)) * 8 + 2 * pair + i % 2];
  mma_m16n8k16<T>(d_frag, a_frag, b_frag, c_frag);
  for (int i = 0; i < 4; ++i) d[(group + 8 * (i / 2)) * 8 + 2 * pair + i % 2] = d_frag[i];
}

// The canonical use: A and B staged in shared memory, fragments loaded with ldmatrix (x4 for A; x2.trans for
// B, which is stored k-major), then the mma.
template <typename T>
__global__ void mma_from_ldmatrix_kernel(const T* a, const T* b, const float* c, float* d) {
  alignas(16) __shared__ T a_tile[16 * 16];
  alignas(16) __shared__ T b_tile[16 * 8];
  const int lane = threadIdx.x, group = lane / 4, pair = lane % 4;
  for (int i = lane; i < 16 * 16; i += 32) a_tile[i] = a[i];
  for (int i = lane; i < 16 * 8; i += 32) b_tile[i] = b[i];
  __syncthreads();
  uint32_t a_frag[4], b_frag[2];
  ldmatrix<4, false>(a_frag, &a_tile[(lane % 16) * 16 + (lane / 16) * 8]);
  ldmatrix<2, true>(b_frag, &b_tile[(lane % 16) * 8]);
  float c_frag[4], d_frag[4];
  for (int i = 0; i < 4; ++i) c_frag[i] = c[(group + 8 * (i / 2)) * 8 + 2 * pair + i % 2];
  mma_m16n8k16<T>(d_frag, a_frag, b_frag, c_frag);
  for (int i = 0; i < 4; ++i) d[(group + 8 * (i / 2)) * 8 + 2 * pair + i % 2] = d_frag[i];
}

template <typename T>
void test_mma(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<T> a(16 * 16), b(16 * 8);
  std::vector<float> c(16 * 8);
  for (T& v : a) v = from_float<T>(normal(rng));
  for (T& v : b) v = from_float<T>(normal(rng));
  for (float& v : c) v = normal(rng);
  std::vector<double> expected(16 * 8);
  for (int row = 0; row < 16; ++row) {
    for (int n = 0; n < 8; ++n) {
      double sum = c[row * 8 + n];
      for (int k = 0; k < 16; ++k) sum += double(element_to_float(a[row * 16 + k])) * element_to_float(b[k * 8 + n]);
      expected[row * 8 + n] = sum;
    }
  }
  const DeviceBuffer<T> a_device(a), b_device(b);
  const DeviceBuffer<float> c_device(c);
  for (int via_ldmatrix = 0; via_ldmatrix < 2; ++via_ldmatrix) {
    DeviceBuffer<float> d_device(std::vector<float>(16 * 8, NAN));
    launch_kernel(via_ldmatrix ? mma_from_ldmatrix_kernel<T> : mma_from_global_kernel<T>, 1, 32, 0, nullptr,
                  a_device.data, b_device.data, c_device.data, d_device.data);
    check_launch("mma kernel");
    const std::vector<float> d = d_device.to_host();
    double worst = 0;
    for (size_t i = 0; i < d.size(); ++i) {
      // Products of 8-bit (bf16) or 11-bit (fp16) significands are exact in fp32; only the fp32 sums round.
      worst = std::fmax(worst, std::fabs(d[i] - expected[i]) / (1.0 + std::fabs(expected[i])));
    }
    expect(worst < 1e-5, via_ldmatrix ? "mma.m16n8k16 with ldmatrix-loaded fragments equals A B + C"
                                      : "mma.m16n8k16 under the documented fragment layout equals A B + C");
  }
}

// Four 8x8 matrices of 16-bit ids (matrix m, row r, column c -> 256 m + 16 r + c) in shared memory; lane l
// points at row l % 8 of matrix l / 8 and keeps the raw registers.
template <int kMatrices, bool kTranspose>
__global__ void ldmatrix_kernel(uint32_t* out) {
  alignas(16) __shared__ uint16_t tile[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) tile[i] = static_cast<uint16_t>(256 * (i / 64) + 16 * ((i % 64) / 8) + i % 8);
  __syncthreads();
  uint32_t r[kMatrices];
  ldmatrix<kMatrices, kTranspose>(r, &tile[(lane / 8) * 64 + (lane % 8) * 8]);
  for (int m = 0; m < kMatrices; ++m) out[lane * kMatrices + m] = r[m];
}

template <int kMatrices, bool kTranspose>
void test_ldmatrix(const char* what) {
  DeviceBuffer<uint32_t> out_device(std::vector<uint32_t>(32 * kMatrices, 0));
  launch_kernel(ldmatrix_kernel<kMatrices, kTranspose>, 1, 32, 0, nullptr, out_device.data);
  check_launch(what);
  const std::vector<uint32_t> out = out_device.to_host();
  bool ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    for (int m = 0; m < kMatrices; ++m) {
      const int row = lane / 4, column = 2 * (lane % 4);
      auto id = [&](int r, int c) { return uint32_t(256 * m + 16 * (kTranspose ? c : r) + (kTranspose ? r : c)); };
      ok = ok && out[lane * kMatrices + m] == (id(row, column) | (id(row, column + 1) << 16));
    }
  }
  expect(ok, what);
}

// ldmatrix's inverse: lane l holds the C-fragment pairs of matrices 0..kMatrices-1 built from the same ids, and
// points at row l % 8 of matrix l / 8 of a shared tile whose every element starts as 0xFFFF; the tile comes back
// whole, so rows the instruction should not write show too.
template <int kMatrices, bool kTranspose>
__global__ void stmatrix_kernel(uint16_t* out) {
#if ELECTRA_WGMMA_AVAILABLE  // stmatrix is sm_90; CMake builds this test for 90a where it builds for 90
  alignas(16) __shared__ uint16_t tile[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) tile[i] = 0xFFFF;
  __syncwarp();
  uint32_t r[kMatrices];
  for (int m = 0; m < kMatrices; ++m) {
    const uint32_t id = 256 * m + 16 * (lane / 4) + 2 * (lane % 4);
    r[m] = id | ((id + 1) << 16);
  }
  stmatrix<kMatrices, kTranspose>(r, &tile[(lane / 8) * 64 + (lane % 8) * 8]);
  __syncwarp();
  for (int i = lane; i < 4 * 64; i += 32) out[i] = tile[i];
#else
  out[threadIdx.x] = 0x1234;  // a build without sm_90a: the test fails
#endif
}

template <int kMatrices, bool kTranspose>
void test_stmatrix(const char* what) {
  DeviceBuffer<uint16_t> out_device(std::vector<uint16_t>(4 * 64, 0));
  launch_kernel(stmatrix_kernel<kMatrices, kTranspose>, 1, 32, 0, nullptr, out_device.data);
  check_launch(what);
  const std::vector<uint16_t> out = out_device.to_host();
  bool ok = true;
  for (int i = 0; i < 4 * 64; ++i) {
    const int m = i / 64, row = (i % 64) / 8, column = i % 8;
    const int expected = m >= kMatrices ? 0xFFFF : 256 * m + (kTranspose ? 16 * column + row : 16 * row + column);
    ok = ok && out[i] == expected;
  }
  expect(ok, what);
}

// 128 threads copy 2 KB (16 bytes each) into shared memory with cp.async, the last quarter zero-filled, then
// write it back reversed by thread, which reads what other threads copied (so the wait and the barrier count).
// kReadBeforeWait (the emulation only): the tile holds 7s before the copies, and is read before the wait.
template <bool kReadBeforeWait = false>
__global__ void cp_async_kernel(const uint4* in, uint4* out, int copied) {
  alignas(16) __shared__ uint4 staged[128];
  const int t = threadIdx.x;
  if constexpr (kReadBeforeWait) {
    staged[t] = uint4{7, 7, 7, 7};
    __syncthreads();
  }
  cp_async_16_or_zero(&staged[t], &in[t < copied ? t : 0], t < copied);
  cp_async_commit();
  if constexpr (!kReadBeforeWait) cp_async_wait<0>();
  __syncthreads();
  out[t] = staged[127 - t];
  if constexpr (kReadBeforeWait) {
    __syncthreads();  // every read before any thread's wait
    cp_async_wait<0>();
  }
}

void test_cp_async(std::mt19937& rng) {
  std::vector<uint4> in(128);
  for (uint4& v : in) v = uint4{uint32_t(rng()), uint32_t(rng()), uint32_t(rng()), uint32_t(rng())};
  const DeviceBuffer<uint4> in_device(in);
  DeviceBuffer<uint4> out_device(std::vector<uint4>(128, uint4{1, 1, 1, 1}));
  const int copied = 96;
  launch_kernel(cp_async_kernel<>, 1, 128, 0, nullptr, in_device.data, out_device.data, copied);
  check_launch("cp.async kernel");
  const std::vector<uint4> out = out_device.to_host();
  bool ok = true;
  for (int t = 0; t < 128; ++t) {
    const int source = 127 - t;
    const uint4 expected = source < copied ? in[source] : uint4{0, 0, 0, 0};
    ok = ok && out[t].x == expected.x && out[t].y == expected.y && out[t].z == expected.z && out[t].w == expected.w;
  }
  expect(ok, "cp.async 16-byte copies and zero fills, after commit, wait and a barrier");
}

__global__ void exp2_ftz_kernel(const float* in, float* out) { out[threadIdx.x] = exp2_ftz(in[threadIdx.x]); }

// Normal results within 4 ulp of exp2 (the ISA's 2 ulp plus rounding, relative 2^-21); results below 2^-126
// and 2^-inf flushed to +0.
void test_exp2_ftz() {
  const std::vector<float> in = {-INFINITY, -150.0f, -127.5f, -126.5f, -125.75f, -60.3f, -17.125f, -1.0f,
                                 -0.3f,     -1e-3f,  0.0f,    0.7f,    1.0f,     5.5f,   20.25f,   100.0f};
  std::vector<float> padded(in);
  padded.resize(32, 0.0f);
  const DeviceBuffer<float> in_device(padded);
  DeviceBuffer<float> out_device(std::vector<float>(32, -1.0f));
  launch_kernel(exp2_ftz_kernel, 1, 32, 0, nullptr, in_device.data, out_device.data);
  check_launch("exp2_ftz kernel");
  const std::vector<float> out = out_device.to_host();
  bool ok = true;
  for (size_t i = 0; i < in.size(); ++i) {
    const double exact = std::exp2(double(in[i]));
    if (exact < std::ldexp(1.0, -126)) {
      ok = ok && out[i] == 0.0f && !std::signbit(out[i]);
    } else {
      ok = ok && std::fabs(out[i] - exact) <= exact * std::ldexp(1.0, -21);
    }
  }
  expect(ok, "ex2.approx.ftz: within 4 ulp, subnormal results and 2^-inf flushed to +0");
}

// 4 blocks of 128 threads add (thread + 1, -(2 block + 1)) to float pair thread % 16 of 16: 32 additions per
// pair from threads of every block, all exact in float32, so any lost update shows.
__global__ void red_add_kernel(float* pairs) {
  red_add_f32x2(pairs + 2 * (threadIdx.x % 16), float(threadIdx.x + 1), -float(2 * blockIdx.x + 1));
}

void test_red_add() {
  DeviceBuffer<float> pairs_device(std::vector<float>(32, 0.5f));
  launch_kernel(red_add_kernel, 4, 128, 0, nullptr, pairs_device.data);
  check_launch("red.add kernel");
  const std::vector<float> pairs = pairs_device.to_host();
  bool ok = true;
  for (int p = 0; p < 16; ++p) {
    double first = 0.5;
    for (int t = p; t < 128; t += 16) first += 4 * (t + 1);  // each block adds thread t + 1 once
    ok = ok && pairs[2 * p] == first && pairs[2 * p + 1] == 0.5f - 8 * (1 + 3 + 5 + 7);
  }
  expect(ok, "red.global.add.v2.f32: every block's and thread's pair added, none lost");
}

// One warpgroup, four k steps (K = 64) of 64 x N products, from the tiles kernels use. A comes from shared memory
// as a K-major 128-byte-swizzled tile [64 x 64], each k step's descriptor 32 bytes further along the rows, or from
// registers as mma A fragments built from global memory by the documented layout. B is either
// - K-major: B^T [N x 64] (row n holds column n of B), a tile like A's (the S = Q K^T of attention), or
// - MN-major: B [64 x N], each k step 16 rows further (O = P V with A from registers; the backward's dQ = dS K
//   with A from shared memory).
// d = A B + c when `accumulate` (scale-d 1 from the first step), else A B (scale-d 0 first).
// What a wgmma_kernel gets wrong, for the emulation's ordering checks (a GPU would race instead): no fence, no
// commit, no wait, a write of the accumulators or of the A fragment, or a read of the accumulators, while the
// wgmma are in flight; the barrier that publishes the shared tiles after the issue instead of before it; no proxy
// fence between the tiles' cp.async copies and the wgmma that read them; or one warp giving a wgmma of the
// warpgroup another B descriptor.
enum class OrderingMistake {
  kNone, kNoFence, kNoCommit, kNoWait, kWriteAccumulators, kWriteFragment, kReadEarly, kBarrierAfterIssue,
  kNoProxyFence, kDescriptorPerWarp
};

template <typename T, int N, bool kAFromRegisters, Major kBMajor, OrderingMistake kMistake = OrderingMistake::kNone>
__global__ void wgmma_kernel(const T* a, const T* b, const float* c, float* d, bool accumulate) {
#if ELECTRA_WGMMA_AVAILABLE
  using ATile = SwizzledTile<64, 64>;
  constexpr bool kBMnMajor = kBMajor == Major::MN;
  using BTile = std::conditional_t<kBMnMajor, SwizzledTile<64, N>, SwizzledTile<N, 64>>;
  constexpr int kBRows = kBMnMajor ? 64 : N, kBCols = kBMnMajor ? N : 64;
  alignas(1024) __shared__ unsigned char a_tile[ATile::kBytes];
  alignas(1024) __shared__ unsigned char b_tile[BTile::kBytes];
  const int thread = threadIdx.x, warp = thread / 32, group = (thread % 32) / 4, pair = thread % 4;
  // The tiles arrive by cp.async as the kernels' do, 8 elements (one 16-byte swizzle chunk) a copy.
  for (int i = thread; i < 64 * 64 / 8; i += 128) cp_async_16(a_tile + ATile::offset(i / 8, i % 8 * 8), &a[8 * i]);
  for (int i = thread; i < kBRows * kBCols / 8; i += 128) {
    cp_async_16(b_tile + BTile::offset(i / (kBCols / 8), i % (kBCols / 8) * 8), &b[8 * i]);
  }
  cp_async_commit();
  uint32_t fragments[4][4];
  for (int step = 0; step < 4; ++step) {
    for (int r = 0; r < 4; ++r) {
      const int row = 16 * warp + group + 8 * (r % 2), column = 16 * step + 2 * pair + 8 * (r / 2);
      fragments[step][r] = pack_pair(a[row * 64 + column], a[row * 64 + column + 1]);
    }
  }
  float acc[N / 8][4];
  auto d_index = [&](int j, int i) { return (16 * warp + group + 8 * (i / 2)) * N + 8 * j + 2 * pair + i % 2; };
  for (int j = 0; j < N / 8; ++j) {
    for (int i = 0; i < 4; ++i) acc[j][i] = c[d_index(j, i)];
  }
  cp_async_wait<0>();
  if constexpr (kMistake != OrderingMistake::kNoProxyFence) fence_proxy_async_shared();
  if constexpr (kMistake != OrderingMistake::kBarrierAfterIssue) __syncthreads();
  wgmma_fence_operands(fragments);
  wgmma_fence_operands(acc);
  if constexpr (kMistake != OrderingMistake::kNoFence) wgmma_fence();
  for (int step = 0; step < 4; ++step) {
    const bool add = accumulate || step > 0;
    const int b_k = kMistake == OrderingMistake::kDescriptorPerWarp && warp == 1 ? (step + 1) % 4 : step;
    const WgmmaDescriptor b_step = kBMnMajor ? BTile::mn_major(b_tile, b_k) : BTile::k_major(b_tile, b_k);
    if constexpr (kAFromRegisters) {
      wgmma_rs<T, N, kBMajor>(acc, fragments[step], b_step, add);
    } else {
      wgmma_ss<T, N, kBMajor>(acc, ATile::k_major(a_tile, step), b_step, add);
    }
  }
  auto store = [&] {
    for (int j = 0; j < N / 8; ++j) {
      for (int i = 0; i < 4; ++i) d[d_index(j, i)] = acc[j][i];
    }
  };
  if constexpr (kMistake == OrderingMistake::kReadEarly) store();
  if constexpr (kMistake == OrderingMistake::kWriteAccumulators) acc[0][0] = 0.0f;
  if constexpr (kMistake == OrderingMistake::kWriteFragment) fragments[0][0] ^= 1u;
  if constexpr (kMistake != OrderingMistake::kNoCommit) wgmma_commit_group();
  if constexpr (kMistake == OrderingMistake::kBarrierAfterIssue) __syncthreads();
  if constexpr (kMistake != OrderingMistake::kNoWait) wgmma_wait_group<0>();
  wgmma_fence_operands(acc);
  if constexpr (kMistake != OrderingMistake::kReadEarly) store();
#else
  d[threadIdx.x] = NAN;  // a build without sm_90a: the test fails and says so
#endif
}

template <typename T, int N, bool kAFromRegisters, Major kBMajor>
void test_wgmma(std::mt19937& rng, bool accumulate) {
  const char* const operands = kAFromRegisters        ? "A from registers, B MN-major"
                               : kBMajor == Major::K ? "A and B K-major from shared memory"
                                                     : "A K-major and B MN-major from shared memory";
  const std::string name = "wgmma m64n" + std::to_string(N) + "k16 " +
                           (std::is_same<T, __half>::value ? "fp16, " : "bf16, ") + operands +
                           (kBMajor == Major::MN && N == 128 ? " (2 panels)" : "") +
                           (accumulate ? ", accumulating" : "");
  const char* const what = name.c_str();
  std::normal_distribution<float> normal;
  std::vector<T> a(64 * 64), b(64 * N);
  std::vector<float> c(64 * N);
  for (T& v : a) v = from_float<T>(normal(rng));
  for (T& v : b) v = from_float<T>(normal(rng));
  for (float& v : c) v = normal(rng);
  auto b_at = [&](int k, int n) { return element_to_float(kBMajor == Major::MN ? b[k * N + n] : b[n * 64 + k]); };
  const DeviceBuffer<T> a_device(a), b_device(b);
  const DeviceBuffer<float> c_device(c);
  DeviceBuffer<float> d_device(std::vector<float>(64 * N, NAN));
  launch_kernel(wgmma_kernel<T, N, kAFromRegisters, kBMajor>, 1, 128, 0, nullptr, a_device.data, b_device.data,
                c_device.data, d_device.data, accumulate);
  check_launch(what);
  const std::vector<float> d = d_device.to_host();
  double worst = 0;
  for (int row = 0; row < 64; ++row) {
    for (int n = 0; n < N; ++n) {
      double expected = accumulate ? c[row * N + n] : 0.0;
      for (int k = 0; k < 64; ++k) expected += double(element_to_float(a[row * 64 + k])) * b_at(k, n);
      // NaN (an element not written) fails the comparison below.
      const double error = std::fabs(d[row * N + n] - expected) / (1.0 + std::fabs(expected));
      worst = error == error ? std::fmax(worst, error) : INFINITY;
    }
  }
  // Exact products; 64 float32 additions of terms ~1 (the tensor cores' own accumulation rounding included).
  expect(worst < 2e-4, what);
}

// What a bulk_reduce_kernel gets wrong, for the emulation's checks: no final wait, no commit, or the barrier that
// publishes the source rows after the issue instead of before it.
enum class BulkMistake { kNone, kNoFinalWait, kNoCommit, kBarrierAfterIssue };

// Bulk reductions as the attention backward issues them: rows of 64 floats written to shared memory by the whole
// block, then one reduction per row by 16 threads into the same 16 global rows from every block, twice from one
// shared buffer (rewritten after the first round's reads are waited for). Values are small integers: any lost or
// doubled addition, or a read of the rewritten buffer by the first round, shows exactly.
template <BulkMistake kMistake = BulkMistake::kNone>
__global__ void bulk_reduce_kernel(float* rows) {
#if ELECTRA_WGMMA_AVAILABLE
  constexpr int kRows = 16, kCols = 64;
  alignas(16) __shared__ float source[kRows * kCols];
  for (int round = 0; round < 2; ++round) {
    if (round > 0) {
      bulk_wait_group_read<0>();
      __syncthreads();  // every issuing thread's reads are done before anyone rewrites the rows
    }
    for (int i = threadIdx.x; i < kRows * kCols; i += blockDim.x) {
      source[i] = float((round + 1) * (blockIdx.x + 1) + i % kCols);
    }
    fence_proxy_async_shared();
    if constexpr (kMistake != BulkMistake::kBarrierAfterIssue) __syncthreads();
    if (threadIdx.x < kRows) bulk_reduce_add_f32(rows + threadIdx.x * kCols, source + threadIdx.x * kCols, kCols);
    if constexpr (kMistake != BulkMistake::kNoCommit) bulk_commit_group();
    if constexpr (kMistake == BulkMistake::kBarrierAfterIssue) __syncthreads();
  }
  if constexpr (kMistake != BulkMistake::kNoFinalWait) bulk_wait_group_read<0>();
#else
  rows[threadIdx.x] = NAN;  // a build without sm_90a: the test fails and says so
#endif
}

void test_bulk_reduce() {
  constexpr int kBlocks = 4;
  DeviceBuffer<float> rows_device(std::vector<float>(16 * 64, 0.5f));
  launch_kernel(bulk_reduce_kernel<>, kBlocks, 128, 0, nullptr, rows_device.data);
  check_launch("bulk reduce kernel");
  const std::vector<float> rows = rows_device.to_host();
  bool ok = true;
  for (int i = 0; i < 16 * 64; ++i) {
    // Each block b adds (b + 1) + column, then 2 (b + 1) + column: 3 (1 + 2 + 3 + 4) + 8 column in all.
    ok = ok && rows[i] == 0.5f + 3 * 10 + 2 * kBlocks * (i % 64);
  }
  expect(ok, "cp.reduce.async.bulk.add.f32: every block's rows added once, from the data before the rewrite");
}

#if !defined(__CUDACC__)
// A kernel whose emulated launch must abort (run in a child process).
template <typename Launch>
void expect_abort(Launch launch, const char* what) {
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    std::freopen("/dev/null", "w", stderr);
    launch();
    std::_Exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, what);
}

template <BulkMistake kMistake>
void test_bulk_mistake_is_caught(const char* what) {
  DeviceBuffer<float> rows_device(std::vector<float>(16 * 64, 0.0f));
  expect_abort([&] { launch_kernel(bulk_reduce_kernel<kMistake>, 1, 128, 0, nullptr, rows_device.data); }, what);
}

// Calls run_launch(launch), where launch() launches wgmma_kernel with kMistake on 64 x 64 bf16 ones (A from
// registers where the mistake is about its fragment); returns d.
template <OrderingMistake kMistake, typename RunLaunch>
std::vector<float> run_wgmma_mistake(RunLaunch run_launch) {
  constexpr bool kAFromRegisters = kMistake == OrderingMistake::kWriteFragment;
  constexpr Major kBMajor = kAFromRegisters ? Major::MN : Major::K;
  const std::vector<__nv_bfloat16> a(64 * 64, from_float<__nv_bfloat16>(1.0f));
  const std::vector<float> c(64 * 64, 0.0f);
  const DeviceBuffer<__nv_bfloat16> a_device(a), b_device(a);
  const DeviceBuffer<float> c_device(c);
  DeviceBuffer<float> d_device(c);
  run_launch([&] {
    launch_kernel(wgmma_kernel<__nv_bfloat16, 64, kAFromRegisters, kBMajor, kMistake>, 1, 128, 0, nullptr,
                  a_device.data, b_device.data, c_device.data, d_device.data, false);
  });
  return d_device.to_host();
}

// The emulation stops a kernel that gets the wgmma ordering wrong (in a child process: it aborts).
template <OrderingMistake kMistake>
void test_wgmma_ordering_mistake_is_caught(const char* what) {
  run_wgmma_mistake<kMistake>([&](auto launch) { expect_abort(launch, what); });
}

// A cp.async tile read before its wait holds its old bytes under the emulation (on a GPU, old or new ones).
void test_cp_async_read_before_wait_sees_old_bytes() {
  const DeviceBuffer<uint4> in_device(std::vector<uint4>(128, uint4{1, 2, 3, 4}));
  DeviceBuffer<uint4> out_device(std::vector<uint4>(128, uint4{0, 0, 0, 0}));
  launch_kernel(cp_async_kernel<true>, 1, 128, 0, nullptr, in_device.data, out_device.data, 128);
  check_launch("cp.async kernel reading before its wait");
  const std::vector<uint4> out = out_device.to_host();
  const bool old_bytes = std::all_of(out.begin(), out.end(), [](const uint4& v) {
    return v.x == 7 && v.y == 7 && v.z == 7 && v.w == 7;
  });
  expect(old_bytes, "the emulation makes cp.async copies at the wait");
}

// Accumulators read before the wait are NaN under the emulation (on a GPU, whatever the registers held).
void test_wgmma_early_read_is_nan() {
  const std::vector<float> d = run_wgmma_mistake<OrderingMistake::kReadEarly>([](auto launch) {
    launch();
    check_launch("wgmma kernel reading its accumulators early");
  });
  expect(std::all_of(d.begin(), d.end(), [](float v) { return v != v; }),
         "the emulation's accumulators are NaN between a wgmma's issue and its wait");
}
#endif

// wgmma exists on compute capability 9.0 (H100, H200) only; the emulation runs it everywhere.
bool device_has_wgmma() {
#if defined(__CUDACC__)
  int device = 0, major = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  return major == 9;
#else
  return true;
#endif
}

// test(matrices, transpose, ".x<matrices>[.trans]") for the 1, 2 and 4 matrices of ldmatrix and stmatrix, without
// and with .trans (matrices and transpose as std::integral_constant types).
template <typename Test>
void for_each_matrix_count(Test test) {
  auto both = [&](auto matrices) {
    const std::string shape = ".x" + std::to_string(decltype(matrices)::value);
    test(matrices, std::false_type{}, shape);
    test(matrices, std::true_type{}, shape + ".trans");
  };
  both(std::integral_constant<int, 1>{});
  both(std::integral_constant<int, 2>{});
  both(std::integral_constant<int, 4>{});
}

int run() {
  std::mt19937 rng(0);
  test_mma<__nv_bfloat16>(rng);
  test_mma<__half>(rng);
  for_each_matrix_count([](auto matrices, auto transpose, const std::string& shape) {
    test_ldmatrix<decltype(matrices)::value, decltype(transpose)::value>(("ldmatrix" + shape).c_str());
  });
  test_cp_async(rng);
  test_exp2_ftz();
  test_red_add();
  if (device_has_wgmma()) {
    for (const bool accumulate : {false, true}) {
      test_wgmma<__nv_bfloat16, 64, false, Major::K>(rng, accumulate);
      test_wgmma<__half, 128, false, Major::K>(rng, accumulate);
      test_wgmma<__nv_bfloat16, 64, true, Major::MN>(rng, accumulate);
      test_wgmma<__half, 128, true, Major::MN>(rng, accumulate);
      test_wgmma<__nv_bfloat16, 128, true, Major::MN>(rng, accumulate);
      test_wgmma<__half, 64, false, Major::K>(rng, accumulate);
      test_wgmma<__nv_bfloat16, 64, false, Major::MN>(rng, accumulate);
      test_wgmma<__half, 128, false, Major::MN>(rng, accumulate);
    }
    test_bulk_reduce();
    for_each_matrix_count([](auto matrices, auto transpose, const std::string& shape) {
      test_stmatrix<decltype(matrices)::value, decltype(transpose)::value>(("stmatrix" + shape).c_str());
    });
  } else {
    std::printf("wgmma, bulk reduction and stmatrix self-tests skipped: compute capability 9.0 only\n");
  }
#if !defined(__CUDACC__)
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kNoFence>("the emulation stops a wgmma without a fence");
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kNoCommit>("the emulation stops a wait on uncommitted wgmma");
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kNoWait>("the emulation stops a block that ends with wgmma "
                                                                  "in flight");
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kWriteAccumulators>("the emulation stops a write of the "
                                                                             "accumulators of wgmma in flight");
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kWriteFragment>("the emulation stops a write of the A "
                                                                         "fragment of wgmma in flight");
  // Every warp's tiles are complete at the wait, so only the operands' hash at the issue shows this one.
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kBarrierAfterIssue>("the emulation stops a wgmma issued "
                                                                             "before its tiles' barrier");
  // The card's tensor cores read shared memory through the async proxy; the copies wrote it through the generic one.
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kNoProxyFence>("the emulation stops a wgmma reading "
                                                                         "cp.async copies not fenced for it");
  test_wgmma_ordering_mistake_is_caught<OrderingMistake::kDescriptorPerWarp>("the emulation stops a wgmma whose "
                                                                              "warps give different descriptors");
  test_wgmma_early_read_is_nan();
  test_cp_async_read_before_wait_sees_old_bytes();
  test_bulk_mistake_is_caught<BulkMistake::kNoFinalWait>("the emulation stops a block that ends before its bulk "
                                                         "reductions are waited for");
  test_bulk_mistake_is_caught<BulkMistake::kNoCommit>("the emulation stops a wait on uncommitted bulk reductions");
  test_bulk_mistake_is_caught<BulkMistake::kBarrierAfterIssue>("the emulation stops a bulk reduction issued before "
                                                               "its source rows' barrier");
#endif
  std::printf("%s primitive self-tests: %s, %d failure(s)\n", ELECTRA_BACKEND_NAME,
              failures == 0 ? "passed" : "FAILED", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace electra_ext::ELECTRA_BACKEND::primitive_tests

int main() { return electra_ext::ELECTRA_BACKEND::primitive_tests::run(); }
