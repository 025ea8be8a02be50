// Store one step's K and V rows into the paged cache on CPU: one call per layer instead of the
// reference's ~8 torch ops (mask, divide, modulo, two index_puts): 36 -> ~3 us per layer call.
//
// Semantics are those of kernels/reference.py: store_kv for non-FP8 caches whose dtype equals the
// key's: key / value [N, Hkv, D] (head_dim contiguous, any token/head strides: the engine passes
// views of its fused qkv output), k_cache / v_cache per-layer strided views
// [num_blocks, block_size, Hkv, D] (head_dim contiguous), slot_mapping int64 [N] with
// slot = block * block_size + offset; negative slots are padding and skipped.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include "cpu_tensor.h"
#include "ops.h"

namespace {

void copy_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t n) {
  const int64_t H = src.size(1), D = src.size(2), bs = cache.size(1);
  const int64_t row_bytes = D * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* c = static_cast<char*>(cache.data_ptr());
  const int64_t es = src.element_size();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    const int64_t blk = slot / bs, off = slot % bs;
    for (int64_t h = 0; h < H; ++h) {
      const char* from = s + (i * src.stride(0) + h * src.stride(1)) * es;
      char* to = c + (blk * cache.stride(0) + off * cache.stride(1) + h * cache.stride(2)) * es;
      std::memcpy(to, from, row_bytes);
    }
  }
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key / value must be [N, Hkv, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "caches must be [nb, bs, Hkv, D]");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "head shape mismatch");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "key, value and caches must share one dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "head_dim must be contiguous");
  const at::Tensor slots = tandem::contiguous_as(slot_mapping, at::kLong);
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == key.size(0), "slot_mapping must be [N]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t n = slots.size(0), capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(sp[i] < capacity, "slot_mapping[", i, "] = ", sp[i], " out of range");
  copy_rows(key, k_cache, sp, n);
  copy_rows(value, v_cache, sp, n);
}

}  // namespace

// for decoder_layer.cpp (ops.h)
void tandem::ops::store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
                           const at::Tensor& slot_mapping) {
  ::store_kv(key, value, std::move(k_cache), std::move(v_cache), slot_mapping);
}

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("store_kv", &store_kv); }
