// The attention backward's dK/dV kernel (with dQ added to the fp32 workspace) on Hopper's warpgroup MMA (wgmma,
// sm_90a): the math and the element-wise step of attention_backward_device.cuh's dkdv_kernel<.., true>, whose
// delta and dQ conversion kernels run around it, with all five tile products on wgmma. Contract:
// cuda/attention_launch.h; the launcher takes it on compute capability 9.0 at head dim 64 when _C was built with
// sm_90a code and the dQ workspace is given (torch.use_deterministic_algorithms keeps the mma.sync kernels). At
// D = 128 it would spill (120 bytes at 255 registers): the dK, dV and dQ accumulators are 192 of them.
//
// Tiling. A block is one warpgroup (4 warps, 128 threads) owning 64 keys of one (sequence, head), 16 per warp (the
// wgmma D layout, whose rows are the keys), so its element-wise step, dropout bits and dQ rows are those of the
// mma.sync kernel with 16 keys per warp. K and V sit in shared memory as 128-byte-swizzled tiles
// (simt/warpgroup_mma.cuh); per 64-query tile, Q and dO double-buffered by cp.async:
//   S^T (64 keys x 64) = K Q^T     D / 16 wgmma m64n64k16, A (K) and B (Q) K-major from shared memory
//   dP^T = V dO^T                  the same with V and dO
//   element-wise (shared): P^T o Z~ and dS^T = P^T o (dP^T o Z~ - delta) in place, in registers
//   dV += (P^T o Z~) dO            4 wgmma m64nDk16, A from registers, B (dO) MN-major
//   dK += dS^T Q                   4 wgmma m64nDk16, A from registers, B (Q) MN-major
//   dQ (64 queries x D) = dS K     4 wgmma m64nDk16: dS^T is written transposed (stmatrix) into a swizzled
//                                  [queries][keys] tile, the K-major A; B (K) MN-major; the sums are staged as
//                                  fp32 rows in shared memory and added to the workspace by one bulk reduction
//                                  per query row (simt/bulk_reduce.cuh), where the mma.sync kernel issues 16
//                                  red.global.add.v2.f32 per thread and tile.
// S^T and dP^T are issued together and waited for once; dV and dK are issued, then the dQ product after the barrier
// that publishes dS, and all three are waited for at the end of the tile, where the dQ sums are staged and their
// bulk reductions issued: the TMA unit adds them to the workspace while the next tile's products run.
//
// Napkin math (ELECTRA-Base, backward 64 GFLOP useful): 5 products at wgmma's ~990 TFLOP/s take 65 us; the
// element-wise step is 1 MUFU.EX2 per score (27 us of the special-function unit at Base, as in the forward) and
// ~10 FP32 instructions per score. With no overlap inside a warpgroup and 8 warps per SM (registers below),
// ~150-200 us is the aim, against 279 + 171 us for the mma.sync dK/dV and dQ kernels at 2a31c20.
// Shared memory: K, V 64 D 2 B each, Q and dO 2 x 64 D 2 B each, dS 8 KB, lse, delta 0.5 KB, dropout bits 0.5 KB,
// dQ's fp32 rows 64 x (4 D + 32) B: 75 KB at D = 64, plus 1 KB to align the tiles to 1024 bytes (2 blocks per SM
// take 152 of the 227 KB). Registers (ptxas, sm_90a, D = 64): 234, no spills, so 2 blocks (8 warps) per SM (3 would
// need at most 168): dV, dK, S^T, dP^T are 128 per thread, and P's and dS's A fragments (32) stay live until the dV
// and dK products that read them complete.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention_backward_device.cuh"
#include "simt/bulk_reduce.cuh"
#include "simt/warpgroup_mma.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_backward_hopper_device {

namespace tiles = attention_tiles;
namespace shared_pieces = attention_backward_device;

constexpr int kThreads = 128;                                 // one warpgroup
constexpr int kBlockKeys = shared_pieces::kDkdvBlockKeys;     // the warpgroup's M; the dropout words' 64 keys
constexpr int kQ = 64;                                        // queries per tile: the N of S^T, the M of dQ
static_assert(kBlockKeys == 64, "one warpgroup of 16 keys per warp");

