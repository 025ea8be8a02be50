// Int4 (Q4_1) weight-only linear with bfloat16 activations on AVX512-BF16, for calls of up to 8
// rows (decode steps the engine gives the int4 kernel): y [M, N] = x [M, K] @ W^T.
//
// Why: quant_linear.cpp dequantizes each group to float32 weights (d * q + m), ~10 instructions
// per 32 weights before its two FMAs, and at batch 1 that, not the weight read, bounds it. Here a
// group's dot product is factored (d * q + m = 16 d * (1 + q / 16) + (m - 16 d)):
//     sum_k (d q_k + m) x_k = 16 d * sum_k (1 + q_k / 16) x_k + (m - 16 d) * sum_k x_k
// 1 + q / 16 (q = 0..15) is a bfloat16 whose mantissa bits 3..6 are q, so a nibble becomes one
// with a shift and one bit-select (vpternlogd), and vdpbf16ps multiplies it with bfloat16 x
// exactly (8-bit significands), summing in float32. One 64-byte load (four groups of a row) ->
// four shifts, four bit-selects, then per activation row four vdpbf16ps and one FMA by the groups'
// 16 d; sum_k x_k is the activations' own, once per call. No activation is rounded (vdpbf16ps
// does count a subnormal bfloat16 x, below ~1.2e-38, as 0); the sums are
// float32 in another order than the float path's (each output within one bfloat16 ulp of the
// float64 product, nearly all correctly rounded: tests/kernels/test_quant_linear.py).
//
// Measured (docs/benchmarks.md "int4 weight-only with bfloat16 activations"; SmolLM2's 30 layers,
// 2 threads, Intel Xeon with AMX): 0.85-0.93x the float path's time at 1 row; from 2 rows, where
// the float path shares each group's dequantization among the rows and pays eight FMAs per 128
// weights and row, the four vdpbf16ps cost more: 1.10-1.19x at 2 rows, 1.04-1.07x at 4, ~1.0 at
// 5, 1.03-1.10x at 8. It still takes every call of up to 8 rows, for batch invariance below.
//
// Batch invariance: every output (n, m) is computed by the same sequence of operations whatever
// the number of rows in the call (up to 8) and where it falls (the one-row path's two weight rows
// at a time, the tiles of 4 / 2 / 1 activation rows all run row_step on each (n, m) over the loads
// in order, then row_corrections and row_result). So a verification step of k + 1 rows at batch 1
// reproduces the plain decode steps bit for bit while the engine gives it to this kernel
// (engine.linear: up to 8 rows, 5 beside a bfloat16 dense copy on AMX), as with quant_linear.cpp.
//
// Built only where the compiler targets AVX512-BF16 (-march=native); elsewhere available() is
// false and int4_linear keeps the float path.

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;  // weights per int4 group (16 bytes of nibbles)
constexpr int64_t kQuad = 128;  // four groups: one 64-byte load, four vdpbf16ps
// rows ahead whose weight lines are prefetched (quant_linear.cpp's kPrefetchRows: the
// hardware prefetcher alone leaves one thread well below the memory bandwidth)
constexpr int64_t kPrefetchRows = 16;

// Where the nibbles of a 64-byte load of one row (groups 4c .. 4c + 3, 16 bytes each) go. As 32
// 16-bit words, word i holds bytes 2i, 2i + 1 of the load, so its four nibbles are weights j,
// j + 16, j + 1, j + 17 of group i / 8, j = 2i % 16 (Q4_1: byte j's low nibble is weight j, its
// high one weight j + 16). Field f of every word is moved to bits 3..6 and 0x3F80 set, which
// makes the bfloat16 1 + q / 16 (exact); vdpbf16ps sums words 2l, 2l + 1, so lane l of the four
// products' sum belongs to group 4c + l / 4.
constexpr int kFieldWeight[4] = {0, 16, 1, 17};  // weight of field f, relative to j

