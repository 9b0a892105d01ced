// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a only) and the shared-memory tile layout it reads,
// beside the sm_80 primitives of simt/primitives.cuh and under the same rule: device code uses these wrappers,
// never inline PTX; under nvcc each is the PTX instruction, under the SIMT emulation it computes what the PTX ISA
// specifies. tests/native/test_primitives.cu checks each against a direct computation, emulated in CI and on an
// H100/H200 in benchmarks/gpu_check.sh.
//
// Why: mma.sync (HMMA) reaches about two thirds of Hopper's tensor-core rate; FlashAttention-3's 250-290 TFLOP/s
// at head dim 64 need wgmma (HGMMA), which multiplies 64 x N x 16 per instruction for a warpgroup (4 consecutive
// warps, the first warp index a multiple of 4) with B, and optionally A, read by the tensor cores straight from
// shared memory: no ldmatrix, no register traffic for the operands.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix ..."), per thread of the warpgroup: w = warp % 4,
// group = lane / 4, pair = lane % 4.
// - D (64 x N, fp32), N / 2 floats as d[N / 8][4]: d[j][i] is row 16 w + group + 8 (i / 2), column 8 j + 2 pair +
//   i % 2, i.e. warp w holds rows 16 w .. 16 w + 15 as N / 8 mma.m16n8 C fragments side by side.
// - A from registers (64 x 16): warp w holds rows 16 w .. 16 w + 15 as one mma.m16n8k16 A fragment.
// - A and B from shared memory: a 64-bit descriptor (start address, leading and stride byte offsets, swizzle
//   mode, each address >> 4). Only the 128-byte swizzle is used here: a tile is stored as panels of 64 16-bit
//   columns (128-byte rows), 8-row atoms 1024 bytes apart, and the 16-byte chunk c of row r sits at chunk
//   c ^ (r % 8). The swizzle acts on shared-memory address bits (bits 4-6 ^= bits 7-9), so every panel starts
//   at a multiple of 1024 bytes. Either operand is K-major (k contiguous: Q and K for S = Q K^T) or MN-major
//   (m or n contiguous: V for O = P V). A K-major operand's 16 k of one instruction are 32 bytes of a row: the
//   descriptor of k step s starts 32 s bytes into the row and the hardware swizzles the sum. An MN-major
//   operand's 16 k are 16 rows: two 8-row atoms, stride byte offset apart; 64-column panels are the leading
//   byte offset apart.
//
// Ordering (the emulation carries out each wgmma at the wait that covers its group, as the PTX ISA allows, reading
// its shared-memory operands and A fragment then; it fills the accumulators with NaN from the issue of the first
// wgmma on them to that wait, so that an early read shows, and stops a kernel that writes them (a write that
// leaves them NaN, a scaling, is lost instead) or the A fragment meanwhile, issues wgmma without a wgmma_fence()
// since the last wait, waits with wgmma uncommitted or ends with wgmma in flight):
// wgmma_fence() before the first wgmma of a sequence and whenever registers it reads were written since;
// fence_proxy_async_shared() by every thread that wrote an operand tile, before the barrier that publishes it;
// wgmma_commit_group() and wgmma_wait_group<n>() before the accumulators are read or the tiles overwritten; and
// wgmma_fence_operands() on the accumulators and register A fragments before wgmma_fence() and after the wait, so
// that nvcc moves no access to them across the fence or the wait (it sees neither touch those registers).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if !defined(__CUDACC__)
#include <algorithm>
#include <array>
#include <map>
#include <optional>
#include <tuple>
#include <vector>
#endif

#include "simt/primitives.cuh"

// 1 where wgmma exists: nvcc's sm_90a device pass and the emulation. Elsewhere a kernel built on it compiles to
// an empty body, and its launcher must not choose it (it checks compute capability 9.0 and an sm_90a build).
#if !defined(__CUDACC__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ELECTRA_WGMMA_AVAILABLE 1
#else
#define ELECTRA_WGMMA_AVAILABLE 0
#endif

