// Paged decode attention for CPU: reads each K/V row once, straight from the paged cache.
//
// Semantics are exactly those of kernels/reference.py: decode_attention (see its docstring):
//   q [N, Hq, D] (inner dim contiguous, any row/head strides), k_cache / v_cache per-layer strided
//   views [num_blocks, block_size, Hkv, D] (inner dim contiguous; dim 0 steps over every layer of a
//   block, so all strides are taken from the tensors), block_tables int32 [B, max_blocks],
//   seq_lens int32 [B], cu_seqlens_q int32 [B+1]. Query i of sequence b sits at
//   p = seq_lens[b] - n_b + i and attends to positions [0, p]. GQA: q head h reads kv head
//   h / (Hq / Hkv). Optional float32 scales [num_blocks, block_size, Hkv] multiply every cached
//   row (FP8 float8_e4m3fn caches). Softmax and accumulation in float32; output in q's dtype.
//
// Work item = (sequence, kv head, chunk of 512 keys): all G = Hq / Hkv query heads and all n_b
// queries of that kv head are processed together (M = n_b * G rows), so each K and V row is read
// and converted once. Two passes over the chunk with a [M, C] float32 scores buffer (cheaper than
// an online softmax here: no rescaling of the accumulators, and the exp runs as one vectorised loop
// per row); a sequence of several chunks then merges its chunks' rows (see kChunkTokens).
// Only the blocks covering seq_lens[b] are ever read: padding entries of block_tables are ignored.
// Inner loops: AVX2/FMA intrinsics when the build has them (-march=native on an AVX2 machine: 8 keys
// per dot-product group, 64 accumulators in registers for P.V, a polynomial exp), plain
// vectorisable loops otherwise (any head_dim; the AVX2 paths need head_dim % 8 / % 64 == 0).
//
// Cold-cache K/V (the engine: a 30-layer model's weights evict the caches between layers) is read
// from DRAM, and the two threads' compute and memory stalls do not overlap by themselves. So each
// block's compute issues software prefetches for the next block of the same (sequence, kv head)
// (pass 1: the next K rows, and during its last block the first V rows of pass 2; pass 2: the next
// V rows), spread over the M rows' dot products (each row issues 1/M of them) instead of one burst:
// a burst of 64+ prefetches fills the miss queue and stalls the core just like the demand misses.
// Measured (2 threads, 64 MB flush before every call, block-major cache [nb, 30, 2, 16, 3, 64]
// float32 strided layer views, 9 q / 3 kv heads, median of 30 calls, 5 interleaved runs each,
// noisy shared machine): B=1 L=200 67 -> 57 us, B=8 L=200 203 -> 173 us, B=64 L=130 866 -> 734
// us, B=64 L=300 1836 -> 1617 us (~12-15 %; the prefetched variant was faster in every round).
// Tried and dropped (no gain or slower in the same runs): work item = a whole sequence with all kv
// heads and one fused pass per block (online softmax, K and V read together, split of long
// sequences for small B) with prefetch of whole blocks 0-2 ahead (L1 or L2 hints); whole-block
// prefetch bursts in this kernel (1-2 blocks ahead); 3-row register blocking of QK/PV (spills on
// 16 ymm registers). A pure read of the same blocks (no math) takes ~410 us (64x130) / ~1250 us
// (64x300) cold, so the remaining gap is compute that the prefetch does not hide.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_tensor.h"
#include "ops.h"
#include "team.h"
#include "vec_exp.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

typedef uint32_t __attribute__((may_alias)) u32_alias;

// ---- one cached row of D values -> float32 ---------------------------------------------------

template <typename T>
struct Row;

template <>
struct Row<float> {
  // float rows are used in place
  static inline const float* load(const float* src, float* /*buf*/, int64_t /*d*/) { return src; }
};

template <>
struct Row<c10::BFloat16> {
  static inline const float* load(const c10::BFloat16* src, float* buf, int64_t d) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    u32_alias* o = reinterpret_cast<u32_alias*>(buf);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
    return buf;
  }
};

