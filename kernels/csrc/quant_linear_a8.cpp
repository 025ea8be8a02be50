// Quantized linear layers with int8 activations for CPU (llama.cpp's Q4_1 x Q8 and Q8_0 x Q8 dot
// products, on a repacked weight): y [M, N] = x [M, K] @ W^T, W int4 (Q4_1 blocks) or int8
// (group G) as in kernels/quant_reference.py, x quantized per row in blocks of 32 to int8 first.
// kernels/quant_reference.py's quantize_activations_int8 / int4_linear_a8 / int8_linear_a8 are the
// semantics and the references.
//
// Why: the float kernels (quant_linear.cpp) turn every weight into a float32 (~5 cycles per 32
// weights) and reduce each output row horizontally; at SmolLM2's K = 576 a batch-1 call reads its
// weights at ~8-10 GB/s per thread even from cache. Here the weights are repacked once
// (int4_pack_a8 / int8_pack_a8) so that 16 output rows sit in the 16 int32 lanes of a vector: a
// block of 32 inputs of 16 rows is 8 vpdpbusd (AVX512-VNNI: 4 u8 x s8 products per lane, the
// activation bytes broadcast) after 4 loads and 12 bit ops (int4) or 8 loads (int8), then one
// convert and two FMAs with the 16 rows' scales, which are contiguous too. No horizontal sums, no
// per-row setup. The price: activations rounded to 8 bits (its quality cost is in
// docs/benchmarks.md), so the engine takes this path only when the config asks
// (model.quantize_activations).
//
// Per block u of 32 inputs of row m: dx = amax / 127, xq = round-half-even(x * (1 / dx)) in
// -127..127, sx = dx * sum(xq); all 0 if 1 / dx is not finite (amax 0 or below ~4e-37), dx NaN
// (so NaN outputs) if the block holds a NaN or an inf. With the weights' unsigned integers wq, scale
// d and "min" m per (row n, block u):
//   y[m, n] = sum_u (d[n, u] * dx[m, u]) * sum_j wq[n, u, j] * xq[m, u, j] + m[n, u] * sx[m, u]
// accumulated block after block in that order (FMA in the SIMD paths; the plain loop rounds the
// product and the sum apart), per row: the integer sums are exact, so the
// result differs from the reference's float64 only by float32 rounding, and a row's arithmetic is
// the same whatever the batch it is in (batch invariance, as quant_linear.cpp). int4: wq = the
// nibbles, m = the Q4_1 min. int8: wq = q + 128 and m = -128 d (see int8_pack_a8).
//
// Packed layout, for row group g (rows 16g .. 16g + 15) and block u:
//   packed uint8 [N / 16, K / 32, C, 16, 4]: chunk c, row i, byte b
//       int4 (C = 4): low nibble wq[16g + i, 32u + 8c + b], high nibble wq[.., 32u + 8c + 4 + b]
//       int8 (C = 8): wq[16g + i, 32u + 4c + b]
//   dm float16 [N / 16, K / 32, 2, 16]: d then m of the 16 rows (one 64-byte line per block)
// AMX (AMX-INT8 + AVX512-VNNI, Linux granting the tile state), calls of kAmxMinRows+ rows: each
// block of 16 activation rows is one tdpbsud per block of 32 inputs (16 x 16 x 32 products; the
// int8 packed block already is the B tile's layout, int4 nibbles are split into it once per row
// group), then the same convert and FMAs as the VNNI path, per row: bit-identical to it. Rows
// left over (M % 16) take the VNNI path. Why: VNNI at 64 rows is compute-bound (~0.35 ms a row
// for SmolLM2's layers); AMX does 16x the products per instruction, though the per-block float
// part (scales differ every 32 inputs) stays, so the gain is far smaller.
// Paths, chosen at compile time (-march=native): AVX512-VNNI (+BW/VL); AVX2 (+FMA/F16C), as
// llama.cpp: int4 by vpmaddubsw (u8 x s8 pairs -> int16) for the 8 groups of 4 inputs, summed in
// int16 (at most 8 * 2 * 15 * 127 = 30480: no saturation), then one vpmaddwd to int32; int8
// widened to int16 first (255 * 127 pairs would saturate); 8 rows per register; a plain loop
// otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"
#include "work_ranges.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TANDEM_VNNI 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define TANDEM_AMX 1
#include "amx.h"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TANDEM_AVX2 1
#include <immintrin.h>
#endif