namespace electra_ext::ELECTRA_BACKEND {

// Which dimension of an operand is contiguous in shared memory (the PTX ISA's imm-trans: 0 for K, 1 for MN).
enum class Major : int { K = 0, MN = 1 };

template <typename T>
constexpr bool is_wgmma_type = std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value;

#if defined(__CUDACC__)

struct WgmmaDescriptor {
  uint64_t bits;
};

// The descriptor of the operand whose first element is at `tile + start_bytes` in shared memory, 128-byte swizzle
// (mode 1 in bits 62-63), stride byte offset 1024 (one 8-row atom: next 8 rows of a K-major operand, next 8 k of an
// MN-major one); leading_bytes is the distance between 64-column panels of an MN-major operand (a K-major
// operand's is unused). Kernels take descriptors from SwizzledTile below.
__device__ __forceinline__ WgmmaDescriptor wgmma_descriptor(const void* tile, uint32_t start_bytes,
                                                            uint32_t leading_bytes) {
  const uint64_t address = shared_address(tile) + start_bytes;
  return {((address & 0x3FFFF) >> 4) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
          (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62)};
}

#if ELECTRA_WGMMA_AVAILABLE

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most kPending committed groups of this warpgroup's wgmma are still in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Makes this thread's ordinary (and cp.async) writes to shared memory visible to the tensor cores' reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// No instruction: pins the registers of accumulators (float) or A fragments (uint32_t) in program order here.
template <typename Register, int kTiles>
__device__ __forceinline__ void wgmma_fence_operands(Register (&r)[kTiles][4]) {
  static_assert(std::is_same<Register, float>::value || std::is_same<Register, uint32_t>::value, "fp32 or b32");
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<Register, float>::value) {
        asm volatile("" : "+f"(r[j][i])::"memory");
      } else {
        asm volatile("" : "+r"(r[j][i])::"memory");
      }
    }
  }
}

#define ELECTRA_WGMMA_D4(i) "+f"(d[(i) / 4][0]), "+f"(d[(i) / 4][1]), "+f"(d[(i) / 4][2]), "+f"(d[(i) / 4][3])
#define ELECTRA_WGMMA_D32(i)                                                                               \
  ELECTRA_WGMMA_D4(i), ELECTRA_WGMMA_D4(i + 4), ELECTRA_WGMMA_D4(i + 8), ELECTRA_WGMMA_D4(i + 12),          \
      ELECTRA_WGMMA_D4(i + 16), ELECTRA_WGMMA_D4(i + 20), ELECTRA_WGMMA_D4(i + 24), ELECTRA_WGMMA_D4(i + 28)
#define ELECTRA_WGMMA_REGISTERS_0_31                                                                           \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31"
#define ELECTRA_WGMMA_REGISTERS_32_63                                                                         \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// One wgmma with a predicate `p` = (SCALE_D != 0); OPERANDS is the PTX text between the accumulators and p.
#define ELECTRA_WGMMA_ASM(SHAPE, TYPE, D_REGISTERS, OPERANDS, SCALE_D, IMMEDIATES, ...)                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\nwgmma.mma_async.sync.aligned." SHAPE \
               ".f32." TYPE "." TYPE " {" D_REGISTERS "}, " OPERANDS ", p, 1, 1, " IMMEDIATES ";\n}\n"  \
               : __VA_ARGS__)
// The same for T = bf16 or fp16 (the type is part of the instruction's text).
#define ELECTRA_WGMMA_ASM_FOR_TYPE(T, SHAPE, ...)            \
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {     \
    ELECTRA_WGMMA_ASM(SHAPE, "bf16", __VA_ARGS__);           \
  } else {                                                   \
    ELECTRA_WGMMA_ASM(SHAPE, "f16", __VA_ARGS__);            \
  }

// d (64 x N) = A (64 x 16, K-major, in shared memory) B (16 x N, in shared memory) + (accumulate ? d : 0).
template <typename T, int N, Major kBMajor>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], WgmmaDescriptor a, WgmmaDescriptor b, bool accumulate) {
  static_assert(is_wgmma_type<T>, "bf16 or fp16 operands");
  static_assert(N == 64 || N == 128, "N = 64 or 128");
  const int scale_d = accumulate;
  constexpr int kTransposeB = static_cast<int>(kBMajor);
  if constexpr (N == 64) {
    ELECTRA_WGMMA_ASM_FOR_TYPE(T, "m64n64k16", ELECTRA_WGMMA_REGISTERS_0_31, "%32, %33", "%34", "0, %35",
                               ELECTRA_WGMMA_D32(0) : "l"(a.bits), "l"(b.bits), "r"(scale_d), "n"(kTransposeB));
  } else {
    ELECTRA_WGMMA_ASM_FOR_TYPE(T, "m64n128k16", ELECTRA_WGMMA_REGISTERS_0_31 ", " ELECTRA_WGMMA_REGISTERS_32_63,
                               "%64, %65", "%66", "0, %67",
                               ELECTRA_WGMMA_D32(0), ELECTRA_WGMMA_D32(32) : "l"(a.bits), "l"(b.bits),
                               "r"(scale_d), "n"(kTransposeB));
  }
}


