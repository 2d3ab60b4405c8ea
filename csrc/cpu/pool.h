// The kernels' thread pool: the chunks of one parallel phase are claimed from a shared counter
// by the calling thread and by helpers on std::thread, so the caller never waits for a helper
// that has not started (a helper descheduled by another process finds nothing left when it
// wakes). The caller waits only for chunks already claimed and in progress: it spins briefly,
// then yields, then sleeps. See docs/scheduling.md for the design and the measurements.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_nerva {
namespace cpu {

// Runs fn(ctx, i) exactly once for every i in [0, n_chunks), on at most `n_threads` threads
// (the caller and n_threads - 1 helpers), and returns when all have finished. Which thread runs
// which chunk is not fixed, so a chunk's result must not depend on it. Runs everything on the
// calling thread when n_chunks or n_threads is <= 1, when called from inside a chunk (nested
// ops), or when another thread is using the pool (concurrent ops from several Python threads:
// each runs on its own thread instead of queueing). The first exception a chunk throws is
// rethrown here after every claimed chunk has finished (the remaining chunks still run).
void run_chunks(int64_t n_chunks, int64_t n_threads, void (*fn)(void*, int64_t), void* ctx);

// The scheduler run_chunks uses: "pool" (above) or "openmp" (the same chunks claimed from a
// counter inside one at::parallel_for region, whose end waits for every OpenMP thread). "" reads
// it; the default is "pool" when OMP_WAIT_POLICY=passive, else "openmp"; the environment
// variable TORCH_NERVA_SCHEDULER=pool|openmp overrides the default (docs/scheduling.md).
std::string scheduler(const std::string& name);

// The openmp scheduler's stall guard (pool_cpu.cpp): action "" reads it, "on" / "off" switch it
// (default on; TORCH_NERVA_STALL_GUARD=0 starts it off), "reset" forgets past stalls;
// helper_delay_us >= 0 sets a test delay of the helpers (-1 leaves it). Returns (on, seconds
// of serial running left, current backoff in seconds, stalls seen).
std::vector<double> stall_guard(const std::string& action, int64_t helper_delay_us);

// Whether the calling thread is running a chunk of run_chunks.
bool in_pool_chunk();

template <typename F>
void parallel_chunks(int64_t n_chunks, int64_t n_threads, const F& f) {
  run_chunks(n_chunks, n_threads,
             [](void* c, int64_t i) { (*static_cast<const F*>(c))(i); },
             const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace cpu
}  // namespace torch_nerva
