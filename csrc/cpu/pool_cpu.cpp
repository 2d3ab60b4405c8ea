// The kernels' thread pool (pool.h).
//
// One job at a time: the pool's job slot is taken with an atomic flag; a caller that finds it
// taken (another Python thread's op, or a nested op inside a chunk) runs its chunks itself.
// The job's chunks are claimed through `counter_`, 32 bits of job epoch and 32 bits of next
// chunk index, with compare-and-swap, so a helper that wakes up late for an earlier job can
// never claim a chunk of a later one: before a caller rewrites the job description it closes
// the counter (new epoch, index exhausted), and a helper validates what it read of the job with
// the CAS on the counter value it read first (all accesses sequentially consistent). A job is
// finished when `done_` reaches its chunk count; only chunks claimed are waited for.
//
// Helpers spin for a short while after a job (consecutive phases of one op follow within
// microseconds), then sleep on a condition variable; the caller wakes them only when some are
// asleep. Helpers are detached and the pool is never destroyed (no join at exit); after fork()
// the child starts with no helpers.
#include "pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <atomic>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TORCH_NERVA_PAUSE() _mm_pause()
#else
#define TORCH_NERVA_PAUSE() std::this_thread::yield()
#endif

namespace torch_nerva {
namespace cpu {
namespace {

typedef void (*ChunkFn)(void*, int64_t);
typedef std::chrono::steady_clock Clock;

// How long a helper spins for the next job, and how long a caller spins, then yields, before
// sleeping while a claimed chunk is still running on another thread.
// The helpers' spin can be set with TORCH_NERVA_POOL_SPIN_US (read once; for measurements).
std::chrono::microseconds helper_spin() {
  static const std::chrono::microseconds spin = [] {
    const char* env = std::getenv("TORCH_NERVA_POOL_SPIN_US");
    return std::chrono::microseconds(env ? std::max(0L, std::atol(env)) : 50L);
  }();
  return spin;
}
constexpr auto kCallerSpin = std::chrono::microseconds(20);
constexpr auto kCallerYield = std::chrono::microseconds(200);
constexpr auto kCallerSleep = std::chrono::microseconds(20);
constexpr uint64_t kExhausted = 0xffffffffu;

thread_local bool t_in_chunk = false;

struct ChunkScope {
  bool old;
  ChunkScope() : old(t_in_chunk) { t_in_chunk = true; }
  ~ChunkScope() { t_in_chunk = old; }
};

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {
      Pool* p = new Pool();  // never destroyed: detached helpers may still wait on it at exit
      pthread_atfork(nullptr, nullptr, [] { Pool::get().reset_after_fork(); });
      return p;
    }();
    return *pool;
  }

  bool try_acquire() {
    bool expected = false;
    return busy_.compare_exchange_strong(expected, true);
  }

  // Called with the job slot held.
  void run(int64_t n_chunks, int64_t n_helpers, ChunkFn fn, void* ctx) {
    ensure_helpers(n_helpers);
    const uint64_t epoch = (epoch_ = (epoch_ + 1) & 0xffffffffu);
    counter_.store((epoch << 32) | kExhausted);  // close: stale readers' CAS now fails
    n_chunks_.store(n_chunks);
    fn_.store(fn);
    ctx_.store(ctx);
    helpers_wanted_.store(n_helpers);
    done_.store(0);
    error_set_.store(false);
    error_ = nullptr;
    counter_.store(epoch << 32);  // open
    posted_.store(static_cast<uint32_t>(epoch));
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    work(static_cast<uint32_t>(epoch), -1);
    wait_done(n_chunks);
    std::exception_ptr error = error_;
    busy_.store(false);
    if (error) std::rethrow_exception(error);
  }

 private:
  Pool() = default;

  void ensure_helpers(int64_t n) {
    while (n_started_.load() < n) {
      const int64_t id = n_started_.load();
      std::thread([this, id] { helper_loop(id); }).detach();
      n_started_.store(id + 1);
    }
  }

  void reset_after_fork() {  // the child has only the forking thread
    new (&mu_) std::mutex();
    new (&cv_) std::condition_variable();
    n_started_.store(0);
    sleepers_.store(0);
    busy_.store(false);
  }

