// Work items [0, n) for a parallel region: one contiguous range per part (thread), each taken
// from its front in chunks by its own thread; a thread whose range is empty takes chunks from the
// back of the others' ranges until nothing is left.
//
// Why: a batch-1 quantized linear is a ~10-50 us call in which each thread streams its half of the
// weights from DRAM; with fixed halves the thread that got less bandwidth (or started later, or
// lost its vCPU for a moment) set the call's end while the other waited at the barrier. On the
// EPYC guest (2 vCPUs, perf over the served config's batch-1 steps) the two threads' barrier waits
// were 6.4 % and 5.2 % of all samples; with these ranges 1.7 % and 3.0 %, and decode steps took
// 0.958-0.985x the time (alternating steps of one engine, 6 rounds of ~400). Less than the waits
// were: most of the freed time went to reading weights at the DRAM limit the two threads share.
// A thread's own stream stays one ascending run of addresses (handing out items one by one
// interleaved the threads' streams and defeated the prefetchers: 1.14-1.92x slower,
// docs/benchmarks.md). Which thread computes an item does not change its result, so outputs stay
// bit-identical.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tandem {

class WorkRanges {
 public:
  static constexpr int64_t kMaxParts = 64;

  // [0, n) in min(parts, kMaxParts, n) near-equal ranges (at least 1), claimed `chunk` items at a time
  WorkRanges(int64_t n, int64_t parts, int64_t chunk)
      : parts_(std::max<int64_t>(1, std::min({parts, kMaxParts, n}))), chunk_(std::max<int64_t>(1, chunk)) {
    for (int64_t p = 0; p < parts_; ++p) ranges_[p].word.store(pack(n * p / parts_, n * (p + 1) / parts_));
  }

  int64_t parts() const { return parts_; }

  // f(begin, end) over what part p's thread gets: its own range front to back, then chunks from the
  // back of the other ranges (the next part's first), until every range is empty
  template <typename F>
  void run(int64_t p, const F& f) {
    int64_t b, e;
    while (take(p, /*front=*/true, b, e)) f(b, e);
    for (int64_t k = 1; k < parts_; ++k) {
      const int64_t victim = (p + k) % parts_;
      while (take(victim, /*front=*/false, b, e)) f(b, e);
    }
  }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> word{0};  // (next, end): the items [next, end) not yet claimed
  };

  static uint64_t pack(int64_t next, int64_t end) {
    return (static_cast<uint64_t>(end) << 32) | static_cast<uint64_t>(next);
  }

  bool take(int64_t p, bool front, int64_t& b, int64_t& e) {
    std::atomic<uint64_t>& word = ranges_[p].word;
    uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t next = static_cast<int64_t>(w & 0xFFFFFFFFu), end = static_cast<int64_t>(w >> 32);
      if (next >= end) return false;
      b = front ? next : std::max(next, end - chunk_);
      e = front ? std::min(end, next + chunk_) : end;
      const uint64_t claimed = front ? pack(e, end) : pack(next, b);
      if (word.compare_exchange_weak(w, claimed, std::memory_order_relaxed)) return true;
    }
  }

  int64_t parts_, chunk_;
  Range ranges_[kMaxParts];
};

}  // namespace tandem
