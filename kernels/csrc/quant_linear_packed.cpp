// Weight-only quantized linear with float activations (float32 or bfloat16, none rounded) on the
// weight repacked as for linear_a8 (int4_pack_a8 / int8_pack_a8: 16 output rows in the lanes of a
// vector): y [M, N] = x [M, K] @ W^T, in x's dtype.
//
// Why: the row kernels (quant_linear.cpp, quant_linear_bf16.cpp) read one output row at a time and
// pay per 32 weights for turning them into floats (a widening load, conversions or permutes, the
// scale), and per row for its scales and a horizontal sum. At batch 1 that, not the weight read,
// bounds them: SmolLM2's int4 layers took ~5 ms for 66 MB. Here one 64-byte load holds a few
// inputs of 16 rows, and a shift and one bit-select (vpternlogd) per vector turn a field of every
// lane into a float whose mantissa's top bits are the weight's:
//   - int4 (chunk c of block u: byte b of row i = input 8c + b in the low nibble, 8c + 4 + b in
//     the high one): 1 + q / 16, q = 0..15;
//   - int8 (chunk c: byte b = input 4c + b, stored as u = q + 128): 1 + u / 256.
// A block's dot product is then factored, with s = 16 (int4) or 256 (int8) and the block's d, m
// (int8: m = -128 d, as int8_pack_a8 stores it):
//     sum_k (d q_k + m) x_k = s d * sum_k (1 + q_k / s) x_k + (m - s d) * sum_k x_k
// and sum_k x_k is the activations' own, once per call. No horizontal sums, no per-row work. An int8
// weight with one scale per row may come with one block's d and m per row group (dm [N / 16, 1, 2,
// 16], cpu_ext.pack_float), read once for all its blocks: 4 bytes per 32 weights not read.
//
// Two ways to the inner sum, by x's dtype and the format:
//   - bfloat16 x, int4 (AVX512-BF16): 1 + q / 16 is a bfloat16 (mantissa bits 3..6), and
//     vdpbf16ps multiplies a pair of them with a pair of x exactly, summing in float32: per
//     64-byte load four shifts, four bit-selects, four vdpbf16ps per activation row. (vdpbf16ps
//     counts a subnormal bfloat16 x, below ~1.2e-38, as 0.)
//   - otherwise (float32 x; bfloat16 x of int8, whose 1 + u / 256 needs 8 mantissa bits): the
//     float32 1 + q / s, one FMA with a broadcast x each (bfloat16 x converted to float32 once per
//     call): per 64-byte load 8 (int4) or 4 (int8) shifts, bit-selects and FMAs per row.
// The products and sums are float32 in another order than the row kernels' (and the factoring
// loses a few bits where s d sum(x) nearly cancels): tests/kernels/test_quant_linear.py bounds it.
//
// Arithmetic, per (activation row, output row): per block, four chains each sum their products
// (float32), part = (c0 + c1) + (c2 + c3), acc = fma(part, s d, acc), acc = fma(m - s d, sum_k x
// of the block, acc); blocks in order; rounded to x's dtype once. The same for every activation
// row in any tile (4, 2, 1 rows), so a row's outputs do not depend on the rows beside it (batch
// invariance: a verification step reproduces the decode steps it replaces).
//
// Built where the compiler targets AVX-512 (-march=native), the vdpbf16ps way where it also
// targets AVX512-BF16; elsewhere linear_packed_available() is false for that case and the engine
// keeps the row kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "work_ranges.h"

