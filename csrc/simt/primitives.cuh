// Tensor-core, asynchronous-copy and reduction primitives. Device code uses these wrappers, never inline PTX:
// under nvcc each one is the PTX instruction (sm_80 and newer); under the SIMT emulation it computes what the
// PTX ISA specifies, fragment layouts included, so a kernel that misreads a layout is wrong on the CPU too.
// tests/native/test_primitives.cu checks each against a direct computation, emulated in CI and on a GPU in
// benchmarks/gpu_check.sh (which is what proves emulation and hardware agree).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), per lane:
// group = lane / 4, pair = lane % 4; a 32-bit register holds two 16-bit elements, the lower index in the lower
// half. A (16x16, row-major) a[0..3] = elements i = 0..7: row group + 8 * ((i / 2) % 2), column
// 2 * pair + i % 2 + 8 * (i / 4). B (16x8, k x n) b[0..1] = elements i = 0..3: k = 2 * pair + i % 2 +
// 8 * (i / 2), n = group. C and D (16x8 fp32) i = 0..3: row group + 8 * (i / 2), column 2 * pair + i % 2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt/simt.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "electra_ext's tensor-core and cp.async primitives need sm_80 or newer"
#endif

namespace electra_ext::ELECTRA_BACKEND {

// Two 16-bit values (bf16 or fp16) in one register, `low` in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T low, T high) {
  uint16_t low_bits, high_bits;
  std::memcpy(&low_bits, &low, 2);
  std::memcpy(&high_bits, &high, 2);
  return uint32_t(low_bits) | (uint32_t(high_bits) << 16);
}

template <typename T>
__device__ __forceinline__ T pair_element(uint32_t pair, int index) {
  const uint16_t bits = static_cast<uint16_t>(pair >> (16 * index));
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, 2);
  return value;
}

__host__ __device__ __forceinline__ float element_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float element_to_float(__half v) { return __half2float(v); }

#if defined(__CUDACC__)

// D = A * B + C for the warp: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16 inputs");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: lanes 8m..8m+7 give the 16-byte rows of matrix m;
// lane l receives, per matrix, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (of the transpose with .trans).
template <int kMatrices, bool kTranspose>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t address = shared_address(row);
  if constexpr (kMatrices == 1 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address) : "memory");
  } else if constexpr (kMatrices == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(address) : "memory");
  } else if constexpr (kMatrices == 2 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
  } else if constexpr (kMatrices == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
  } else if constexpr (!kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// stmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (sm_90), ldmatrix's inverse: r[m] holds, per lane, row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m (an mma C fragment's pair, packed as 16-bit values);
// lanes 8m..8m+7 give the 16-byte rows of matrix m, which receive its rows (its columns with .trans).
template <int kMatrices, bool kTranspose>
__device__ __forceinline__ void stmatrix(const uint32_t (&r)[kMatrices], void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "stmatrix stores 1, 2 or 4 matrices");
  const uint32_t address = shared_address(row);
  if constexpr (kMatrices == 1 && !kTranspose) {
    asm volatile("stmatrix.sync.aligned.m8n8.x1.shared.b16 [%0], {%1};\n" ::"r"(address), "r"(r[0]) : "memory");
  } else if constexpr (kMatrices == 1) {
    asm volatile("stmatrix.sync.aligned.m8n8.x1.trans.shared.b16 [%0], {%1};\n" ::"r"(address), "r"(r[0])
                 : "memory");
  } else if constexpr (kMatrices == 2 && !kTranspose) {
    asm volatile("stmatrix.sync.aligned.m8n8.x2.shared.b16 [%0], {%1, %2};\n" ::"r"(address), "r"(r[0]), "r"(r[1])
                 : "memory");
  } else if constexpr (kMatrices == 2) {
    asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};\n" ::"r"(address), "r"(r[0]),
                 "r"(r[1])
                 : "memory");
  } else if constexpr (!kTranspose) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
  } else {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
                 "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
  }
}
#endif

// 16 bytes global -> shared without passing through registers (cp.async.cg: cached in L2 only). Both
// addresses 16-byte aligned. The copy is complete only after cp_async_commit and a cp_async_wait that covers
// its group, and visible to other threads only after a __syncthreads as well.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared)), "l"(global) : "memory");
}

