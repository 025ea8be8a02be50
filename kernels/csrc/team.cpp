// See team.h.

#include "team.h"

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TANDEM_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define TANDEM_PAUSE() asm volatile("yield")
#else
#define TANDEM_PAUSE() ((void)0)
#endif

namespace tandem {

namespace {

thread_local Team* t_current = nullptr;

// Spins of a waiting thread (a member between loops, the leader at a loop's end) before it yields
// its CPU once (~0.1 ms on a 2.6 GHz Zen 4, ~65 cycles a pause): a step's gaps between loops are
// 3-20 us, so a member yields only when the leader is held up, and then lets whatever else wants
// the CPU run (a server shares it with its event loop).
constexpr int kSpinsBeforeYield = 1 << 12;

// spins (yielding now and then, as above) until done() holds
template <typename F>
void spin_until(const F& done) {
  for (int spins = 0; !done();) {
    TANDEM_PAUSE();
    if (++spins == kSpinsBeforeYield) {
      spins = 0;
      std::this_thread::yield();
    }
  }
}

}  // namespace

Team* Team::current() { return t_current; }

void Team::record(std::exception_ptr e) {
  std::lock_guard<std::mutex> lock(error_mu_);
  if (!error_) error_ = std::move(e);
}

void Team::wait_idle() {
  spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
}

void Team::end_warm() {
  cancel_.store(true, std::memory_order_relaxed);
  wait_idle();
}

void Team::read_spans(const void* ctx, int64_t t) {
  const Team& team = *static_cast<const Team*>(ctx);
  const int64_t members = team.size_ - 1, k = t - 1;
  for (int64_t i = 0; i < team.num_spans_; ++i) {
    const auto* p = static_cast<const volatile char*>(team.spans_[i].data);
    const int64_t lines = team.spans_[i].bytes / 64;
    for (int64_t l = lines * k / members; l < lines * (k + 1) / members; ++l) {
      // the leader wants the team for a loop: what is read by now is what the stretch allowed
      if (l % 64 == 0 && team.cancel_.load(std::memory_order_relaxed)) return;
      (void)p[l * 64];
    }
  }
}

void Team::warm(const Span* spans, int64_t count) {
  end_warm();
  if (size_ < 2) return;
  cancel_.store(false, std::memory_order_relaxed);
  num_spans_ = std::min(count, kMaxSpans);
  std::copy(spans, spans + num_spans_, spans_);
  fn_ = &Team::read_spans;
  ctx_ = this;
  parts_ = size_;
  pending_.store(size_ - 1, std::memory_order_relaxed);
  epoch_.fetch_add(1, std::memory_order_release);  // the leader does not wait: the next loop will
}

void Team::run(int64_t parts, void (*fn)(const void*, int64_t), const void* ctx) {
  TORCH_INTERNAL_ASSERT(1 <= parts && parts <= size_, "Team::run: ", parts, " parts for ", size_, " threads");
  end_warm();
  fn_ = fn;
  ctx_ = ctx;
  parts_ = parts;
  pending_.store(size_ - 1, std::memory_order_relaxed);
  epoch_.fetch_add(1, std::memory_order_release);  // publishes the fields above
  try {
    fn(ctx, 0);
  } catch (...) {
    record(std::current_exception());
  }
  wait_idle();
  if (error_) {
    std::exception_ptr e;
    std::swap(e, error_);
    std::rethrow_exception(e);
  }
}

void Team::serve(int64_t t) {
  // The epoch only moves on once every member has finished the loop before, so a member never
  // misses one: it starts from 0, as the team does, whenever its thread gets going.
  uint64_t seen = 0;
  for (;;) {
    uint64_t e = seen;
    spin_until([&] { return (e = epoch_.load(std::memory_order_acquire)) != seen; });
    seen = e;
    if (stopping_) return;
    if (t < parts_) {
      try {
        fn_(ctx_, t);
      } catch (...) {
        record(std::current_exception());
      }
    }
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

void Team::stop() {
  end_warm();
  stopping_ = true;
  epoch_.fetch_add(1, std::memory_order_release);
}

int64_t team_size() {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region() || Team::current() != nullptr) return 0;
#ifdef __linux__
  // (with OMP_PROC_BIND, OpenMP has pinned this thread to its own place and places the others)
  cpu_set_t cpus;
  if (omp_get_proc_bind() == omp_proc_bind_false && sched_getaffinity(0, sizeof(cpus), &cpus) == 0 &&
      threads > CPU_COUNT(&cpus))
    return 0;
#endif
  return threads;
}

void with_team(const std::function<void()>& body) {
  const int64_t threads = team_size();
  if (threads == 0) {
    body();
    return;
  }
  Team team(threads);
  std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int t = omp_get_thread_num();
    if (t == 0) {
      team.size_ = omp_get_num_threads();  // OpenMP may grant fewer (members read it after an epoch)
      t_current = &team;
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      t_current = nullptr;
      team.stop();
    } else {
      team.serve(t);
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace tandem

namespace {

// For tests (tests/kernels/test_team.py): the OpenMP thread number that ran each item of
// tandem::parallel_for(0, n, grain), run twice in one team (team) or through at::parallel_for,
// then the size of the team the loops ran in (0: none); the item `fail` (unless -1) raises on
// whichever thread runs it
at::Tensor team_probe(int64_t n, int64_t grain, bool team, int64_t fail) {
  at::Tensor out = at::full({n + 1}, -1, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  p[n] = 0;
  const auto loop = [&] {
    tandem::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        TORCH_CHECK(i != fail, "team_probe: item ", i, " raised on thread ", omp_get_thread_num());
        p[i] = omp_get_thread_num();
      }
    });
  };
  if (team) {
    tandem::with_team([&] {
      loop();
      std::fill(p, p + n, -1);
      const tandem::Team* current = tandem::Team::current();
      p[n] = current ? current->size() : 0;
      loop();
    });
  } else {
    loop();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("team_probe(int n, int grain, bool team, int fail) -> Tensor", &team_probe);
}