namespace {

constexpr int64_t kBlock = 32;  // inputs per block (the Q4_1 group; int8: 32 of a group)
constexpr int64_t kRows = 16;   // output rows per group (the lanes of a vector)

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif

// x as the kernels read it, arranged once per call: per row and block, 16 words (vdpbf16ps: chunk
// c, chain p: the bfloat16 pair of inputs 8c + kPairBase[p] and + 2) or 32 float32 (the FMA way:
// the block's inputs in order), and the block's float32 sum
constexpr int kPairBase[4] = {0, 1, 4, 5};
struct Acts {
  int64_t units;
  std::vector<int32_t> pairs;  // [M, units, 16] (vdpbf16ps)
  std::vector<float> xs;       // [M, units * 32] (FMA)
  std::vector<float> sums;     // [M, units]
  const int32_t* pair(int64_t m, int64_t u) const { return pairs.data() + (m * units + u) * 16; }
  const float* block(int64_t m, int64_t u) const { return xs.data() + (m * units + u) * kBlock; }
};

Acts arrange(const at::Tensor& x, bool dot) {
  const int64_t M = x.size(0), K = x.size(1), stride = x.stride(0), units = K / kBlock;
  Acts a{units, {}, {}, std::vector<float>(M * units)};
  const bool bf = x.scalar_type() == at::kBFloat16;
  if (dot) a.pairs.resize(M * units * 16);
  else a.xs.resize(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t u = 0; u < units; ++u) {
      __m512 lo, hi;  // the block's 32 inputs as float32
      if (bf) {
        const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()) + m * stride + u * kBlock;
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))), 16));
        hi = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))), 16));
        if (dot) {
          int32_t* out = a.pairs.data() + (m * units + u) * 16;
          for (int c = 0; c < 4; ++c)
            for (int p = 0; p < 4; ++p) {
              const int64_t k = 8 * c + kPairBase[p];
              out[4 * c + p] = static_cast<int32_t>(xb[k] | (static_cast<uint32_t>(xb[k + 2]) << 16));
            }
        }
      } else {
        const float* xb = x.data_ptr<float>() + m * stride + u * kBlock;
        lo = _mm512_loadu_ps(xb);
        hi = _mm512_loadu_ps(xb + 16);
      }
      if (!dot) {
        _mm512_storeu_ps(a.xs.data() + (m * units + u) * kBlock, lo);
        _mm512_storeu_ps(a.xs.data() + (m * units + u) * kBlock + 16, hi);
      }
      // the sum's order is fixed: two 16-lane halves added lane by lane, then the lanes reduced
      a.sums[m * units + u] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  return a;
}

// (v & field) | one per 32-bit lane in one instruction: truth table 0xEA = (A & B) | C
template <uint32_t Field, uint32_t One>
inline __m512i pick(__m512i v) {
  const __m512i field = _mm512_set1_epi32(static_cast<int>(Field)), one = _mm512_set1_epi32(static_cast<int>(One));
  return _mm512_ternarylogic_epi32(v, field, one, 0xEA);
}

template <int S>
inline __m512i shift(__m512i v) {
  if constexpr (S >= 0) return _mm512_slli_epi32(v, S);
  else return _mm512_srli_epi32(v, -S);
}

// The four chains' sums of block u for MT activation rows: part[m][0..3]
//   int4 (C = 4 chunks of 64 bytes), vdpbf16ps: per chunk four bfloat16 vectors 1 + q / 16
//   (inputs 8c + {0, 2}, {1, 3}, {4, 6}, {5, 7}), chain p = pair p
template <int MT>
inline void block_dot_bf16(const uint8_t* p, const Acts& a, int64_t m0, int64_t u, __m512 (*part)[4]) {
#if defined(__AVX512BF16__)
  for (int c = 0; c < 4; ++c) {
    const __m512i raw = _mm512_loadu_si512(p + 64 * c);
    // field 0x0078 of each 16-bit half (bits 3..6), exponent 0x3F80: the bfloat16 1 + q / 16
    const __m512bh lv[4] = {(__m512bh)pick<0x00780078u, 0x3F803F80u>(shift<3>(raw)),
                            (__m512bh)pick<0x00780078u, 0x3F803F80u>(shift<-5>(raw)),
                            (__m512bh)pick<0x00780078u, 0x3F803F80u>(shift<-1>(raw)),
                            (__m512bh)pick<0x00780078u, 0x3F803F80u>(shift<-9>(raw))};
    for (int m = 0; m < MT; ++m) {
      const int32_t* xp = a.pair(m0 + m, u) + 4 * c;
      for (int q = 0; q < 4; ++q) part[m][q] = _mm512_dpbf16_ps(part[m][q], lv[q], (__m512bh)_mm512_set1_epi32(xp[q]));
    }
  }
#else
  (void)p, (void)a, (void)m0, (void)u, (void)part;
#endif
}