// The activation rows, rearranged once per call: per row and four groups, four blocks of 32
// bfloat16 values, block f word i = the x that weight field f of word i meets (zeros past K). And
// each group's float32 sum, zero-padded to a multiple of 16 groups.
struct Acts {
  int64_t quads, groups, gpad;
  std::vector<c10::BFloat16> xs;  // [M, quads * 128]
  std::vector<float> sums;        // [M, gpad]
  const c10::BFloat16* row(int64_t m) const { return xs.data() + m * quads * kQuad; }
  const float* sum(int64_t m) const { return sums.data() + m * gpad; }
};

Acts arrange(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), stride = x.stride(0);
  Acts a;
  a.groups = K / kGroup;
  a.quads = (a.groups + 3) / 4;
  a.gpad = (a.groups + 15) / 16 * 16;
  a.xs.assign(M * a.quads * kQuad, c10::BFloat16(0.0f));
  a.sums.assign(M * a.gpad, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < a.groups; ++g) {
      const c10::BFloat16* xg = x.data_ptr<c10::BFloat16>() + m * stride + g * kGroup;
      c10::BFloat16* quad = a.xs.data() + m * a.quads * kQuad + (g / 4) * kQuad;
      for (int64_t i = (g % 4) * 8; i < (g % 4) * 8 + 8; ++i)
        for (int f = 0; f < 4; ++f) quad[f * 32 + i] = xg[(2 * i) % 16 + kFieldWeight[f]];
      // bfloat16 -> float32 is a 16-bit shift; the sum's order is fixed: two 16-lane halves added
      // lane by lane, then the 16 lanes reduced
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg)));
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16)));
      a.sums[m * a.gpad + g] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(l, 16))));
    }
  }
  return a;
}

// Groups 4c .. 4c + 3 of one weight row as bfloat16 1 + q / 16, the four fields (see
// kFieldWeight); past the row's last group (``left`` < 4 groups) the nibbles are 0, so 1 meets a
// zero activation.
struct Levels {
  __m512bh f[4];
};
inline Levels levels(const uint8_t* q, int64_t left) {
  const __m512i w = left >= 4 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8((1ull << (16 * left)) - 1, q);
  const __m512i field = _mm512_set1_epi16(0x78), one = _mm512_set1_epi16(0x3F80);
  // (v & 0x78) | 0x3F80 in one instruction: truth table 0xEA = (A & B) | C
  auto pick = [&](__m512i v) { return (__m512bh)_mm512_ternarylogic_epi32(v, field, one, 0xEA); };
  return {{pick(_mm512_slli_epi16(w, 3)), pick(_mm512_srli_epi16(w, 1)), pick(_mm512_srli_epi16(w, 5)),
           pick(_mm512_srli_epi16(w, 9))}};
}

