// A team of threads kept for a whole decode step, and the parallel loop the kernels use.
//
// Why: a batch-1 decode step of a small quantized model is ~120 short parallel calls (the layers'
// linears, 5-30 us each). Each at::parallel_for opens an OpenMP region, and on the EPYC guest
// (2 vCPUs, the served int4 config) the calling thread took 1.45 us from the call to its own first
// item, the other thread 1.82 us, and 0.66 us more from the last item's end to the return: ~2.5 us
// of every call, ~0.3 ms of a ~3.7 ms step (per-call timers around linear_a8, docs/benchmarks.md).
// with_team opens ONE region for the step's layers instead: its calling thread runs them, and the
// region's other threads wait on a spin flag for the next loop. Handing a loop over is then two
// cache-line transfers: 0.35-0.85 / 0.55-1.38 us to the first items, 0.09-0.24 us after the last
// (the same timers, two runs), and batch-1 steps took 0.954-0.987x the time (alternating steps of
// one engine, bench/decode_step.py --alternate-team).
//
// tandem::parallel_for splits [begin, end) exactly as at::parallel_for does with OpenMP
// (min(threads, ceil(n / grain)) chunks of ceil(n / chunks) items, chunk t on thread t), on the
// team when the calling thread leads one, else through at::parallel_for itself. Which thread runs
// an item never changes a kernel's result, so outputs are bit-identical either way.
// Inside a team, code that calls at::parallel_for or oneDNN runs on the calling thread alone
// (OpenMP regions do not nest): with_team's callers keep such work out (decoder_layer.cpp).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace tandem {

class Team {
 public:
  explicit Team(int64_t size) : size_(size) {}

  int64_t size() const { return size_; }

  // The team the calling thread leads (inside with_team's body), or nullptr
  static Team* current();

  // fn(ctx, t) on threads t = 0 .. parts - 1 (parts <= size()), t = 0 the caller's; returns when
  // all are done, rethrowing the first exception any of them raised
  void run(int64_t parts, void (*fn)(const void*, int64_t), const void* ctx);

  // Bytes for the member threads to read into their caches (split between them) while the leader
  // goes on with work of its own. The next loop stops them where they are (what is read by then is
  // what the leader's stretch allowed) and starts once they have. At most kMaxSpans.
  struct Span {
    const void* data;
    int64_t bytes;
  };
  static constexpr int64_t kMaxSpans = 8;
  void warm(const Span* spans, int64_t count);

  // a member thread's loop (t >= 1) until stop()
  void serve(int64_t t);
  void stop();

 private:
  friend void with_team(const std::function<void()>& body);
  void record(std::exception_ptr e);
  void wait_idle();  // until the member threads are done with the last loop or warm
  void end_warm();   // stops a warm still running, then wait_idle
  static void read_spans(const void* team, int64_t t);

  int64_t size_;  // set by its leader (with_team) before the first loop
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  int64_t parts_ = 0;
  bool stopping_ = false;
  Span spans_[kMaxSpans];
  int64_t num_spans_ = 0;
  std::mutex error_mu_;
  std::exception_ptr error_;
  alignas(64) std::atomic<uint64_t> epoch_{0};  // bumped by the leader per loop (and to stop)
  alignas(64) std::atomic<int64_t> pending_{0};  // member threads still in the current loop
  alignas(64) std::atomic<bool> cancel_{false};  // set by the leader: the running warm stops
};

// body() on the calling thread, leading a team of at::get_num_threads() threads (an OpenMP region
// that lasts as long as body); without a team where there is nothing to gain (one thread), where
// the threads outnumber the CPUs this thread may run on (a member spinning for its next loop
// would take the CPU from the thread it waits for; OpenMP's own barriers go to sleep instead), or
// where no region can be opened (already inside one)
void with_team(const std::function<void()>& body);

// the team size with_team would use now (0: no team)
int64_t team_size();

// at::get_num_threads(), or the size of the team the calling thread leads
inline int64_t num_threads() {
  const Team* team = Team::current();
  return team ? team->size() : at::get_num_threads();
}

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  Team* team = Team::current();
  if (team == nullptr) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t parts = std::min(team->size(), grain > 0 ? (n - 1) / grain + 1 : n);
  if (parts <= 1) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + parts - 1) / parts;
  const auto job = [&](int64_t t) {
    const int64_t b = begin + t * chunk;
    if (b < end) f(b, std::min(end, b + chunk));
  };
  using Job = decltype(job);
  team->run(parts, [](const void* ctx, int64_t t) { (*static_cast<const Job*>(ctx))(t); }, &job);
}

}  // namespace tandem
