// New CPU tensors and int tensors for the kernels' hot paths, without the dispatcher where it
// does nothing.
//
// Why: at::empty goes through the dispatcher (BackendSelect, then the CPU kernel). Inside a decode
// step's layers each call took 0.6-0.9 us, and a layer makes ~12 of them. at::detail::empty_cpu,
// which that CPU kernel ends in, took ~0.4 us less per tensor (add_rms_norm's two outputs: 1.70
// -> 0.89 us with its checks; per-call timers, docs/benchmarks.md). The same goes for a .to() that
// has nothing to convert.

#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

namespace tandem {

// at::empty(sizes, dtype) on the CPU
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, /*memory_format_opt=*/std::nullopt);
}

// t.to(dtype).contiguous(): t itself when it is of that dtype and contiguous already
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

}  // namespace tandem
