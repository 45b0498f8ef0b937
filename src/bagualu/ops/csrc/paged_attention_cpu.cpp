// Paged-KV attention on CPU: flash-decoding with online softmax, GQA-aware, fp32/bf16, multi-threaded
// through the helper pool of helpers.h (shared with the linear kernel when adopted).
//
// Work item = (sequence, tile of <= 32 query rows, slice of the context); rows are (token, head) pairs,
// token-major, so a decode item holds all H heads of its token and reads each block's G KV heads as one
// contiguous run (fewer, longer streams than one item per KV head: random 4 KiB reads reach about half
// the bandwidth of sequential ones here). The heads of one token in one KV group are register-tiled
// together (<= 4 rows), so each K/V vector is loaded (and for bf16 widened) once per group, not once
// per head. Long contexts with few items (batch-1 decode) are split over the context; the thread that
// finishes a tile's last slice merges the slices (log-sum-exp), so a call has a single barrier.
//
// Per row the state is (m = running max, l = running sum, acc[Dh]); keys are taken a step of up to 64
// (several blocks) at a time:
//   s_j = scale * q.k_j,  m' = max(m, max_j s_j),  p_j = exp(s_j - m'),
//   l = l * exp(m - m') + sum_j p_j,  acc = acc * exp(m - m') + sum_j p_j v_j
// and out = acc / l. All arithmetic is fp32.
//
// SIMD: AVX2+FMA intrinsics when the compiler targets them (-march=native on x86-64); otherwise, or when
// Dh is not a multiple of 8, plain loops on blocks widened to fp32 (define BGL_SCALAR to force that path,
// as the tests do). On AVX-512 CPUs the QK and PV tiles are 512-bit where Dh is a multiple of 16
// (paged_attention_avx512.h; -DBGL_NO_AVX512 keeps the AVX2 ones).
// Prefill chunks (>= kMinTileTokens query rows of one sequence) take other items on AVX-512 CPUs: the
// query rows of several tokens of one KV group against 32 keys at a time (paged_attention_tiles.h), where a
// row item would hold one token's heads and stream every key once per token.
// Layout: cache [N blocks][G kv heads][B slots][Dh]; q/out rows of H*Dh with a token stride.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "bf16.h"
#include "exp_f32.h"
#include "helpers.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(BGL_SCALAR)
#include <immintrin.h>
#define BGL_AVX2 1
#else
#define BGL_AVX2 0
#endif
#if BGL_AVX2 && defined(__AVX512F__) && !defined(BGL_NO_AVX512)
#define BGL_AVX512 1  // 512-bit QK and PV tiles where Dh % 16 == 0
#else
#define BGL_AVX512 0
#endif

#ifndef BGL_PREFETCH
#define BGL_PREFETCH 1
#endif