// d (64 x N) = A (64 x 16, from registers: one mma A fragment per warp) B (16 x N, in shared memory)
// + (accumulate ? d : 0).
template <typename T, int N, Major kBMajor>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], WgmmaDescriptor b,
                                         bool accumulate) {
  static_assert(is_wgmma_type<T>, "bf16 or fp16 operands");
  static_assert(N == 64 || N == 128, "N = 64 or 128");
  const int scale_d = accumulate;
  constexpr int kTransposeB = static_cast<int>(kBMajor);
  if constexpr (N == 64) {
    ELECTRA_WGMMA_ASM_FOR_TYPE(T, "m64n64k16", ELECTRA_WGMMA_REGISTERS_0_31, "{%32, %33, %34, %35}, %36", "%37",
                               "%38", ELECTRA_WGMMA_D32(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                               "l"(b.bits), "r"(scale_d), "n"(kTransposeB));
  } else {
    ELECTRA_WGMMA_ASM_FOR_TYPE(T, "m64n128k16", ELECTRA_WGMMA_REGISTERS_0_31 ", " ELECTRA_WGMMA_REGISTERS_32_63,
                               "{%64, %65, %66, %67}, %68", "%69", "%70",
                               ELECTRA_WGMMA_D32(0), ELECTRA_WGMMA_D32(32) : "r"(a[0]), "r"(a[1]), "r"(a[2]),
                               "r"(a[3]), "l"(b.bits), "r"(scale_d), "n"(kTransposeB));
  }
}


#undef ELECTRA_WGMMA_ASM_FOR_TYPE
#undef ELECTRA_WGMMA_ASM
#undef ELECTRA_WGMMA_REGISTERS_32_63
#undef ELECTRA_WGMMA_REGISTERS_0_31
#undef ELECTRA_WGMMA_D32
#undef ELECTRA_WGMMA_D4

#endif  // ELECTRA_WGMMA_AVAILABLE

#else  // the SIMT emulation

// The emulated shared memory is host memory, whose addresses do not fit the descriptor's 18 bits: the emulated
// descriptor keeps the pointer and the one offset that varies.
struct WgmmaDescriptor {
  const unsigned char* start;
  uint32_t leading_bytes;
};

inline WgmmaDescriptor wgmma_descriptor(const void* tile, uint32_t start_bytes, uint32_t leading_bytes) {
  if (leading_bytes % 16 != 0 || leading_bytes >= (1u << 18)) {
    ::simt::fail("wgmma descriptor: the leading byte offset is not a multiple of 16 below 2^18");
  }
  return {static_cast<const unsigned char*>(tile) + start_bytes, leading_bytes};
}

namespace wgmma_emulation {

// Per thread: whether a wgmma_fence() came since the last wait (a wgmma needs one: after the wait the thread reads
// the results, a register access), how many wgmma in flight write each accumulator array, and how many wgmma it
// has issued in the block. On a GPU a missing fence or an early access is a silent race.
struct ThreadState {
  bool fenced = false;
  std::map<const float*, int> in_flight;
  size_t issued = 0;
};
inline ThreadState& thread_state() { return ::simt::thread_state<ThreadState>(); }

// What the threads of a warpgroup must give a wgmma alike (the PTX ISA's wgmma is .sync.aligned: all of them
// issue it, with the same descriptors, shape and scale-d). The emulation computes each warp's rows from that
// warp's own, so a kernel whose warps or lanes differ would compute here what the tensor cores do not.
struct IssueSignature {
  const void* a_start;  // null: A from registers
  uint32_t a_leading_bytes;
  const void* b_start;
  uint32_t b_leading_bytes;
  int n;
  int b_major;
  int accumulate;
  auto fields() const { return std::tie(a_start, a_leading_bytes, b_start, b_leading_bytes, n, b_major, accumulate); }
};
// Per block: the signature of each warpgroup's i-th wgmma, as the first of its threads to issue it gave it.
struct WarpgroupIssues {
  std::map<unsigned, std::vector<IssueSignature>> by_warpgroup;
};

// Each thread compares with the first of its warpgroup to issue: no warp collective, which would let the other
// lanes (and warps) run up to the issue first and hide a tile that arrives after it.
inline void check_warpgroup_uniform(const IssueSignature& mine, unsigned warpgroup) {
  std::vector<IssueSignature>& issues = ::simt::block_state<WarpgroupIssues>().by_warpgroup[warpgroup];
  const size_t ordinal = thread_state().issued++;
  if (issues.size() <= ordinal) issues.push_back(mine);
  if (issues[ordinal].fields() != mine.fields()) {
    ::simt::fail("wgmma: the threads of a warpgroup issued it with different descriptors, N, B major-ness or "
                 "scale-d (it is warpgroup-wide: every thread must give the same)");
  }
}

}  // namespace wgmma_emulation

inline void wgmma_fence() { wgmma_emulation::thread_state().fenced = true; }
inline void wgmma_commit_group() { ::simt::async_commit_group(::simt::AsyncKind::kWgmma); }
template <int kPending>
void wgmma_wait_group() {
  ::simt::async_wait_group(::simt::AsyncKind::kWgmma, kPending);
  wgmma_emulation::thread_state().fenced = false;
}
inline void fence_proxy_async_shared() { ::simt::fence_proxy_async(); }
template <typename Register, int kTiles>
void wgmma_fence_operands(Register (&)[kTiles][4]) {}

namespace wgmma_emulation {

// The address of element (mn, k) of a 16-k operand slice under the 128-byte swizzle, the address arithmetic the
// PTX ISA specifies, swizzled on the address's own bits as the hardware does.
inline const void* element_address(const WgmmaDescriptor& descriptor, Major major, int mn, int k) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(descriptor.start);
  if (start % 16 != 0 || (start / 128) % 8 != 0) {
    ::simt::fail("wgmma descriptor: the start is not in the first row of a 1024-byte-aligned swizzle atom");
  }
  uintptr_t address = start + (major == Major::K ? (mn % 8) * 128 + (mn / 8) * 1024 + k * 2
                                                 : (mn % 64) * 2 + (mn / 64) * descriptor.leading_bytes +
                                                       (k % 8) * 128 + (k / 8) * 1024);
  address ^= ((address >> 7) & 7) << 4;
  return reinterpret_cast<const void*>(address);
}

template <typename T>
float element(const WgmmaDescriptor& descriptor, Major major, int mn, int k) {
  T value;
  std::memcpy(static_cast<void*>(&value), element_address(descriptor, major, mn, k), sizeof(T));
  return element_to_float(value);
}

// A hash (FNV-1a) of the 16-bit elements mn_begin .. mn_end - 1 (all 16 k) of a shared-memory operand slice. At
// the issue (`check_fenced`) it also stops the kernel if one was written by cp.async or stmatrix and not fenced for
// the async proxy since (see simt::check_async_proxy_read).
inline uint64_t operand_hash(uint64_t hash, const WgmmaDescriptor& descriptor, Major major, int mn_begin,
                             int mn_end, bool check_fenced) {
  for (int mn = mn_begin; mn < mn_end; ++mn) {
    for (int k = 0; k < 16; ++k) {
      const void* address = element_address(descriptor, major, mn, k);
      if (check_fenced) ::simt::check_async_proxy_read(address, 2, "wgmma");
      uint16_t bits;
      std::memcpy(&bits, address, sizeof(bits));
      hash = (hash ^ bits) * 1099511628211ull;
    }
  }
  return hash;
}

// Issues d (64 x N) = A B + (accumulate ? d : 0) for this thread, warp w of its warpgroup computing rows 16 w ..
// 16 w + 15: `a_rows(w, rows)` fills those rows of A (16 x 16) when the wait carries the wgmma out. The first
// wgmma in flight on d keeps d's values and fills d with NaN bytes; at the wait it fails if d holds other bytes
// (the kernel wrote it), then puts the values back.
// The hardware reads the shared-memory operands (B, and A when `a_shared` is given) at some moment between the
// issue and the wait, so they must be complete at the issue and unchanged until the wait. The wait carries the
// product out with what is there then, which shows a write while it was in flight; lane 0 of each warp also
// hashes its warp's operands at the issue and fails at the wait if they changed, which shows data that arrived
// after the issue (a barrier missing before it, whose writers ran before the wait); at the issue it also checks
// that no operand bytes written by cp.async or stmatrix still lack their writer's fence_proxy_async_shared().
template <typename T, int N, Major kBMajor, typename ARows>
void issue(float (&d)[N / 8][4], ARows a_rows, std::optional<WgmmaDescriptor> a_shared, const WgmmaDescriptor& b,
           bool accumulate) {
  if ((blockDim.x * blockDim.y * blockDim.z) % 128 != 0) ::simt::fail("wgmma: the block is not whole warpgroups");
  std::map<const float*, int>& in_flight = thread_state().in_flight;  // the wait runs on this thread too
  if (!thread_state().fenced) ::simt::fail("wgmma issued without a wgmma_fence() since the thread's last wait");
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int warp = static_cast<int>(thread / ::simt::kWarpSize) % 4;
  check_warpgroup_uniform({a_shared ? a_shared->start : nullptr, a_shared ? a_shared->leading_bytes : 0u, b.start,
                           b.leading_bytes, N, static_cast<int>(kBMajor), accumulate ? 1 : 0},
                          thread / 128);
  constexpr size_t kBytes = sizeof(d);
  const bool first = in_flight[&d[0][0]]++ == 0;
  std::array<unsigned char, kBytes> kept{};
  if (first) {
    std::memcpy(kept.data(), d, kBytes);
    std::memset(d, 0xFF, kBytes);
  }
  const bool hashes_operands = ::simt::lane_id() == 0;
  auto shared_operands_hash = [a_shared, b, warp](bool at_issue) {
    const uint64_t hash = operand_hash(14695981039346656037ull, b, kBMajor, 0, N, at_issue);
    return a_shared ? operand_hash(hash, *a_shared, Major::K, 16 * warp, 16 * warp + 16, at_issue) : hash;
  };
  const uint64_t hash_at_issue = hashes_operands ? shared_operands_hash(true) : 0;
  ::simt::async_issue(::simt::AsyncKind::kWgmma, [&d, &in_flight, a_rows, b, accumulate, warp, first, kept,
                                                  hashes_operands, shared_operands_hash, hash_at_issue] {
    if (hashes_operands && shared_operands_hash(false) != hash_at_issue) {
      ::simt::fail("wgmma: a shared-memory operand changed between the wgmma's issue and its wait (written after "
                   "the issue by a thread no barrier ordered before it, or while the wgmma was in flight)");
    }
    if (first) {
      std::array<unsigned char, kBytes> now;
      std::memcpy(now.data(), d, kBytes);
      if (std::any_of(now.begin(), now.end(), [](unsigned char byte) { return byte != 0xFF; })) {
        ::simt::fail("wgmma: the accumulator registers were written while a wgmma on them was in flight");
      }
      std::memcpy(d, kept.data(), kBytes);
    }
    if (--in_flight[&d[0][0]] == 0) in_flight.erase(&d[0][0]);
    float rows[16][16];
    a_rows(warp, rows);
    const int group = ::simt::lane_id() / 4, pair = ::simt::lane_id() % 4;
    for (int j = 0; j < N / 8; ++j) {
      for (int i = 0; i < 4; ++i) {
        const int row = group + 8 * (i / 2), column = 8 * j + 2 * pair + i % 2;
        float sum = accumulate ? d[j][i] : 0.0f;
        for (int k = 0; k < 16; ++k) sum += rows[row][k] * element<T>(b, kBMajor, column, k);
        d[j][i] = sum;
      }
    }
  });
}

}  // namespace wgmma_emulation