  // Claims and runs chunks of job `epoch` until none is left. `id` < 0 is the caller.
  void work(uint32_t epoch, int64_t id) {
    for (;;) {
      uint64_t v = counter_.load();
      if ((v >> 32) != epoch) return;
      const int64_t i = static_cast<int64_t>(v & 0xffffffffu);
      const int64_t n = n_chunks_.load();
      const ChunkFn fn = fn_.load();
      void* ctx = ctx_.load();
      if (i >= n || id >= helpers_wanted_.load()) return;
      // Success means the counter still held v: the job read above is job `epoch`, and chunk i
      // is ours; job `epoch` cannot finish (nor its slot be rewritten) before done_ counts it.
      if (!counter_.compare_exchange_weak(v, v + 1)) continue;
      {
        ChunkScope scope;
        try {
          fn(ctx, i);
        } catch (...) {
          bool expected = false;
          if (error_set_.compare_exchange_strong(expected, true)) error_ = std::current_exception();
        }
      }
      done_.fetch_add(1);
    }
  }

  void wait_done(int64_t n_chunks) {
    if (done_.load() == n_chunks) return;
    const auto start = Clock::now();
    for (int64_t k = 0;; ++k) {
      for (int j = 0; j < 64; ++j) {
        if (done_.load(std::memory_order_acquire) == n_chunks) return;
        TORCH_NERVA_PAUSE();
      }
      const auto waited = Clock::now() - start;
      if (waited < kCallerSpin) continue;
      if (waited < kCallerYield) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kCallerSleep);
      }
    }
  }

  void helper_loop(int64_t id) {
    uint32_t seen = posted_.load();
    const auto spin = helper_spin();
    for (;;) {
      const auto start = Clock::now();
      bool fresh = false;
      while (!fresh) {  // spin a little for the next job
        for (int j = 0; j < 64 && !fresh; ++j) {
          fresh = posted_.load(std::memory_order_relaxed) != seen;
          if (!fresh) TORCH_NERVA_PAUSE();
        }
        if (Clock::now() - start > spin) break;
      }
      if (!fresh) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);  // seq_cst: the caller's posted_ store or this is seen first
        cv_.wait(lock, [&] { return posted_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = posted_.load();
      work(seen, id);
    }
  }

  std::atomic<bool> busy_{false};
  uint64_t epoch_ = 0;  // owned by the slot holder
  std::atomic<uint64_t> counter_{kExhausted};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> helpers_wanted_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> error_set_{false};
  std::exception_ptr error_;
  std::atomic<uint32_t> posted_{0};
  std::atomic<int64_t> sleepers_{0};
  std::atomic<int64_t> n_started_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

void run_serial(int64_t n_chunks, ChunkFn fn, void* ctx) {
  ChunkScope scope;
  for (int64_t i = 0; i < n_chunks; ++i) fn(ctx, i);
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// The stall guard of the openmp scheduler. The end of an OpenMP region waits for every thread
// of the team; when another process holds a core, a team thread may not run for a time slice
// of the OS (milliseconds, against regions of tens of microseconds), and the caller waits for
// it at the barrier although it ran every chunk itself. The guard measures that wait (the end
// of the region minus the moment the caller found no chunk left): above kStallNs, the phases
// of the next `backoff` run serially on the calling thread (no region, nobody to wait for),
// then one region probes again; the backoff doubles while probes stall (kMinBackoffNs ..
// kMaxBackoffNs) and halves with every region that does not. Serial and parallel runs give
// bit-identical results (chunks own their outputs), so the guard changes timings only.
constexpr int64_t kStallNs = 250 * 1000;
constexpr int64_t kMinBackoffNs = 20 * 1000 * 1000;
constexpr int64_t kMaxBackoffNs = 2000 * 1000 * 1000;
std::atomic<int64_t> g_serial_until{0};
std::atomic<int64_t> g_backoff{0};
std::atomic<int64_t> g_stalls{0};
std::atomic<int> g_guard{-1};  // -1 unread, 0 off, 1 on
// Test hook: helpers (not the caller) sleep this long before claiming a chunk.
std::atomic<int64_t> g_helper_delay_us{0};

bool guard_on() {
  int g = g_guard.load(std::memory_order_relaxed);
  if (g < 0) {
    const char* env = std::getenv("TORCH_NERVA_STALL_GUARD");
    g = (env && std::string(env) == "0") ? 0 : 1;
    g_guard.store(g);
  }
  return g == 1;
}

void note_wait(int64_t end, int64_t waited) {
  int64_t backoff = g_backoff.load(std::memory_order_relaxed);
  if (waited > kStallNs) {
    backoff = std::min(kMaxBackoffNs, std::max(kMinBackoffNs, 2 * backoff));
    g_backoff.store(backoff, std::memory_order_relaxed);
    g_serial_until.store(end + backoff, std::memory_order_relaxed);
    g_stalls.fetch_add(1, std::memory_order_relaxed);
  } else if (backoff > 0) {
    g_backoff.store(backoff / 2 < kMinBackoffNs ? 0 : backoff / 2, std::memory_order_relaxed);
  }
}

// The same chunks claimed from a counter by the threads of one at::parallel_for (OpenMP)
// region: balanced dynamically, but the region's end still waits for every thread; guarded
// as above.
void run_openmp(int64_t n_chunks, int64_t n_threads, ChunkFn fn, void* ctx) {
  const bool guard = guard_on();
  if (guard && now_ns() < g_serial_until.load(std::memory_order_relaxed)) {
    run_serial(n_chunks, fn, ctx);
    return;
  }
  const int64_t delay_us = g_helper_delay_us.load(std::memory_order_relaxed);
  std::atomic<int64_t> next{0};
  int64_t caller_done = 0;
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t) {
    ChunkScope scope;
    if (begin != 0 && delay_us > 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    }
    for (int64_t i = next.fetch_add(1); i < n_chunks; i = next.fetch_add(1)) fn(ctx, i);
    if (begin == 0) caller_done = now_ns();  // thread 0 of the region is the caller
  });
  if (guard && caller_done > 0) {
    const int64_t end = now_ns();
    note_wait(end, end - caller_done);
  }
}