// As cp_async_16 when `copy`; otherwise writes 16 zero bytes and reads nothing (for tiles past the end).
__device__ __forceinline__ void cp_async_16_or_zero(void* shared, const void* global, bool copy) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(copy ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 2^x as the one MUFU.EX2 instruction: ex2.approx.ftz.f32 (2 ulp, like exp2f), subnormal inputs and results
// flushed to zero, 2^-inf = +0. exp2f is ex2.approx.f32 without .ftz, for which ptxas brackets MUFU.EX2 with a
// compare and two predicated multiplies to keep subnormal results: 3 FP32 instructions per call that a softmax,
// whose subnormal probabilities round to nothing next to the row's largest (1), does not need.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// address[0] += x and address[1] += y in global memory, each atomically, no result returned (8-byte aligned
// address). sm_90: one vector reduction, red.global.add.v2.f32; before sm_90, two scalar atomicAdd (which ptxas
// emits as RED when the result is unused).
__device__ __forceinline__ void red_add_f32x2(float* address, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(address), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(address, x);
  atomicAdd(address + 1, y);
#endif
}

#else  // the SIMT emulation

// Writes one lane's A fragment (a[0..3] of mma.m16n8k16, the layout in this file's header) into the 16 x 16 A.
template <typename T>
void place_a_fragment(const uint32_t (&a)[4], int lane, float (&A)[16][16]) {
  const int group = lane / 4, pair = lane % 4;
  for (int i = 0; i < 8; ++i) {
    A[group + 8 * ((i / 2) % 2)][2 * pair + i % 2 + 8 * (i / 4)] = element_to_float(pair_element<T>(a[i / 2], i % 2));
  }
}

// Each lane reads, from the gathered fragments, only the two rows of A and two columns of B that its four
// results take (64 conversions instead of the whole 16 x 16 A and 16 x 8 B: this is most of an emulated kernel's
// time); C's elements are its own.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16 inputs");
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  };
  const Fragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  Fragments lanes[::simt::kWarpSize];
  ::simt::warp_gather(&mine, lanes, sizeof(Fragments));
  const int group = ::simt::lane_id() / 4, pair = ::simt::lane_id() % 4;
  // A row group + 8 h, column k: lane 4 group + (k % 8) / 2, element 2 h + k % 2 + 4 (k / 8).
  // B row k, column 2 pair + j: lane 4 (2 pair + j) + (k % 8) / 2, element k % 2 + 2 (k / 8).
  float a_rows[2][16], b_columns[2][16];
  for (int k = 0; k < 16; ++k) {
    const int lane_in_group = (k % 8) / 2;
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * h + k % 2 + 4 * (k / 8);
      a_rows[h][k] = element_to_float(pair_element<T>(lanes[4 * group + lane_in_group].a[i / 2], i % 2));
    }
    for (int j = 0; j < 2; ++j) {
      const int i = k % 2 + 2 * (k / 8);
      b_columns[j][k] = element_to_float(pair_element<T>(lanes[4 * (2 * pair + j) + lane_in_group].b[i / 2], i % 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += a_rows[i / 2][k] * b_columns[i % 2][k];
    d[i] = sum;
  }
}

template <int kMatrices, bool kTranspose>
void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) ::simt::fail("ldmatrix: a row address is not 16-byte aligned");
  const void* rows[::simt::kWarpSize];
  ::simt::warp_gather(&row, rows, sizeof(row));
  const int lane = ::simt::lane_id();
  auto element = [&](int matrix, int r, int c) {
    uint16_t value;
    std::memcpy(&value, static_cast<const unsigned char*>(rows[8 * matrix + r]) + 2 * c, 2);
    return uint32_t(value);
  };
  for (int m = 0; m < kMatrices; ++m) {
    const int out_row = lane / 4, out_column = 2 * (lane % 4);
    if constexpr (kTranspose) {  // element (r, c) of the result is element (c, r) of the matrix
      r[m] = element(m, out_column, out_row) | (element(m, out_column + 1, out_row) << 16);
    } else {
      r[m] = element(m, out_row, out_column) | (element(m, out_row, out_column + 1) << 16);
    }
  }
}

template <int kMatrices, bool kTranspose>
void stmatrix(const uint32_t (&r)[kMatrices], void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "stmatrix stores 1, 2 or 4 matrices");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) ::simt::fail("stmatrix: a row address is not 16-byte aligned");
  uint32_t registers[::simt::kWarpSize][kMatrices];
  ::simt::warp_gather(r, registers, sizeof(r));
  const int lane = ::simt::lane_id();
  if (lane >= 8 * kMatrices) return;  // lanes past the matrices give no row
  const int m = lane / 8, stored_row = lane % 8;
  // Element (i, j) of matrix m sits with lane 4 i + j / 2, in the lower half for even j.
  auto element = [&](int i, int j) { return static_cast<uint16_t>(registers[4 * i + j / 2][m] >> (16 * (j % 2))); };
  uint16_t values[8];
  for (int c = 0; c < 8; ++c) values[c] = kTranspose ? element(c, stored_row) : element(stored_row, c);
  std::memcpy(row, values, sizeof(values));
  ::simt::note_generic_shared_write(row, sizeof(values));
}

// Each copy is made by the cp_async_wait that covers its group, the latest moment the PTX ISA allows, so that a
// kernel that reads a tile before waiting for it (or waits for too few groups) reads the tile's old bytes.
inline void check_copy_alignment(const void* shared, const void* global) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 || reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    ::simt::fail("cp.async: an address is not 16-byte aligned");
  }
}
inline void cp_async_16(void* shared, const void* global) {
  check_copy_alignment(shared, global);
  ::simt::async_issue(::simt::AsyncKind::kCpAsync, [shared, global] {
    std::memcpy(shared, global, 16);
    ::simt::note_generic_shared_write(shared, 16);
  });
}
inline void cp_async_16_or_zero(void* shared, const void* global, bool copy) {
  if (copy) {
    cp_async_16(shared, global);
    return;
  }
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0) ::simt::fail("cp.async: an address is not 16-byte aligned");
  ::simt::async_issue(::simt::AsyncKind::kCpAsync, [shared] {
    std::memset(shared, 0, 16);
    ::simt::note_generic_shared_write(shared, 16);
  });
}
inline void cp_async_commit() { ::simt::async_commit_group(::simt::AsyncKind::kCpAsync); }
template <int kPending>
void cp_async_wait() {
  ::simt::async_wait_group(::simt::AsyncKind::kCpAsync, kPending);
}

inline void red_add_f32x2(float* address, float x, float y) {
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0) ::simt::fail("red.global.add.v2.f32: address not 8-byte aligned");
  atomicAdd(address, x);
  atomicAdd(address + 1, y);
}

// Exact rounding instead of the hardware's 2 ulp; the flushes as on the GPU.
inline float exp2_ftz(float x) {
  const float y = std::exp2(std::fpclassify(x) == FP_SUBNORMAL ? 0.0f : x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

#endif

}  // namespace electra_ext::ELECTRA_BACKEND