template <typename T, int N, Major kBMajor>
void wgmma_ss(float (&d)[N / 8][4], WgmmaDescriptor a, WgmmaDescriptor b, bool accumulate) {
  static_assert(is_wgmma_type<T>, "bf16 or fp16 operands");
  static_assert(N == 64 || N == 128, "N = 64 or 128");
  auto a_rows = [a](int warp, float (&rows)[16][16]) {
    for (int row = 0; row < 16; ++row) {
      for (int k = 0; k < 16; ++k) rows[row][k] = wgmma_emulation::element<T>(a, Major::K, 16 * warp + row, k);
    }
  };
  wgmma_emulation::issue<T, N, kBMajor>(d, a_rows, a, b, accumulate);
}

// The A fragment is read at the wait too, through `a`: the kernel must leave those registers alone meanwhile.
template <typename T, int N, Major kBMajor>
void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], WgmmaDescriptor b, bool accumulate) {
  static_assert(is_wgmma_type<T>, "bf16 or fp16 operands");
  static_assert(N == 64 || N == 128, "N = 64 or 128");
  struct Fragment {
    uint32_t a[4];
  };
  const Fragment at_issue{{a[0], a[1], a[2], a[3]}};
  auto a_rows = [&a, at_issue](int, float (&rows)[16][16]) {
    const Fragment mine{{a[0], a[1], a[2], a[3]}};
    if (std::memcmp(&mine, &at_issue, sizeof(Fragment)) != 0) {
      ::simt::fail("wgmma: the A fragment registers were written while a wgmma reading them was in flight");
    }
    Fragment lanes[::simt::kWarpSize];
    ::simt::warp_gather(&mine, lanes, sizeof(Fragment));
    for (int lane = 0; lane < ::simt::kWarpSize; ++lane) place_a_fragment<T>(lanes[lane].a, lane, rows);
  };
  wgmma_emulation::issue<T, N, kBMajor>(d, a_rows, std::nullopt, b, accumulate);
}