// 16 float16 values from p (fewer than 16 left: the rest 0) as float32
inline __m512 halves16(const c10::Half* p, int64_t left) {
  const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// One (weight row, activation row) pair's step over one load's four groups: the 128 products of
// the levels 1 + q / 16 summed per group (4 lanes each), scaled by the groups' 16 d (dv) into acc
inline void row_step(const Levels& lv, const c10::BFloat16* xp, __m512 dv, __m512* acc) {
  __m512 part = _mm512_setzero_ps();
  for (int f = 0; f < 4; ++f) part = _mm512_dpbf16_ps(part, lv.f[f], (__m512bh)_mm512_loadu_si512(xp + 32 * f));
  *acc = _mm512_fmadd_ps(part, dv, *acc);
}

// (m_g - 16 d_g) of a weight row's groups into corr [gpad] (zeros past the last group), since
// d q + m = 16 d (1 + q / 16) + m - 16 d
inline void row_corrections(const c10::Half* d, const c10::Half* mins, int64_t groups, float* corr) {
  for (int64_t g = 0; g < groups; g += 16)
    _mm512_storeu_ps(corr + g, _mm512_sub_ps(halves16(mins + g, groups - g),
                                             _mm512_mul_ps(halves16(d + g, groups - g), _mm512_set1_ps(16.0f))));
}

// The output of one (weight row, activation row): 16 d sum (1 + q / 16) x per group (acc, two
// accumulators) plus sum_g corr_g * sum_g(x), lane by lane in a fixed order, then one reduction
inline float row_result(const __m512* acc, const float* corr, const float* sums, int64_t gpad) {
  __m512 t = _mm512_add_ps(acc[0], acc[1]);
  for (int64_t g = 0; g < gpad; g += 16) t = _mm512_fmadd_ps(_mm512_loadu_ps(corr + g), _mm512_loadu_ps(sums + g), t);
  return _mm512_reduce_add_ps(t);
}

struct Weights {
  const uint8_t* q;    // [N, K / 2]
  const c10::Half* d;  // [N, K / 32]
  const c10::Half* m;  // [N, K / 32]
  int64_t K, groups;
  const uint8_t* qrow(int64_t n) const { return q + n * (K / 2); }
  const c10::Half* drow(int64_t n) const { return d + n * groups; }
  const c10::Half* mrow(int64_t n) const { return m + n * groups; }
};

// 16 d of 16 groups from 4c on (a chunk of four loads)
inline __m512 scales16(const Weights& w, int64_t n, int64_t c) {
  return _mm512_mul_ps(halves16(w.drow(n) + 4 * c, w.groups - 4 * c), _mm512_set1_ps(16.0f));
}
// the lanes of scales16's chunk that hold load c's four groups, each four times
inline __m512i quad_index(int64_t c) {
  return _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                          _mm512_set1_epi32(static_cast<int>(4 * (c % 4))));
}

// Calls step(c, k) for each load c in order, k = c % 2 as a compile-time constant (the
// accumulator index: a runtime one keeps the accumulators in memory, on the FMA chain)
template <typename Step>
inline void for_quads(int64_t quads, Step step) {
  int64_t c = 0;
  for (; c + 2 <= quads; c += 2) {
    step(c, std::integral_constant<int, 0>());
    step(c + 1, std::integral_constant<int, 1>());
  }
  if (c < quads) step(c, std::integral_constant<int, 0>());
}

// M = 1: y[n], y[n + 1] (the activation loads shared), prefetching the rows kPrefetchRows ahead
// while they are below ``end``; per row the same operations as row_tile's
inline void row_pair_m1(const Weights& w, int64_t n, int64_t end, const Acts& a, float* corr, float* out) {
  const bool ahead = n + kPrefetchRows + 2 <= end;
  // named registers, not arrays indexed in a loop: GCC keeps those in memory, on the FMA chain
  __m512 acc0[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, acc1[2] = {acc0[0], acc0[1]};
  __m512 d0 = acc0[0], d1 = acc0[0];
  for_quads(a.quads, [&](int64_t c, auto k) {
    if (ahead) {  // one load = one 64-byte line of a row
      for (int64_t r = n + kPrefetchRows; r < n + kPrefetchRows + 2; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w.qrow(r) + c * 64), _MM_HINT_T0);
        if (c == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(w.drow(r)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w.mrow(r)), _MM_HINT_T0);
        }
      }
    }
    const __m512i idx = quad_index(c);
    const int64_t left = a.groups - 4 * c;
    const c10::BFloat16* xq = a.row(0) + c * kQuad;
    if (c % 4 == 0) d0 = scales16(w, n, c);
    row_step(levels(w.qrow(n) + c * 64, left), xq, _mm512_permutexvar_ps(idx, d0), &acc0[k]);
    if (c % 4 == 0) d1 = scales16(w, n + 1, c);
    row_step(levels(w.qrow(n + 1) + c * 64, left), xq, _mm512_permutexvar_ps(idx, d1), &acc1[k]);
  });
  row_corrections(w.drow(n), w.mrow(n), a.groups, corr);
  out[0] = row_result(acc0, corr, a.sum(0), a.gpad);
  row_corrections(w.drow(n + 1), w.mrow(n + 1), a.groups, corr);
  out[1] = row_result(acc1, corr, a.sum(0), a.gpad);
}

