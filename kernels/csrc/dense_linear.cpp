// Dense bfloat16 linear for decode steps on a CPU with AMX: y [M, N] = x [M, K] @ W^T for M <= 128
// rows on the AMX tiles, reading the weight oneDNN already holds (Linear.packed:
// mkldnn::_reorder_linear_weight's copy, so no second copy); other calls go to oneDNN itself.
//
// Why: oneDNN through torch (mkldnn::_linear_pointwise) costs ~17 us a call before it reads a
// byte (a 64 x 64 layer at 1 row, Intel Xeon with AMX; its primitive runs ~5 us of that, the rest
// is torch's ideep wrapper: primitive lookup, memory descriptors, scratchpad), and a bfloat16
// decode step of SmolLM2 makes 121 such calls: ~2 ms of a ~14 ms step, besides the weight read.
// Here a call is one parallel region over the weight's 32-output blocks (the 30 layers' linears
// at 1-16 rows: 6.3-7.8 vs 9.9-11.9 ms, 17-32 rows 9.9-10.4 vs 13.3-14.2, docs/benchmarks.md
// "Dense bfloat16 decode steps").
//
// The layout: oneDNN packs a [N, K] bfloat16 weight for its AVX-512 / AMX kernels as AB16b32a2b,
// i.e. [N / 32][K / 32][16][32][2] = [N / 32][K / 2][32][2]: blocks of 32 outputs, in a block the
// k-pairs in order, per pair the 32 outputs' (k even, k odd) side by side. 16 pair rows of a
// block's first or last 64 bytes are an AMX B tile as they lie (a 128-byte stride). Nothing
// promises that layout, so before the first call on a shape this file packs a probe weight of that
// shape through the same torch op and compares its bytes with its own packing (layout_ok); any
// difference, N or K not a multiple of 32 (oneDNN would pad), a CPU without AMX-BF16 or Linux not
// granting the tiles, and the shape keeps oneDNN for every call.
//
// The arithmetic is oneDNN's own on these tiles for up to 32 rows (tdpbf16ps over k in blocks of
// 32, float32 sums, each rounded to bfloat16 once): the outputs equal its call's bit for bit, and
// above 32 rows its calls on 32 rows at a time (tests/kernels/test_dense_linear.py). So each
// row's outputs are the same whatever the number of rows in the call, up to 128: a verification
// step of k + 1 tokens per sequence reproduces the decode steps it replaces.

#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "amx.h"
#include "ops.h"