template <>
struct Row<c10::Half> {
  static inline const float* load(const c10::Half* src, float* buf, int64_t d) {
    int64_t i = 0;
#if defined(__F16C__)
    const __m128i* s = reinterpret_cast<const __m128i*>(src);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(s + i / 8)));
#endif
    for (; i < d; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
};

struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i)
      v[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
};
const Fp8Table kFp8;

template <>
struct Row<c10::Float8_e4m3fn> {
  static inline const float* load(const c10::Float8_e4m3fn* src, float* buf, int64_t d) {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
    for (int64_t i = 0; i < d; ++i) buf[i] = kFp8.v[s[i]];
    return buf;
  }
};

// ---- AVX2 inner loops (the build uses -march=native; other CPUs take the plain loops) ---------

#if defined(__AVX2__) && defined(__FMA__)
#define TANDEM_AVX2 1

// scores of one query row against 8 key rows: out[k] = q . keys[k], D % 8 == 0
inline void dot8(const float* q, const float* const* keys, int64_t D, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[0] + d), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[1] + d), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[2] + d), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[3] + d), a3);
    a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[4] + d), a4);
    a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[5] + d), a5);
    a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[6] + d), a6);
    a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[7] + d), a7);
  }
  // transpose-reduce: lane k of the result = horizontal sum of a_k
  const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h45 = _mm256_hadd_ps(a4, a5), h67 = _mm256_hadd_ps(a6, a7);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
  _mm256_storeu_ps(out, sum);
}

// acc[0:64] += sum_t p[t] * rows[t][0:64], the 64 accumulators in registers
inline void axpy64(float* acc, const float* p, const float* const* rows, int64_t off, int64_t nt) {
  __m256 c0 = _mm256_loadu_ps(acc), c1 = _mm256_loadu_ps(acc + 8), c2 = _mm256_loadu_ps(acc + 16),
         c3 = _mm256_loadu_ps(acc + 24), c4 = _mm256_loadu_ps(acc + 32), c5 = _mm256_loadu_ps(acc + 40),
         c6 = _mm256_loadu_ps(acc + 48), c7 = _mm256_loadu_ps(acc + 56);
  for (int64_t t = 0; t < nt; ++t) {
    const __m256 w = _mm256_set1_ps(p[t]);
    const float* v = rows[t] + off;
    c0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), c0);
    c1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), c1);
    c2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), c2);
    c3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), c3);
    c4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), c4);
    c5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), c5);
    c6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), c6);
    c7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), c7);
  }
  _mm256_storeu_ps(acc, c0);
  _mm256_storeu_ps(acc + 8, c1);
  _mm256_storeu_ps(acc + 16, c2);
  _mm256_storeu_ps(acc + 24, c3);
  _mm256_storeu_ps(acc + 32, c4);
  _mm256_storeu_ps(acc + 40, c5);
  _mm256_storeu_ps(acc + 48, c6);
  _mm256_storeu_ps(acc + 56, c7);
}
#endif

// s[0:n] <- softmax(s[0:n]) (n >= 1); returns the max and the sum of exp(s - max) (merging chunks)
inline std::pair<float, float> softmax_inplace(float* s, int64_t n) {
  int64_t t = 0;
  float mx = -INFINITY;
#ifdef TANDEM_AVX2
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(s);
    for (t = 8; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) mx = std::max(mx, v);
  } else {
    t = 0;
  }
#endif
  for (; t < n; ++t) mx = std::max(mx, s[t]);
  float sum = 0.0f;
  t = 0;