// y[m0 .. m0 + MT, n] for one weight row n (MT = 1, 2, 4): its levels made once per load for the
// MT rows; each row's operations are those of row_pair_m1's
template <int MT>
inline void row_tile(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* corr, float* out) {
  static_assert(MT == 1 || MT == 2 || MT == 4);
  // named accumulators (see row_pair_m1): acc<i>[k] for activation row m0 + i
  const __m512 z = _mm512_setzero_ps();
  __m512 acc0[2] = {z, z}, acc1[2] = {z, z}, acc2[2] = {z, z}, acc3[2] = {z, z};
  __m512 dchunk = z;
  for_quads(a.quads, [&](int64_t c, auto k) {
    if (c % 4 == 0) dchunk = scales16(w, n, c);
    const __m512 dv = _mm512_permutexvar_ps(quad_index(c), dchunk);
    const Levels lv = levels(w.qrow(n) + c * 64, a.groups - 4 * c);
    row_step(lv, a.row(m0) + c * kQuad, dv, &acc0[k]);
    if constexpr (MT >= 2) row_step(lv, a.row(m0 + 1) + c * kQuad, dv, &acc1[k]);
    if constexpr (MT == 4) {
      row_step(lv, a.row(m0 + 2) + c * kQuad, dv, &acc2[k]);
      row_step(lv, a.row(m0 + 3) + c * kQuad, dv, &acc3[k]);
    }
  });
  row_corrections(w.drow(n), w.mrow(n), a.groups, corr);
  out[0] = row_result(acc0, corr, a.sum(m0), a.gpad);
  if constexpr (MT >= 2) out[1] = row_result(acc1, corr, a.sum(m0 + 1), a.gpad);
  if constexpr (MT == 4) {
    out[2] = row_result(acc2, corr, a.sum(m0 + 2), a.gpad);
    out[3] = row_result(acc3, corr, a.sum(m0 + 3), a.gpad);
  }
}

template <int MT>
inline void emit_tile(const Weights& w, int64_t n, const Acts& a, int64_t& m0, float* corr, c10::BFloat16* y,
                      int64_t N) {
  float out[MT];
  row_tile<MT>(w, n, a, m0, corr, out);
  for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = static_cast<c10::BFloat16>(out[i]);
  m0 += MT;
}

}  // namespace

bool tandem::ops::int4_linear_bf16_available() { return true; }

// shapes and dtypes checked by int4_linear (quant_linear.cpp)
at::Tensor tandem::ops::int4_linear_bf16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                         const at::Tensor& mins) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "x must be CPU bfloat16 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const Acts a = arrange(x);
  const Weights w{qweight.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), K,
                  K / kGroup};
  at::Tensor y = tandem::new_cpu({M, N}, x.scalar_type());
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t threads = std::max<int64_t>(1, tandem::num_threads());
  const int64_t grain = std::max<int64_t>(1, (N + threads - 1) / threads);  // one range per thread
  tandem::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> corr(a.gpad, 0.0f);
    float out[2];
    int64_t n = begin;
    for (; M == 1 && n + 2 <= end; n += 2) {
      row_pair_m1(w, n, end, a, corr.data(), out);
      yp[n] = static_cast<c10::BFloat16>(out[0]);
      yp[n + 1] = static_cast<c10::BFloat16>(out[1]);
    }
    for (; n < end; ++n) {  // M > 1, or the odd last row of a thread's range at M = 1
      int64_t m0 = 0;
      while (m0 + 4 <= M) emit_tile<4>(w, n, a, m0, corr.data(), yp, N);
      if (M - m0 >= 2) emit_tile<2>(w, n, a, m0, corr.data(), yp, N);
      if (M - m0 >= 1) emit_tile<1>(w, n, a, m0, corr.data(), yp, N);
    }
  });
  return y;
}

#else

bool tandem::ops::int4_linear_bf16_available() { return false; }

at::Tensor tandem::ops::int4_linear_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "int4_linear_bf16: built without AVX512-BF16");
}

#endif
