// Self-tests of the SIMT emulation: each primitive against a direct computation on the host.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simt/simt.cuh"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

// Each lane reads its xor / down / up / indexed partner's value.
__global__ void shuffle_kernel(int* xor_out, int* down_out, int* up_out, int* idx_out) {
  const int t = threadIdx.x;
  const int value = 1000 * (t / 32) + t % 32;
  xor_out[t] = __shfl_xor_sync(0xffffffffu, value, 5);
  down_out[t] = __shfl_down_sync(0xffffffffu, value, 3);
  up_out[t] = __shfl_up_sync(0xffffffffu, value, 2);
  idx_out[t] = __shfl_sync(0xffffffffu, value, 7);
}

void test_shuffles() {
  constexpr int kThreads = 64;
  std::vector<int> xor_out(kThreads), down_out(kThreads), up_out(kThreads), idx_out(kThreads);
  simt::launch_kernel(shuffle_kernel, 1, kThreads, 0, nullptr, xor_out.data(), down_out.data(), up_out.data(),
                      idx_out.data());
  for (int t = 0; t < kThreads; ++t) {
    const int warp = 1000 * (t / 32), lane = t % 32;
    expect(xor_out[t] == warp + (lane ^ 5), "__shfl_xor_sync reads lane ^ mask");
    expect(down_out[t] == warp + (lane + 3 < 32 ? lane + 3 : lane), "__shfl_down_sync keeps its own value past 31");
    expect(up_out[t] == warp + (lane >= 2 ? lane - 2 : lane), "__shfl_up_sync keeps its own value below 0");
    expect(idx_out[t] == warp + 7, "__shfl_sync reads the indexed lane");
  }
}

__global__ void vote_kernel(unsigned* ballot, int* any, int* all) {
  const int lane = threadIdx.x % 32;
  ballot[threadIdx.x] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  any[threadIdx.x] = __any_sync(0xffffffffu, lane == 31);
  all[threadIdx.x] = __all_sync(0xffffffffu, lane < 31);
}

void test_votes() {
  std::vector<unsigned> ballot(32);
  std::vector<int> any(32), all(32);
  simt::launch_kernel(vote_kernel, 1, 32, 0, nullptr, ballot.data(), any.data(), all.data());
  unsigned expected = 0;
  for (int lane = 0; lane < 32; lane += 3) expected |= 1u << lane;
  for (int t = 0; t < 32; ++t) {
    expect(ballot[t] == expected, "__ballot_sync sets bit l for lanes whose predicate holds");
    expect(any[t] == 1 && all[t] == 0, "__any_sync / __all_sync");
  }
}

// A block-wide reversal through static shared memory needs the barrier between the write and the read; a
// second launch with other values checks that the static array does not leak state between launches.
__global__ void reverse_kernel(const float* in, float* out, int n) {
  __shared__ float staged[256];
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  staged[t] = in[base + t];
  __syncthreads();
  if (base + t < n) out[base + t] = staged[blockDim.x - 1 - t];
}

void test_shared_memory_and_barrier() {
  constexpr int kThreads = 256, kBlocks = 3;
  for (int trial = 0; trial < 2; ++trial) {
    std::vector<float> in(kThreads * kBlocks), out(kThreads * kBlocks, -1.0f);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i * (trial + 1));
    simt::launch_kernel(reverse_kernel, kBlocks, kThreads, 0, nullptr, in.data(), out.data(), kThreads * kBlocks);
    for (int b = 0; b < kBlocks; ++b) {
      for (int t = 0; t < kThreads; ++t) {
        expect(out[b * kThreads + t] == in[b * kThreads + kThreads - 1 - t], "block reversal through shared memory");
      }
    }
  }
}

// Dynamic shared memory: a per-block sum over a 2-D block; also checks blockIdx/gridDim in a 2-D grid.
__global__ void dynamic_sum_kernel(const int* in, int* out) {
  ELECTRA_DYNAMIC_SHARED(int, partial);
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  partial[t] = in[block * threads + t];
  __syncthreads();
  if (t == 0) {
    int sum = 0;
    for (int i = 0; i < threads; ++i) sum += partial[i];
    out[block] = sum;
  }
}