namespace {

typedef int32_t __attribute__((may_alias)) i32_alias;

constexpr int64_t kBlock = 32;  // inputs per block (= the Q4_1 group)
constexpr int64_t kRows = 16;   // output rows per group (the int32 lanes of a zmm)
constexpr int kMaxTile = 8;     // activation rows per pass over the weights

// x [M, K] quantized per block: xq int8 [M, K] (natural order), dx, sx float [M, K / 32]
struct QuantizedRows {
  int64_t M, K, units;
  std::vector<int8_t> q;
  std::vector<float> dx, sx;
};

// one block of 32 inputs (already float) -> q[0:32], returns sum(q); d / id as in the header
inline int32_t quantize_block(const float* v, int8_t* q, float& d) {
#if TANDEM_VNNI
  const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
  // x * 0 is 0 for every finite x and NaN for NaN / inf: one add tells whether all 32 are finite
  const bool finite = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(v0, _mm512_setzero_ps()),
                                                         _mm512_mul_ps(v1, _mm512_setzero_ps()))) == 0.f;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
#elif TANDEM_AVX2
  __m256 vs[4], zero = _mm256_setzero_ps(), nan_or_zero = zero, mx = zero;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int i = 0; i < 4; ++i) {
    vs[i] = _mm256_loadu_ps(v + 8 * i);
    nan_or_zero = _mm256_add_ps(nan_or_zero, _mm256_mul_ps(vs[i], zero));  // as above
    mx = _mm256_max_ps(mx, _mm256_and_ps(vs[i], abs_mask));
  }
  alignas(32) float lanes[8], nz[8];
  _mm256_store_ps(lanes, mx);
  _mm256_store_ps(nz, nan_or_zero);
  float amax = 0.f, nzs = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]), nzs += nz[i];
  const bool finite = nzs == 0.f;
#else
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < kBlock; ++j) {
    finite = finite && std::isfinite(v[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
#endif
  d = amax / 127.f;
  float id = d > 0.f ? 1.f / d : 0.f;
  if (!finite) {  // a NaN / inf input: the block's products are NaN, its q all 0 (not rounded:
    d = std::numeric_limits<float>::quiet_NaN();  // NaN * 0 has no integer value)
    std::fill(q, q + kBlock, static_cast<int8_t>(0));
    return 0;
  }
  if (!std::isfinite(id)) d = 0.f, id = 0.f;  // amax so small that 1 / dx overflows: zeros
#if TANDEM_VNNI
  // explicit round to nearest even (std::nearbyint in the default mode); |v * id| <= 127 (+1 ulp)
  const __m512 s = _mm512_set1_ps(id);
  const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif TANDEM_AVX2
  // round half to even (_mm256_round_ps), then int32 -> int16 -> int8 packs (no saturation
  // happens: |q| <= 127); the packs interleave 128-bit lanes, put back in order by a permute
  const __m256 s = _mm256_set1_ps(id);
  __m256i qi[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(vs[i], s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, qi[i]);
  }
  const __m256i w16 = _mm256_packs_epi32(qi[0], qi[1]), x16 = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b8);
  alignas(32) int32_t part[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(part), sum);
  int32_t total = 0;
  for (int i = 0; i < 8; ++i) total += part[i];
  return total;
#else
  int32_t sum = 0;
  for (int j = 0; j < kBlock; ++j) {
    const int32_t qj = static_cast<int32_t>(std::nearbyint(v[j] * id));  // half to even
    q[j] = static_cast<int8_t>(qj);
    sum += qj;
  }
  return sum;
#endif
}

// rows in parallel once there is enough of them (a 64-row step of SmolLM2's 120 layer calls
// quantized on one thread, scalar, took ~12 ms of a ~46 ms model-worth of calls)
QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), xs = x.stride(0), units = K / kBlock;
  QuantizedRows r{M, K, units, std::vector<int8_t>(M * K), std::vector<float>(M * units), std::vector<float>(M * units)};
  const c10::BFloat16* xb = x.scalar_type() == at::kBFloat16 ? x.data_ptr<c10::BFloat16>() : nullptr;
  const float* xf = xb == nullptr ? x.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  tandem::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float v[kBlock];
    for (int64_t m = begin; m < end; ++m)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t off = m * xs + u * kBlock;
        const float* vp = v;
        if (xb == nullptr) {
          vp = xf + off;
        } else {
#if TANDEM_VNNI  // bfloat16 -> float32: the 16 bits move to the top
          for (int h = 0; h < 2; ++h) {
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + off + 16 * h));
            _mm512_store_si512(v + 16 * h, _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
          }
