// The SIMT emulation runtime: runs a grid's blocks one after another, each block's threads as fibers (user-space
// contexts) that take turns on the launching host thread.
//
// Why fibers and not one host thread per CUDA thread: a block's threads meet at every barrier and every warp
// collective (each emulated ldmatrix and mma gathers its warp), tens of thousands of times per launch. As host
// threads each meeting cost a futex wake-up and a kernel context switch per thread: an emulated attention forward
// + backward (T = 130, 2 heads) took 1.3 s, most of it in the scheduler, against 0.13 s as fibers, whose switch
// saves and restores registers in user space (the test suite: 17 -> 7 minutes on 2 cores).
#include "simt/emulation.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <typeindex>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define ELECTRA_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ELECTRA_SIMT_ASAN 1
#endif
#endif
#if defined(ELECTRA_SIMT_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace simt {
namespace {

// This thread's asynchronous operations of one kind: those issued since its last commit, and the committed
// groups, oldest first.
struct AsyncQueue {
  const char* operations;  // for messages: what they are, and the wait that carries them out
  const char* wait;
  std::vector<std::function<void()>> uncommitted;
  std::deque<std::vector<std::function<void()>>> committed;
};

// A fiber's stack: 1 MiB, far above what a kernel and the emulated primitives put on it (their fragments and
// gathered lanes take KiB). Pages are committed only when touched (a 1024-thread block maps 1 GiB of address space,
// not of memory), and a guard page below each turns an overflow into a fault.
constexpr std::size_t kStackBytes = std::size_t{1} << 20;
constexpr std::size_t kGuardBytes = 4096;

// The lowest usable address of each stack so far: stacks outlive launches (the next one reuses them), guarded by
// launch_mutex.
std::vector<unsigned char*> stack_pool;

unsigned char* take_stack(std::size_t index) {
  while (stack_pool.size() <= index) {
    void* memory = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED || mprotect(memory, kGuardBytes, PROT_NONE) != 0) fail("could not map a fiber stack");
    stack_pool.push_back(static_cast<unsigned char*>(memory) + kGuardBytes);
  }
  return stack_pool[index];
}

// One emulated CUDA thread: its context, its indices, and the state that a host thread would keep in thread_local
// variables (all fibers share the launching host thread's).
struct Thread {
  ucontext_t context{};
  unsigned char* stack = nullptr;
  int index = 0;  // linear thread index in the block
  uint3 thread_idx{};
  uint3 block_idx{};
  unsigned collective_count = 0;  // warp collectives this thread has joined in the current block
  AsyncQueue async_queues[3] = {
      {"cp.async copies", "cp_async_wait", {}, {}},
      {"bulk reductions", "bulk_wait_group_read", {}, {}},
      {"wgmma", "wgmma_wait_group", {}, {}},
  };
  std::unordered_map<std::type_index, std::shared_ptr<void>> state;  // thread_state<T>()
  std::vector<uintptr_t> unfenced_chunks;  // 16-byte shared-memory chunks written since its last proxy fence
  bool finished = false;
  const char* waiting_at = nullptr;  // the barrier that holds it, for the message when none can go on
#if defined(ELECTRA_SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct Block;

// A launch in progress on this host thread.
struct Launch {
  dim3 grid;
  const std::function<void()>* body = nullptr;  // the kernel with its arguments bound
  Block* block = nullptr;  // the block that runs
  ucontext_t host{};
  std::vector<Thread> threads;
  std::deque<Thread*> runnable;  // threads ready to run, in the order they will
  Thread* running = nullptr;
#if defined(ELECTRA_SIMT_ASAN)
  void* host_fake_stack = nullptr;
  const void* host_stack_bottom = nullptr;
  std::size_t host_stack_bytes = 0;
  bool from_host = false;  // whether the switch in progress left the host context
#endif
};
thread_local Launch* launch = nullptr;

Thread& running_thread() { return *launch->running; }

// Makes `thread` the running one: the CUDA built-in variables are thread_local, shared by the fibers.
void activate(Thread* thread) {
  launch->running = thread;
  threadIdx = thread->thread_idx;
  blockIdx = thread->block_idx;
}

// Tells AddressSanitizer which stack the switch lands on (it checks accesses against the running stack's bounds).
void before_switch(Thread* from, Thread* to) {
#if defined(ELECTRA_SIMT_ASAN)
  launch->from_host = from == nullptr;
  // A finished thread's stack is done with: no place to keep its fake stack tells ASan to free it.
  void** fake_stack = from == nullptr ? &launch->host_fake_stack : (from->finished ? nullptr : &from->fake_stack);
  if (to == nullptr) {
    __sanitizer_start_switch_fiber(fake_stack, launch->host_stack_bottom, launch->host_stack_bytes);
  } else {
    __sanitizer_start_switch_fiber(fake_stack, to->stack, kStackBytes);
  }
#else
  (void)from;
  (void)to;
#endif
}

void after_switch(Thread* to) {
#if defined(ELECTRA_SIMT_ASAN)
  const void* from_bottom = nullptr;
  std::size_t from_bytes = 0;
  __sanitizer_finish_switch_fiber(to == nullptr ? launch->host_fake_stack : to->fake_stack, &from_bottom, &from_bytes);
  if (launch->from_host) {
    launch->host_stack_bottom = from_bottom;
    launch->host_stack_bytes = from_bytes;
  }
#else
  (void)to;
#endif
}

// Leaves `from` (nullptr: the host) for the next runnable thread, made the running one before it resumes, or for
// the host when no thread is runnable: the host then finds every thread finished, or a deadlock.
void switch_to_next(ucontext_t* from_context, Thread* from) {
  Thread* next = nullptr;
  if (!launch->runnable.empty()) {
    next = launch->runnable.front();
    launch->runnable.pop_front();
  }
  before_switch(from, next);
  if (next != nullptr) {
    activate(next);
    swapcontext(from_context, &next->context);
  } else {
    swapcontext(from_context, &launch->host);
  }
}

// Suspends the running thread (a barrier holds it, or it has finished) until a release makes it runnable and its
// turn comes.
void suspend_running() {
  Thread* self = launch->running;
  switch_to_next(&self->context, self);
  after_switch(self);
}

// A barrier for a fixed set of threads in which a thread that has finished (returned from the kernel) drops out,
// as exited threads stop counting at a GPU barrier.
class Barrier {
 public:
  explicit Barrier(const char* what) : what_(what) {}

