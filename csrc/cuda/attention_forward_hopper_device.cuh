// Fused multi-head attention forward on Hopper's warpgroup MMA (wgmma, sm_90a): the FlashAttention-2 scheme of
// attention_forward_device.cuh (whose masking, online softmax, dropout and output code this kernel shares) with the
// two products on wgmma. Contract: cuda/attention_launch.h; the launcher takes it on compute capability 9.0 for
// head dims 64 and 128 when _C was built with sm_90a code.
//
// Tiling. A block of 2 warpgroups (8 warps, 256 threads) owns kBlockM = 128 query rows of one (sequence, head),
// 64 per warpgroup, 16 per warp (the wgmma D layout). Q, and per 64-key tile K and V, sit in shared memory as
// 128-byte-swizzled tiles (simt/warpgroup_mma.cuh), K and V in a ring of 3 buffers filled by cp.async (tile j + 1
// in flight while tile j's S and tile j - 1's P V read theirs, one __syncthreads per tile). Per warpgroup and key
// tile j:
//   S (64 x 64) = Q K_j^T      D / 16 wgmma m64n64k16, A (Q) and B (K) both K-major from shared memory
//   O (64 x D) += P_j-1 V_j-1  issued right behind it: 4 wgmma m64nDk16, A (P) from registers, B (V) MN-major
//   once S is done: masking, online softmax, Philox dropout on S's registers, exactly as the mma.sync kernel (the
//   D layout is its C fragments), while the P V product still runs; then the wait for it, O rescaled, and P_j's
//   C fragments become the A fragments of the next tile's P V.
// That is FlashAttention-3's overlap inside a warpgroup: the softmax of tile j runs beside the tensor cores' P V
// of tile j - 1, and the other warpgroups resident on the SM (2 blocks per SM at D = 64) fill the gaps that remain.
//
// Napkin math (ELECTRA-Base, B = 32, T = 512, H = 12, D = 64: 25.8 GFLOP, 101 MB): at wgmma's ~990 TFLOP/s dense
// bf16 (H100) the products take 26 us; the softmax is one MUFU.EX2 per score, 16/clk/SM: 32 x 12 x 512^2 scores /
// (132 SMs x 16 x 1.75 GHz) = 27 us, which is why the two are overlapped. ~40-50 us is the aim (111 us for the
// mma.sync kernel at 2a31c20). K and V are read from L2 once per 128 query rows: 4 x per (sequence, head) at
// T = 512, 100 MB from L2.
// Shared memory: Q 128 D 2 B + 3 x (K + V) 64 D 2 B = 64 KB at D = 64, 128 KB at D = 128, plus 1 KB to align the
// tiles to 1024 bytes. Registers per thread: S 32, O D / 2, P 16 (live beside S: the P V product reads it during
// the softmax), row statistics 4; ptxas (CUDA 13, sm_90a, no spills): 128 at D = 64 under 2 blocks (16 warps) per
// SM, 209 at D = 128 (1 block). Products issued and waited for one at a time took 123 and 202.
// Why 64-key tiles: with 128 (S m64n128k16, FlashAttention-3's tile) D = 64 needs 220 registers, so 1 block of 8
// warps per SM, or spills 172 bytes at the 128 that 2 blocks allow.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention_forward_device.cuh"
#include "simt/warpgroup_mma.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_forward_hopper_device {

namespace tiles = attention_tiles;
namespace shared_pieces = attention_forward_device;

constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kBlockM = kWarpgroups * 64;  // query rows per block
constexpr int kBlockN = 64;                // keys per tile
// K and V buffers: tile j + 1 loads while tile j's S = Q K^T and tile j - 1's P V read theirs.
constexpr int kStages = 3;

