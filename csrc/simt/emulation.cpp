// The SIMT emulation runtime: runs a grid's blocks one after another, each block's threads as host threads.
#include "simt/emulation.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace simt {
namespace {

// Far above any legitimate wait (a block's threads reach a barrier within milliseconds, even under ASan).
constexpr std::chrono::seconds kBarrierTimeout{120};

// A reusable barrier for a fixed set of threads in which a thread that has finished (returned from the
// kernel) drops out, as exited threads stop counting at a GPU barrier. std::barrier is C++20; this builds as
// C++17 too.
class Barrier {
 public:
  void reset(int participants) {
    std::lock_guard<std::mutex> lock(mutex_);
    participants_ = participants;
    waiting_ = 0;
  }

  // The last thread to arrive runs `on_release` (with no other thread past or inside the barrier), then
  // releases the others.
  template <typename OnRelease>
  void arrive_and_wait(OnRelease&& on_release) {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++waiting_ == participants_) {
      on_release();
      release();
      return;
    }
    // A GPU would hang here too; the emulation says why instead.
    if (!released_.wait_for(lock, kBarrierTimeout, [&] { return generation != generation_; })) {
      fail("a barrier waited 120 s for threads that never arrived (a __syncthreads or warp collective that "
           "not every thread of the block or warp reaches?)");
    }
  }

  void arrive_and_wait() {
    arrive_and_wait([] {});
  }

  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --participants_;
    if (participants_ > 0 && waiting_ == participants_) release();
  }

 private:
  void release() {
    waiting_ = 0;
    ++generation_;
    released_.notify_all();
  }

  std::mutex mutex_;
  std::condition_variable released_;
  int participants_ = 0;
  int waiting_ = 0;
  unsigned long generation_ = 0;
};

struct Warp {
  Barrier barrier;
  // Two banks of one slot per lane: see publish().
  unsigned char slots[2][kWarpSize][kWarpSlotBytes];
};

struct Block {
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_shared;
};

thread_local Block* current_block = nullptr;
thread_local int current_thread = 0;  // linear thread index in the block
thread_local unsigned collective_count = 0;  // warp collectives this thread has joined in the current block

Warp& current_warp() { return current_block->warps[current_thread / kWarpSize]; }

thread_local cudaError_t last_error = cudaSuccess;
std::mutex launch_mutex;  // __shared__ statics are per kernel, not per launch: one launch at a time

// Poison for memory a kernel must write before reading (dynamic shared memory at the start of each block):
// 0xFF bytes are NaN as float and -1 as integers, so a read of unwritten memory shows in the results.
constexpr unsigned char kPoison = 0xFF;

uint3 unlinear(unsigned i, const dim3& extent) {
  return uint3{i % extent.x, (i / extent.x) % extent.y, i / (extent.x * extent.y)};
}

}  // namespace

void fail(const char* what) {
  std::fprintf(stderr, "simt emulation: %s\n", what);
  std::abort();
}

namespace {

// This thread's asynchronous operations of one kind: those issued since its last commit, and the committed
// groups, oldest first.
struct AsyncQueue {
  const char* operations;  // for messages: what they are, and the wait that carries them out
  const char* wait;
  std::vector<std::function<void()>> uncommitted;
  std::deque<std::vector<std::function<void()>>> committed;
};
thread_local AsyncQueue async_queues[] = {
    {"cp.async copies", "cp_async_wait", {}, {}},
    {"bulk reductions", "bulk_wait_group_read", {}, {}},
    {"wgmma", "wgmma_wait_group", {}, {}},
};

AsyncQueue& async_queue(AsyncKind kind) { return async_queues[static_cast<int>(kind)]; }

[[noreturn]] void fail_about(const AsyncQueue& queue, const char* format) {
  char message[256];
  std::snprintf(message, sizeof(message), format, queue.operations, queue.wait);
  fail(message);
}

// Empty groups may stay behind (a kernel commits one per tile, the last with nothing in it).
void check_no_async_operations_left() {
  for (AsyncQueue& queue : async_queues) {
    const bool left = !queue.uncommitted.empty() ||
                      std::any_of(queue.committed.begin(), queue.committed.end(),
                                  [](const std::vector<std::function<void()>>& group) { return !group.empty(); });
    if (left) fail_about(queue, "a thread ended its block with %s it never waited for (%s<0>)");
    queue.committed.clear();
  }
}

}  // namespace

void async_issue(AsyncKind kind, std::function<void()> operation) {
  async_queue(kind).uncommitted.push_back(std::move(operation));
}

void async_commit_group(AsyncKind kind) {
  AsyncQueue& queue = async_queue(kind);
  queue.committed.push_back(std::move(queue.uncommitted));
  queue.uncommitted.clear();
}