  void reset(int participants) {
    participants_ = participants;
    waiting_.clear();
  }

  // The last thread to arrive runs `on_release` (with every other thread waiting), then releases the others and
  // goes on; they run after it, in the order they arrived.
  template <typename OnRelease>
  void arrive_and_wait(OnRelease&& on_release) {
    if (static_cast<int>(waiting_.size()) + 1 == participants_) {
      on_release();
      release();
      return;
    }
    Thread* self = launch->running;
    waiting_.push_back(self);
    self->waiting_at = what_;
    suspend_running();
    self->waiting_at = nullptr;
  }

  void arrive_and_wait() {
    arrive_and_wait([] {});
  }

  void arrive_and_drop() {
    --participants_;
    if (participants_ > 0 && static_cast<int>(waiting_.size()) == participants_) release();
  }

 private:
  void release() {
    launch->runnable.insert(launch->runnable.end(), waiting_.begin(), waiting_.end());
    waiting_.clear();
  }

  const char* what_;
  int participants_ = 0;
  std::vector<Thread*> waiting_;
};

// Poison for memory a kernel must write before reading (dynamic shared memory at the start of each block):
// 0xFF bytes are NaN as float and -1 as integers, so a read of unwritten memory shows in the results.
constexpr unsigned char kPoison = 0xFF;

struct Warp {
  Barrier barrier{"__syncwarp or a warp collective"};
  // Two banks of one slot per lane: see publish().
  unsigned char slots[2][kWarpSize][kWarpSlotBytes];
};

struct Block {
  Barrier barrier{"__syncthreads"};
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_shared;
  // Where every thread waits between blocks; unlike the block's own barrier, threads never drop out of it.
  Barrier between_blocks{"the end of the block"};
  // Chunks (address / 16) of generic-proxy writes not yet fenced, with the thread that wrote each last.
  std::unordered_map<uintptr_t, int> unfenced_chunks;
  std::unordered_map<std::type_index, std::shared_ptr<void>> state;  // block_state<T>()

  // Ready for the next block of the grid (every thread waits at between_blocks, or none has started).
  void start() {
    barrier.reset(static_cast<int>(warps.size()) * kWarpSize);
    for (Warp& warp : warps) warp.barrier.reset(kWarpSize);
    std::fill(dynamic_shared.begin(), dynamic_shared.end(), kPoison);
    unfenced_chunks.clear();
    state.clear();
  }
};

Warp& current_warp() { return launch->block->warps[running_thread().index / kWarpSize]; }

thread_local cudaError_t last_error = cudaSuccess;
std::mutex launch_mutex;  // __shared__ statics are per kernel, not per launch: one launch at a time

uint3 unlinear(unsigned i, const dim3& extent) {
  return uint3{i % extent.x, (i / extent.x) % extent.y, i / (extent.x * extent.y)};
}

}  // namespace

