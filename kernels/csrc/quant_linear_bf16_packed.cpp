// Int4 (Q4_1) weight-only linear with bfloat16 activations on AVX512-BF16, on the weight repacked
// as for linear_a8 (int4_pack_a8: 16 output rows in the lanes of a vector): y [M, N] = x [M, K] @
// W^T, no activation rounded.
//
// Why: quant_linear_bf16.cpp reads the Q4_1 rows as they are, one output row at a time: per 128
// weights of a row a load, four shifts and bit-selects, four vdpbf16ps, a permute and an FMA, and
// per output row its scales, corrections and a horizontal sum; at SmolLM2's K = 576 that per-row
// part is as large as the dot product, and a batch-1 step of its 30 layers took ~5 ms for 66 MB
// (bound by instructions, not by memory). Here one 64-byte load holds 8 inputs of 16 rows (chunk
// c of block u: byte b of row i = input 8c + b in the low nibble, 8c + 4 + b in the high one):
// four shifts and four bit-selects make four vectors of 16 rows x one pair of inputs as bfloat16
// 1 + q / 16, each a vdpbf16ps operand as it is, against one broadcast pair of x. Per block of 32
// inputs, per activation row: 16 vdpbf16ps in four chains, then two FMAs with the 16 rows' scales
// (d q + m = 16 d (1 + q / 16) + m - 16 d, as quant_linear_bf16.cpp). No horizontal sums.
//
// Pairs: shifted left 3, the low nibbles of bytes 0 and 2 land on bits 3..6 and 19..22 (the two
// bfloat16 halves of a lane): inputs (0, 2); right 5: bytes 1, 3: (1, 3); right 1, the high
// nibbles of bytes 0, 2: (4, 6); right 9: (5, 7). x is arranged once per call into those pairs.
//
// Arithmetic, per (activation row, output row): per block, chains p = 0..3 each sum their four
// vdpbf16ps (float32), part = (p0 + p1) + (p2 + p3), acc = fma(part, 16 d, acc), acc =
// fma(m - 16 d, sum_k x of the block, acc); blocks in order; rounded to bfloat16 once. The same
// for every activation row in any tile, so a row's outputs do not depend on the rows beside it.
//
// Built only where the compiler targets AVX512-BF16 (-march=native); elsewhere available() is
// false and the engine keeps int4_linear.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "work_ranges.h"

namespace {

constexpr int64_t kBlock = 32;  // inputs per block (the Q4_1 group)
constexpr int64_t kRows = 16;   // output rows per group (the lanes of a vector)
constexpr int kPairBase[4] = {0, 1, 4, 5};  // chain p pairs inputs kPairBase[p] and + 2 of a chunk

// x as the kernel reads it: per row and block, 16 dwords (chunk c, chain p: the bfloat16 pair of
// inputs 8c + kPairBase[p] and + 2), and the block's float32 sum
struct PairedRows {
  int64_t units;
  std::vector<int32_t> pairs;  // [M, units, 16]
  std::vector<float> sums;     // [M, units]
};

PairedRows arrange(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), stride = x.stride(0);
  PairedRows r{K / kBlock, std::vector<int32_t>(M * (K / kBlock) * 16), std::vector<float>(M * (K / kBlock))};
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t u = 0; u < r.units; ++u) {
      const uint16_t* xb = xs + m * stride + u * kBlock;
      int32_t* out = r.pairs.data() + (m * r.units + u) * 16;
      for (int c = 0; c < 4; ++c)
        for (int p = 0; p < 4; ++p) {
          const int64_t k = 8 * c + kPairBase[p];
          out[4 * c + p] = static_cast<int32_t>(xb[k] | (static_cast<uint32_t>(xb[k + 2]) << 16));
        }
      // the sum's order is fixed: two 16-lane halves added lane by lane, then the lanes reduced
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
      r.sums[m * r.units + u] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(l, 16))));
    }
  return r;
}

