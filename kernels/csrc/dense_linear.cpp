// Dense bfloat16 linear for decode steps: y [M, N] = x [M, K] @ W^T for M <= 128 rows on the
// weight oneDNN already holds (Linear.packed: mkldnn::_reorder_linear_weight's copy, so no second
// copy), on a CPU with AMX on its tiles, else on one with AVX512-BF16 with vdpbf16ps; other calls
// go to oneDNN itself.
//
// Why: oneDNN through torch (mkldnn::_linear_pointwise) costs ~17 us a call before it reads a
// byte (a 64 x 64 layer at 1 row, Intel Xeon with AMX; its primitive runs ~5 us of that, the rest
// is torch's ideep wrapper: primitive lookup, memory descriptors, scratchpad), and a bfloat16
// decode step of SmolLM2 makes 121 such calls: ~2 ms of a ~14 ms step, besides the weight read.
// Here a call is one parallel region over the weight's blocks of outputs (the 30 layers' linears
// at 1-16 rows on AMX: 6.3-7.8 vs 9.9-11.9 ms, 17-32 rows 9.9-10.4 vs 13.3-14.2, docs/benchmarks.md
// "Dense bfloat16 decode steps"; on an AMD EPYC without AMX see "bfloat16 decode steps without
// AMX").
//
// The layout: oneDNN packs a [N, K] bfloat16 weight as AB16b<B>a2b, i.e. [N / B][K / 32][16][B][2]
// = [N / B][K / 2][B][2]: blocks of B outputs, in a block the k-pairs in order, per pair the B
// outputs' (k even, k odd) side by side. B is 32 for its AMX kernels (16 pair rows of a block's
// first or last 64 bytes are an AMX B tile as they lie, a 128-byte stride) and 64 for its
// AVX512-BF16 ones (a pair row is four vdpbf16ps operands of 16 outputs). Nothing promises that
// layout, so before the first call on a shape this file packs a probe weight of that shape through
// the same torch op and compares its bytes with its own packing at each B (packed_block); no
// match, N not a multiple of B or K of 32 (oneDNN would pad), a CPU without AVX512-BF16 (or,
// for B = 32, without AMX-BF16 granted by Linux) and the shape keeps oneDNN for every call.
//
// The arithmetic, AMX (B = 32): oneDNN's own on these tiles for up to 32 rows (tdpbf16ps over k
// in blocks of 32, float32 sums, each rounded to bfloat16 once): the outputs equal its call's bit
// for bit, and above 32 rows its calls on 32 rows at a time (tests/kernels/test_dense_linear.py).
// AVX512-BF16 (B = 64, or 32 without the tiles): per row and output one float32 sum over the
// k-pairs in order, one vdpbf16ps each, rounded to bfloat16 once; every row alike, 1 to 4 rows at
// a time, so a row's outputs do not depend on the rows beside it (oneDNN's own AVX512-BF16 kernel
// rounds a row differently from 31 rows up at K = 1536). Either way each row's outputs are the
// same whatever the number of rows in the call, up to 128: a verification step of k + 1 tokens
// per sequence reproduces the decode steps it replaces.

#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"

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

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define TANDEM_AMX_BF16 1
#else
#define TANDEM_AMX_BF16 0
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "amx.h"
#include "work_ranges.h"

namespace {

// Calls up to this many rows take our kernels here (the tiles in chunks of 32 rows, vdpbf16ps 4
// rows at a time): a speculative verification step (batch x (k + 1) rows) then computes each row
// as the decode steps it replaces did. oneDNN's own kernel differs from its <= 32-row one above 32
// rows (on AMX: the LM head from 33 rows, a K = 1536 layer at 33), so batch-16 verification
// through it left greedy speculative decoding unequal to plain decoding. Prefill-size calls stay
// oneDNN's: x re-read per block of outputs.
constexpr int64_t kMaxRows = 128;

#if TANDEM_AMX_BF16

constexpr int64_t kAmxBlock = 32;  // outputs per packed block (two 16-column C tiles)
constexpr int64_t kChunk = 32;  // rows per pass over a block: two A tiles of 16 rows

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
  float out[kChunk * kAmxBlock];
  const c10::BFloat16* wb = w + b * K * kAmxBlock;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kc = 0; kc < K / 32; ++kc) {  // 32 inputs: 16 pair rows of 64 values
    const c10::BFloat16* wk = wb + kc * 16 * 2 * kAmxBlock;
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
  _tile_stored(0, out, kAmxBlock * 4);
  _tile_stored(1, out + 16, kAmxBlock * 4);
  if constexpr (TWO) {
    _tile_stored(2, out + 16 * kAmxBlock, kAmxBlock * 4);
    _tile_stored(3, out + 16 * kAmxBlock + 16, kAmxBlock * 4);
  }
  for (int64_t m = 0; m < rows; ++m)  // float32 -> bfloat16, round to nearest even, as oneDNN
    for (int64_t i = 0; i < kAmxBlock; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + b * kAmxBlock + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + m * kAmxBlock + i)));
}