void fail(const char* what) {
  std::fprintf(stderr, "simt emulation: %s\n", what);
  std::abort();
}

namespace {

AsyncQueue& async_queue(AsyncKind kind) { return running_thread().async_queues[static_cast<int>(kind)]; }

[[noreturn]] void fail_about(const AsyncQueue& queue, const char* format) {
  char message[256];
  std::snprintf(message, sizeof(message), format, queue.operations, queue.wait);
  fail(message);
}

// Empty groups may stay behind (a kernel commits one per tile, the last with nothing in it).
void check_no_async_operations_left() {
  for (AsyncQueue& queue : running_thread().async_queues) {
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

std::shared_ptr<void>& thread_state_slot(std::type_index type) { return running_thread().state[type]; }
std::shared_ptr<void>& block_state_slot(std::type_index type) { return launch->block->state[type]; }

void note_generic_shared_write(const void* address, std::size_t bytes) {
  Thread& self = running_thread();
  const uintptr_t first = reinterpret_cast<uintptr_t>(address) / 16;
  for (uintptr_t chunk = first; chunk <= (reinterpret_cast<uintptr_t>(address) + bytes - 1) / 16; ++chunk) {
    launch->block->unfenced_chunks[chunk] = self.index;
    self.unfenced_chunks.push_back(chunk);
  }
}

void fence_proxy_async() {
  Thread& self = running_thread();
  std::unordered_map<uintptr_t, int>& unfenced = launch->block->unfenced_chunks;
  for (const uintptr_t chunk : self.unfenced_chunks) {
    const auto written = unfenced.find(chunk);
    if (written != unfenced.end() && written->second == self.index) unfenced.erase(written);  // else rewritten since
  }
  self.unfenced_chunks.clear();
}

void check_async_proxy_read(const void* address, std::size_t bytes, const char* reader) {
  const std::unordered_map<uintptr_t, int>& unfenced = launch->block->unfenced_chunks;
  if (unfenced.empty()) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(address) / 16;
  for (uintptr_t chunk = first; chunk <= (reinterpret_cast<uintptr_t>(address) + bytes - 1) / 16; ++chunk) {
    const auto written = unfenced.find(chunk);
    if (written == unfenced.end()) continue;
    char message[320];
    std::snprintf(message, sizeof(message),
                  "%s reads shared memory that thread %d wrote by cp.async or stmatrix with no fence_proxy_async() "
                  "after it (on a GPU the asynchronous proxy may read the old bytes)",
                  reader, written->second);
    fail(message);
  }
}

void sync_block() { launch->block->barrier.arrive_and_wait(); }
void sync_warp() { current_warp().barrier.arrive_and_wait(); }
int lane_id() { return running_thread().index % kWarpSize; }
void* dynamic_shared_memory() { return launch->block->dynamic_shared.data(); }

namespace {

using Bank = unsigned char (*)[kWarpSlotBytes];

// Writes this lane's bytes into its slot and waits until every lane of the warp has written: one barrier per
// collective. The banks alternate, so a lane writes a bank again only two collectives later, after passing the
// next collective's barrier, which no lane reaches before it has finished reading this one.
Bank publish(const void* value, std::size_t bytes) {
  if (bytes > kWarpSlotBytes) fail("a warp collective of more than kWarpSlotBytes per lane");
  Warp& warp = current_warp();
  Bank bank = warp.slots[running_thread().collective_count++ % 2];
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

namespace {

// Where the threads that did not finish wait, as runs of thread indices ("0-95 at __syncthreads, 96-127 at ...").
std::string describe_waits(const std::vector<Thread>& threads) {
  std::string out;
  for (std::size_t first = 0; first < threads.size();) {
    std::size_t last = first;
    while (last + 1 < threads.size() && threads[last + 1].waiting_at == threads[first].waiting_at) ++last;
    if (!threads[first].finished) {
      const uint3 block = threads[first].block_idx;
      out += (out.empty() ? "in block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                                std::to_string(block.z) + ") threads "
                          : ", ") +
             std::to_string(first) + (last > first ? "-" + std::to_string(last) : "") + " wait at " +
             threads[first].waiting_at;
    }
    first = last + 1;
  }
  return out;
}

// A fiber's whole life: the kernel for every block of the grid, in order. Between blocks every thread waits; the
// last to arrive prepares the next block.
void thread_main() {
  Thread& self = running_thread();
  after_switch(&self);
  const unsigned blocks = launch->grid.x * launch->grid.y * launch->grid.z;
  for (unsigned b = 0; b < blocks; ++b) {
    self.block_idx = unlinear(b, launch->grid);
    blockIdx = self.block_idx;
    self.collective_count = 0;
    self.state.clear();
    self.unfenced_chunks.clear();
    (*launch->body)();
    check_no_async_operations_left();
    current_warp().barrier.arrive_and_drop();
    launch->block->barrier.arrive_and_drop();
    launch->block->between_blocks.arrive_and_wait([] { launch->block->start(); });
  }
  self.finished = true;
  suspend_running();  // never resumes: nothing makes a finished thread runnable
}

}  // namespace

void run_grid(dim3 grid, dim3 block_shape, std::size_t dynamic_shared_bytes, const std::function<void()>& body) {
  const unsigned threads = block_shape.x * block_shape.y * block_shape.z;
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || threads % kWarpSize != 0) {
    last_error = cudaErrorInvalidConfiguration;  // the emulation also needs whole warps
    return;
  }
  if (dynamic_shared_bytes > static_cast<std::size_t>(emulated_device().max_shared_memory_per_block_optin)) {
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
  block.between_blocks.reset(static_cast<int>(threads));
  block.start();
  Launch state;
  state.threads = std::vector<Thread>(threads);
  state.grid = grid;
  state.body = &body;
  state.block = &block;
  launch = &state;
  blockDim = block_shape;
  gridDim = grid;
  for (unsigned t = 0; t < threads; ++t) {
    Thread& thread = state.threads[t];
    thread.index = static_cast<int>(t);
    thread.thread_idx = unlinear(t, block_shape);
    thread.stack = take_stack(t);
    getcontext(&thread.context);
    thread.context.uc_stack.ss_sp = thread.stack;
    thread.context.uc_stack.ss_size = kStackBytes;
    thread.context.uc_link = nullptr;
    makecontext(&thread.context, thread_main, 0);
    // makecontext has placed the stack; later switches restore registers only. Forgetting uc_stack keeps
    // AddressSanitizer's swapcontext interceptor from unpoisoning the whole 1 MiB stack (128 KiB of shadow) at
    // every switch, which took half the emulated tests' time and dropped the redzones of the frames on it; the
    // fiber annotations (before_switch) give ASan the stack bounds instead.
    thread.context.uc_stack = stack_t{};
    state.runnable.push_back(&thread);
  }
  // Threads switch to one another at barriers; the host context runs again only when none is runnable.
  switch_to_next(&state.host, nullptr);
  after_switch(nullptr);
  // A GPU would hang here; the emulation says why instead.
  const std::string waits = describe_waits(state.threads);
  if (!waits.empty()) {
    fail(("threads wait at a barrier that others never reach (a __syncthreads or warp collective that not every "
          "thread of the block or warp reaches?): " + waits).c_str());
  }
  launch = nullptr;
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

const DeviceLimits& emulated_device() {
  // {major, minor, threads per SM, shared memory per block (opt-in) and per SM, blocks per SM}
  static constexpr DeviceLimits kH100{9, 0, 2048, 227 * 1024, 228 * 1024, 32};
  static constexpr DeviceLimits kA100{8, 0, 2048, 163 * 1024, 164 * 1024, 32};
  static constexpr DeviceLimits kRtx3090{8, 6, 1536, 99 * 1024, 100 * 1024, 16};
  const char* sm = std::getenv("ELECTRA_EXT_EMULATED_SM");
  if (sm != nullptr && std::strcmp(sm, "80") == 0) return kA100;
  if (sm != nullptr && std::strcmp(sm, "86") == 0) return kRtx3090;
  return kH100;
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  if (device != 0) fail("the emulated device is device 0");
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor: return emulated_device().major;
    case cudaDevAttrComputeCapabilityMinor: return emulated_device().minor;
    case cudaDevAttrMultiProcessorCount: return kMultiProcessorCount;
    case cudaDevAttrMaxThreadsPerMultiProcessor: return emulated_device().max_threads_per_multiprocessor;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return emulated_device().max_shared_memory_per_block_optin;
    case cudaDevAttrMaxSharedMemoryPerBlock: return kDefaultSharedMemoryPerBlock;
    case cudaDevAttrMaxThreadsPerBlock: return kMaxThreadsPerBlock;
    case cudaDevAttrWarpSize: return kWarpSize;
    default: fail("device attribute not emulated");
  }
}

}  // namespace simt