namespace {

// x [M, K] @ W^T on oneDNN's packed W: the very op engine/linear.py calls otherwise
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view, c10::List<std::optional<at::Scalar>>,
                                               std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

}  // namespace

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace {

constexpr int64_t kBlock = 32;    // outputs per packed block (two 16-column C tiles)
constexpr int64_t kChunk = 32;    // rows per pass over a block: two A tiles of 16 rows
// Calls up to this many rows take the tiles here, in chunks of 32 rows: a speculative
// verification step (batch x (k + 1) rows) then computes each row as the decode steps it replaces
// did. oneDNN's own kernel differs from its <= 32-row one above 32 rows (the LM head from 33 rows,
// a K = 1536 layer at 33), so batch-16 verification through it left greedy speculative decoding
// unequal to plain decoding. Prefill-size calls stay oneDNN's: x re-read per 32-output block.
constexpr int64_t kMaxRows = 128;

// palette 1, for a chunk's rows as r0 = min(rows, 16) + r1 = rows - r0: tmm0 / tmm1 C of rows
// 0..r0 x 16 float32 (outputs 0-15 / 16-31 of a block), tmm2 / tmm3 the same for rows r0..rows;
// tmm4 / tmm5 A, those rows x 32 bfloat16 of x; tmm6 / tmm7 B, 16 k-pairs x (16 outputs x 2 k):
// the two halves of a block's 128-byte pair rows, read in place with a 128-byte stride. Unused
// tiles stay 0 x 0.
struct alignas(64) Tiles {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  Tiles(int64_t r0, int64_t r1) {
    for (int t : {0, 1, 4}) set(t, r0);
    if (r1 > 0)
      for (int t : {2, 3, 5}) set(t, r1);
    set(6, 16);
    set(7, 16);
  }
  void set(int t, int64_t r) {
    rows[t] = static_cast<uint8_t>(r);
    colsb[t] = 64;
  }
};

// y[:, 32 b .. 32 b + 32) of one chunk's rows (x: its first row, ld: x's row stride; TWO: more
// than 16 rows, two A tiles), with the tile configuration for those rows loaded; w: oneDNN's
// packed bytes. Each row meets the same tile operations in any chunk of any size: AMX computes a C
// row from its A row only.
template <bool TWO>
inline void chunk_block(const c10::BFloat16* w, int64_t K, const c10::BFloat16* x, int64_t ld, int64_t rows,
                        c10::BFloat16* y, int64_t N, int64_t b) {
  float out[kChunk * kBlock];
  const c10::BFloat16* wb = w + b * K * kBlock;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kc = 0; kc < K / 32; ++kc) {  // 32 inputs: 16 pair rows of 64 values
    const c10::BFloat16* wk = wb + kc * 16 * 2 * kBlock;
    _tile_loadd(6, wk, 128);
    _tile_loadd(7, wk + 32, 128);
    _tile_loadd(4, x + kc * 32, ld * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO) {
      _tile_loadd(5, x + 16 * ld + kc * 32, ld * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, kBlock * 4);
  _tile_stored(1, out + 16, kBlock * 4);
  if constexpr (TWO) {
    _tile_stored(2, out + 16 * kBlock, kBlock * 4);
    _tile_stored(3, out + 16 * kBlock + 16, kBlock * 4);
  }
  for (int64_t m = 0; m < rows; ++m)  // float32 -> bfloat16, round to nearest even, as oneDNN
    for (int64_t i = 0; i < kBlock; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + b * kBlock + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + m * kBlock + i)));
}

// y[:, 32 b .. 32 b + 32) for blocks b in [begin, end), all M rows: chunks of 32 rows, the last
// one the M % 32 rows left with a tile configuration of its own.
void block_range(const c10::BFloat16* w, int64_t K, const c10::BFloat16* x, int64_t ldx, int64_t M, c10::BFloat16* y,
                 int64_t N, int64_t begin, int64_t end) {
  const int64_t chunks = (M + kChunk - 1) / kChunk, tail = M % kChunk, t0 = std::min<int64_t>(tail, 16);
  const Tiles full_cfg(16, 16), tail_cfg(t0, tail - t0);
  const Tiles* loaded = nullptr;  // per thread: the pool's threads each run a range
  auto use = [&](const Tiles& cfg) {
    if (loaded != &cfg) _tile_loadconfig(&cfg), loaded = &cfg;
  };
  // Above 32 rows, blocks in groups of ~512 KB of weight, each chunk over the group's blocks: the
  // group's weight read from memory once (then from L2), a chunk's 32 rows of x in L1 meanwhile
  // (block by block, every chunk, x re-read from L2 made the LM head at 128 rows 1.7x oneDNN's).
  const int64_t group = M <= kChunk ? end - begin : std::max<int64_t>(1, (512 << 10) / (K * kBlock * 2));
  for (int64_t g0 = begin; g0 < end; g0 += group) {
    const int64_t g1 = std::min(end, g0 + group);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t rows = std::min(kChunk, M - c * kChunk);
      const c10::BFloat16* xc = x + c * kChunk * ldx;
      c10::BFloat16* yc = y + c * kChunk * N;
      use(rows == kChunk ? full_cfg : tail_cfg);
      for (int64_t b = g0; b < g1; ++b) {
        if (rows > 16) chunk_block<true>(w, K, xc, ldx, rows, yc, N, b);
        else chunk_block<false>(w, K, xc, ldx, rows, yc, N, b);
      }
    }
  }
  _tile_release();  // this thread's tile state back to init: cheaper context switches
}

