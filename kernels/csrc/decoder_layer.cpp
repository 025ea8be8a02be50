// The Llama decoder layers of a decode step in ONE call (quantized or oneDNN-packed linears).
//
// Why: a batch-1 decode step of a quantized small model on CPU is mostly fixed cost, not weight
// reads (a bfloat16 one's too, in part: 0.86x the per-op step time at batch 1): per layer the
// Python model issues ~10 op calls (norms, 4 linears, RoPE, KV store, attention, SiLU-mul) plus
// the views between them, each paying Python and dispatcher overhead.
// Here the same ops (ops.h: the very functions registered as tandem_cpu::*) run back to back in
// C++, every layer of the step in one call (DecoderStack), in the order engine/model.py runs them,
// on the same intermediate tensors: the result is bit-identical to the per-op path (tests/model/test_quantization.py::
// test_one_call_decoder_layers_equal_the_per_op_path checks it), only the calls between them are gone.
//
// Scope (engine/model.py decides): CPU, float32 / bfloat16 activations, a cache of the model dtype
// without FP8 scales, a decode step (no prefill), and every linear either quantized within its
// kernel's row limit (Linear.max_quant_rows; weights as Linear.kernel_tensors: 3 tensors int4, 2
// int8 or repacked) or dense: in oneDNN's layout (Linear.packed: bfloat16 layers, or a bfloat16
// dense copy of quantized ones above that limit), or plain float32 weights (dense_linear_f32).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"
#include "team.h"