// y[m0 .. m0 + MT, 16g .. 16g + 16) for row group g
template <int MT>
void group_tile(const uint8_t* packed, const c10::Half* dm, int64_t g, const PairedRows& xr, int64_t m0,
                c10::BFloat16* y, int64_t N) {
  const int64_t units = xr.units;
  const uint8_t* p = packed + g * units * 256;
  const c10::Half* s = dm + g * units * 2 * kRows;
  const __m512i field = _mm512_set1_epi32(0x00780078), one = _mm512_set1_epi32(0x3F803F80);
  // (v & 0x78) | 0x3F80 per 16-bit half in one instruction: truth table 0xEA = (A & B) | C
  auto pick = [&](__m512i v) { return (__m512bh)_mm512_ternarylogic_epi32(v, field, one, 0xEA); };
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t u = 0; u < units; ++u, p += 256, s += 2 * kRows) {
    for (int line = 0; line < 256; line += 64)  // 8 blocks ahead
      _mm_prefetch(reinterpret_cast<const char*>(p + 8 * 256 + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(s + 8 * 2 * kRows), _MM_HINT_T0);
    __m512 part[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int q = 0; q < 4; ++q) part[m][q] = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * c);
      const __m512bh lv[4] = {pick(_mm512_slli_epi32(raw, 3)), pick(_mm512_srli_epi32(raw, 5)),
                              pick(_mm512_srli_epi32(raw, 1)), pick(_mm512_srli_epi32(raw, 9))};
      for (int m = 0; m < MT; ++m) {
        const int32_t* xp = xr.pairs.data() + ((m0 + m) * units + u) * 16 + 4 * c;
        for (int q = 0; q < 4; ++q)
          part[m][q] = _mm512_dpbf16_ps(part[m][q], lv[q], (__m512bh)_mm512_set1_epi32(xp[q]));
      }
    }
    const __m512 d16 = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))),
                                     _mm512_set1_ps(16.0f));
    const __m512 corr =
        _mm512_sub_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows))), d16);
    for (int m = 0; m < MT; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]), _mm512_add_ps(part[m][2], part[m][3]));
      acc[m] = _mm512_fmadd_ps(sum, d16, acc[m]);
      acc[m] = _mm512_fmadd_ps(corr, _mm512_set1_ps(xr.sums[(m0 + m) * units + u]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + m) * N + g * kRows), (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

}  // namespace

bool tandem::ops::int4_linear_bf16_packed_available() { return true; }

at::Tensor tandem::ops::int4_linear_bf16_packed(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "x must be CPU bfloat16 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK((packed.scalar_type() == at::kByte || packed.scalar_type() == at::kChar) && packed.dim() == 5 &&
                  packed.is_contiguous() &&
                  packed.size(1) * kBlock == K && packed.size(2) == 4 && packed.size(3) == kRows &&
                  packed.size(4) == 4,
              "packed must be a uint8 (or its int8 view) [N / 16, K / 32, 4, 16, 4] from int4_pack_a8 for this x");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 && dm.size(0) == packed.size(0) &&
                  dm.size(1) == packed.size(1) && dm.size(2) == 2 && dm.size(3) == kRows,
              "dm must be a float16 [N / 16, K / 32, 2, 16] from int4_pack_a8");
  const int64_t groups = packed.size(0), N = groups * kRows;
  const PairedRows xr = arrange(x);
  at::Tensor y = tandem::new_cpu({M, N}, x.scalar_type());
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
  const c10::Half* dp = dm.data_ptr<c10::Half>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  // one range of row groups per thread, claimed ~16 KB of weights at a time (work_ranges.h)
  tandem::WorkRanges work(groups, tandem::num_threads(), 16384 / std::max<int64_t>(1, xr.units * (256 + 64)));
  tandem::parallel_for(0, work.parts(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      work.run(part, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          int64_t m0 = 0;
          for (; m0 + 4 <= M; m0 += 4) group_tile<4>(pp, dp, g, xr, m0, yp, N);
          if (M - m0 >= 2) group_tile<2>(pp, dp, g, xr, m0, yp, N), m0 += 2;
          if (M - m0 >= 1) group_tile<1>(pp, dp, g, xr, m0, yp, N);
        }
      });
  });
  return y;
}

#else

bool tandem::ops::int4_linear_bf16_packed_available() { return false; }

at::Tensor tandem::ops::int4_linear_bf16_packed(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "int4_linear_bf16_packed: built without AVX512-BF16");
}

#endif

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("int4_linear_bf16_packed(Tensor x, Tensor packed, Tensor dm) -> Tensor");
  m.def("int4_linear_bf16_packed_available() -> bool", &tandem::ops::int4_linear_bf16_packed_available);
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("int4_linear_bf16_packed", &tandem::ops::int4_linear_bf16_packed); }