#elif TANDEM_AVX2
          for (int h = 0; h < 4; ++h) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + off + 8 * h));
            _mm256_store_si256(reinterpret_cast<__m256i*>(v + 8 * h), _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
          }
#else
          for (int j = 0; j < kBlock; ++j) v[j] = static_cast<float>(xb[off + j]);
#endif
        }
        float d;
        const int32_t sum = quantize_block(vp, r.q.data() + m * K + u * kBlock, d);
        r.dx[m * units + u] = d;
        r.sx[m * units + u] = d * static_cast<float>(sum);
      }
  });
  return r;
}

// y[m0 + m, 16g .. 16g + 16) for MT activation rows: acc[m] lane i = row 16g + i. B: bytes of
// weights per block of 16 rows (256: int4 nibbles, 512: int8 + 128)
template <int MT, int B, typename T>
void group_tile(const uint8_t* packed, const c10::Half* dm, int64_t g, const QuantizedRows& xr, int64_t m0, T* y,
                int64_t N) {
  constexpr bool kInt4 = B == 256;
  const int64_t units = xr.units, K = xr.K;
  const uint8_t* p = packed + g * units * B;
  const c10::Half* s = dm + g * units * 2 * kRows;
#if TANDEM_VNNI
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t u = 0; u < units; ++u, p += B, s += 2 * kRows) {
    for (int line = 0; line < B; line += 64)  // 8 blocks ahead
      _mm_prefetch(reinterpret_cast<const char*>(p + 8 * B + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(s + 8 * 2 * kRows), _MM_HINT_T0);
    __m512i w[8];  // w[c]: inputs 32u + 4c .. 4c + 3 of the 16 rows, unsigned bytes
    for (int k = 0; k < B / 64; ++k) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * k);
      if (kInt4) {
        w[2 * k] = _mm512_and_si512(raw, low4);
        w[2 * k + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      } else {
        w[k] = raw;
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows)));
    for (int m = 0; m < MT; ++m) {
      // read in place (may_alias): each 4-byte group is one broadcast load; a copy to a local
      // array went through general registers (8-byte loads, shifts and a register-to-vector
      // broadcast per group)
      const i32_alias* x4 = reinterpret_cast<const i32_alias*>(xr.q.data() + (m0 + m) * K + u * kBlock);
      __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();  // two chains: latency
      for (int c = 0; c < 8; c += 2) {
        i0 = _mm512_dpbusd_epi32(i0, w[c], _mm512_set1_epi32(x4[c]));
        i1 = _mm512_dpbusd_epi32(i1, w[c + 1], _mm512_set1_epi32(x4[c + 1]));
      }
      const float dx = xr.dx[(m0 + m) * units + u], sx = xr.sx[(m0 + m) * units + u];
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(64) float out[kRows];
    _mm512_store_ps(out, acc[m]);
    for (int i = 0; i < kRows; ++i) y[(m0 + m) * N + g * kRows + i] = static_cast<T>(out[i]);
  }
#elif TANDEM_AVX2
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MT][2];  // [m][h]: rows 16g + 8h .. 16g + 8h + 7
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t u = 0; u < units; ++u, p += B, s += 2 * kRows) {
    for (int h = 0; h < 2; ++h) {
      __m256i w[8];  // w[c]: inputs 32u + 4c .. 4c + 3 of rows 8h .. 8h + 7, unsigned bytes
      for (int k = 0; k < B / 64; ++k) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * k + 32 * h));
        if (kInt4) {
          w[2 * k] = _mm256_and_si256(raw, low4);
          w[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        } else {
          w[k] = raw;
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8 * h)));
      const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + kRows + 8 * h)));
      for (int m = 0; m < MT; ++m) {
        const i32_alias* x4 = reinterpret_cast<const i32_alias*>(xr.q.data() + (m0 + m) * K + u * kBlock);
        __m256i isum;
        if (kInt4) {
          __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(x4[0]));
          for (int c = 1; c < 8; ++c) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(x4[c])));
          isum = _mm256_madd_epi16(s16, ones);
        } else {  // bytes up to 255: vpmaddubsw could saturate, so widen to int16 and vpmaddwd
          isum = _mm256_setzero_si256();
          for (int c = 0; c < 8; ++c) {
            const __m256i x16 = _mm256_cvtepi8_epi16(_mm_set1_epi32(x4[c]));  // 4 inputs, twice
            const __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w[c]));  // rows 0-3
            const __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w[c], 1));  // rows 4-7
            // pairs summed: lane 2r, 2r + 1 of each half -> row r's two halves of 4 inputs
            const __m256i a = _mm256_madd_epi16(lo, x16), b = _mm256_madd_epi16(hi, x16);
            isum = _mm256_add_epi32(isum, _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8));
          }
        }
        const float dx = xr.dx[(m0 + m) * units + u], sx = xr.sx[(m0 + m) * units + u];
        acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[m][h]);
        acc[m][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sx), acc[m][h]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(32) float out[kRows];
    _mm256_store_ps(out, acc[m][0]);
    _mm256_store_ps(out + 8, acc[m][1]);
    for (int i = 0; i < kRows; ++i) y[(m0 + m) * N + g * kRows + i] = static_cast<T>(out[i]);
  }