#endif

// Dynamic shared memory is only 16-byte aligned, swizzle atoms need 1024: a kernel asks for kSwizzleSlackBytes more
// than its tiles take and places them from swizzle_aligned(its dynamic shared memory). The swizzle XORs bits of the
// shared-window address (the descriptors' start), so that address is what gets aligned, not the generic pointer.
constexpr size_t kSwizzleSlackBytes = 1024;
__device__ __forceinline__ unsigned char* swizzle_aligned(void* dynamic_shared) {
#if defined(__CUDA_ARCH__)
  const uint32_t address = shared_address(dynamic_shared);
#else
  const uintptr_t address = reinterpret_cast<uintptr_t>(dynamic_shared);  // the emulation's shared memory
#endif
  return static_cast<unsigned char*>(dynamic_shared) + (1024 - address % 1024) % 1024;
}

// A [kRows x kCols] tile of 16-bit elements under the 128-byte swizzle: kCols / 64 panels of kRows 128-byte rows,
// starting at a multiple of 1024 bytes. Rows are M or N for a K-major operand, K for an MN-major one.
template <int kRows, int kCols>
struct SwizzledTile {
  static_assert(kRows % 8 == 0 && kCols % 64 == 0, "whole 8-row atoms and 64-column panels");
  static constexpr int kPanelBytes = kRows * 128;
  static constexpr int kBytes = kPanelBytes * (kCols / 64);