namespace {

// x [M, K] @ W^T with W as engine/model.py's bind_kernels passes it: (qweight, scales, mins) int4,
// (qweight, scales) int8, (packed, dm) int4 / int8 repacked for int8 activations (uint8 marks
// it), the same for float activations (packed viewed as int8 [.., 5 dims] marks it:
// linear_packed), or (weight,) a dense weight: in oneDNN's layout (dense_linear: our
// kernels or oneDNN), or plain float32 (dense_linear_f32; engine/model.py passes those for steps
// of up to engine.linear.F32_DIRECT_MAX_ROWS rows only)
at::Tensor quant_linear(const at::Tensor& x, at::TensorList w) {
  if (w.size() == 1)
    return w[0].is_mkldnn() ? tandem::ops::dense_linear(x, w[0]) : tandem::ops::dense_linear_f32(x, w[0], 0);
  if (w.size() == 3) return tandem::ops::int4_linear(x, w[0], w[1], w[2]);
  TORCH_CHECK(w.size() == 2, "a quantized weight is 3 tensors (int4), 2 (int8 or a *_pack_a8's)");
  if (w[0].scalar_type() == at::kByte) return tandem::ops::linear_a8(x, w[0], w[1]);
  if (w[0].dim() == 5) return tandem::ops::linear_packed(x, w[0], w[1]);
  return tandem::ops::int8_linear(x, w[0], w[1]);
}

// Reading ahead (team.h's warm): in a team, a layer runs four stretches on the calling thread
// alone (the norm before qkv; RoPE, the KV store and attention, ~17 us at batch 1; the norm before
// gate_up; SiLU-mul), and before each the other threads start reading the weights of the linears
// that follow into their caches. The next loop (the linear's, or attention's own at longer
// contexts) stops the read where it got.
//   - Before attention: all of o_proj (from the caches, the caller's rows read faster too), up to
//     kWarmMaxBytes (add_whole), then the members' share of gate_up.
//   - Before the others: the members' share of the next linear (add_share).
// Batch-1 steps, alternating in one engine (docs/benchmarks.md): o_proj alone took the served
// config to 0.971-0.988x; the members' shares on top of that to a further 0.958-0.979x (int4 with
// bfloat16 activations 0.956-0.967x, int8 0.956-0.972x, float32 0.979x; float32 + int4, whose
// kernel is bound by its arithmetic, 0.998-1.018x). Only up to kWarmMaxBytes of o_proj: a
// quantized one is ~200 KB at SmolLM2's shapes, a float32 one 1.3 MB, which takes longer to read
// than the stretch lasts and does not fit a 1 MB L2; warming it (when the next loop still waited
// for the whole read) made float32 steps 1.3-6 % slower. oneDNN-packed weights (dense bfloat16) do
// not expose their bytes and are not read ahead.
constexpr int64_t kWarmMaxBytes = 256 << 10;

// Appends what the members compute of linear w: every kernel here splits its output rows (or
// groups of 16 rows, each tensor's dim 0) into one range per thread, the caller's first
// (tandem::parallel_for, work_ranges.h), so the members' ranges start near size(0) / team size.
// That a range can move (work_ranges.h hands a finished thread the others' rows) only makes the
// read less useful, never wrong: it is a read.
bool add_share(at::TensorList w, int64_t threads, tandem::Team::Span* spans, int64_t& n) {
  if (n + static_cast<int64_t>(w.size()) > tandem::Team::kMaxSpans) return false;
  for (const at::Tensor& t : w)
    if (t.is_mkldnn() || t.dim() == 0 || !t.is_contiguous()) return false;
  for (const at::Tensor& t : w) {
    const int64_t rows = t.size(0), row_bytes = static_cast<int64_t>(t.nbytes()) / std::max<int64_t>(rows, 1);
    const int64_t first = rows / threads;
    spans[n++] = {static_cast<const char*>(t.data_ptr()) + first * row_bytes, (rows - first) * row_bytes};
  }
  return true;
}

// Appends all of w, if its tensors expose their bytes and come to at most kWarmMaxBytes
bool add_whole(at::TensorList w, tandem::Team::Span* spans, int64_t& n) {
  int64_t bytes = 0;
  for (const at::Tensor& t : w) {
    if (t.is_mkldnn()) return false;
    bytes += static_cast<int64_t>(t.nbytes());
  }
  if (bytes > kWarmMaxBytes || n + static_cast<int64_t>(w.size()) > tandem::Team::kMaxSpans) return false;
  for (const at::Tensor& t : w) spans[n++] = {t.data_ptr(), static_cast<int64_t>(t.nbytes())};
  return true;
}

// In a team, starts the members reading all of `whole` (add_whole), then their share of `share`
void read_ahead(at::TensorList whole, at::TensorList share) {
  tandem::Team* team = tandem::Team::current();
  if (team == nullptr) return;
  tandem::Team::Span spans[tandem::Team::kMaxSpans];
  int64_t n = 0;
  add_whole(whole, spans, n);
  add_share(share, team->size(), spans, n);
  if (n > 0) team->warm(spans, n);
}

// (this layer's MLP output [N, hidden], the residual stream it is to be added to): see
// DecoderLayer.forward. residual None: layer 0 (x is the embeddings).
std::tuple<at::Tensor, at::Tensor> decoder_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, at::TensorList qkv_w, at::TensorList o_w, at::TensorList gate_up_w,
    at::TensorList down_w, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double sm_scale, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(x.dim() == 2 && k_cache.dim() == 4, "x must be [N, hidden], caches [nb, bs, Hkv, D]");
  read_ahead({}, qkv_w);
  at::Tensor h, res;
  if (residual.has_value()) {
    std::tie(h, res) = tandem::ops::add_rms_norm(x, *residual, input_norm, eps);
  } else {
    h = tandem::ops::rms_norm(x, input_norm, eps);
    res = x;
  }
  const int64_t n = x.size(0), D = k_cache.size(3), q_size = num_heads * D, kv_size = num_kv_heads * D;
  const at::Tensor qkv = quant_linear(h, qkv_w);  // [N, q_size + 2 kv_size]
  read_ahead(o_w, gate_up_w);
  TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size, "qkv width != (num_heads + 2 num_kv_heads) * head_dim");
  const at::Tensor q = qkv.narrow(1, 0, q_size).view({n, num_heads, D});  // strided views, no copies
  const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({n, num_kv_heads, D});
  const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, num_kv_heads, D});
  auto [q_rot, k_rot] = tandem::ops::rotary(q, k, positions, cos, sin);
  tandem::ops::store_kv(k_rot, v, k_cache, v_cache, slot_mapping);
  const at::Tensor attn = tandem::ops::decode_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
                                                        max_seqlen, sm_scale, c10::nullopt, c10::nullopt);
  const at::Tensor o = quant_linear(attn.reshape({n, q_size}), o_w);  // [N, hidden]
  read_ahead({}, gate_up_w);
  auto [h2, res2] = tandem::ops::add_rms_norm(o, res, post_norm, eps);
  const at::Tensor gate_up = quant_linear(h2, gate_up_w);
  read_ahead({}, down_w);
  const at::Tensor mlp = quant_linear(tandem::ops::silu_mul(gate_up), down_w);
  return {mlp, res2};
}

}  // namespace