#else
  float acc[MT][kRows] = {};
  for (int64_t u = 0; u < units; ++u, p += B, s += 2 * kRows)
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = xr.q.data() + (m0 + m) * K + u * kBlock;
      const float dx = xr.dx[(m0 + m) * units + u], sx = xr.sx[(m0 + m) * units + u];
      for (int i = 0; i < kRows; ++i) {
        int32_t isum = 0;
        for (int c = 0; c < 8; ++c)
          for (int b = 0; b < 4; ++b) {
            const int32_t wv = kInt4 ? (p[((c / 2) * kRows + i) * 4 + b] >> (4 * (c % 2))) & 0x0F
                                     : p[(c * kRows + i) * 4 + b];
            isum += wv * xq[4 * c + b];
          }
        acc[m][i] += static_cast<float>(isum) * (static_cast<float>(s[i]) * dx);
        acc[m][i] += static_cast<float>(s[kRows + i]) * sx;
      }
    }
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < kRows; ++i) y[(m0 + m) * N + g * kRows + i] = static_cast<T>(acc[m][i]);
#endif
}

#if TANDEM_AMX
// palette 1, two sets (block u in set u % 2, so the next block's tile loads and product run
// while this one's float part does): A = tmm0 / tmm3, 16 activation rows x 32 int8; B = tmm1 /
// tmm4, 8 rows (inputs 4c .. 4c + 3) x 16 weight rows x 4 bytes; C = tmm2 / tmm5, 16 x 16 int32
// (activation row, weight row)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {32, 64, 64, 32, 64, 64};
  uint8_t rows[16] = {16, 8, 16, 16, 8, 16};
};

// The B tiles of row group g, one per block: 8 rows of 64 bytes (unsigned weights), in `tiles`
// (int4: the nibbles split as the VNNI path splits them) or in place (int8: the packed layout is it)
template <int B>
const uint8_t* b_tiles(const uint8_t* packed, int64_t g, int64_t units, uint8_t* tiles) {
  const uint8_t* p = packed + g * units * B;
  if (B == 512) return p;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t u = 0; u < units; ++u)
    for (int k = 0; k < 4; ++k) {
      const __m512i raw = _mm512_loadu_si512(p + u * B + 64 * k);
      _mm512_storeu_si512(tiles + u * 512 + 128 * k, _mm512_and_si512(raw, low4));
      _mm512_storeu_si512(tiles + u * 512 + 128 * k + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
    }
  return tiles;
}

// block u's integer sums of 16 activation rows x 16 weight rows into c, in tile set A, B, C (see
// TileConfig; the intrinsics take literal tile numbers, hence a macro)
#define TANDEM_BLOCK_SUMS(A, B, C, a, a_stride, b, c) \
  do {                                                 \
    _tile_loadd(A, a, a_stride);                       \
    _tile_loadd(B, b, 64);                             \
    _tile_zero(C);                                     \
    _tile_dpbsud(C, A, B); /* signed activations x unsigned weights, as vpdpbusd's */ \
    _tile_stored(C, c, 64);                            \
  } while (0)

