// Weight-only quantized linear layers for CPU: y [M, N] = x [M, K] @ W^T with W stored as int4
// (llama.cpp Q4_1 blocks) or int8 (symmetric, group size G); formats and semantics are those of
// kernels/quant_reference.py. Activations float32 or bfloat16 (converted to float32 once),
// products accumulated in float32, output in x's dtype.
//
// Why: a decode step reads every weight once, and at batch 1 that read is the step (SmolLM2:
// 538 MB in float32, ~96 MB as Q4_1 + Q8_0). MKL / oneDNN have no kernel for these formats, and
// torch's packed int8 / int4 CPU kernels were measured slower than these at decode sizes
// (docs/benchmarks.md "Weight-only quantization").
//
// Work unit = 32 weights of one row (an int4 group). It is dequantized into registers once, to
// exactly the float32 weights the reference dequantizes (int4: d * q + m as a multiply then an
// add, like numpy's / torch's; int8: d * q), then multiplied with up to MT activation rows, each
// row keeping one vector accumulator. So an int4 model from a Q4_1 GGUF computes with the very
// weights of the float32 path; only the summation order differs. (bfloat16 x of up to 8 rows on
// AVX512-BF16: quant_linear_bf16.cpp, see int4_linear.) Threads split the output
// features N; each processes its rows for all M, in tiles of MT rows (a tile's activations stay
// in L1/L2 while the row's weights are dequantized once per tile).
// int4 on AVX-512: the 16 possible values of a group, d * [0..15] + m, are one zmm register, and
// vpermps looks the nibbles up in it (it reads only the low 4 bits of each index), so a group
// costs a widening load, a shift and two permutes instead of int -> float conversions.
// Paths: AVX-512 (16 lanes) or AVX2+FMA (8 lanes), chosen at compile time (-march=native); a plain
// loop otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kUnit = 32;  // weights per work unit (= the int4 group)
constexpr int64_t kBf16DotMaxRows = 8;  // int4, bfloat16 x: quant_linear_bf16.cpp up to here

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kLanes = 16;
constexpr int kMaxTile = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline void dequant_int4(const uint8_t* qs, float d, float m, vec* w) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(d)), _mm512_set1_ps(m));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  w[0] = _mm512_permutexvar_ps(bytes, table);                         // low nibbles: values 0..15
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);  // high nibbles: 16..31
}
inline void dequant_int8(const int8_t* q, float d, vec* w) {
  const __m512 dv = _mm512_set1_ps(d);
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * i)))), dv);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kMaxTile = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 u8x8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline void dequant_int4(const uint8_t* qs, float d, float m, vec* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) w[i] = _mm256_add_ps(_mm256_mul_ps(u8x8_to_ps(parts[i]), dv), mv);
}
inline void dequant_int8(const int8_t* q, float d, vec* w) {
  const __m256 dv = _mm256_set1_ps(d);
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i)))), dv);
}
#else
constexpr int kLanes = 1;
constexpr int kMaxTile = 4;
#endif

// float16 [n] -> float32 [n]
inline void halves_to_floats(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One weight row's 32-weight units, dequantized to float32 (exactly the reference's weights).
struct Int4Rows {
  const uint8_t* q;    // [N, K / 2]
  const c10::Half* d;  // [N, K / 32]
  const c10::Half* m;  // [N, K / 32]
  int64_t K;
  int64_t num_scales() const { return K / kUnit; }
  // per-row float32 copies of d (and m) in buf: [2 * K / 32]
  void load_row_scales(int64_t n, float* buf) const {
    halves_to_floats(d + n * (K / kUnit), K / kUnit, buf);
    halves_to_floats(m + n * (K / kUnit), K / kUnit, buf + K / kUnit);
  }
#if defined(__AVX2__) && defined(__FMA__)
  void unit(int64_t n, int64_t u, const float* buf, vec* w) const {
    dequant_int4(q + n * (K / 2) + u * 16, buf[u], buf[K / kUnit + u], w);
  }
#endif
  void unit_scalar(int64_t n, int64_t u, const float* buf, float* w) const {
    const uint8_t* qs = q + n * (K / 2) + u * 16;
    const float dd = buf[u], mm = buf[K / kUnit + u];
    for (int j = 0; j < 16; ++j) {
      w[j] = static_cast<float>(qs[j] & 0x0F) * dd + mm;
      w[j + 16] = static_cast<float>(qs[j] >> 4) * dd + mm;
    }
  }
};