template <int D>
struct Layout {
  static_assert(D == 64, "head dim 64 (at 128 the accumulators spill)");
  using KeyTile = SwizzledTile<kBlockKeys, D>;   // K, V: rows are keys
  using QueryTile = SwizzledTile<kQ, D>;         // Q, dO: rows are queries
  using DsTile = SwizzledTile<kQ, kBlockKeys>;   // dS: rows are queries, columns keys
  // Byte offsets from the 1024-byte-aligned base.
  static constexpr int kV = KeyTile::kBytes;
  static constexpr int kQTiles = 2 * KeyTile::kBytes;             // 2 buffers
  static constexpr int kDoTiles = kQTiles + 2 * QueryTile::kBytes;  // 2 buffers
  static constexpr int kDs = kDoTiles + 2 * QueryTile::kBytes;
  static constexpr int kLse = kDs + DsTile::kBytes;               // float[kQ]
  static constexpr int kDelta = kLse + kQ * 4;                    // float[kQ]
  static constexpr int kBits = kDelta + kQ * 4;                   // uint32_t[kQ][kBlockKeys / 32]
  // dQ's sums, float[kQ][kDqStride]: rows of D floats (16-byte aligned, the bulk reductions' sources) 32 bytes
  // apart beyond their length, so that a half-warp's 8-byte stores (4 rows x 4 lanes) fill the 32 banks once.
  static constexpr int kDqStride = D + 8;
  static constexpr int kDq = kBits + kQ * kBlockKeys / 8;
  static constexpr int kBytes = kDq + kQ * kDqStride * 4;
  static constexpr size_t kSharedBytes = size_t(kBytes) + kSwizzleSlackBytes;
};

#if ELECTRA_WGMMA_AVAILABLE
// dS^T as the dK product's A fragments (ds[j]: rows keys key0 + group and + 8, columns queries 16 j + 2 pair and
// + 1, and + 8) into the [queries][keys] tile. Each fragment is four 8 x 8 matrices in the mma C layout, which
// stmatrix.trans stores transposed: matrix i's 8 rows of 8 keys (16 bytes, one swizzled chunk) are tile rows
// 16 j + 8 (i / 2) .. + 7 at keys key0 + 8 (i % 2). 4 stmatrix.x4 per thread instead of 32 two-byte stores.
template <typename Tile, typename T>
__device__ __forceinline__ void store_transposed(const uint32_t (&ds)[kQ / 16][4], T* tile, int key0) {
  const int lane = threadIdx.x % tiles::kWarpSize, matrix = lane / 8;  // lane l gives row l % 8 of matrix l / 8
#pragma unroll
  for (int j = 0; j < kQ / 16; ++j) {
    stmatrix<4, true>(ds[j], Tile::at(tile, 16 * j + 8 * (matrix / 2) + lane % 8, key0 + 8 * (matrix % 2)));
  }
}

