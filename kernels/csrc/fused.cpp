// Fused elementwise kernels for CPU float32 and bfloat16: RMSNorm (with the residual add),
// SiLU-mul, RoPE.
//
// Semantics are those of kernels/fused_reference.py (HF Llama). Each replaces 2-6 torch ops whose
// per-op overhead (~5-10 us each, x 30 layers) and extra passes over memory dominate a small
// model's decode step on CPU. Math is float32; bfloat16 values are rounded (to nearest even) at
// exactly the points where the torch reference rounds them, so bfloat16 results equal the
// reference's except where float32 rounding of the RMS sum / the exp flips a bf16 rounding (one
// ulp). float32 results equal the references to float32 rounding: the RMS sum is accumulated in
// another order, and exp (SiLU) is vec_exp.h's degree-6 polynomial (relative error < 2e-7), 8
// lanes at a time with AVX2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"
#include "vec_exp.h"

namespace {

constexpr int64_t kGrain = 16;  // rows per parallel chunk: a decode step stays on one thread

using bf16 = c10::BFloat16;

// the reference's rounding to the activation dtype (identity for float32)
template <typename T>
inline float rnd(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return static_cast<float>(static_cast<T>(v));
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, " must be CPU float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [N, H] with contiguous rows");
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be [H], contiguous, of x's dtype");
}

// out[i] = w * rnd(h / sqrt(mean(h^2) + eps)), h = x (+ residual, rounded; then also written to h_out)
template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
               at::Tensor& out, at::Tensor* h_out) {
  const int64_t n = x.size(0), H = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* hp = h_out ? h_out->data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  tandem::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(std::is_same_v<T, float> ? 0 : H);
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = xp + i * xs;
      const float* src;
      if constexpr (std::is_same_v<T, float>) {
        src = xr;
        if (rp) {
          float* hr = hp + i * H;
          const float* rr = rp + i * rs;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) hr[j] = xr[j] + rr[j];
          src = hr;
        }
      } else {
        float* hb = hbuf.data();
        if (rp) {
          const T* rr = rp + i * rs;
          T* hr = hp + i * H;
          for (int64_t j = 0; j < H; ++j) {
            hr[j] = static_cast<T>(static_cast<float>(xr[j]) + static_cast<float>(rr[j]));
            hb[j] = static_cast<float>(hr[j]);
          }
        } else {
          for (int64_t j = 0; j < H; ++j) hb[j] = static_cast<float>(xr[j]);
        }
        src = hb;
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) ss += src[j] * src[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + feps);
      T* o = op + i * H;
      if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) o[j] = wp[j] * (src[j] * inv);
      } else {
        for (int64_t j = 0; j < H; ++j)
          o[j] = static_cast<T>(static_cast<float>(wp[j]) * rnd<T>(src[j] * inv));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  at::Tensor out = tandem::new_cpu(x.sizes(), x.scalar_type());
  if (x.scalar_type() == at::kFloat) norm_rows<float>(x, nullptr, weight, eps, out, nullptr);
  else norm_rows<bf16>(x, nullptr, weight, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(), "residual must match x");
  check_weight(weight, x);
  at::Tensor out = tandem::new_cpu(x.sizes(), x.scalar_type());
  at::Tensor h = tandem::new_cpu(x.sizes(), x.scalar_type());
  if (x.scalar_type() == at::kFloat) norm_rows<float>(x, &residual, weight, eps, out, &h);
  else norm_rows<bf16>(x, &residual, weight, eps, out, &h);
  return {out, h};
}

// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|); bf16: silu rounded, then the product
template <typename T>
inline float silu_mul_one(float x, float u) {
  const float e = tandem::exp_nonpos(x > 0.0f ? -x : x);
  const float sig = (x > 0.0f ? 1.0f : e) / (1.0f + e);
  return rnd<T>(x * sig) * u;
}

#if defined(__AVX2__) && defined(__FMA__)
// silu(x) = x * sigmoid(x) on 8 lanes, sigmoid from exp(-|x|): silu_mul_one's arithmetic
inline __m256 silu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = tandem::exp8_nonpos(_mm256_or_ps(x, _mm256_set1_ps(-0.0f)));  // exp(-|x|)
  const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(one, e)));
}