// y[m0 .. m0 + 16, 16g .. 16g + 16): the VNNI group_tile's arithmetic, its integer sums from AMX
template <typename T>
void group_amx16(const uint8_t* tiles, const c10::Half* dm, int64_t g, const QuantizedRows& xr, int64_t m0, T* y,
                 int64_t N) {
  const int64_t units = xr.units, K = xr.K;
  const int8_t* a = xr.q.data() + m0 * K;
  const c10::Half* s = dm + g * units * 2 * kRows;
  alignas(64) int32_t c[2][kRows * kRows];  // [set][activation row, weight row]
  __m512 acc[kRows];
  for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
  TANDEM_BLOCK_SUMS(0, 1, 2, a, K, tiles, c[0]);
  for (int64_t u = 0; u < units; ++u, s += 2 * kRows) {
    if (u + 1 < units) {  // the next block's sums first: its tile work overlaps this block's floats
      const int8_t* an = a + (u + 1) * kBlock;
      const uint8_t* bn = tiles + (u + 1) * 512;
      if (u % 2 == 0) TANDEM_BLOCK_SUMS(3, 4, 5, an, K, bn, c[1]);
      else TANDEM_BLOCK_SUMS(0, 1, 2, an, K, bn, c[0]);
    }
    const int32_t* cu = c[u % 2];
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows)));
#pragma GCC unroll 16
    for (int m = 0; m < kRows; ++m) {  // unrolled: acc stays in 16 registers
      const float dx = xr.dx[(m0 + m) * units + u], sx = xr.sx[(m0 + m) * units + u];
      const __m512i isum = _mm512_load_si512(cu + m * kRows);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[m]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    alignas(64) float out[kRows];
    _mm512_store_ps(out, acc[m]);
    for (int i = 0; i < kRows; ++i) y[(m0 + m) * N + g * kRows + i] = static_cast<T>(out[i]);
  }
}
#endif

// amx_tiles: group g's B tiles (b_tiles) when this thread has AMX configured, else nullptr
template <int B, typename T>
void group_all_m(const uint8_t* packed, const c10::Half* dm, int64_t g, const QuantizedRows& xr, T* y, int64_t N,
                 const uint8_t* amx_tiles = nullptr) {
  int64_t m0 = 0;
#if TANDEM_AMX
  for (; amx_tiles != nullptr && xr.M - m0 >= kRows; m0 += kRows) group_amx16(amx_tiles, dm, g, xr, m0, y, N);
#endif
  auto step = [&](auto mt_tag) {
    constexpr int MT = decltype(mt_tag)::value;
    group_tile<MT, B>(packed, dm, g, xr, m0, y, N);
    m0 += MT;
  };
  while (xr.M - m0 >= kMaxTile) step(std::integral_constant<int, kMaxTile>{});
  if (xr.M - m0 >= 4) step(std::integral_constant<int, 4>{});
  if (xr.M - m0 >= 2) step(std::integral_constant<int, 2>{});
  if (xr.M - m0 >= 1) step(std::integral_constant<int, 1>{});
}

// packed [N / 16, K / 32, C, 16, 4] and dm [N / 16, K / 32, 2, 16] from per-element functions:
// byte(n, u, c, b) the packed byte of inputs 4c + b of block u; d(n, u), m(n, u) the scales
template <typename Byte, typename D, typename M>
std::tuple<at::Tensor, at::Tensor> pack(int64_t N, int64_t K, int64_t C, Byte byte, D d, M m) {
  const int64_t units = K / kBlock;
  TORCH_CHECK(N % kRows == 0, "int8 activations: out_features must be a multiple of 16, got ", N);
  TORCH_CHECK(K % kBlock == 0, "int8 activations: in_features must be a multiple of 32, got ", K);
  at::Tensor packed = at::empty({N / kRows, units, C, kRows, 4}, at::TensorOptions().dtype(at::kByte));
  at::Tensor dm = at::empty({N / kRows, units, 2, kRows}, at::TensorOptions().dtype(at::kHalf));
  uint8_t* po = packed.data_ptr<uint8_t>();
  c10::Half* so = dm.data_ptr<c10::Half>();
  for (int64_t g = 0; g < N / kRows; ++g)
    for (int64_t u = 0; u < units; ++u) {
      uint8_t* blk = po + (g * units + u) * C * kRows * 4;
      c10::Half* s = so + (g * units + u) * 2 * kRows;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t n = g * kRows + i;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t b = 0; b < 4; ++b) blk[(c * kRows + i) * 4 + b] = byte(n, u, c, b);
        s[i] = d(n, u);
        s[kRows + i] = m(n, u);
      }
    }
  return {packed, dm};
}