// The warp's 16 rows of dQ's accumulator (rows 16 warp + group and + 8, columns 8 n + 2 pair and + 1) into the
// fp32 staging rows, then one bulk reduction per valid query row (q0 + row < len) by lanes 0-15 into the
// workspace rows `dq_rows` (row stride `stride` floats). Each lane first waits until its previous tile's reduction
// has read the row it overwrites (long done: a tile's products ago).
template <int D>
__device__ __forceinline__ void add_dq_rows_in_bulk(const float (&dq)[D / 8][4], float* staging, float* dq_rows,
                                                    int64_t stride, int q0, int len) {
  constexpr int kStride = Layout<D>::kDqStride;
  const int lane = threadIdx.x % tiles::kWarpSize, group = lane / 4, pair = lane % 4;
  const int warp_row0 = 16 * (threadIdx.x / tiles::kWarpSize);
  bulk_wait_group_read<0>();
  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<float2*>(staging + (warp_row0 + group + 8 * half) * kStride + 8 * n + 2 * pair) =
          make_float2(dq[n][2 * half], dq[n][2 * half + 1]);
    }
  }
  fence_proxy_async_shared();  // the lanes' stores, for the TMA unit's reads after the warp barrier
  __syncwarp();
  const int row = warp_row0 + lane;
  if (lane < 16 && q0 + row < len) bulk_reduce_add_f32(dq_rows + (q0 + row) * stride, staging + row * kStride, D);
  bulk_commit_group();
}
#endif

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const AttentionBackwardArgs args) {
#if ELECTRA_WGMMA_AVAILABLE
  using L = Layout<D>;
  using KeyTile = typename L::KeyTile;
  using QueryTile = typename L::QueryTile;
  using DsTile = typename L::DsTile;
  constexpr int kDSteps = D / 16, kQSteps = kQ / 16, kKeySteps = kBlockKeys / 16;
  const AttentionShape& s = args.shape;
  const int b = blockIdx.z, h = blockIdx.y, key0 = blockIdx.x * kBlockKeys;
  const tiles::SequenceExtent seq = shared_pieces::sequence_of(s, b);
  if (shared_pieces::write_padding_keys<T, D, kThreads>(args, seq, h, key0)) return;
  const int len = seq.length;

  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  unsigned char* const shared = swizzle_aligned(shared_raw);
  T* const sK = reinterpret_cast<T*>(shared);
  T* const sV = reinterpret_cast<T*>(shared + L::kV);
  auto q_tile = [&](int t) { return reinterpret_cast<T*>(shared + L::kQTiles + (t & 1) * QueryTile::kBytes); };
  auto do_tile = [&](int t) { return reinterpret_cast<T*>(shared + L::kDoTiles + (t & 1) * QueryTile::kBytes); };
  T* const sDs = reinterpret_cast<T*>(shared + L::kDs);
  float* const sLse = reinterpret_cast<float*>(shared + L::kLse);
  float* const sDelta = reinterpret_cast<float*>(shared + L::kDelta);
  uint32_t* const sBits = reinterpret_cast<uint32_t*>(shared + L::kBits);
  float* const sDq = reinterpret_cast<float*>(shared + L::kDq);

  const shared_pieces::HeadRows<T> rows = shared_pieces::head_rows<T, D>(args, seq, h);
  const int64_t row_stride = rows.dout_stride;
  auto load_queries = [&](int t) {
    const int q0 = t * kQ;
    tiles::load_tile_async<kQ, D, kThreads, T, QueryTile>(q_tile(t), rows.q + q0 * args.q.token_stride,
                                                          args.q.token_stride, len - q0, threadIdx.x);
    tiles::load_tile_async<kQ, D, kThreads, T, QueryTile>(do_tile(t), rows.dout + q0 * row_stride, row_stride,
                                                          len - q0, threadIdx.x);
  };
  tiles::load_tile_async<kBlockKeys, D, kThreads, T, KeyTile>(sK, rows.k + key0 * args.k.token_stride,
                                                              args.k.token_stride, len - key0, threadIdx.x);
  tiles::load_tile_async<kBlockKeys, D, kThreads, T, KeyTile>(sV, rows.v + key0 * args.v.token_stride,
                                                              args.v.token_stride, len - key0, threadIdx.x);
  load_queries(0);
  cp_async_commit();

  const bool dropout = s.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*s.seed) : 0;
  const float dropout_scale = dropout ? s.dropout_scale : 1.0f;
  const float scale_log2 = s.softmax_scale * shared_pieces::kLog2e;
  const int warp = threadIdx.x / tiles::kWarpSize;
  const int warp_key0 = 16 * warp;  // the warp's keys: warp_key0 + group and + 8 of the block's
  const int valid_keys = len - key0;
  float* const dq_rows = args.dq_accum + seq.start * row_stride + h * D;

  float dv[1][D / 8][4] = {}, dk[1][D / 8][4] = {};
  float dq[D / 8][4];
  const int query_tiles = (len + kQ - 1) / kQ;
  shared_pieces::QueryValues next_values = shared_pieces::load_query_values<kQ, kThreads>(rows, 0, len);
  for (int t = 0; t < query_tiles; ++t) {
    const int q0 = t * kQ;
    const shared_pieces::QueryValues values = next_values;
    next_values = shared_pieces::load_query_values<kQ, kThreads>(rows, q0 + kQ, len);
    shared_pieces::stage_query_tile<kQ, kThreads>(sLse, sDelta, sBits, values, s, seed, b, h, q0, key0);
    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's copies, for the tensor cores' reads after the barrier
    __syncthreads();  // tile t, lse, delta and bits visible; every warp has waited for the previous tile's products
    // Into the previous tile's buffers only now: each warp's dV and dK products of that tile read them until the
    // warp's own wait at the tile's end, past the barrier before its dQ product.
    if (t + 1 < query_tiles) {
      load_queries(t + 1);
      cp_async_commit();
    }
    const T* const cQ = q_tile(t);
    const T* const cdO = do_tile(t);

    float st[1][kQ / 8][4], dpt[1][kQ / 8][4];  // S^T and dP^T: rows the warp's 16 keys, columns the queries
    wgmma_fence_operands(st[0]);
    wgmma_fence_operands(dpt[0]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      wgmma_ss<T, kQ, Major::K>(st[0], KeyTile::k_major(sK, ks), QueryTile::k_major(cQ, ks), ks > 0);
    }
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      wgmma_ss<T, kQ, Major::K>(dpt[0], KeyTile::k_major(sV, ks), QueryTile::k_major(cdO, ks), ks > 0);
    }
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operands(st[0]);
    wgmma_fence_operands(dpt[0]);

    shared_pieces::with_tile_switches(dropout, valid_keys < kBlockKeys, [&](auto with_dropout, auto mask_keys) {
      shared_pieces::dkdv_elementwise<decltype(with_dropout)::value, decltype(mask_keys)::value, 1, kQ>(
          st, dpt, scale_log2, dropout_scale, sLse, sDelta, sBits, 0, warp_key0, valid_keys);
    });
    uint32_t p[kQSteps][4], ds[kQSteps][4];