// y[:, 32 b .. 32 b + 32) for blocks b in [begin, end), all M rows: chunks of 32 rows, the last
// one the M % 32 rows left with a tile configuration of its own.
void amx_block_range(const c10::BFloat16* w, int64_t K, const c10::BFloat16* x, int64_t ldx, int64_t M,
                     c10::BFloat16* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t chunks = (M + kChunk - 1) / kChunk, tail = M % kChunk, t0 = std::min<int64_t>(tail, 16);
  const Tiles full_cfg(16, 16), tail_cfg(t0, tail - t0);
  const Tiles* loaded = nullptr;  // per thread: the pool's threads each run a range
  auto use = [&](const Tiles& cfg) {
    if (loaded != &cfg) _tile_loadconfig(&cfg), loaded = &cfg;
  };
  // Above 32 rows, blocks in groups of ~512 KB of weight, each chunk over the group's blocks: the
  // group's weight read from memory once (then from L2), a chunk's 32 rows of x in L1 meanwhile
  // (block by block, every chunk, x re-read from L2 made the LM head at 128 rows 1.7x oneDNN's).
  const int64_t group = M <= kChunk ? end - begin : std::max<int64_t>(1, (512 << 10) / (K * kAmxBlock * 2));
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

#endif  // TANDEM_AMX_BF16

// y[:, B b .. B b + B) of R rows of x (x: the first, ldx its row stride; y: the first's output row)
// from block b of the packed weight (wb: its first pair row): per output a float32 sum over the
// k-pairs in order, one vdpbf16ps each (two bfloat16 products added to it), rounded to bfloat16
// once (round to nearest even). Each row meets the same operations whatever R is.
template <int64_t B, int R>
inline void dp_rows(const c10::BFloat16* wb, int64_t K, const c10::BFloat16* x, int64_t ldx, c10::BFloat16* y,
                    int64_t N) {
  constexpr int V = B / 16;  // 16-output vectors per pair row
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    const c10::BFloat16* wk = wb + kp * 2 * B;
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wk + 32 * v);
    for (int r = 0; r < R; ++r) {
      int32_t pair;  // x[r][2 kp], x[r][2 kp + 1]
      std::memcpy(&pair, x + r * ldx + 2 * kp, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xb);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * N + 16 * v), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
}

// y[:, B b .. B b + B) for blocks b in [begin, end), all M rows, 4 at a time then the 1-3 left:
// a block is read from memory once, then from L2 for the next rows (73.7 KB at K = 576, B = 64)
template <int64_t B>
void dp_block_range(const c10::BFloat16* w, int64_t K, const c10::BFloat16* x, int64_t ldx, int64_t M,
                    c10::BFloat16* y, int64_t N, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const c10::BFloat16* wb = w + b * K * B;
    c10::BFloat16* yb = y + b * B;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dp_rows<B, 4>(wb, K, x + m * ldx, ldx, yb + m * N, N);
    switch (M - m) {
      case 3: dp_rows<B, 3>(wb, K, x + m * ldx, ldx, yb + m * N, N); break;
      case 2: dp_rows<B, 2>(wb, K, x + m * ldx, ldx, yb + m * N, N); break;
      case 1: dp_rows<B, 1>(wb, K, x + m * ldx, ldx, yb + m * N, N); break;
      default: break;
    }
  }
}

const c10::BFloat16* onednn_data(const at::Tensor& packed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::data_ptr", "").typed<int64_t(const at::Tensor&)>();
  return reinterpret_cast<const c10::BFloat16*>(op.call(packed));
}

