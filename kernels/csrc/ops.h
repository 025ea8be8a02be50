// The C++ CPU ops callable from other translation units of the extension (decoder_layer.cpp).
// Each is the op registered under the same name in tandem_cpu (same checks, same results).

#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace tandem::ops {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos, const at::Tensor& sin);
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                            int64_t max_query_len, double sm_scale, const c10::optional<at::Tensor>& k_scale,
                            const c10::optional<at::Tensor>& v_scale);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
// int4_linear's path for bfloat16 x of up to 8 rows on AVX512-BF16 (quant_linear_bf16.cpp;
// int4_linear checks the shapes and calls it where available() says it was built)
bool int4_linear_bf16_available();
at::Tensor int4_linear_bf16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& mins);
// x [M, K] @ W^T on a weight packed by mkldnn::_reorder_linear_weight: oneDNN's own call, or for
// bfloat16 calls of up to 128 rows our kernel on the same bytes, AMX tiles or vdpbf16ps
// (dense_linear.cpp; kernel: which an [N, K] weight gets, "amx", "vdpbf16ps" or "onednn")
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& packed);
std::string dense_linear_kernel(int64_t N, int64_t K);
// x [M, K] @ W^T on a plain float32 [N, K] weight, AVX-512 (lanes 16) or AVX2 (8) FMAs, each row
// alike (dense_linear_f32.cpp; lanes 0: the widest built; _lanes: the widths built, widest first)
at::Tensor dense_linear_f32(const at::Tensor& x, const at::Tensor& w, int64_t lanes);
std::vector<int64_t> dense_linear_f32_lanes();
at::Tensor linear_a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm);
// int4 / int8 weight-only on int4_pack_a8's / int8_pack_a8's weight with float32 or bfloat16 x
// (quant_linear_packed.cpp; available: whether this build runs x of dtype on weights of bits)
bool linear_packed_available(at::ScalarType dtype, int64_t bits);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm);

}  // namespace tandem::ops