#pragma unroll
    for (int j = 0; j < kQSteps; ++j) {
      tiles::c_fragments_to_a<T>(p[j], st[0][2 * j], st[0][2 * j + 1]);
      tiles::c_fragments_to_a<T>(ds[j], dpt[0][2 * j], dpt[0][2 * j + 1]);
    }
    store_transposed<DsTile>(ds, sDs, warp_key0);
    wgmma_fence_operands(p);
    wgmma_fence_operands(ds);
    wgmma_fence_operands(dv[0]);
    wgmma_fence_operands(dk[0]);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kQSteps; ++j) wgmma_rs<T, D, Major::MN>(dv[0], p[j], QueryTile::mn_major(cdO, j), true);
#pragma unroll
    for (int j = 0; j < kQSteps; ++j) wgmma_rs<T, D, Major::MN>(dk[0], ds[j], QueryTile::mn_major(cQ, j), true);
    wgmma_commit_group();

    fence_proxy_async_shared();  // this thread's dS stores, for the dQ product's reads after the barrier
    __syncthreads();
    wgmma_fence_operands(dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) {
      wgmma_ss<T, D, Major::MN>(dq, DsTile::k_major(sDs, kk), KeyTile::mn_major(sK, kk), kk > 0);
    }
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operands(dv[0]);
    wgmma_fence_operands(dk[0]);
    wgmma_fence_operands(dq);
    // Staged here, after the wait, not while the next tile's S^T and dP^T run: reading dQ's registers with any
    // wgmma in flight makes ptxas wait for that wgmma first (C7517; ctest's test_ptxas_report_*). What overlaps
    // the next tile's products is the bulk reductions' own work.
    add_dq_rows_in_bulk<D>(dq, sDq, dq_rows, row_stride, q0, len);
  }
  bulk_wait_group_read<0>();  // the staging rows are read before the block ends
  __syncthreads();  // every warp's products are done before the tiles become the output's stage

  shared_pieces::store_rows<T, D, 1, kThreads, KeyTile>(
      dk, s.softmax_scale, sK, shared_pieces::gradient_rows<T, D>(args.grad_k, args, seq.start, h),
      args.grad_token_stride, key0, len, seq.rows);
  shared_pieces::store_rows<T, D, 1, kThreads, KeyTile>(
      dv, 1.0f, sV, shared_pieces::gradient_rows<T, D>(args.grad_v, args, seq.start, h), args.grad_token_stride,
      key0, len, seq.rows);
#endif
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_backward_hopper_device