  // Byte offset of element (row, column); 16-byte chunks stay whole (column a multiple of 8: a cp.async target).
  __host__ __device__ static constexpr uint32_t offset(int row, int column) {
    return (column / 64) * kPanelBytes + row * 128 + ((((column % 64) / 8) ^ (row % 8)) * 16) + (column % 8) * 2;
  }
  // Element (row, column) of a tile of T.
  template <typename T>
  __device__ __forceinline__ static T* at(T* tile, int row, int column) {
    using Byte = std::conditional_t<std::is_const<T>::value, const unsigned char, unsigned char>;
    return reinterpret_cast<T*>(reinterpret_cast<Byte*>(tile) + offset(row, column));
  }
  // The operand of k step `step` (16 k): columns 16 step .. of a K-major operand (32 bytes per step along the
  // rows; the leading byte offset is unused, 16 as CUTLASS writes it), rows 16 step .. of an MN-major one.
  __device__ __forceinline__ static WgmmaDescriptor k_major(const void* tile, int step) {
    return wgmma_descriptor(tile, (step / 4) * kPanelBytes + (step % 4) * 32, 16);
  }
  __device__ __forceinline__ static WgmmaDescriptor mn_major(const void* tile, int step) {
    return wgmma_descriptor(tile, step * 16 * 128, kPanelBytes);
  }
};

}  // namespace electra_ext::ELECTRA_BACKEND
