// Fused elementwise kernels for CPU float32: RMSNorm (with the residual add), SiLU-mul, RoPE.
//
// Semantics are those of kernels/fused_reference.py (HF Llama). Each replaces 2-6 torch ops whose
// per-op overhead (~5-10 us each, x 30 layers) and extra passes over memory dominate a small
// model's decode step on CPU. Results equal the references to float32 rounding: the RMS sum is
// accumulated in another order, and exp (SiLU) is vec_exp.h's degree-6 polynomial (relative error
// < 2e-7), 8 lanes at a time with AVX2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "vec_exp.h"

namespace {

constexpr int64_t kGrain = 16;  // rows per parallel chunk: a decode step stays on one thread

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be CPU float32");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [N, H] with contiguous rows");
}

// out[i] = w * (h / sqrt(mean(h^2) + eps)), h = x (+ residual; then also written to h_out)
void norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
               at::Tensor& out, at::Tensor* h_out) {
  const int64_t n = x.size(0), H = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* hp = h_out ? h_out->data_ptr<float>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * xs;
      const float* src = xr;
      if (rp) {
        float* hr = hp + i * H;
        const float* rr = rp + i * rs;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) hr[j] = xr[j] + rr[j];
        src = hr;
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) ss += src[j] * src[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + feps);
      float* o = op + i * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) o[j] = wp[j] * (src[j] * inv);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be float32 [H]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  norm_rows(x, nullptr, weight, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must match x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be float32 [H]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor h = at::empty(x.sizes(), x.options());
  norm_rows(x, &residual, weight, eps, out, &h);
  return {out, h};
}

// [N, 2I] (gate | up) -> silu(gate) * up [N, I]; silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up width must be even");
  const int64_t n = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = at::empty({n, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * gs;
      const float* u = g + I;
      float* o = op + i * I;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (; j + 8 <= I; j += 8) {
        const __m256 x = _mm256_loadu_ps(g + j);
        const __m256 e = tandem::exp8_nonpos(_mm256_or_ps(x, sign));  // exp(-|x|)
        const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + j)));
      }
#endif
      for (; j < I; ++j) {
        const float x = g[j];
        const float e = tandem::exp_nonpos(x > 0.0f ? -x : x);
        const float sig = (x > 0.0f ? 1.0f : e) / (1.0f + e);
        o[j] = x * sig * u[j];
      }
    }
  });
  return out;
}

// rotate-half RoPE of one [H, D] token (rows at stride hs) into dst [H, D] contiguous
inline void rope_token(const float* src, int64_t hs, int64_t H, int64_t D, const float* c, const float* s,
                       float* dst) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    const float* x = src + h * hs;
    float* y = dst + h * D;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) y[j] = x[j] * c[j] + (-x[j + half]) * s[j];
#pragma omp simd
    for (int64_t j = half; j < D; ++j) y[j] = x[j] * c[j] + x[j - half] * s[j];
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->stride(2) == 1,
                "q / k must be CPU float32 [N, H, D] with contiguous head_dim");
  const int64_t n = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == n && k.size(2) == D && D % 2 == 0, "q / k shapes must agree, D even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D,
              "cos / sin must be float32 [P, D]");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == n, "positions must be [N]");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < cos.size(0), "position out of the table");
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qop = qo.data_ptr<float>(), *kop = ko.data_ptr<float>();
  const int64_t Hq = q.size(1), Hk = k.size(1);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cp + pp[i] * D;
      const float* s = sp + pp[i] * D;
      rope_token(qp + i * q.stride(0), q.stride(1), Hq, D, c, s, qop + i * Hq * D);
      rope_token(kp + i * k.stride(0), k.stride(1), Hk, D, c, s, kop + i * Hk * D);
    }
  });
  return {qo, ko};
}

}  // namespace

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