// 0 = pool, 1 = openmp. Default: the pool when torch's OpenMP threads sleep when idle
// (OMP_WAIT_POLICY=passive); otherwise they spin for milliseconds after each of torch's own
// parallel ops and starve the pool's helpers of their core (docs/scheduling.md).
std::atomic<int> g_mode{-1};

int default_mode() {
  if (const char* env = std::getenv("TORCH_NERVA_SCHEDULER")) {
    const std::string v(env);
    if (v == "pool") return 0;
    if (v == "openmp") return 1;
  }
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::string p = policy ? policy : "";
  for (char& ch : p) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return p == "passive" ? 0 : 1;
}

int mode() {
  int m = g_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    m = default_mode();
    g_mode.store(m);
  }
  return m;
}

}  // namespace

bool in_pool_chunk() { return t_in_chunk; }

std::vector<double> stall_guard(const std::string& action, int64_t helper_delay_us) {
  if (action == "on" || action == "off") {
    g_guard.store(action == "on" ? 1 : 0);
  } else {
    TORCH_CHECK(action.empty() || action == "reset",
                "torch_nerva._stall_guard: expected \"\", \"on\", \"off\" or \"reset\", got \"",
                action, "\"");
  }
  TORCH_CHECK(helper_delay_us >= -1, "torch_nerva._stall_guard: helper_delay_us must be >= -1");
  if (action == "reset" || action == "off") {
    g_serial_until.store(0);
    g_backoff.store(0);
  }
  if (action == "reset") g_stalls.store(0);
  if (helper_delay_us >= 0) g_helper_delay_us.store(helper_delay_us);
  const int64_t left = std::max<int64_t>(0, g_serial_until.load() - now_ns());
  return {guard_on() ? 1.0 : 0.0, left * 1e-9, g_backoff.load() * 1e-9, (double)g_stalls.load()};
}

std::string scheduler(const std::string& name) {
  if (name == "pool") {
    g_mode.store(0);
  } else if (name == "openmp") {
    g_mode.store(1);
  } else {
    TORCH_CHECK(name.empty(), "torch_nerva._scheduler: expected \"pool\", \"openmp\" or \"\", got \"",
                name, "\"");
  }
  return mode() == 0 ? "pool" : "openmp";
}

void run_chunks(int64_t n_chunks, int64_t n_threads, ChunkFn fn, void* ctx) {
  if (n_chunks <= 0) return;
  if (n_chunks == 1 || n_threads <= 1 || t_in_chunk || n_chunks >= (int64_t)kExhausted) {
    run_serial(n_chunks, fn, ctx);
    return;
  }
  if (mode() == 1) {
    run_openmp(n_chunks, n_threads, fn, ctx);
    return;
  }
  Pool& pool = Pool::get();
  if (!pool.try_acquire()) {
    run_serial(n_chunks, fn, ctx);
    return;
  }
  pool.run(n_chunks, n_threads - 1, fn, ctx);
}

}  // namespace cpu
}  // namespace torch_nerva