void test_dynamic_shared_memory() {
  const dim3 grid(2, 3), block(32, 4);
  const int threads = 128, blocks = 6;
  std::vector<int> in(threads * blocks), out(blocks, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i % 17);
  simt::launch_kernel(dynamic_sum_kernel, grid, block, threads * sizeof(int), nullptr, in.data(), out.data());
  for (int b = 0; b < blocks; ++b) {
    int expected = 0;
    for (int i = 0; i < threads; ++i) expected += in[b * threads + i];
    expect(out[b] == expected, "per-block sum through dynamic shared memory in a 2-D grid and block");
  }
}

__global__ void atomic_kernel(float* float_sum, int* int_sum, int* maximum, int* cas_winner) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(float_sum, 0.5f);
  atomicAdd(int_sum, 1);
  atomicMax(maximum, t);
  atomicCAS(cas_winner, -1, t);
}

void test_atomics() {
  float float_sum = 0.0f;
  int int_sum = 0, maximum = -1, cas_winner = -1;
  simt::launch_kernel(atomic_kernel, 4, 128, 0, nullptr, &float_sum, &int_sum, &maximum, &cas_winner);
  expect(float_sum == 256.0f, "atomicAdd(float) from 512 threads");
  expect(int_sum == 512, "atomicAdd(int) from 512 threads");
  expect(maximum == 511, "atomicMax");
  expect(cas_winner >= 0 && cas_winner < 512, "atomicCAS lets exactly one thread swap");
}

// Threads that return early stop counting at later barriers, as on the GPU.
__global__ void early_exit_kernel(int* out) {
  __shared__ int value;
  if (threadIdx.x >= 32) return;
  if (threadIdx.x == 0) value = 42;
  __syncthreads();
  out[threadIdx.x] = value;
}

void test_early_exit() {
  std::vector<int> out(32, 0);
  simt::launch_kernel(early_exit_kernel, 1, 128, 0, nullptr, out.data());
  for (int v : out) expect(v == 42, "a barrier after other warps returned");
}

// Without the barrier between the write and the read, a thread reads its mirror's slot before that thread has
// run: each thread runs until it reaches a barrier, so threads 0-31 find the poison (NaN) that fills dynamic shared
// memory, where a GPU would give a timing-dependent mix.
__global__ void unsynchronised_reverse_kernel(const float* in, float* out) {
  ELECTRA_DYNAMIC_SHARED(float, staged);
  const int t = threadIdx.x;
  staged[t] = in[t];
  out[t] = staged[blockDim.x - 1 - t];
}

void test_a_missing_barrier_shows() {
  constexpr int kThreads = 64;
  std::vector<float> in(kThreads), out(kThreads, 0.0f);
  for (int t = 0; t < kThreads; ++t) in[t] = static_cast<float>(t);
  simt::launch_kernel(unsynchronised_reverse_kernel, 1, kThreads, kThreads * sizeof(float), nullptr, in.data(),
                      out.data());
  for (int t = 0; t < kThreads / 2; ++t) expect(std::isnan(out[t]), "a missing __syncthreads reads unwritten memory");
}

// Lane 0 waits at __syncthreads while the rest of its warp waits for it at a shuffle: a GPU hangs; the emulation
// must stop and say where each thread waits (run as `test_simt deadlock`, a CTest that expects the message).
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

void test_bad_configuration_is_an_error() {
  std::vector<int> out(64);
  simt::launch_kernel(early_exit_kernel, 1, 48, 0, nullptr, out.data());
  expect(simt::cudaGetLastError() == cudaErrorInvalidConfiguration, "a block of 48 threads (not whole warps)");
  simt::launch_kernel(early_exit_kernel, 1, 2048, 0, nullptr, out.data());
  expect(simt::cudaGetLastError() == cudaErrorInvalidConfiguration, "a block of 2048 threads");
  expect(simt::cudaGetLastError() == cudaSuccess, "cudaGetLastError clears the error");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "deadlock") == 0) {
    std::vector<int> out(64);
    simt::launch_kernel(deadlock_kernel, 1, 64, 0, nullptr, out.data());
    std::printf("the deadlocked launch returned\n");
    return EXIT_FAILURE;
  }
  test_shuffles();
  test_votes();
  test_shared_memory_and_barrier();
  test_dynamic_shared_memory();
  test_atomics();
  test_early_exit();
  test_a_missing_barrier_shows();
  test_bad_configuration_is_an_error();
  std::printf("%s: %d failure(s)\n", failures == 0 ? "simt self-tests passed" : "simt self-tests FAILED", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