namespace {

constexpr int kRowTile = 32;          // query rows per work item
constexpr int64_t kMinSplitKeys = 256;  // do not split a context into slices shorter than this
constexpr double kMinParallelWork = 1 << 18;  // rows x keys x Dh below which one thread does it all

enum DType : int { F32 = 0, BF16 = 1 };

using bgl::bf16_to_f32;
using bgl::f32_to_bf16;

void to_f32(const void* src, int dtype, int64_t n, float* dst) {
  if (dtype == F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
#if BGL_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, bgl::widen8_bf16(s + i));
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

void from_f32(const float* src, int64_t n, int dtype, void* dst) {
  if (dtype == F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

#if BGL_AVX2
#include "paged_attention_avx2.h"
#endif
#if BGL_AVX512
#include "paged_attention_avx512.h"
#endif

// Online-softmax step of one row over its scores s[a:e): s becomes p = exp(s - m'), (m, l) are updated,
// and the factor exp(m - m') the row's accumulator must be scaled by is returned.
inline float softmax_step(float* s, int64_t a, int64_t e, float& m, float& l) {
  float mb = -std::numeric_limits<float>::infinity();
  for (int64_t j = a; j < e; ++j) mb = std::max(mb, s[j]);
  const float mn = std::max(m, mb);
  const float alpha = std::exp(m - mn);  // 0 on the first block (m = -inf)
  float sum = 0.f;
  for (int64_t j = a; j < e; ++j) {
    s[j] = std::exp(s[j] - mn);
    sum += s[j];
  }
  l = l * alpha + sum;
  m = mn;
  return alpha;
}

// Portable path (no AVX2, or Dh not a multiple of 8): one row at a time on a block widened to fp32.
void block_row_generic(const float* q, const float* K, const float* V, int64_t Dh, int64_t a, int64_t e, float scale,
                       float* s, float& m, float& l, float* acc) {
  for (int64_t j = a; j < e; ++j) {
    const float* k = K + j * Dh;
    float t = 0.f;
    for (int64_t c = 0; c < Dh; ++c) t += q[c] * k[c];
    s[j] = t * scale;
  }
  const float alpha = softmax_step(s, a, e, m, l);
  for (int64_t c = 0; c < Dh; ++c) acc[c] *= alpha;
  for (int64_t j = a; j < e; ++j) {
    const float pj = s[j];
    const float* v = V + j * Dh;
    for (int64_t c = 0; c < Dh; ++c) acc[c] += pj * v[c];
  }
}

struct Args {
  const void* q; const void* k; const void* v; void* out;
  int q_dtype, kv_dtype;
  int64_t q_stride, out_stride;  // elements between token rows
  int64_t H, G, Dh, B, M;
  const int32_t* block_tables; const int32_t* context_lens; const int32_t* qsl;
  float scale;
  int64_t window;  // <= 0: none
};

struct Item {
  int64_t s, row0, nrows, kb, ke;  // rows [row0, row0+nrows) of sequence s (row = token * H + head); keys [kb, ke)
  int64_t part;                       // -1: write out directly; else first row of its partial state
  double cost;
  int64_t merge;                      // index of the merge this slice belongs to, or -1
  int64_t g = -1;                     // >= 0: a prefill tile (paged_attention_tiles.h) of KV group g, tokens
                                      // [row0, row0+nrows) of s; -1: rows of the row path
};

struct Scratch {
  std::vector<float> q, acc, m, l, s, kf, vf;
};

// The rows of one work item -- (query token, query head) pairs, token-major -- with their key ranges and
// KV heads, and groups of rows that share both (the heads of one token in one KV group), <= 4 rows each
// for the register tiles.
struct Rows {
  int64_t n, lo[kRowTile], hi[kRowTile], kvh[kRowTile], lo_min, hi_max, h_min, h_max;
  int64_t grp0[kRowTile], grpn[kRowTile], ngrp;
};

inline void prefetch_range(const char* k, const char* v, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(k + off);
    __builtin_prefetch(v + off);
  }
}

#if BGL_AVX2
// Vector path. Blocks are taken kStepKeys keys at a time (several small blocks per step), so the
// per-row softmax bookkeeping (max, rescale of the accumulator) is paid once per step, not per block.
constexpr int64_t kStepKeys = 64;

//
// Prefetch: while the QK and PV loops read block b they prefetch, row by row, the same rows of the block
// that comes KS blocks later (the next step's), and over the last step the first blocks of `next`, the
// item this thread will most likely claim next (the caller's guess); see prefetch_rows. Measured on a
// Zen 5 (2 threads; batch-32 decode shapes: 12 layers' bf16 KV, 4 KV heads of 64, 192 keys, 75 MB per
// step from DRAM): 4.6 -> 2.5 ms per step; with the previous scheme, each step's blocks fetched in one burst
// at its start and nothing for an item's first step, memory and compute had run one after the other.
template <typename T, class V>  // V: the register type of the QK and PV tiles (Ymm, or Zmm)
void scan_simd(const Args& A, const Item& it, const Rows& R, Scratch& w, int64_t sB, const Item* next) {
  const int64_t Dh = A.Dh, B = A.B, KS = std::max<int64_t>(1, kStepKeys / B);
  const int32_t* bt = A.block_tables + it.s * A.M;
  const int64_t blk = B * Dh, bstride = A.G * blk;
  const T* kc = static_cast<const T*>(A.k);
  const T* vc = static_cast<const T*>(A.v);
  const int64_t b_end = (R.hi_max + B - 1) / B;
  const int32_t* next_bt = next ? A.block_tables + next->s * A.M : nullptr;
  const int64_t next_b0 = next ? next->kb / B : 0, next_b1 = next ? (next->ke + B - 1) / B : 0;
  auto ahead = [&](const T* cache, int64_t b, int64_t head_off) -> const T* {  // see above; nullptr: none
    if (!BGL_PREFETCH) return nullptr;
    if (b + KS < b_end) return cache + int64_t(bt[b + KS]) * bstride + head_off;
    const int64_t nb = next_b0 + (b + KS - b_end);
    return next_bt && nb < next_b1 ? cache + int64_t(next_bt[nb]) * bstride + head_off : nullptr;
  };
  static const float ones[4] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t b0 = R.lo_min / B; b0 < b_end; b0 += KS) {
    const int64_t b1 = std::min(b_end, b0 + KS);
    for (int64_t x = 0; x < R.ngrp; ++x) {
      const int64_t r = R.grp0[x], rt = R.grpn[x], head_off = R.kvh[r] * blk;
      const int64_t a = std::max(R.lo[r], b0 * B), e = std::min(R.hi[r], b1 * B);  // absolute positions
      if (a >= e) continue;
      float* s = &w.s[r * sB];
      float *m = &w.m[r], *l = &w.l[r], *acc = &w.acc[r * Dh];
      const float* q = &w.q[r * Dh];
      for (int64_t b = a / B; b * B < e; ++b) {  // scores of every block of the step
        const int64_t base = int64_t(bt[b]) * bstride + head_off;
        const int64_t ja = std::max(a, b * B) - b * B, je = std::min(e, (b + 1) * B) - b * B;
        float* sb = s + (b - b0) * B;
        const T* pf = ahead(kc, b, head_off);
        switch (rt) {
          case 1: qk_group<V, 1>(q, kc + base, Dh, ja, je, A.scale, sb, sB, pf); break;
          case 2: qk_group<V, 2>(q, kc + base, Dh, ja, je, A.scale, sb, sB, pf); break;
          case 3: qk_group<V, 3>(q, kc + base, Dh, ja, je, A.scale, sb, sB, pf); break;
          default: qk_group<V, 4>(q, kc + base, Dh, ja, je, A.scale, sb, sB, pf); break;
        }
      }
      float alpha[4];
      const int64_t sa = a - b0 * B, se = e - b0 * B;
      switch (rt) {
        case 1: softmax_group<1>(s, sB, sa, se, m, l, alpha); break;
        case 2: softmax_group<2>(s, sB, sa, se, m, l, alpha); break;
        case 3: softmax_group<3>(s, sB, sa, se, m, l, alpha); break;
        default: softmax_group<4>(s, sB, sa, se, m, l, alpha); break;
      }
      for (int64_t b = a / B; b * B < e; ++b) {  // then the values, rescaling the accumulators once
        const int64_t base = int64_t(bt[b]) * bstride + head_off;
        const int64_t ja = std::max(a, b * B) - b * B, je = std::min(e, (b + 1) * B) - b * B;
        const float* pb = s + (b - b0) * B;
        const float* al = b * B <= a ? alpha : ones;
        const T* pf = ahead(vc, b, head_off);
        switch (rt) {
          case 1: pv_group<V, 1>(acc, vc + base, Dh, pb, sB, ja, je, al, pf); break;
          case 2: pv_group<V, 2>(acc, vc + base, Dh, pb, sB, ja, je, al, pf); break;
          case 3: pv_group<V, 3>(acc, vc + base, Dh, pb, sB, ja, je, al, pf); break;
          default: pv_group<V, 4>(acc, vc + base, Dh, pb, sB, ja, je, al, pf); break;
        }
      }
    }
  }
}
#endif

// Portable path (no AVX2, or Dh not a multiple of 8): block by block, each KV head's part widened to fp32
// once, row by row.
void scan_generic(const Args& A, const Item& it, const Rows& R, Scratch& w, int64_t sB) {
  const int64_t Dh = A.Dh, B = A.B, G = A.G;
  const size_t esz = A.kv_dtype == F32 ? 4 : 2;
  const int32_t* bt = A.block_tables + it.s * A.M;
  const int64_t blk = B * Dh, bstride = G * blk;
  const char* kc = static_cast<const char*>(A.k);
  const char* vc = static_cast<const char*>(A.v);
  std::vector<int64_t> widened(G);
  for (int64_t b = R.lo_min / B; b * B < R.hi_max; ++b) {
    if (BGL_PREFETCH && (b + 1) * B < R.hi_max) {
      const int64_t next = (int64_t(bt[b + 1]) * bstride + R.h_min * blk) * esz;
      prefetch_range(kc + next, vc + next, (R.h_max - R.h_min + 1) * blk * esz);
    }
    std::fill(widened.begin(), widened.end(), int64_t(-1));
    for (int64_t r = 0; r < R.n; ++r) {
      const int64_t a = std::max(R.lo[r], b * B) - b * B, e = std::min(R.hi[r], (b + 1) * B) - b * B;
      if (a >= e) continue;
      const int64_t g = R.kvh[r], base = (int64_t(bt[b]) * bstride + g * blk) * esz;
      float* kf = &w.kf[g * blk];
      float* vf = &w.vf[g * blk];
      if (widened[g] != b) {  // the whole block: another row of this head may need other keys of it
        to_f32(kc + base, A.kv_dtype, blk, kf);
        to_f32(vc + base, A.kv_dtype, blk, vf);
        widened[g] = b;
      }
      block_row_generic(&w.q[r * Dh], kf, vf, Dh, a, e, A.scale, &w.s[r * sB], w.m[r], w.l[r], &w.acc[r * Dh]);
    }
  }
}

#if BGL_AVX512 && !defined(BGL_NO_TILES)  // -DBGL_NO_TILES: prefill chunks on the row path (tests, A/B)
#include "paged_attention_tiles.h"
#define BGL_TILES 1
#else
#define BGL_TILES 0
constexpr int64_t kMinTileTokens = 1;
inline int64_t tile_tokens(int64_t) { return 1; }
#endif

// Whether prefill chunks of a cache with head dim Dh and B-slot blocks take the prefill tiles.
inline bool prefill_tiles(int64_t Dh, int64_t B) { return BGL_TILES && Dh % 16 == 0 && B % 16 == 0; }

// Process one work item: all rows of the tile over the keys [kb, ke).
void run_item(const Args& A, const Item& it, const Item* next, Scratch& w, float* part_m, float* part_l,
              float* part_acc) {
  const int64_t H = A.H, HR = A.H / A.G, Dh = A.Dh, B = A.B;
  const int64_t qs = A.qsl[it.s], n = A.qsl[it.s + 1] - qs, L = A.context_lens[it.s];
  const bool simd = BGL_AVX2 && Dh % 8 == 0;
  const int64_t sB = (simd ? std::max(B, int64_t(64) / B * B) : B) + 8;
  w.q.resize(kRowTile * Dh); w.acc.assign(kRowTile * Dh, 0.f); w.s.resize(kRowTile * sB + 8);
  w.m.assign(kRowTile, -std::numeric_limits<float>::infinity()); w.l.assign(kRowTile, 0.f);
  if (!simd) { w.kf.resize(A.G * B * Dh); w.vf.resize(A.G * B * Dh); }
  Rows R;
  R.n = it.nrows; R.lo_min = it.ke; R.hi_max = it.kb; R.h_min = A.G; R.h_max = 0; R.ngrp = 0;
  const size_t qesz = A.q_dtype == F32 ? 4 : 2;
  for (int64_t r = 0; r < it.nrows; ++r) {
    const int64_t row = it.row0 + r, i = row / H, h = row % H, p = L - n + i;
    to_f32(static_cast<const char*>(A.q) + ((qs + i) * A.q_stride + h * Dh) * qesz, A.q_dtype, Dh, &w.q[r * Dh]);
    R.lo[r] = std::max(it.kb, A.window > 0 ? p - A.window + 1 : int64_t(0));
    R.hi[r] = std::min(it.ke, p + 1);
    R.kvh[r] = h / HR;
    R.lo_min = std::min(R.lo_min, R.lo[r]);
    R.hi_max = std::max(R.hi_max, R.hi[r]);
    R.h_min = std::min(R.h_min, R.kvh[r]);
    R.h_max = std::max(R.h_max, R.kvh[r]);
  }
  for (int64_t r = 0; r < it.nrows;) {
    int64_t n_same = 1;
    while (r + n_same < it.nrows && R.lo[r + n_same] == R.lo[r] && R.hi[r + n_same] == R.hi[r] &&
           R.kvh[r + n_same] == R.kvh[r])
      ++n_same;
    for (int64_t x = 0; x < n_same;) {
      const int64_t left = n_same - x, take = left <= 4 ? left : (left == 5 || left == 6 ? 3 : 4);
      R.grp0[R.ngrp] = r + x; R.grpn[R.ngrp++] = take; x += take;
    }
    r += n_same;
  }
#if BGL_AVX2
#if BGL_AVX512
  if (simd && Dh % 16 == 0) {
    if (A.kv_dtype == F32) scan_simd<float, Zmm>(A, it, R, w, sB, next);
    else scan_simd<uint16_t, Zmm>(A, it, R, w, sB, next);
  } else
#endif
  if (simd && A.kv_dtype == F32) scan_simd<float, Ymm>(A, it, R, w, sB, next);
  else if (simd) scan_simd<uint16_t, Ymm>(A, it, R, w, sB, next);
  else scan_generic(A, it, R, w, sB);
#else
  scan_generic(A, it, R, w, sB);
#endif
  const size_t oesz = A.q_dtype == F32 ? 4 : 2;
  for (int64_t r = 0; r < it.nrows; ++r) {
    float* acc = &w.acc[r * Dh];
    if (it.part >= 0) {
      part_m[it.part + r] = w.m[r];
      part_l[it.part + r] = w.l[r];
      std::memcpy(part_acc + (it.part + r) * Dh, acc, size_t(Dh) * 4);
      continue;
    }
    const int64_t row = it.row0 + r, i = row / H, h = row % H;
    const float inv = 1.f / w.l[r];
    for (int64_t c = 0; c < Dh; ++c) acc[c] *= inv;
    from_f32(acc, Dh, A.q_dtype, static_cast<char*>(A.out) + ((qs + i) * A.out_stride + h * Dh) * oesz);
  }
}

// Merge the partial states of one tile computed over nsplit context slices: out = sum e^(m_k-m) acc_k / ...
void merge(const Args& A, const Item& it, int64_t nsplit, const float* pm, const float* pl, const float* pacc,
           std::vector<float>& buf) {
  const int64_t H = A.H, Dh = A.Dh, qs = A.qsl[it.s];
  buf.resize(Dh);
  for (int64_t r = 0; r < it.nrows; ++r) {
    float m = -std::numeric_limits<float>::infinity(), l = 0.f;
    for (int64_t k = 0; k < nsplit; ++k) m = std::max(m, pm[it.part + k * it.nrows + r]);
    std::fill(buf.begin(), buf.end(), 0.f);
    for (int64_t k = 0; k < nsplit; ++k) {
      const int64_t pr = it.part + k * it.nrows + r;
      if (pl[pr] == 0.f) continue;  // this slice held none of the row's keys
      const float wgt = std::exp(pm[pr] - m);
      l += pl[pr] * wgt;
      for (int64_t c = 0; c < Dh; ++c) buf[c] += wgt * pacc[pr * Dh + c];
    }
    const float inv = 1.f / l;
    for (int64_t c = 0; c < Dh; ++c) buf[c] *= inv;
    const int64_t row = it.row0 + r, i = row / H, h = row % H;
    const size_t oesz = A.q_dtype == F32 ? 4 : 2;
    from_f32(buf.data(), Dh, A.q_dtype, static_cast<char*>(A.out) + ((qs + i) * A.out_stride + h * Dh) * oesz);
  }
}

}  // namespace

namespace {
// Checks the index tensors; 0 if fine, else a code (err[0..2] say where) that the Python side turns into
// a message: 1 query_start_loc[0] != 0, 2 sequence with no query rows, 3 query_start_loc[S] != T,
// 4 context_len < query rows, 5 context needs more blocks than block_tables has, 6 block id out of range.
int check_indices(const int32_t* bt, const int32_t* ctx, const int32_t* qsl, int64_t S, int64_t M,
                              int64_t T, int64_t num_blocks, int64_t B, int64_t* err) {
  if (qsl[0] != 0) { err[0] = qsl[0]; return 1; }
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = int64_t(qsl[s + 1]) - qsl[s], L = ctx[s];
    err[0] = s; err[1] = n; err[2] = L;
    if (n < 1) return 2;
    if (L < n) return 4;
    const int64_t nb = (L + B - 1) / B;
    if (nb > M) { err[1] = nb; return 5; }
    for (int64_t b = 0; b < nb; ++b)
      if (bt[s * M + b] < 0 || bt[s * M + b] >= num_blocks) { err[1] = b; err[2] = bt[s * M + b]; return 6; }
  }
  if (qsl[S] != T) { err[0] = qsl[S]; return 3; }
  return 0;
}

// One call's plan, for the threads that claim its items.
struct Job {
  const Args* A;
  const Item *items, *merges;
  const int64_t* nsplits;
  std::atomic<int64_t>* done;  // per merge: slices finished
  float *pm, *pl, *pacc;
  int64_t ni, threads;  // items; threads claiming them
};

void run_job_item(const void* ctx, int64_t x) {
  const Job& j = *static_cast<const Job*>(ctx);
  const Item& it = j.items[x];
#if BGL_TILES
  if (it.g >= 0) {
    thread_local TileScratch tw;  // grown once per thread, reused by every call
    if (j.A->kv_dtype == F32) run_token_tile<float>(*j.A, it.s, it.g, it.row0, it.nrows, tw);
    else run_token_tile<uint16_t>(*j.A, it.s, it.g, it.row0, it.nrows, tw);
    return;
  }
#endif
  thread_local Scratch w;  // grown once per thread, reused by every call
  // items are claimed in order, one at a time, so this thread's next one is about `threads` further on
  const Item* next = x + j.threads < j.ni ? &j.items[x + j.threads] : nullptr;
  run_item(*j.A, it, next, w, j.pm, j.pl, j.pacc);
  if (it.merge >= 0 && j.done[it.merge].fetch_add(1, std::memory_order_acq_rel) + 1 == j.nsplits[it.merge])
    merge(*j.A, j.merges[it.merge], j.nsplits[it.merge], j.pm, j.pl, j.pacc, w.s);
}
}  // namespace

extern "C" {

// out[T, H, Dh] = attention; returns 0, or an index-check code (see check_indices) before touching anything.
int bgl_paged_attention(const void* q, const void* k, const void* v, void* out, int q_dtype, int kv_dtype,
                        int64_t q_stride, int64_t out_stride, int64_t T, int64_t S, int64_t H, int64_t G,
                        int64_t Dh, int64_t N, int64_t B, int64_t M, const int32_t* block_tables,
                        const int32_t* context_lens, const int32_t* qsl, float scale, int64_t window,
                        int num_threads, int64_t* err) {
  if (const int code = check_indices(block_tables, context_lens, qsl, S, M, T, N, B, err)) return code;
  if (S == 0 || T == 0) return 0;
  const Args A{q, k, v, out, q_dtype, kv_dtype, q_stride, out_stride, H, G, Dh, B, M,
               block_tables, context_lens, qsl, scale, window};
  // Plan: tiles of rows (token-major, all heads of a token together when they fit, so an item reads each
  // block's KV heads as one contiguous run); split contexts when there are too few items for the cores.
  const int64_t tile = H <= kRowTile ? kRowTile / H * H : kRowTile;
  // A sequence with many query rows (a prefill chunk) gets prefill tiles where this build has them.
  const int64_t TT = prefill_tiles(Dh, B) ? tile_tokens(H / G) : 0;
  auto tiled = [&](int64_t s) { return TT > 0 && qsl[s + 1] - qsl[s] >= kMinTileTokens; };
  int64_t base_items = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qsl[s + 1] - qsl[s];
    base_items += tiled(s) ? G * ((n + TT - 1) / TT) : (n * H + tile - 1) / tile;
  }
  const int64_t target = 4 * int64_t(std::max(num_threads, 1));
  std::vector<Item> items, merges;
  std::vector<int64_t> nsplits;
  int64_t part_rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qsl[s + 1] - qsl[s], L = context_lens[s], rows = n * H;
    if (tiled(s)) {  // one item per (KV group, TT tokens); never split over the context
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t0 = 0; t0 < n; t0 += TT) {
          const int64_t nt = std::min(TT, n - t0), last = L - n + t0 + nt;  // keys the last token sees
          const int64_t first = window > 0 ? std::max<int64_t>(0, L - n + t0 - window + 1) : 0;
          items.push_back({s, t0, nt, 0, L, -1, double(nt * (H / G)) * double(last - first), -1, g});
        }
      continue;
    }
    int64_t nsplit = 1;
    if (num_threads > 1 && base_items < target)
      nsplit = std::max<int64_t>(1, std::min((target + base_items - 1) / base_items, L / kMinSplitKeys));
    const int64_t chunk = ((L + nsplit - 1) / nsplit + B - 1) / B * B;
    nsplit = (L + chunk - 1) / chunk;
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t nr = std::min<int64_t>(tile, rows - r0);
      if (nsplit == 1) {
        items.push_back({s, r0, nr, 0, L, -1, double(nr) * double(L), -1});
        continue;
      }
      merges.push_back({s, r0, nr, 0, L, part_rows, 0.0, -1});
      nsplits.push_back(nsplit);
      for (int64_t k = 0; k < nsplit; ++k) {
        const int64_t kb = k * chunk, ke = std::min(L, kb + chunk);
        items.push_back({s, r0, nr, kb, ke, part_rows, double(nr) * double(std::max<int64_t>(0, ke - kb)),
                         int64_t(merges.size()) - 1});
        part_rows += nr;
      }
    }
  }
  // Longest first: with dynamic scheduling that balances uneven context lengths across threads.
  std::sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  double work = 0;
  for (const Item& x : items) work += x.cost;
  if (work * double(Dh) < kMinParallelWork) num_threads = 1;  // waking a team costs more than it saves
  std::vector<float> pm(part_rows), pl(part_rows), pacc(part_rows * Dh);
  const int64_t ni = int64_t(items.size());
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[merges.size() + 1]);
  for (size_t x = 0; x < merges.size(); ++x) done[x].store(0, std::memory_order_relaxed);
  // Items are claimed one at a time by the caller and the helper threads (helpers.h: the caller never
  // waits for a helper to wake, only for items already running). No second phase: the thread that finishes
  // the last slice of a split context merges it.
  const int helpers = num_threads > 1 && ni > 1 ? num_threads - 1 : 0;
  const Job job{&A, items.data(), merges.data(), nsplits.data(), done.get(), pm.data(), pl.data(), pacc.data(),
                ni, helpers + 1};
  bgl::Helpers::run(helpers, ni, run_job_item, &job);
  return 0;
}

// Post this library's parallel loops to `pool`, another library's helper pool (bgl_helpers_pool), so the
// kernels of one decode step share a set of helper threads.
void bgl_adopt_helpers(void* pool) { bgl::Helpers::adopt(pool); }

// lanes of the widest tiles this build has (16: AVX-512 ones, used where Dh % 16 == 0)
int bgl_simd_width() { return BGL_AVX512 ? 16 : BGL_AVX2 ? 8 : 1; }

// whether this build has the prefill tiles (paged_attention_tiles.h)
int bgl_prefill_tiles() { return BGL_TILES; }

}  // extern "C"