namespace tandem {

// A decode step's decoder layers [begin, end) in ONE call from Python, their weights, norms, RoPE
// tables and KV caches bound once (engine/model.py makes one per model, cache and weight set):
// per layer the Python loop paid ~9 us (perf) to pass ~24 arguments, four weight lists among them,
// to a decoder_layer op, and ~3 us to slice the layer's cache views. Each layer is decoder_layer
// as before; the int4 weight-only batch-1 step went from 5.96-6.17 to 5.29-5.47 ms
// (docs/benchmarks.md "Dense bfloat16 decode steps"). On more than one thread the layers run in
// one team (team.h): the step's ~120 parallel loops hand over to a waiting thread instead of
// opening an OpenMP region each.
struct DecoderStack : torch::CustomClassHolder {
  std::vector<at::Tensor> input_norms, post_norms, k_caches, v_caches;
  std::vector<std::vector<at::Tensor>> linears;  // [layer * 4 + j]: qkv, o, gate_up, down
  at::Tensor cos, sin;
  double eps, sm_scale;
  int64_t num_heads, num_kv_heads;
  // The layers run in one team (team.h) where every op in them goes through tandem::parallel_for:
  // not where a linear would call oneDNN (a packed weight without our kernel; our dense_linear
  // takes up to 128 rows), which runs on one thread inside a team.
  bool team_ok = true;
  bool team_on = true;  // set_team: off for benchmarks (engine/model.py set_layer_team)
  static constexpr int64_t kTeamMaxRows = 128;

  // norms: per layer input then post-attention; weights: every linear's tensors in order, counts[j]
  // of them for linear j (four per layer); caches: per layer k then v
  DecoderStack(std::vector<at::Tensor> norms, std::vector<at::Tensor> weights, std::vector<int64_t> counts,
               std::vector<at::Tensor> caches, at::Tensor cos_, at::Tensor sin_, double eps_, double sm_scale_,
               int64_t num_heads_, int64_t num_kv_heads_)
      : cos(std::move(cos_)),
        sin(std::move(sin_)),
        eps(eps_),
        sm_scale(sm_scale_),
        num_heads(num_heads_),
        num_kv_heads(num_kv_heads_) {
    const size_t layers = norms.size() / 2;
    TORCH_CHECK(norms.size() == 2 * layers && caches.size() == 2 * layers && counts.size() == 4 * layers,
                "DecoderStack: 2 norms, 2 caches and 4 linears per layer");
    size_t w = 0;
    for (size_t l = 0; l < layers; ++l) {
      input_norms.push_back(norms[2 * l]);
      post_norms.push_back(norms[2 * l + 1]);
      k_caches.push_back(caches[2 * l]);
      v_caches.push_back(caches[2 * l + 1]);
      for (size_t j = 0; j < 4; ++j) {
        const int64_t c = counts[4 * l + j];
        TORCH_CHECK(c >= 1 && w + c <= weights.size(), "DecoderStack: counts do not match the weights");
        linears.emplace_back(weights.begin() + w, weights.begin() + w + c);
        w += c;
      }
    }
    TORCH_CHECK(w == weights.size(), "DecoderStack: counts do not match the weights");
    for (const auto& lin : linears)
      if (lin.size() == 1 && lin[0].is_mkldnn())
        team_ok = team_ok && lin[0].scalar_type() == at::kBFloat16 &&
                  tandem::ops::dense_linear_kernel(lin[0].size(0), lin[0].size(1)) != "onednn";
  }

  // whether forward asks for a team for steps of this many rows (with_team decides whether the
  // threads and CPUs allow one), and whether it would get one now
  bool wants_team(int64_t rows) const { return team_on && team_ok && rows <= kTeamMaxRows; }
  bool team_for(int64_t rows) const { return wants_team(rows) && tandem::team_size() > 0; }
  void set_team(bool on) { team_on = on; }

  // (the MLP output of layer end - 1, its residual stream); residual None: begin is layer 0 and x
  // the embeddings
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor x, c10::optional<at::Tensor> residual, int64_t begin,
                                             int64_t end, at::Tensor positions, at::Tensor slot_mapping,
                                             at::Tensor block_tables, at::Tensor seq_lens, at::Tensor cu_seqlens,
                                             int64_t max_seqlen) {
    TORCH_CHECK(0 <= begin && begin < end && end <= static_cast<int64_t>(input_norms.size()),
                "DecoderStack.forward: layers [", begin, ", ", end, ") out of range");
    const auto layers = [&] {
      for (int64_t l = begin; l < end; ++l) {
        const auto* lin = &linears[4 * l];
        std::tie(x, residual) = decoder_layer(x, residual, input_norms[l], post_norms[l], eps, lin[0], lin[1],
                                              lin[2], lin[3], positions, cos, sin, k_caches[l], v_caches[l],
                                              slot_mapping, block_tables, seq_lens, cu_seqlens, max_seqlen, sm_scale,
                                              num_heads, num_kv_heads);
      }
    };
    if (wants_team(x.size(0))) tandem::with_team(layers);
    else layers();
    return {x, *residual};
  }
};

}  // namespace tandem

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.class_<tandem::DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, at::Tensor, at::Tensor, double, double, int64_t, int64_t>())
      .def("forward", &tandem::DecoderStack::forward)
      .def("team_for", &tandem::DecoderStack::team_for)
      .def("set_team", &tandem::DecoderStack::set_team);
}