// Q4_1 (qweight uint8 [N, K / 2], scales, mins float16 [N, K / 32]) -> (packed, dm): chunk c of
// a block holds inputs 8c .. 8c + 3 in the low nibbles and 8c + 4 .. 8c + 7 in the high ones
std::tuple<at::Tensor, at::Tensor> int4_pack_a8(const at::Tensor& qweight, const at::Tensor& scales,
                                                const at::Tensor& mins) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  qweight.is_contiguous(),
              "int4: qweight must be contiguous CPU uint8 [N, K / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, units = K / kBlock;
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == units,
                "int4: scales / mins must be contiguous float16 [N, K / 32]");
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const c10::Half *d = scales.data_ptr<c10::Half>(), *mn = mins.data_ptr<c10::Half>();
  auto nibble = [&](int64_t n, int64_t u, int64_t j) -> uint8_t {  // q[n, 32u + j]
    const uint8_t byte = q[n * (K / 2) + u * 16 + j % 16];
    return j < 16 ? byte & 0x0F : byte >> 4;
  };
  return pack(
      N, K, 4, [&](int64_t n, int64_t u, int64_t c, int64_t b) -> uint8_t {
        return nibble(n, u, 8 * c + b) | (nibble(n, u, 8 * c + 4 + b) << 4);
      },
      [&](int64_t n, int64_t u) { return d[n * units + u]; }, [&](int64_t n, int64_t u) { return mn[n * units + u]; });
}

// int8 (qweight int8 [N, K], scales float16 [N, K / G]) -> (packed, dm): bytes q + 128 (the
// unsigned operand), so a block's integer sum is sum(q * xq) + 128 sum(xq), and the "min" -128 d
// (exact in float16) takes the second part away: y = sum_u d dx isum - 128 d sx.
std::tuple<at::Tensor, at::Tensor> int8_pack_a8(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous(),
              "int8: qweight must be contiguous CPU int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) >= 1 && K % scales.size(1) == 0 &&
                  (K / scales.size(1)) % kBlock == 0,
              "int8: scales must be contiguous float16 [N, K / G], G a multiple of 32");
  const int64_t G = K / scales.size(1);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const c10::Half* d = scales.data_ptr<c10::Half>();
  auto scale = [&](int64_t n, int64_t u) { return d[n * (K / G) + u * kBlock / G]; };
  for (int64_t i = 0; i < scales.numel(); ++i)
    TORCH_CHECK(std::fabs(static_cast<float>(d[i])) * 128.f <= 65504.f, "int8: a scale too large for -128 d in float16");
  return pack(
      N, K, 8, [&](int64_t n, int64_t u, int64_t c, int64_t b) -> uint8_t {
        return static_cast<uint8_t>(q[n * K + u * kBlock + 4 * c + b] + 128);
      },
      scale, [&](int64_t n, int64_t u) { return static_cast<c10::Half>(-128.f * static_cast<float>(scale(n, u))); });
}

// AMX for calls of at least kAmxMinRows rows, where this build has it and Linux grants it. The
// kernel alone is faster with it from 16 rows (0.84-0.96x the VNNI path's time at 16, 0.80x at
// 64), but decode steps of 16-24 rows were 1.05x slower with it, 48-64 rows 0.94x (without a
// dense copy; docs/benchmarks.md "On an Intel Xeon with AMX")
constexpr int64_t kAmxMinRows = 2 * kRows;
bool use_amx(int64_t M) {
#if TANDEM_AMX
  return M >= kAmxMinRows && tandem::amx_tiles_granted();
#else
  (void)M;
  return false;
#endif
}