void async_wait_group(AsyncKind kind, int pending) {
  AsyncQueue& queue = async_queue(kind);
  if (!queue.uncommitted.empty()) fail_about(queue, "%s issued since the last commit are never waited for (%s)");
  while (queue.committed.size() > static_cast<std::size_t>(pending)) {
    std::vector<std::function<void()>> group = std::move(queue.committed.front());
    queue.committed.pop_front();
    for (const std::function<void()>& operation : group) operation();
  }
}

void sync_block() { current_block->barrier.arrive_and_wait(); }
void sync_warp() { current_warp().barrier.arrive_and_wait(); }
int lane_id() { return current_thread % kWarpSize; }
void* dynamic_shared_memory() { return current_block->dynamic_shared.data(); }

namespace {

using Bank = unsigned char (*)[kWarpSlotBytes];

// Writes this lane's bytes into its slot and waits until every lane of the warp has written: one barrier per
// collective. The banks alternate, so a lane writes a bank again only two collectives later, after passing the
// next collective's barrier, which no lane reaches before it has finished reading this one.
Bank publish(const void* value, std::size_t bytes) {
  if (bytes > kWarpSlotBytes) fail("a warp collective of more than kWarpSlotBytes per lane");
  Warp& warp = current_warp();
  Bank bank = warp.slots[collective_count++ % 2];
  std::memcpy(bank[lane_id()], value, bytes);
  warp.barrier.arrive_and_wait();
  return bank;
}

}  // namespace

void warp_exchange(const void* value, void* out, std::size_t bytes, int source_lane) {
  std::memcpy(out, publish(value, bytes)[source_lane], bytes);
}

void warp_gather(const void* value, void* out, std::size_t bytes) {
  const Bank bank = publish(value, bytes);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    std::memcpy(static_cast<unsigned char*>(out) + lane * bytes, bank[lane], bytes);
  }
}

unsigned warp_ballot(bool predicate) {
  const Bank bank = publish(&predicate, sizeof(predicate));
  unsigned ballot = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    bool vote;
    std::memcpy(&vote, bank[lane], sizeof(vote));
    ballot |= static_cast<unsigned>(vote) << lane;
  }
  return ballot;
}

void run_grid(dim3 grid, dim3 block_shape, std::size_t dynamic_shared_bytes, const std::function<void()>& body) {
  const unsigned threads = block_shape.x * block_shape.y * block_shape.z;
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || threads % kWarpSize != 0) {
    last_error = cudaErrorInvalidConfiguration;  // the emulation also needs whole warps
    return;
  }
  if (dynamic_shared_bytes > static_cast<std::size_t>(kMaxSharedMemoryPerBlockOptin)) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  if (blocks == 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> launch_lock(launch_mutex);
  Block block;
  block.warps = std::vector<Warp>(threads / kWarpSize);
  block.dynamic_shared.resize(dynamic_shared_bytes);
  auto start_block = [&] {
    block.barrier.reset(static_cast<int>(threads));
    for (Warp& warp : block.warps) warp.barrier.reset(kWarpSize);
    std::fill(block.dynamic_shared.begin(), block.dynamic_shared.end(), kPoison);
  };
  start_block();
  // Between blocks every thread waits here; the last to arrive prepares the next block. Unlike the block's
  // own barrier, threads never drop out of this one.
  Barrier between_blocks;
  between_blocks.reset(static_cast<int>(threads));

  // One host thread per CUDA thread for the whole launch, running the blocks in order.
  auto worker = [&](unsigned thread) {
    current_block = &block;
    current_thread = static_cast<int>(thread);
    threadIdx = unlinear(thread, block_shape);
    blockDim = block_shape;
    gridDim = grid;
    for (unsigned b = 0; b < blocks; ++b) {
      blockIdx = unlinear(b, grid);
      collective_count = 0;
      body();
      check_no_async_operations_left();
      current_warp().barrier.arrive_and_drop();
      block.barrier.arrive_and_drop();
      between_blocks.arrive_and_wait(start_block);
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) workers.emplace_back(worker, t);
  for (std::thread& w : workers) w.join();
}

cudaError_t cudaGetLastError() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

int compute_capability_major() {
  const char* sm = std::getenv("ELECTRA_EXT_EMULATED_SM");
  return sm != nullptr && std::strcmp(sm, "80") == 0 ? 8 : 9;
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  if (device != 0) fail("the emulated device is device 0");
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor: return compute_capability_major();
    case cudaDevAttrComputeCapabilityMinor: return 0;
    case cudaDevAttrMultiProcessorCount: return kMultiProcessorCount;
    case cudaDevAttrMaxThreadsPerMultiProcessor: return kMaxThreadsPerMultiProcessor;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return kMaxSharedMemoryPerBlockOptin;
    case cudaDevAttrMaxSharedMemoryPerBlock: return kDefaultSharedMemoryPerBlock;
    case cudaDevAttrMaxThreadsPerBlock: return kMaxThreadsPerBlock;
    case cudaDevAttrWarpSize: return kWarpSize;
    default: fail("device attribute not emulated");
  }
}

}  // namespace simt