//   int4, FMA: per chunk eight float32 vectors 1 + q / 16 (the nibble moved to mantissa bits
//   19..22), inputs 8c + b (low nibble of byte b: shift 19 - 8b) and 8c + 4 + b (high: 15 - 8b);
//   chain b takes both of byte b's
template <int MT>
inline void block_fma_int4(const uint8_t* p, const Acts& a, int64_t m0, int64_t u, __m512 (*part)[4]) {
  constexpr uint32_t F = 0x00780000u, One = 0x3F800000u;
  for (int c = 0; c < 4; ++c) {
    const __m512i raw = _mm512_loadu_si512(p + 64 * c);
    const __m512 w[8] = {
        _mm512_castsi512_ps(pick<F, One>(shift<19>(raw))), _mm512_castsi512_ps(pick<F, One>(shift<11>(raw))),
        _mm512_castsi512_ps(pick<F, One>(shift<3>(raw))),  _mm512_castsi512_ps(pick<F, One>(shift<-5>(raw))),
        _mm512_castsi512_ps(pick<F, One>(shift<15>(raw))), _mm512_castsi512_ps(pick<F, One>(shift<7>(raw))),
        _mm512_castsi512_ps(pick<F, One>(shift<-1>(raw))), _mm512_castsi512_ps(pick<F, One>(shift<-9>(raw)))};
    for (int m = 0; m < MT; ++m) {
      const float* xb = a.block(m0 + m, u) + 8 * c;
      for (int b = 0; b < 4; ++b) {
        part[m][b] = _mm512_fmadd_ps(w[b], _mm512_set1_ps(xb[b]), part[m][b]);
        part[m][b] = _mm512_fmadd_ps(w[4 + b], _mm512_set1_ps(xb[4 + b]), part[m][b]);
      }
    }
  }
}

//   int8, FMA: per chunk (C = 8) four float32 vectors 1 + u / 256 (byte b moved to mantissa bits
//   15..22: shift 15 - 8b), input 4c + b; chain b takes byte b's
template <int MT>
inline void block_fma_int8(const uint8_t* p, const Acts& a, int64_t m0, int64_t u, __m512 (*part)[4]) {
  constexpr uint32_t F = 0x007F8000u, One = 0x3F800000u;
  for (int c = 0; c < 8; ++c) {
    const __m512i raw = _mm512_loadu_si512(p + 64 * c);
    const __m512 w[4] = {_mm512_castsi512_ps(pick<F, One>(shift<15>(raw))),
                         _mm512_castsi512_ps(pick<F, One>(shift<7>(raw))),
                         _mm512_castsi512_ps(pick<F, One>(shift<-1>(raw))),
                         _mm512_castsi512_ps(pick<F, One>(shift<-9>(raw)))};
    for (int m = 0; m < MT; ++m) {
      const float* xb = a.block(m0 + m, u) + 4 * c;
      for (int b = 0; b < 4; ++b) part[m][b] = _mm512_fmadd_ps(w[b], _mm512_set1_ps(xb[b]), part[m][b]);
    }
  }
}

// float32 -> bfloat16, rounded to nearest even (NaN -> 0x7FC0)
inline __m256i bf16_of(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

enum class Way { kBf16Dot, kFmaInt4, kFmaInt8 };

// y[m0 .. m0 + MT, 16g .. 16g + 16) for row group g; B = packed bytes per block of 16 rows; dm_blocks:
// dm's blocks per row group (K / 32, or 1: every block's d and m, read once)
template <Way W, int MT, typename T>
void group_tile(const uint8_t* packed, const c10::Half* dm, int64_t dm_blocks, int64_t g, const Acts& a, int64_t m0,
                T* y, int64_t N) {
  constexpr int64_t B = W == Way::kFmaInt8 ? 512 : 256;
  const float s = W == Way::kFmaInt8 ? 256.0f : 16.0f;
  const int64_t units = a.units;
  const uint8_t* p = packed + g * units * B;
  const c10::Half* sc = dm + g * dm_blocks * 2 * kRows;
  const int64_t sc_step = dm_blocks == 1 ? 0 : 2 * kRows;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t u = 0; u < units; ++u, p += B, sc += sc_step) {
    for (int64_t line = 0; line < B; line += 64)  // 8 blocks ahead
      _mm_prefetch(reinterpret_cast<const char*>(p + 8 * B + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sc + 8 * sc_step), _MM_HINT_T0);
    __m512 part[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int q = 0; q < 4; ++q) part[m][q] = _mm512_setzero_ps();
    if constexpr (W == Way::kBf16Dot) block_dot_bf16<MT>(p, a, m0, u, part);
    else if constexpr (W == Way::kFmaInt4) block_fma_int4<MT>(p, a, m0, u, part);
    else block_fma_int8<MT>(p, a, m0, u, part);
    const __m512 sd = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc))),
                                    _mm512_set1_ps(s));
    const __m512 corr =
        _mm512_sub_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kRows))), sd);
    for (int m = 0; m < MT; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]), _mm512_add_ps(part[m][2], part[m][3]));
      acc[m] = _mm512_fmadd_ps(sum, sd, acc[m]);
      acc[m] = _mm512_fmadd_ps(corr, _mm512_set1_ps(a.sums[(m0 + m) * units + u]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    T* out = y + (m0 + m) * N + g * kRows;
    if constexpr (std::is_same_v<T, float>) _mm512_storeu_ps(out, acc[m]);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16_of(acc[m]));
  }
}