#ifdef TANDEM_AVX2
  {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
      const __m256 e = tandem::exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
      _mm256_storeu_ps(s + t, e);
      acc = _mm256_add_ps(acc, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    for (float v : lanes) sum += v;
  }
#endif
  for (; t < n; ++t) {
    s[t] = tandem::exp_nonpos(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (t = 0; t < n; ++t) s[t] *= inv;
  return {mx, sum};
}

// ---- the kernel ---------------------------------------------------------------------------------

struct Args {
  const void* q;  // [N, Hq, D] with strides q_s0, q_s1, 1, of q_dtype (read as float32)
  at::ScalarType q_dtype;
  int64_t q_s0, q_s1;
  const void* k;
  const void* v;
  int64_t k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;
  const float* ks;  // nullable, [nb, bs, Hkv]
  const float* vs;
  int64_t ks_s0, ks_s1, ks_s2, vs_s0, vs_s1, vs_s2;
  const int32_t* bt;
  int64_t bt_s0;
  const int32_t* seq_lens;
  const int32_t* cu;
  void* out;  // contiguous [N, Hq, D] of q_dtype (each value rounded once from float32)
  int64_t B, Hq, Hkv, D, bs;
  float sm_scale;
};

// q[off .. off + D) (float32 / bfloat16 / float16 at base) times scale, as float32 into dst: q's
// values exactly, then one multiply, as converting q to float32 first did
inline void scaled_floats(const void* base, at::ScalarType dtype, int64_t off, int64_t D, float scale, float* dst) {
  if (dtype == at::kFloat) {
    const float* src = static_cast<const float*>(base) + off;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
  } else if (dtype == at::kBFloat16) {
    const c10::BFloat16* src = static_cast<const c10::BFloat16*>(base) + off;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  } else {
    const c10::Half* src = static_cast<const c10::Half*>(base) + off;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  }
}

// src[0 .. D) into out[off .. off + D) of dtype, each rounded to nearest even once (as .to(dtype))
inline void store_as(const float* src, void* out, at::ScalarType dtype, int64_t off, int64_t D) {
  if (dtype == at::kFloat) {
    std::memcpy(static_cast<float*>(out) + off, src, D * sizeof(float));
  } else if (dtype == at::kBFloat16) {
    c10::BFloat16* dst = static_cast<c10::BFloat16*>(out) + off;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<c10::BFloat16>(src[d]);
  } else {
    c10::Half* dst = static_cast<c10::Half*>(out) + off;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<c10::Half>(src[d]);
  }
}

// A sequence's keys in chunks of kChunkTokens (rounded up to whole blocks), from position 0: a
// work item is (sequence, kv head, chunk). Why: at batch 1 there are only Hkv items (SmolLM2: 3),
// which two threads split 2:1, and a long sequence's K/V read is then one thread's (one core read
// ~13 GB/s of the ~26 two read on the Xeon). With chunks, the items of a long sequence spread over
// the threads; each chunk's rows are a softmax over its own keys and their P.V, merged in chunk
// order (weights exp(max_c - max) * sum_c). The chunks are fixed positions, so a query's result
// does not depend on the batch, the thread count or the keys that follow it: a row whose visible
// keys lie in one chunk gets that chunk's result exactly (weight 1), as a sequence of one chunk
// does.
// Measured (2 threads, 9 q / 3 kv heads, D 64, warm caches, µs per call, old -> new, alternating
// runs): Xeon (AMX) bf16 B1 L1600 66 -> 58, f32 B1 L1600 54 -> 45, bf16 B1 L600 28 -> 24, bf16
// B64 L300 708 -> 627; EPYC (Zen 4), quietest round's minimum: f32 B1 L1600 53 -> 45, bf16 B1 L600
// 26 -> 24, bf16 B8 L600 167 -> 139. On the Xeon, chunks of 128 were slower at B64 L300 (783) and
// of 256 at B1 L600 (28.2), though 256 was faster at B8 L600 (138 against 158).
constexpr int64_t kChunkTokens = 512;

// What a chunk leaves for the merge, per row: its normalised P.V [D], its score max and exp sum
// (sum 0: no visible key in the chunk)
struct Partials {
  std::vector<float> acc;         // [rows, D]
  std::vector<float> max, sum;    // [rows]
};

// The rows of sequences of more than one chunk: per row, the chunks with visible keys (sum > 0)
// in chunk order, each weighted exp(max_c - max) * sum_c / the total (1 for a row whose keys lie in
// one chunk: that chunk's P.V exactly)
template <typename ItemT>
void merge_chunks(const Args& a, const std::vector<ItemT>& items, const Partials& parts, int64_t D, int64_t G) {
  std::vector<const ItemT*> heads;  // the first chunk of each (sequence, kv head) to merge
  for (const ItemT& it : items)
    if (it.part >= 0 && it.c == 0) heads.push_back(&it);
  tandem::parallel_for(0, static_cast<int64_t>(heads.size()), 16, [&](int64_t begin, int64_t end) {
    std::vector<float> out(D), weight;
    for (int64_t k = begin; k < end; ++k) {
      const ItemT* first = heads[k];
      const int64_t q0 = a.cu[first->b], nq = a.cu[first->b + 1] - q0, M = nq * G;
      weight.resize(first->nch);
      for (int64_t r = 0; r < M; ++r) {
        float mx = -INFINITY, total = 0.0f;
        for (int64_t c = 0; c < first->nch; ++c) {
          const int64_t row = first[c].part + r;
          if (parts.sum[row] > 0.0f) mx = std::max(mx, parts.max[row]);
        }
        for (int64_t c = 0; c < first->nch; ++c) {
          const int64_t row = first[c].part + r;
          weight[c] = parts.sum[row] > 0.0f ? std::exp(parts.max[row] - mx) * parts.sum[row] : 0.0f;
          total += weight[c];
        }
        bool any = false;
        for (int64_t c = 0; c < first->nch; ++c) {
          if (weight[c] == 0.0f) continue;
          const float wc = weight[c] / total;
          const float* src = parts.acc.data() + (first[c].part + r) * D;
          if (!any) {
            for (int64_t d = 0; d < D; ++d) out[d] = wc * src[d];
          } else {
            for (int64_t d = 0; d < D; ++d) out[d] += wc * src[d];
          }
          any = true;
        }
        if (!any) std::fill(out.begin(), out.end(), 0.0f);
        const int64_t i = r / G, g = r % G;
        store_as(out.data(), a.out, a.q_dtype, ((q0 + i) * a.Hq + first->h * G + g) * D, D);
      }
    }
  });
}

// DC: head_dim as a compile-time constant (0 = runtime a.D), so the D loops unroll into registers.
template <typename T, int64_t DC>
void run(const Args& a) {
  const int64_t D = DC ? DC : a.D;
  const int64_t G = a.Hq / a.Hkv;
  const int64_t bs = a.bs;
  const int64_t chunk = bs * std::max<int64_t>(1, (kChunkTokens + bs - 1) / bs);  // tokens
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  // items (b, h, c) in that order; a sequence of more than one chunk gets partials per item
  struct Item {
    int64_t b, h, c, nch, part;  // part: first row of its partials (nch > 1), else -1
  };
  std::vector<Item> items;
  int64_t total_tokens = 0, part_rows = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t L = std::max<int32_t>(a.seq_lens[b], 0), nq = a.cu[b + 1] - a.cu[b];
    total_tokens += L;
    if (nq <= 0) continue;
    const int64_t nch = std::max<int64_t>(1, (L + chunk - 1) / chunk);
    for (int64_t h = 0; h < a.Hkv; ++h)
      for (int64_t c = 0; c < nch; ++c) {
        items.push_back({b, h, c, nch, nch > 1 ? part_rows : -1});
        if (nch > 1) part_rows += nq * G;
      }
  }
  Partials parts;
  parts.acc.resize(part_rows * D);
  parts.max.resize(part_rows);
  parts.sum.resize(part_rows);
  const int64_t n_items = static_cast<int64_t>(items.size());
  // Items of short sequences are cheap: keep tiny problems on the calling thread (fork/join costs
  // more than the work).
  const int64_t work = total_tokens * a.Hkv * D * G;
  const int64_t grain = work < (1 << 16) ? std::max<int64_t>(n_items, 1) : 1;

  tandem::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf, scores, acc, kbuf(bs * D), wbuf(bs);
    std::vector<const float*> krows(bs);
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = items[w];
      const int64_t b = it.b, h = it.h;
      const int64_t q0 = a.cu[b], nq = a.cu[b + 1] - q0;
      const int64_t L = a.seq_lens[b];
      const int64_t t0 = it.c * chunk, C = std::min(L, t0 + chunk) - t0;  // this chunk: [t0, t0 + C)
      const int64_t M = nq * G;  // rows r = i * G + g: query i, q head h * G + g
      qbuf.resize(M * D);
      acc.assign(M * D, 0.0f);
      scores.resize(M * std::max<int64_t>(C, 1));
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t off = (q0 + i) * a.q_s0 + (h * G + g) * a.q_s1;
          scaled_floats(a.q, a.q_dtype, off, D, a.sm_scale, qbuf.data() + (i * G + g) * D);
        }
      const int32_t* table = a.bt + b * a.bt_s0 + t0 / bs;  // the chunk's blocks
      const int64_t nblocks = (C + bs - 1) / bs;

      // pass 1: scores[r, t] = (q_r . k_t) * sm_scale (* k_scale_t)
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t blk = table[j];
        const int64_t nt = std::min(bs, C - j * bs);
        const T* kbase = kc + blk * a.k_s0 + h * a.k_s2;
        for (int64_t t = 0; t < nt; ++t) krows[t] = Row<T>::load(kbase + t * a.k_s1, kbuf.data() + t * D, D);
        const char* pfbase = nullptr;
        int64_t pfst = 0, pfnt = 0;
        {
          const int64_t jp = j + 1;
          const bool isk = jp < nblocks;
          const int64_t jj = isk ? jp : 0;
          const int64_t pb = table[jj];
          pfnt = std::min(bs, C - jj * bs);
          pfbase = reinterpret_cast<const char*>(isk ? kc + pb * a.k_s0 + h * a.k_s2 : vc + pb * a.v_s0 + h * a.v_s2);
          pfst = (isk ? a.k_s1 : a.v_s1) * sizeof(T);
        }
        const int64_t rowbytes = D * sizeof(T);
        for (int64_t r = 0; r < M; ++r) {
          // this row's share of the next block's rows
          for (int64_t t = r * pfnt / M; t < (r + 1) * pfnt / M; ++t)
            for (int64_t o = 0; o < rowbytes; o += 64) __builtin_prefetch(pfbase + t * pfst + o, 0, 3);
          const float* qr = qbuf.data() + r * D;
          float* sr = scores.data() + r * C + j * bs;
          int64_t t = 0;
#ifdef TANDEM_AVX2
          if (D % 8 == 0) {
            for (; t + 8 <= nt; t += 8) dot8(qr, krows.data() + t, D, sr + t);
            if (t < nt) {
              // The block's last keys through dot8 too (the others repeat its last key): a score
              // must not depend on how full the block is, or a verification step (1 + k queries,
              // more keys present) would round differently from the decode steps it replaces.
              const float* pad[8];
              float tail[8];
              for (int64_t u = 0; u < 8; ++u) pad[u] = krows[std::min(t + u, nt - 1)];
              dot8(qr, pad, D, tail);
              std::copy(tail, tail + (nt - t), sr + t);
              t = nt;
            }
          }
#endif
          for (; t < nt; ++t) {
            const float* kr = krows[t];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
            sr[t] = s;
          }
        }
        if (a.ks) {
          const float* sc = a.ks + blk * a.ks_s0 + h * a.ks_s2;
          for (int64_t r = 0; r < M; ++r) {
            float* sr = scores.data() + r * C + j * bs;
            for (int64_t t = 0; t < nt; ++t) sr[t] *= sc[t * a.ks_s1];
          }
        }
      }

      // softmax over the visible part of each row's chunk (query i sees positions [0, L - nq + i]);
      // masked positions get weight 0
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = r / G;
        const int64_t visible = std::min<int64_t>(std::max<int64_t>(L - nq + i + 1 - t0, 0), C);
        float* sr = scores.data() + r * C;
        float mx = -INFINITY, sum = 0.0f;
        if (visible > 0) std::tie(mx, sum) = softmax_inplace(sr, visible);
        for (int64_t t = visible; t < C; ++t) sr[t] = 0.0f;
        if (it.part >= 0) {
          parts.max[it.part + r] = mx;
          parts.sum[it.part + r] = sum;
        }
      }

      // pass 2: acc_r += p[r, t] (* v_scale_t) * v_t
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t blk = table[j];
        const int64_t nt = std::min(bs, C - j * bs);
        const T* vbase = vc + blk * a.v_s0 + h * a.v_s2;
        for (int64_t t = 0; t < nt; ++t) krows[t] = Row<T>::load(vbase + t * a.v_s1, kbuf.data() + t * D, D);
        const float* sc = a.vs ? a.vs + blk * a.vs_s0 + h * a.vs_s2 : nullptr;
        const int64_t pfj = j + 1 < nblocks ? j + 1 : -1;
        const int64_t pfnt2 = pfj >= 0 ? std::min(bs, C - pfj * bs) : 0;
        const char* pfv = pfj >= 0 ? reinterpret_cast<const char*>(vc + table[pfj] * a.v_s0 + h * a.v_s2) : nullptr;
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t t = r * pfnt2 / M; t < (r + 1) * pfnt2 / M; ++t)
            for (int64_t o = 0; o < D * (int64_t)sizeof(T); o += 64)
              __builtin_prefetch(pfv + t * a.v_s1 * sizeof(T) + o, 0, 3);
          const float* pr = scores.data() + r * C + j * bs;
          float* ar = acc.data() + r * D;
          const float* pt = pr;
          if (sc) {  // fold the V scales into the weights
            for (int64_t t = 0; t < nt; ++t) wbuf[t] = pr[t] * sc[t * a.vs_s1];
            pt = wbuf.data();
          }