struct Int8Rows {
  const int8_t* q;     // [N, K]
  const c10::Half* d;  // [N, K / G]
  int64_t K, G;
  int64_t num_scales() const { return K / G; }
  void load_row_scales(int64_t n, float* buf) const { halves_to_floats(d + n * (K / G), K / G, buf); }
#if defined(__AVX2__) && defined(__FMA__)
  void unit(int64_t n, int64_t u, const float* buf, vec* w) const {
    dequant_int8(q + n * K + u * kUnit, buf[u * kUnit / G], w);
  }
#endif
  void unit_scalar(int64_t n, int64_t u, const float* buf, float* w) const {
    const int8_t* qs = q + n * K + u * kUnit;
    const float dd = buf[u * kUnit / G];
    for (int j = 0; j < kUnit; ++j) w[j] = static_cast<float>(qs[j]) * dd;
  }
};

// out[m] (m < MT) = sum_k w[n, k] * x[m, k] for one weight row n
template <int MT, typename Rows>
inline void row_tile(const Rows& rows, int64_t n, const float* x, int64_t K, const float* buf, float* out) {
  const int64_t units = K / kUnit;
#if defined(__AVX2__) && defined(__FMA__)
  constexpr int W = kUnit / kLanes;
  // two accumulators per row (lane i of a unit goes to i % 2), the same for every MT, so a row's
  // result does not depend on the batch it is in (batch invariance: speculative verification of
  // k + 1 rows reproduces plain decoding bit for bit)
  constexpr int A = W < 2 ? W : 2;
  vec acc[MT][A];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = vzero();
  for (int64_t u = 0; u < units; ++u) {
    vec w[W];
    rows.unit(n, u, buf, w);
    for (int m = 0; m < MT; ++m) {
      const float* xu = x + m * K + u * kUnit;
      for (int i = 0; i < W; ++i) acc[m][i % A] = vfma(w[i], vload(xu + i * kLanes), acc[m][i % A]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    vec t = acc[m][0];
    for (int a = 1; a < A; ++a) t = vadd(t, acc[m][a]);
    out[m] = vsum(t);
  }
#else
  float acc[MT] = {};
  float w[kUnit];
  for (int64_t u = 0; u < units; ++u) {
    rows.unit_scalar(n, u, buf, w);
    for (int m = 0; m < MT; ++m) {
      const float* xu = x + m * K + u * kUnit;
      for (int j = 0; j < kUnit; ++j) acc[m] += w[j] * xu[j];
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = acc[m];
#endif
}

template <typename Rows, typename T>
void rows_all_m(const Rows& rows, int64_t n, const float* x, int64_t M, int64_t K, const float* buf, T* y,
                int64_t N) {
  float out[kMaxTile];
  int64_t m0 = 0;
  auto emit = [&](int mt) {
    for (int i = 0; i < mt; ++i) y[(m0 + i) * N + n] = static_cast<T>(out[i]);
    m0 += mt;
  };
  while (m0 + kMaxTile <= M) {
    row_tile<kMaxTile>(rows, n, x + m0 * K, K, buf, out);
    emit(kMaxTile);
  }
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (M - m0 >= 8) { row_tile<8>(rows, n, x + m0 * K, K, buf, out); emit(8); }
#endif
  if (M - m0 >= 4) { row_tile<4>(rows, n, x + m0 * K, K, buf, out); emit(4); }
  if (M - m0 >= 2) { row_tile<2>(rows, n, x + m0 * K, K, buf, out); emit(2); }
  if (M - m0 >= 1) { row_tile<1>(rows, n, x + m0 * K, K, buf, out); emit(1); }
}

// y [M, N] = x [M, K] @ rows^T in x's dtype (float32 / bfloat16; bfloat16 x is converted once to
// a float32 buffer here and y rounded as it is stored: no extra torch ops per call)
template <typename Rows>
at::Tensor run(const at::Tensor& x, const Rows& rows, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "x must be CPU [M, K] with contiguous rows");
  const bool bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), xs = x.stride(0);
  std::vector<float> xbuf;
  const float* xp = nullptr;
  if (!bf && xs == K) {
    xp = x.data_ptr<float>();
  } else {
    xbuf.resize(M * K);
    if (bf) {
      const c10::BFloat16* src = x.data_ptr<c10::BFloat16>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xbuf[m * K + k] = static_cast<float>(src[m * xs + k]);
    } else {
      const float* src = x.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::copy(src + m * xs, src + m * xs + K, xbuf.data() + m * K);
    }
    xp = xbuf.data();
  }
  at::Tensor y = tandem::new_cpu({M, N}, x.scalar_type());
  const int64_t threads = std::max<int64_t>(1, tandem::num_threads());
  const int64_t grain = std::max<int64_t>(1, (N + threads - 1) / threads);  // one range per thread
  float* yf = bf ? nullptr : y.data_ptr<float>();
  c10::BFloat16* yb = bf ? y.data_ptr<c10::BFloat16>() : nullptr;
  // One weight row at a time, at M = 1 too: rows taken in pairs (x loads shared, the rows 16 ahead
  // prefetched) were faster from cache but slower from memory, where a step's weights come from.
  // SmolLM2's 30 layers from memory, bit-equal outputs (AMD EPYC, 2 threads): int8 group 32 with
  // bfloat16 x 6.40 -> 5.26 ms, int4 with float32 x 4.40 -> 4.13; an AVX2 build 5.27 -> 4.95 and
  // 6.37 -> 5.40; decode steps 0.83-0.85x (docs/benchmarks.md "On the EPYC, 2026-12-05").
  tandem::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * rows.num_scales());  // one row's scales (and mins)
    for (int64_t n = begin; n < end; ++n) {
      rows.load_row_scales(n, buf.data());
      if (bf) rows_all_m(rows, n, xp, M, K, buf.data(), yb, N);
      else rows_all_m(rows, n, xp, M, K, buf.data(), yf, N);
    }
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kUnit == 0, "int4: in_features must be a multiple of 32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) * 2 == K &&
                  qweight.is_contiguous(),
              "int4: qweight must be contiguous uint8 [N, K / 2]");
  const int64_t N = qweight.size(0);
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == K / kUnit,
                "int4: scales / mins must be contiguous float16 [N, K / 32]");
  // bfloat16 x of up to 8 rows (engine.linear's QUANT_MAX_ROWS: every step the engine gives this
  // kernel beside a dense copy): vdpbf16ps (quant_linear_bf16.cpp); batch-invariant among those
  if (x.scalar_type() == at::kBFloat16 && x.size(0) <= kBf16DotMaxRows && x.stride(1) == 1 &&
      tandem::ops::int4_linear_bf16_available())
    return tandem::ops::int4_linear_bf16(x, qweight, scales, mins);
  Int4Rows rows{qweight.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), K};
  return run(x, rows, N);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.size(1) == K &&
                  qweight.is_contiguous(),
              "int8: qweight must be contiguous int8 [N, K]");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) >= 1 && K % scales.size(1) == 0,
              "int8: scales must be contiguous float16 [N, K / G]");
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % kUnit == 0, "int8: the group size must be a multiple of 32");
  Int8Rows rows{qweight.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(), K, G};
  return run(x, rows, N);
}

