// ParallelFor over XLA's intra-op thread pool, shared by the native CPU kernels (dequant4.cc, rotate.cc).
#ifndef OFTJAX_CSRC_PARALLEL_FOR_H_
#define OFTJAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace oftjax {

// Runs work(0..chunks-1) on the calling thread and the XLA intra-op pool. Chunks are claimed from a shared
// counter, so a pool task that starts late finds nothing left and touches no buffer; the caller waits only for
// chunks that were claimed. Which thread runs a chunk must not change its result (callers keep every chunk's
// arithmetic independent of the others).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> work) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    int64_t chunks = 0;
    std::function<void(int64_t)> work;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->work = std::move(work);
  auto drain = [state]() {
    int64_t mine = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks; ++mine) state->work(c);
    if (mine > 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += mine;
      if (state->done == state->chunks) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(std::function<void()>(drain));  // a copy per task
  drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->chunks; });
}

}  // namespace oftjax

#endif  // OFTJAX_CSRC_PARALLEL_FOR_H_