#ifdef TANDEM_AVX2
          if (D % 64 == 0) {
            for (int64_t off = 0; off < D; off += 64) axpy64(ar + off, pt, krows.data(), off, nt);
            continue;
          }
#endif
          {
            for (int64_t t = 0; t < nt; ++t) {
              const float p = pt[t];
              const float* vr = krows[t];
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
            }
          }
        }
      }

      if (it.part >= 0) {
        std::copy(acc.begin(), acc.end(), parts.acc.begin() + it.part * D);
      } else {
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t g = 0; g < G; ++g)
            store_as(acc.data() + (i * G + g) * D, a.out, a.q_dtype, ((q0 + i) * a.Hq + h * G + g) * D, D);
      }
    }
  });
  if (part_rows > 0) merge_chunks(a, items, parts, D, G);
}

template <typename T>
void dispatch_d(const Args& a) {
  if (a.D == 64)
    run<T, 64>(a);
  else if (a.D == 128)
    run<T, 128>(a);
  else
    run<T, 0>(a);
}

void check_scale(const c10::optional<at::Tensor>& s, const at::Tensor& cache, const char* name) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->scalar_type() == at::kFloat && s->dim() == 3, name, " must be float32 [nb, bs, Hkv]");
  TORCH_CHECK(s->size(0) == cache.size(0) && s->size(1) == cache.size(1) && s->size(2) == cache.size(2),
              name, " shape must match the cache's first three dims");
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in,
                            const at::Tensor& cu_in, int64_t max_query_len, double sm_scale,
                            const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  (void)max_query_len;  // n_b comes from cu_seqlens_q; kept for signature parity with the reference
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q_in.dim() == 3, "q must be [N, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must match");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "cache head_dim must be contiguous");
  const int64_t N = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim mismatch");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "kv_heads must divide q heads");
  check_scale(k_scale, k_cache, "k_scale");
  check_scale(v_scale, v_cache, "v_scale");
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "k_scale and v_scale go together");
  TORCH_CHECK(k_cache.scalar_type() != at::kFloat8_e4m3fn || k_scale.has_value(), "FP8 cache needs scales");

  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16 ||
                  q_in.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16");
  // read in its dtype (converted to float32 per row in the kernel, as one .to(float32) did)
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor bt = tandem::contiguous_as(block_tables_in, at::kInt);
  const at::Tensor lens = tandem::contiguous_as(seq_lens_in, at::kInt);
  const at::Tensor cu = tandem::contiguous_as(cu_in, at::kInt);
  const int64_t B = lens.size(0);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == B + 1, "cu_seqlens_q must be [B+1]");
  TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B, "block_tables must be [B, max_blocks]");
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* cp = cu.data_ptr<int32_t>();
  TORCH_CHECK(cp[B] == N, "cu_seqlens_q[-1] must equal the number of queries");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] <= bt.size(1) * bs, "seq_lens[", b, "] exceeds its block table");
    TORCH_CHECK(cp[b + 1] >= cp[b], "cu_seqlens_q must be non-decreasing");
  }
  // every block a sequence covers must exist (padding entries beyond them are never read)
  const int32_t* tp = bt.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = (std::max<int32_t>(lp[b], 0) + bs - 1) / bs;
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t id = tp[b * bt.stride(0) + j];
      TORCH_CHECK(id >= 0 && id < k_cache.size(0), "block_tables[", b, ", ", j, "] = ", id, " out of range");
    }
  }

  at::Tensor out = tandem::new_cpu({N, Hq, D}, q.scalar_type());
  Args a{};
  a.q = q.data_ptr();
  a.q_dtype = q.scalar_type();
  a.q_s0 = q.stride(0);
  a.q_s1 = q.stride(1);
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  a.k_s0 = k_cache.stride(0);
  a.k_s1 = k_cache.stride(1);
  a.k_s2 = k_cache.stride(2);
  a.v_s0 = v_cache.stride(0);
  a.v_s1 = v_cache.stride(1);
  a.v_s2 = v_cache.stride(2);
  if (k_scale.has_value()) {
    a.ks = k_scale->data_ptr<float>();
    a.vs = v_scale->data_ptr<float>();
    a.ks_s0 = k_scale->stride(0);
    a.ks_s1 = k_scale->stride(1);
    a.ks_s2 = k_scale->stride(2);
    a.vs_s0 = v_scale->stride(0);
    a.vs_s1 = v_scale->stride(1);
    a.vs_s2 = v_scale->stride(2);
  }
  a.bt = tp;
  a.bt_s0 = bt.stride(0);
  a.seq_lens = lp;
  a.cu = cp;
  a.out = out.data_ptr();
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.bs = bs;
  a.sm_scale = static_cast<float>(sm_scale);

  switch (k_cache.scalar_type()) {
    case at::kFloat: dispatch_d<float>(a); break;
    case at::kBFloat16: dispatch_d<c10::BFloat16>(a); break;
    case at::kHalf: dispatch_d<c10::Half>(a); break;
    case at::kFloat8_e4m3fn: dispatch_d<c10::Float8_e4m3fn>(a); break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", k_cache.scalar_type());
  }
  return out;
}

}  // namespace

// for decoder_layer.cpp (ops.h)
at::Tensor tandem::ops::decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         const at::Tensor& cu_seqlens_q, int64_t max_query_len, double sm_scale,
                                         const c10::optional<at::Tensor>& k_scale,
                                         const c10::optional<at::Tensor>& v_scale) {
  return ::decode_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len, sm_scale,
                            k_scale, v_scale);
}

TORCH_LIBRARY(tandem_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor cu_seqlens_q, int max_query_len, float sm_scale, Tensor? k_scale=None, Tensor? v_scale=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