template <typename T>
inline T* w_out(at::Tensor& w, int64_t offset) { return w.data_ptr<T>() + offset; }

// The whole [N, K] weight in float32 or bfloat16 (for large M: dequantize once, then a dense GEMM)
template <typename Rows>
at::Tensor dequantize_rows(const Rows& rows, int64_t N, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(dtype));
  tandem::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * rows.num_scales());
    alignas(64) float row[kUnit];
    for (int64_t n = begin; n < end; ++n) {
      rows.load_row_scales(n, buf.data());
      for (int64_t u = 0; u < K / kUnit; ++u) {
#if defined(__AVX2__) && defined(__FMA__)
        vec w[kUnit / kLanes];
        rows.unit(n, u, buf.data(), w);
        for (int i = 0; i < kUnit / kLanes; ++i) vstore(row + i * kLanes, w[i]);
#else
        rows.unit_scalar(n, u, buf.data(), row);
#endif
        if (dtype == at::kFloat) {
          std::copy(row, row + kUnit, w_out<float>(out, n * K + u * kUnit));
        } else {
          c10::BFloat16* o = w_out<c10::BFloat16>(out, n * K + u * kUnit);
          for (int64_t j = 0; j < kUnit; ++j) o[j] = static_cast<c10::BFloat16>(row[j]);
        }
      }
    }
  });
  return out;
}

at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf,
              "int4: contiguous uint8 qweight, float16 scales / mins");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  Int4Rows rows{qweight.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), K};
  return dequantize_rows(rows, N, K, dtype);
}

at::Tensor int8_dequantize(const at::Tensor& qweight, const at::Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && scales.is_contiguous() &&
                  scales.scalar_type() == at::kHalf && qweight.size(1) % scales.size(1) == 0,
              "int8: contiguous int8 qweight, float16 scales [N, K / G]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  Int8Rows rows{qweight.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(), K, K / scales.size(1)};
  return dequantize_rows(rows, N, K, dtype);
}

}  // namespace

// for decoder_layer.cpp (ops.h)
at::Tensor tandem::ops::int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                    const at::Tensor& mins) {
  return ::int4_linear(x, qweight, scales, mins);
}
at::Tensor tandem::ops::int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return ::int8_linear(x, qweight, scales);
}

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor mins, ScalarType dtype) -> Tensor");
  m.def("int8_dequantize(Tensor qweight, Tensor scales, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequantize", &int8_dequantize);
}