// [N, K] -> [N / B, K / 2, B, 2]: oneDNN's AB16b<B>a2b
at::Tensor pack(const at::Tensor& weight, int64_t B) {
  const int64_t N = weight.size(0), K = weight.size(1);
  return weight.reshape({N / B, B, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// The block width B at which oneDNN packs an [N, K] bfloat16 weight as pack() does, or 0: one
// probe per shape and process (the layout oneDNN picks depends on the shape, dtype and CPU only)
int64_t packed_block(int64_t N, int64_t K) {
  static std::mutex mu;
  static std::map<std::pair<int64_t, int64_t>, int64_t> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find({N, K});
  if (it != known.end()) return it->second;
  int64_t block = 0;
  if (N > 0 && K > 0 && K % 32 == 0) {
    static const auto reorder = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                    .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
    static const auto nbytes = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mkldnn::_nbytes", "")
                                   .typed<int64_t(const at::Tensor&)>();
    // distinct values everywhere (a generator seeded per shape), so a permutation shows
    const at::Tensor probe = at::randn({N, K}, at::Generator(at::detail::createCPUGenerator(N * 131 + K)),
                                       at::TensorOptions().dtype(at::kBFloat16));
    const at::Tensor theirs = reorder.call(probe, std::nullopt);
    for (const int64_t B : {int64_t{32}, int64_t{64}}) {
      if (N % B != 0 || nbytes.call(theirs) != static_cast<int64_t>(probe.nbytes())) continue;
      const at::Tensor ours = pack(probe, B);
      if (std::memcmp(onednn_data(theirs), ours.data_ptr(), ours.nbytes()) == 0) block = B;
    }
  }
  known[{N, K}] = block;
  return block;
}

enum class Path { kOneDnn, kAmx, kDp32, kDp64 };

// Which kernel takes bfloat16 calls of up to kMaxRows rows on an [N, K] packed weight
Path path_for(int64_t N, int64_t K) {
  const int64_t block = packed_block(N, K);
#if TANDEM_AMX_BF16
  if (block == 32 && tandem::amx_tiles_granted()) return Path::kAmx;
#endif
  return block == 32 ? Path::kDp32 : block == 64 ? Path::kDp64 : Path::kOneDnn;
}

}  // namespace

std::string tandem::ops::dense_linear_kernel(int64_t N, int64_t K) {
  switch (path_for(N, K)) {
    case Path::kAmx: return "amx";
    case Path::kDp32:
    case Path::kDp64: return "vdpbf16ps";
    default: return "onednn";
  }
}

at::Tensor tandem::ops::dense_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(packed.is_mkldnn() && packed.dim() == 2, "packed must be a weight from mkldnn::_reorder_linear_weight");
  const int64_t M = x.size(0), N = packed.size(0), K = packed.size(1);
  const bool direct = packed.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.dim() == 2 &&
                      x.stride(1) == 1 && x.scalar_type() == at::kBFloat16 && x.size(1) == K && M >= 1 &&
                      M <= kMaxRows;
  const Path path = direct ? path_for(N, K) : Path::kOneDnn;
  if (path == Path::kOneDnn) return onednn_linear(x, packed);
  at::Tensor y = tandem::new_cpu({M, N}, x.scalar_type());
  const c10::BFloat16* w = onednn_data(packed);
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t ldx = x.stride(0), threads = std::max<int64_t>(1, tandem::num_threads());
#if TANDEM_AMX_BF16
  if (path == Path::kAmx) {
    const int64_t blocks = N / kAmxBlock;
    // blocks split evenly over the threads (one range each: one contiguous stretch of W)
    const int64_t grain = std::max<int64_t>(1, (blocks + threads - 1) / threads);
    tandem::parallel_for(0, blocks, grain,
                         [&](int64_t begin, int64_t end) { amx_block_range(w, K, xp, ldx, M, yp, N, begin, end); });
    return y;
  }
#endif
  const int64_t B = path == Path::kDp64 ? 64 : 32;
  // one range of blocks per thread, claimed one block (36-98 KB of weights here) at a time
  // (work_ranges.h: a thread done early takes blocks from the back of the other's range)
  tandem::WorkRanges work(N / B, threads, 1);
  tandem::parallel_for(0, work.parts(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      work.run(part, [&](int64_t b0, int64_t b1) {
        if (B == 64) dp_block_range<64>(w, K, xp, ldx, M, yp, N, b0, b1);
        else dp_block_range<32>(w, K, xp, ldx, M, yp, N, b0, b1);
      });
  });
  return y;
}

#else

std::string tandem::ops::dense_linear_kernel(int64_t, int64_t) { return "onednn"; }

// a build without AVX512-BF16: oneDNN for every call
at::Tensor tandem::ops::dense_linear(const at::Tensor& x, const at::Tensor& packed) { return onednn_linear(x, packed); }

#endif

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("dense_linear_kernel(int N, int K) -> str", &tandem::ops::dense_linear_kernel);
  m.def("dense_linear(Tensor x, Tensor packed) -> Tensor");
}

// the packed weight is a MkldnnCPU tensor, which picks the kernel
TORCH_LIBRARY_IMPL(tandem_cpu, MkldnnCPU, m) { m.impl("dense_linear", &tandem::ops::dense_linear); }