inline __m256 load_bf16_8(const bf16* p) {  // the 16 bits move to the top of a float32
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// c10's float -> bfloat16 (round to nearest even, NaN -> 0x7FC0) on 8 lanes: the bits, in int32s
inline __m256i bf16_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

inline __m256 round_bf16_8(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }

inline void store_bf16_8(bf16* p, __m256 v) {
  const __m256i r = bf16_bits8(v);  // each < 65536: the unsigned pack keeps them
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

// [N, 2I] (gate | up) -> silu(gate) * up [N, I]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up width must be even");
  const int64_t n = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = tandem::new_cpu({n, I}, gate_up.scalar_type());
  if (gate_up.scalar_type() == at::kBFloat16) {
    const bf16* gp = gate_up.data_ptr<bf16>();
    bf16* op = out.data_ptr<bf16>();
    tandem::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bf16* g = gp + i * gs;
        const bf16* u = g + I;
        bf16* o = op + i * I;
        int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)  // (scalar: ~3x the time, ~1.9 ms of a batch-64 step)
        for (; j + 8 <= I; j += 8)  // rounded where silu_mul_one rounds: silu(x), then the product
          store_bf16_8(o + j, _mm256_mul_ps(round_bf16_8(silu8(load_bf16_8(g + j))), load_bf16_8(u + j)));
#endif
        for (; j < I; ++j)
          o[j] = static_cast<bf16>(silu_mul_one<bf16>(static_cast<float>(g[j]), static_cast<float>(u[j])));
      }
    });
    return out;
  }
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  tandem::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * gs;
      const float* u = g + I;
      float* o = op + i * I;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; j + 8 <= I; j += 8)
        _mm256_storeu_ps(o + j, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + j)), _mm256_loadu_ps(u + j)));
#endif
      for (; j < I; ++j) o[j] = silu_mul_one<float>(g[j], u[j]);
    }
  });
  return out;
}

// rotate-half RoPE of one [H, D] token (rows at stride hs) into dst [H, D] contiguous; bf16 rounds
// cos / sin, each product and the sum, as the reference's q * c + rotate_half(q) * s does
template <typename T>
inline void rope_token(const T* src, int64_t hs, int64_t H, int64_t D, const float* c, const float* s, T* dst) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    const T* x = src + h * hs;
    T* y = dst + h * D;
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) y[j] = x[j] * c[j] + (-x[j + half]) * s[j];
#pragma omp simd
      for (int64_t j = half; j < D; ++j) y[j] = x[j] * c[j] + x[j - half] * s[j];
    } else {
      for (int64_t j = 0; j < D; ++j) {
        const float other = j < half ? -static_cast<float>(x[j + half]) : static_cast<float>(x[j - half]);
        const float a = rnd<T>(static_cast<float>(x[j]) * rnd<T>(c[j]));
        const float b = rnd<T>(other * rnd<T>(s[j]));
        y[j] = static_cast<T>(a + b);
      }
    }
  }
}

template <typename T>
void rotary_rows(const at::Tensor& q, const at::Tensor& k, const int64_t* pp, const at::Tensor& cos,
                 const at::Tensor& sin, at::Tensor& qo, at::Tensor& ko) {
  const int64_t n = q.size(0), D = q.size(2), Hq = q.size(1), Hk = k.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  T *qop = qo.data_ptr<T>(), *kop = ko.data_ptr<T>();
  tandem::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cp + pp[i] * D;
      const float* s = sp + pp[i] * D;
      rope_token<T>(qp + i * q.stride(0), q.stride(1), Hq, D, c, s, qop + i * Hq * D);
      rope_token<T>(kp + i * k.stride(0), k.stride(1), Hk, D, c, s, kop + i * Hk * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->dim() == 3 && t->stride(2) == 1,
                "q / k must be CPU [N, H, D] of one dtype with contiguous head_dim");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q / k must be float32 or bfloat16");
  const int64_t n = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == n && k.size(2) == D && D % 2 == 0, "q / k shapes must agree, D even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D,
              "cos / sin must be float32 [P, D]");
  const at::Tensor pos = tandem::contiguous_as(positions, at::kLong);
  TORCH_CHECK(pos.numel() == n, "positions must be [N]");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < cos.size(0), "position out of the table");
  at::Tensor qo = tandem::new_cpu(q.sizes(), q.scalar_type());
  at::Tensor ko = tandem::new_cpu(k.sizes(), k.scalar_type());
  if (q.scalar_type() == at::kFloat) rotary_rows<float>(q, k, pp, cos, sin, qo, ko);
  else rotary_rows<bf16>(q, k, pp, cos, sin, qo, ko);
  return {qo, ko};
}

}  // namespace

// the ops above, for decoder_layer.cpp (ops.h)
namespace tandem::ops {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return ::rms_norm(x, weight, eps); }
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return ::add_rms_norm(x, residual, weight, eps);
}
at::Tensor silu_mul(const at::Tensor& gate_up) { return ::silu_mul(gate_up); }
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  return ::rotary(q, k, positions, cos, sin);
}
}  // namespace tandem::ops

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
}