template <int kHeadDim>
struct Layout {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma tiles of 64-column panels: head dim 64 or 128");
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KVTile = SwizzledTile<kBlockN, kHeadDim>;
  // Byte offsets from the 1024-byte-aligned base: Q, the kStages K buffers, the kStages V buffers.
  static constexpr int kKOffset = QTile::kBytes;
  static constexpr int kVOffset = kKOffset + kStages * KVTile::kBytes;
  static constexpr int kBytes = kVOffset + kStages * KVTile::kBytes;
  static constexpr size_t kSharedBytes = size_t(kBytes) + kSwizzleSlackBytes;
  // 2 blocks per SM at D = 64 (up to 128 registers per thread); 1 at D = 128.
  static constexpr int kMinBlocks = kHeadDim == 64 ? 2 : 1;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, Layout<kHeadDim>::kMinBlocks) forward_kernel(AttentionForwardArgs args) {
#if ELECTRA_WGMMA_AVAILABLE
  using L = Layout<kHeadDim>;
  using QTile = typename L::QTile;
  using KVTile = typename L::KVTile;
  constexpr int kKSteps = kHeadDim / 16;  // wgmma k steps of S = Q K^T
  constexpr int kPSteps = kBlockN / 16;   // of O = P V
  constexpr int kSTiles = kBlockN / 8, kOTiles = kHeadDim / 8;

  const AttentionShape& shape = args.shape;
  const shared_pieces::BlockRows<T> rows = shared_pieces::block_rows<T, kHeadDim>(args, kBlockM);
  if (!rows.in_grid ||
      shared_pieces::write_padding_block<kHeadDim, kThreads>(rows, kBlockM, shape.heads, threadIdx.x)) {
    return;
  }
  const tiles::SequenceExtent seq = rows.seq;
  const int m0 = rows.m0;

  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  unsigned char* const shared = swizzle_aligned(shared_raw);
  T* const q_tile = reinterpret_cast<T*>(shared);
  auto k_tile = [&](int j) {
    return reinterpret_cast<T*>(shared + L::kKOffset + (j % kStages) * KVTile::kBytes);
  };
  auto v_tile = [&](int j) {
    return reinterpret_cast<T*>(shared + L::kVOffset + (j % kStages) * KVTile::kBytes);
  };

  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int pair = lane % 4, warpgroup = warp / 4;
  const int warp_m0 = m0 + warp * 16;                 // this warp's first query row (position in the sequence)
  // wgmma is issued by whole warpgroups: one whose 64 rows all lie past the sequence only loads and waits.
  const bool computes = m0 + warpgroup * 64 < seq.length;
  const unsigned char* const warpgroup_q = shared + warpgroup * 64 * 128;  // its 64 rows of each Q panel

  const int n_tiles = (seq.length + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int j) {
    const int n0 = j * kBlockN, valid = seq.length - n0;
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads, T, KVTile>(k_tile(j), rows.k + n0 * args.k.token_stride,
                                                                   args.k.token_stride, valid, thread);
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads, T, KVTile>(v_tile(j), rows.v + n0 * args.v.token_stride,
                                                                   args.v.token_stride, valid, thread);
  };
  tiles::load_tile_async<kBlockM, kHeadDim, kThreads, T, QTile>(q_tile, rows.q, args.q.token_stride,
                                                                seq.length - m0, thread);
  load_kv(0);
  cp_async_commit();

  const bool dropout = shape.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*shape.seed) : 0;
  const float scale_log2 = shape.softmax_scale * shared_pieces::kLog2e;

  float o[1][kOTiles][4];
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[0][t][i] = 0.0f;
  }
  float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.0f, 0.0f}};
  float s[kSTiles][4];
  uint32_t p[kPSteps][4];  // P of the previous tile, the A operand of its P V product

  // O += P V_j: issued, not waited for (P's registers and V_j's buffer stay untouched until the wait).
  auto issue_pv = [&](int j) {
    wgmma_fence_operands(p);
    wgmma_fence_operands(o[0]);
    wgmma_fence();  // P's registers and O's rescaling, before the products read them
#pragma unroll
    for (int ks = 0; ks < kPSteps; ++ks) {
      wgmma_rs<T, kHeadDim, Major::MN>(o[0], p[ks], KVTile::mn_major(v_tile(j), ks), true);
    }
    wgmma_commit_group();
  };

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's copies, for the tensor cores' reads after the barrier
    __syncthreads();  // tile j visible to all; every warpgroup has waited for its products of tile j - 2 and earlier
    if (j + 1 < n_tiles) {
      load_kv(j + 1);  // into tile j - 2's buffers: tile j - 1's V is still read by the P V product issued below
      cp_async_commit();
    }
    if (!computes) continue;

    wgmma_fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      wgmma_ss<T, kBlockN, Major::K>(s, QTile::k_major(warpgroup_q, ks), KVTile::k_major(k_tile(j), ks), ks > 0);
    }
    wgmma_commit_group();
    // The previous tile's P V runs on the tensor cores behind S = Q K_j^T, and on during this tile's softmax:
    // FlashAttention-3's overlap inside a warpgroup, with O rescaled only once that product is waited for.
    if (j > 0) {
      issue_pv(j - 1);
      wgmma_wait_group<1>();
    } else {
      wgmma_wait_group<0>();
    }
    wgmma_fence_operands(s);

    const int n0 = j * kBlockN;
    if (n0 + kBlockN > seq.length) shared_pieces::mask_keys_past_sequence(s, n0, seq.length, pair);
    float rescale[2];
    shared_pieces::softmax_tile(s, row_max[0], row_sum[0], scale_log2, rescale);
    if (dropout) {
      static_assert(kSTiles == 8, "dropout_c_fragments takes a 16 x 64 block");
      tiles::dropout_c_fragments(s, seed, static_cast<uint32_t>(rows.b), static_cast<uint32_t>(rows.h), warp_m0, n0,
                                 shape.dropout_threshold, lane);
    }
    wgmma_wait_group<0>();
    wgmma_fence_operands(o[0]);
    wgmma_fence_operands(p);
    shared_pieces::rescale_rows(o[0], rescale);
#pragma unroll
    for (int ks = 0; ks < kPSteps; ++ks) tiles::c_fragments_to_a<T>(p[ks], s[2 * ks], s[2 * ks + 1]);
  }
  if (computes) {
    issue_pv(n_tiles - 1);
    wgmma_wait_group<0>();
    wgmma_fence_operands(o[0]);
  }

  shared_pieces::write_rows<QTile, kHeadDim, 1>(o, row_max, row_sum, q_tile, warp * 16, rows.out, rows.lse, seq,
                                                warp_m0, shape, lane);
#endif
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_forward_hopper_device