// y [M, N] = x [M, K] @ W^T for W packed by int4_pack_a8 (C = 4) or int8_pack_a8 (C = 8)
at::Tensor linear_a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "x must be CPU [M, K] with contiguous rows");
  const bool bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 5 && packed.is_contiguous() &&
                  packed.size(1) * kBlock == K && (packed.size(2) == 4 || packed.size(2) == 8) &&
                  packed.size(3) == kRows && packed.size(4) == 4,
              "packed must be a uint8 [N / 16, K / 32, 4 or 8, 16, 4] from int4_pack_a8 / int8_pack_a8 for this x");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 && dm.size(0) == packed.size(0) &&
                  dm.size(1) == packed.size(1) && dm.size(2) == 2 && dm.size(3) == kRows,
              "dm must be a float16 [N / 16, K / 32, 2, 16] from int4_pack_a8 / int8_pack_a8");
  const int64_t groups = packed.size(0), N = groups * kRows;
  const bool int4 = packed.size(2) == 4;
  const QuantizedRows xr = quantize_rows(x);
  at::Tensor y = tandem::new_cpu({x.size(0), N}, x.scalar_type());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::Half* dp = dm.data_ptr<c10::Half>();
  c10::BFloat16* yb = bf ? y.data_ptr<c10::BFloat16>() : nullptr;
  float* yf = bf ? nullptr : y.data_ptr<float>();
  const bool amx = use_amx(xr.M);
  // one range of row groups per thread, claimed ~16 KB of weights at a time (work_ranges.h)
  const int64_t group_bytes = xr.units * ((int4 ? 256 : 512) + 2 * kRows * 2);
  tandem::WorkRanges work(groups, tandem::num_threads(), 16384 / group_bytes);
  tandem::parallel_for(0, work.parts(), 1, [&](int64_t begin, int64_t end) {
    const uint8_t* tiles = nullptr;
#if TANDEM_AMX
    std::vector<uint8_t> unpacked(amx && int4 ? xr.units * 512 : 0);
    if (amx) {
      const TileConfig cfg;
      _tile_loadconfig(&cfg);  // per thread: the pool's threads each run a range
    }
#endif
    for (int64_t part = begin; part < end; ++part)
      work.run(part, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
#if TANDEM_AMX
          if (amx) tiles = int4 ? b_tiles<256>(pp, g, xr.units, unpacked.data()) : b_tiles<512>(pp, g, xr.units, nullptr);
#endif
          if (int4 && bf) group_all_m<256>(pp, dp, g, xr, yb, N, tiles);
          else if (int4) group_all_m<256>(pp, dp, g, xr, yf, N, tiles);
          else if (bf) group_all_m<512>(pp, dp, g, xr, yb, N, tiles);
          else group_all_m<512>(pp, dp, g, xr, yf, N, tiles);
        }
      });
#if TANDEM_AMX
    if (amx) _tile_release();  // this thread's tile state back to init: cheaper context switches
#endif
  });
  return y;
}

// The rows as linear_a8 quantizes them: (xq int8 [M, K], dx float32 [M, K / 32]), for tests
// (quant_reference.quantize_activations_int8 is the definition; they must be equal, bit for bit)
std::tuple<at::Tensor, at::Tensor> quantize_a8(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.size(1) % kBlock == 0 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be CPU float32 / bfloat16 [M, K] with contiguous rows, K a multiple of 32");
  const QuantizedRows r = quantize_rows(x);
  at::Tensor xq = at::empty({r.M, r.K}, at::TensorOptions().dtype(at::kChar));
  at::Tensor dx = at::empty({r.M, r.units}, at::TensorOptions().dtype(at::kFloat));
  std::copy(r.q.begin(), r.q.end(), xq.data_ptr<int8_t>());
  std::copy(r.dx.begin(), r.dx.end(), dx.data_ptr<float>());
  return {xq, dx};
}

// whether linear_a8 takes the AMX path for a call of `rows` rows (for tests and benchmarks)
bool a8_uses_amx(int64_t rows) { return use_amx(rows); }

}  // namespace

// for decoder_layer.cpp (ops.h)
at::Tensor tandem::ops::linear_a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm) {
  return ::linear_a8(x, packed, dm);
}

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("int4_pack_a8(Tensor qweight, Tensor scales, Tensor mins) -> (Tensor, Tensor)");
  m.def("int8_pack_a8(Tensor qweight, Tensor scales) -> (Tensor, Tensor)");
  m.def("linear_a8(Tensor x, Tensor packed, Tensor dm) -> Tensor");
  m.def("quantize_a8(Tensor x) -> (Tensor, Tensor)");
  m.def("a8_uses_amx(int rows) -> bool");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("int4_pack_a8", &int4_pack_a8);
  m.impl("int8_pack_a8", &int8_pack_a8);
  m.impl("linear_a8", &linear_a8);
  m.impl("quantize_a8", &quantize_a8);
}

// no tensor argument to dispatch on
TORCH_LIBRARY_IMPL(tandem_cpu, CompositeExplicitAutograd, m) { m.impl("a8_uses_amx", &a8_uses_amx); }