const c10::BFloat16* onednn_data(const at::Tensor& packed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::data_ptr", "").typed<int64_t(const at::Tensor&)>();
  return reinterpret_cast<const c10::BFloat16*>(op.call(packed));
}

// [N, K] -> [N / 32, K / 2, 32, 2]: the layout the kernel reads
at::Tensor pack(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  return weight.reshape({N / kBlock, kBlock, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// Whether Linux grants the tiles and oneDNN packs a [N, K] bfloat16 weight as pack() does: one
// probe per shape and process (the layout oneDNN picks depends on the shape, dtype and CPU only)
bool layout_ok(int64_t N, int64_t K) {
  if (!tandem::amx_tiles_granted()) return false;
  static std::mutex mu;
  static std::map<std::pair<int64_t, int64_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find({N, K});
  if (it != known.end()) return it->second;
  bool ok = N % kBlock == 0 && K % kBlock == 0;
  if (ok) {
    static const auto reorder = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                    .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
    // distinct values everywhere (a generator seeded per shape), so a permutation shows
    const at::Tensor probe = at::randn({N, K}, at::Generator(at::detail::createCPUGenerator(N * 131 + K)),
                                       at::TensorOptions().dtype(at::kBFloat16));
    const at::Tensor theirs = reorder.call(probe, std::nullopt), ours = pack(probe);
    static const auto nbytes = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mkldnn::_nbytes", "")
                                   .typed<int64_t(const at::Tensor&)>();
    ok = nbytes.call(theirs) == ours.nbytes() && std::memcmp(onednn_data(theirs), ours.data_ptr(), ours.nbytes()) == 0;
  }
  known[{N, K}] = ok;
  return ok;
}

}  // namespace

bool tandem::ops::dense_linear_direct(int64_t N, int64_t K) { return layout_ok(N, K); }

at::Tensor tandem::ops::dense_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(packed.is_mkldnn() && packed.dim() == 2, "packed must be a weight from mkldnn::_reorder_linear_weight");
  const int64_t M = x.size(0), N = packed.size(0), K = packed.size(1);
  const bool direct = packed.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.dim() == 2 &&
                      x.stride(1) == 1 && x.scalar_type() == at::kBFloat16 && x.size(1) == K && M >= 1 &&
                      M <= kMaxRows;
  if (!direct || !layout_ok(N, K)) return onednn_linear(x, packed);
  at::Tensor y = at::empty({M, N}, x.options());
  const c10::BFloat16* w = onednn_data(packed);
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t blocks = N / kBlock, threads = std::max<int64_t>(1, at::get_num_threads());
  // blocks split evenly over the threads (one range each: one contiguous stretch of W)
  const int64_t grain = std::max<int64_t>(1, (blocks + threads - 1) / threads);
  at::parallel_for(0, blocks, grain,
                   [&](int64_t begin, int64_t end) { block_range(w, K, xp, x.stride(0), M, yp, N, begin, end); });
  return y;
}

#else

bool tandem::ops::dense_linear_direct(int64_t, int64_t) { return false; }

// a build without AMX-BF16: oneDNN for every call
at::Tensor tandem::ops::dense_linear(const at::Tensor& x, const at::Tensor& packed) { return onednn_linear(x, packed); }

#endif

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("dense_linear_direct(int N, int K) -> bool", &tandem::ops::dense_linear_direct);
  m.def("dense_linear(Tensor x, Tensor packed) -> Tensor");
}

// the packed weight is a MkldnnCPU tensor, which picks the kernel
TORCH_LIBRARY_IMPL(tandem_cpu, MkldnnCPU, m) { m.impl("dense_linear", &tandem::ops::dense_linear); }