template <Way W, typename T>
void run(const uint8_t* pp, const c10::Half* dp, int64_t dm_blocks, const Acts& a, int64_t M, int64_t groups, T* y) {
  constexpr int64_t B = W == Way::kFmaInt8 ? 512 : 256;
  const int64_t N = groups * kRows;
  // one range of row groups per thread, claimed ~16 KB of weights at a time (work_ranges.h)
  tandem::WorkRanges work(groups, tandem::num_threads(), 16384 / std::max<int64_t>(1, a.units * (B + 64)));
  tandem::parallel_for(0, work.parts(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      work.run(part, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          int64_t m0 = 0;
          for (; m0 + 4 <= M; m0 += 4) group_tile<W, 4>(pp, dp, dm_blocks, g, a, m0, y, N);
          if (M - m0 >= 2) group_tile<W, 2>(pp, dp, dm_blocks, g, a, m0, y, N), m0 += 2;
          if (M - m0 >= 1) group_tile<W, 1>(pp, dp, dm_blocks, g, a, m0, y, N);
        }
      });
  });
}

}  // namespace

bool tandem::ops::linear_packed_available(at::ScalarType dtype, int64_t bits) {
  if (dtype == at::kBFloat16 && bits == 4) return kHasBf16Dot;
  return (dtype == at::kBFloat16 || dtype == at::kFloat) && (bits == 4 || bits == 8);
}

at::Tensor tandem::ops::linear_packed(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be CPU float32 or bfloat16 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK((packed.scalar_type() == at::kByte || packed.scalar_type() == at::kChar) && packed.dim() == 5 &&
                  packed.is_contiguous() && packed.size(1) * kBlock == K &&
                  (packed.size(2) == 4 || packed.size(2) == 8) && packed.size(3) == kRows && packed.size(4) == 4,
              "packed must be a uint8 (or its int8 view) [N / 16, K / 32, 4 or 8, 16, 4] from int4_pack_a8 / "
              "int8_pack_a8 for this x");
  const bool int8 = packed.size(2) == 8, bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 && dm.size(0) == packed.size(0) &&
                  (dm.size(1) == packed.size(1) || (int8 && dm.size(1) == 1)) && dm.size(2) == 2 &&
                  dm.size(3) == kRows,
              "dm must be a float16 [N / 16, K / 32, 2, 16] from int4_pack_a8 / int8_pack_a8 (int8 with one scale per "
              "row: [N / 16, 1, 2, 16] too)");
  const bool dot = bf && !int8;
  TORCH_CHECK(!dot || kHasBf16Dot, "linear_packed: bfloat16 x of int4 needs a build with AVX512-BF16");
  const int64_t groups = packed.size(0);
  const Acts a = arrange(x, dot);
  at::Tensor y = tandem::new_cpu({M, groups * kRows}, x.scalar_type());
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
  const c10::Half* dp = dm.data_ptr<c10::Half>();
  const int64_t db = dm.size(1);
  if (dot) run<Way::kBf16Dot>(pp, dp, db, a, M, groups, y.data_ptr<c10::BFloat16>());
  else if (int8 && bf) run<Way::kFmaInt8>(pp, dp, db, a, M, groups, y.data_ptr<c10::BFloat16>());
  else if (int8) run<Way::kFmaInt8>(pp, dp, db, a, M, groups, y.data_ptr<float>());
  else if (bf) run<Way::kFmaInt4>(pp, dp, db, a, M, groups, y.data_ptr<c10::BFloat16>());
  else run<Way::kFmaInt4>(pp, dp, db, a, M, groups, y.data_ptr<float>());
  return y;
}

#else

bool tandem::ops::linear_packed_available(at::ScalarType, int64_t) { return false; }

at::Tensor tandem::ops::linear_packed(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_packed: built without AVX-512");
}

#endif

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("linear_packed(Tensor x, Tensor packed, Tensor dm) -> Tensor");
  m.def("linear_packed_available(ScalarType dtype, int bits) -> bool", &tandem::ops::linear_packed_available);
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("linear_packed", &tandem::ops::linear_packed); }
