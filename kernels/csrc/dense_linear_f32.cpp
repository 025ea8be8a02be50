// Dense float32 linear for a decode step's few rows, on the plain [N, K] weight: y [M, N] = x [M, K]
// @ W^T, with AVX-512 or AVX2 FMAs.
//
// Why: MKL runs a call of few rows on one thread; engine/linear.py's split hands it one block of
// output rows per thread, but even so SmolLM2's 30 layers (425 MB) took 20 ms at 1 row on an AMD
// EPYC (Zen 4, 2 threads), ~21 GB/s, 1.6x the copy-bandwidth floor, and 28-32 ms at 2-8 rows (MKL
// there switches to kernels that read the weight at a fraction of that). A float32 decode step is
// a stream of the weights: per item of 4 output rows, up to 2 activation rows one weight row after
// the other (one load and one FMA per row and vector of inputs), more rows the 4 side by side (4
// weight loads, then per activation row one load and 4 FMAs; see tile); outputs in the lanes'
// sums. The weight is the one the model already holds (no copy, no repack); a step of more rows
// than the engine sends here goes to MKL.
//
// Arithmetic, per (activation row m, output n), for lanes L (16: AVX-512, 8: AVX2): L partial sums,
// lane l over k = l, l + L, l + 2L, ... in order, each product added with one rounding (FMA);
// then the lanes summed pairwise, halves first (L = 16: lane l + 8 onto l, then + 4, + 2, + 1).
// The same for every row and output in any call, whatever the tile, the thread or the rows beside
// it: a row's outputs do not depend on the batch (a verification step reproduces decode steps as
// long as both stay within the rows the engine sends here, engine.linear.F32_DIRECT_MAX_ROWS).
// Not MKL's order: outputs differ from F.linear's in the last bits.
//
// K must be a multiple of L (a check; the engine passes other shapes to MKL).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"
#include "work_ranges.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)

struct Lanes8 {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {  // pairwise, halves first: 8 -> 4 -> 2 -> 1
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
  }
};

#if defined(__AVX512F__)  // (AVX-512 implies AVX2; FMA can be switched off alone)
struct Lanes16 {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) {  // pairwise, halves first: 16 -> 8, then as Lanes8
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return Lanes8::sum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
  }
};
#endif

// y[m0 .. m0 + MT, n0 .. n0 + NT): NT weight rows streamed once, MT activation rows against each.
// Up to 2 activation rows the NT rows are read one after the other (one stream, the hardware
// prefetcher's alone), from 4 rows side by side (four streams, the next item's rows prefetched):
// the 30 layers of SmolLM2 at 1 row 13.1-13.3 vs 15.5-15.8 ms, at 2 rows 15.6 vs 18.3 (AMD EPYC,
// 2 threads; prefetching in the one stream made it slower, 14.2-14.4); at 8 rows the side-by-side
// rows are faster (21.5 vs 25.2). Each output's sum is the same either way.
template <class S, int MT, int NT>
void tile(const float* w, const float* x, int64_t xs, float* y, int64_t N, int64_t K, int64_t m0, int64_t n0) {
  if constexpr (MT <= 2) {
    const float* xr = x + m0 * xs;
    for (int j = 0; j < NT; ++j) {
      const float* wj = w + (n0 + j) * K;
      typename S::V acc[MT];
      for (int m = 0; m < MT; ++m) acc[m] = S::zero();
      for (int64_t k = 0; k < K; k += S::L) {
        const typename S::V wv = S::load(wj + k);
        for (int m = 0; m < MT; ++m) acc[m] = S::fma(wv, S::load(xr + m * xs + k), acc[m]);
      }
      for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n0 + j] = S::sum(acc[m]);
    }
    return;
  }
  typename S::V acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = S::zero();
  const float* wr = w + n0 * K;
  const float* xr = x + m0 * xs;
  for (int64_t k = 0; k < K; k += S::L) {
    typename S::V wv[NT];
    if (k % 16 == 0)  // the next item's rows (NT further on), one 64-byte line a row per 16 inputs
      for (int j = 0; j < NT; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr + (j + NT) * K + k), _MM_HINT_T0);
    for (int j = 0; j < NT; ++j) wv[j] = S::load(wr + j * K + k);
    for (int m = 0; m < MT; ++m) {
      const typename S::V xv = S::load(xr + m * xs + k);
      for (int j = 0; j < NT; ++j) acc[m][j] = S::fma(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) y[(m0 + m) * N + n0 + j] = S::sum(acc[m][j]);
}

// every row of x against weight rows [n0, n0 + NT): 4 activation rows at a time (16 accumulators
// with NT = 4), the weight rows re-read from L1 / L2 after the first 4
template <class S, int NT>
void rows(const float* w, const float* x, int64_t xs, float* y, int64_t M, int64_t N, int64_t K, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<S, 4, NT>(w, x, xs, y, N, K, m, n0);
  if (M - m >= 2) tile<S, 2, NT>(w, x, xs, y, N, K, m, n0), m += 2;
  if (M - m >= 1) tile<S, 1, NT>(w, x, xs, y, N, K, m, n0);
}

template <class S>
void run(const float* w, const float* x, int64_t xs, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int kOut = 4;  // weight rows per item
  const int64_t items = (N + kOut - 1) / kOut;
  // one range of items per thread, claimed ~16 KB of weights at a time (work_ranges.h)
  tandem::WorkRanges work(items, tandem::num_threads(), 16384 / (kOut * K * 4));
  tandem::parallel_for(0, work.parts(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      work.run(part, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n0 = i * kOut;
          if (n0 + kOut <= N) {
            rows<S, kOut>(w, x, xs, y, M, N, K, n0);
          } else {
            for (int64_t n = n0; n < N; ++n) rows<S, 1>(w, x, xs, y, M, N, K, n);
          }
        }
      });
  });
}

#endif  // AVX2 + FMA

}  // namespace

std::vector<int64_t> tandem::ops::dense_linear_f32_lanes() {
  std::vector<int64_t> lanes;
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  lanes.push_back(16);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  lanes.push_back(8);
#endif
  return lanes;
}

at::Tensor tandem::ops::dense_linear_f32(const at::Tensor& x, const at::Tensor& w, int64_t lanes) {
  static const std::vector<int64_t> built = dense_linear_f32_lanes();  // once, not per call
  TORCH_CHECK(!built.empty(), "dense_linear_f32: built without AVX2 + FMA or AVX-512");
  if (lanes == 0) lanes = built.front();
  TORCH_CHECK(std::find(built.begin(), built.end(), lanes) != built.end(), "dense_linear_f32: lanes ", lanes,
              " not built here");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be CPU float32 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == K,
              "w must be a contiguous CPU float32 [N, K] for this x");
  TORCH_CHECK(K % lanes == 0, "dense_linear_f32: K = ", K, " is not a multiple of ", lanes);
  const int64_t N = w.size(0);
  at::Tensor y = tandem::new_cpu({M, N}, x.scalar_type());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();  // an empty sum
  const float *wp = w.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if (lanes == 16) return run<Lanes16>(wp, xp, x.stride(0), yp, M, N, K), y;
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (lanes == 8) return run<Lanes8>(wp, xp, x.stride(0), yp, M, N, K), y;
#endif
  TORCH_CHECK(false, "dense_linear_f32: lanes ", lanes, " not built here");  // not reached: checked above
}

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("dense_linear_f32(Tensor x, Tensor w, int lanes=0) -> Tensor");
  m.def("dense_linear_f32_lanes() -> int[]", &tandem::ops::dense_linear_f32_lanes);
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("dense_linear_f32", &tandem::ops::dense_linear_f32); }
