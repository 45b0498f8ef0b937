// Paged-KV attention on CPU: flash-decoding with online softmax, GQA-aware, fp32/bf16, OpenMP.
//
// Work item = (sequence, KV head, tile of <= 16 query rows, slice of the context). The rows of a tile
// share one KV head -- for decode, the H/G query heads of a group -- and the heads of one query token are
// register-tiled together (<= 4 rows), so each K/V vector is loaded (and for bf16 widened) once per
// group, not once per head, and the cache is streamed from memory once per group. Long contexts with
// few items (batch-1 decode) are split over the context; the thread that finishes a tile's last slice
// merges the slices (log-sum-exp), so a call has a single barrier.
//
// Per row the state is (m = running max, l = running sum, acc[Dh]); keys are taken a step of up to 64
// (several blocks) at a time:
//   s_j = scale * q.k_j,  m' = max(m, max_j s_j),  p_j = exp(s_j - m'),
//   l = l * exp(m - m') + sum_j p_j,  acc = acc * exp(m - m') + sum_j p_j v_j
// and out = acc / l. All arithmetic is fp32.
//
// SIMD: AVX2+FMA intrinsics when the compiler targets them (-march=native on x86-64); otherwise, or when
// Dh is not a multiple of 8, plain loops on blocks widened to fp32 (define BGL_SCALAR to force that path,
// as the tests do). AVX-512 machines run the AVX2 path.
// Layout: cache [N blocks][G kv heads][B slots][Dh]; q/out rows of H*Dh with a token stride.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(BGL_SCALAR)
#include <immintrin.h>
#define BGL_AVX2 1
#else
#define BGL_AVX2 0
#endif

#ifndef BGL_PREFETCH
#define BGL_PREFETCH 1
#endif

namespace {

constexpr int kRowTile = 16;          // query rows per work item
constexpr int64_t kMinSplitKeys = 256;  // do not split a context into slices shorter than this
constexpr double kMinParallelWork = 1 << 18;  // rows x keys x Dh below which one thread does it all

enum DType : int { F32 = 0, BF16 = 1 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

void to_f32(const void* src, int dtype, int64_t n, float* dst) {
  if (dtype == F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
#if BGL_AVX2
  for (; i + 8 <= n; i += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
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
  int64_t s, g, row0, nrows, kb, ke;  // rows [row0, row0+nrows) of sequence s; keys [kb, ke)
  int64_t part;                       // -1: write out directly; else first row of its partial state
  double cost;
  int64_t merge;                      // index of the merge this slice belongs to, or -1
};

struct Scratch {
  std::vector<float> q, acc, m, l, s, kf, vf;
};

// The rows of one work item: fp32 queries, key ranges, online-softmax state, groups of rows that share
// a key range (the heads of one query token), <= 4 rows each for the register tiles.
struct Rows {
  int64_t n, lo[kRowTile], hi[kRowTile], lo_min, hi_max;
  int64_t grp0[kRowTile], grpn[kRowTile], ngrp;
};

inline void prefetch_block(const char* k, const char* v, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(k + off);
    __builtin_prefetch(v + off);
  }
}

#if BGL_AVX2
// Vector path. Blocks are taken kStepKeys keys at a time (several small blocks per step), so the
// per-row softmax bookkeeping (max, rescale of the accumulator) is paid once per step, not per block.
constexpr int64_t kStepKeys = 64;

template <typename T>
void scan_simd(const Args& A, const Item& it, const Rows& R, Scratch& w, int64_t sB) {
  const int64_t Dh = A.Dh, B = A.B, KS = std::max<int64_t>(1, kStepKeys / B);
  const int32_t* bt = A.block_tables + it.s * A.M;
  const int64_t blk = B * Dh, head_off = it.g * blk, bstride = A.G * blk;
  const T* kc = static_cast<const T*>(A.k);
  const T* vc = static_cast<const T*>(A.v);
  const int64_t b_end = (R.hi_max + B - 1) / B;
  static const float ones[4] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t b0 = R.lo_min / B; b0 < b_end; b0 += KS) {
    const int64_t b1 = std::min(b_end, b0 + KS);
    if (BGL_PREFETCH)  // the next step's blocks are elsewhere in memory: start fetching them
      for (int64_t b = b1; b < std::min(b_end, b1 + KS); ++b) {
        const int64_t base = int64_t(bt[b]) * bstride + head_off;
        prefetch_block(reinterpret_cast<const char*>(kc + base), reinterpret_cast<const char*>(vc + base),
                       blk * int64_t(sizeof(T)));
      }
    for (int64_t x = 0; x < R.ngrp; ++x) {
      const int64_t r = R.grp0[x], rt = R.grpn[x];
      const int64_t a = std::max(R.lo[r], b0 * B), e = std::min(R.hi[r], b1 * B);  // absolute positions
      if (a >= e) continue;
      float* s = &w.s[r * sB];
      float *m = &w.m[r], *l = &w.l[r], *acc = &w.acc[r * Dh];
      const float* q = &w.q[r * Dh];
      for (int64_t b = a / B; b * B < e; ++b) {  // scores of every block of the step
        const int64_t base = int64_t(bt[b]) * bstride + head_off;
        const int64_t ja = std::max(a, b * B) - b * B, je = std::min(e, (b + 1) * B) - b * B;
        float* sb = s + (b - b0) * B;
        switch (rt) {
          case 1: qk_group<1>(q, kc + base, Dh, ja, je, A.scale, sb, sB); break;
          case 2: qk_group<2>(q, kc + base, Dh, ja, je, A.scale, sb, sB); break;
          case 3: qk_group<3>(q, kc + base, Dh, ja, je, A.scale, sb, sB); break;
          default: qk_group<4>(q, kc + base, Dh, ja, je, A.scale, sb, sB); break;
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
        switch (rt) {
          case 1: pv_group<1>(acc, vc + base, Dh, pb, sB, ja, je, al); break;
          case 2: pv_group<2>(acc, vc + base, Dh, pb, sB, ja, je, al); break;
          case 3: pv_group<3>(acc, vc + base, Dh, pb, sB, ja, je, al); break;
          default: pv_group<4>(acc, vc + base, Dh, pb, sB, ja, je, al); break;
        }
      }
    }
  }
}
#endif

// Portable path (no AVX2, or Dh not a multiple of 8): block by block, widened to fp32, row by row.
void scan_generic(const Args& A, const Item& it, const Rows& R, Scratch& w, int64_t sB) {
  const int64_t Dh = A.Dh, B = A.B;
  const size_t esz = A.kv_dtype == F32 ? 4 : 2;
  const int32_t* bt = A.block_tables + it.s * A.M;
  const int64_t blk = B * Dh, head_off = it.g * blk, bstride = A.G * blk;
  for (int64_t b = R.lo_min / B; b * B < R.hi_max; ++b) {
    const int64_t base = int64_t(bt[b]) * bstride + head_off;
    const char* kraw = static_cast<const char*>(A.k) + base * esz;
    const char* vraw = static_cast<const char*>(A.v) + base * esz;
    if (BGL_PREFETCH && (b + 1) * B < R.hi_max)
      prefetch_block(static_cast<const char*>(A.k) + (int64_t(bt[b + 1]) * bstride + head_off) * esz,
                     static_cast<const char*>(A.v) + (int64_t(bt[b + 1]) * bstride + head_off) * esz, blk * esz);
    const int64_t j0 = std::max(R.lo_min, b * B) - b * B, j1 = std::min(R.hi_max, (b + 1) * B) - b * B;
    to_f32(kraw + j0 * Dh * esz, A.kv_dtype, (j1 - j0) * Dh, &w.kf[j0 * Dh]);
    to_f32(vraw + j0 * Dh * esz, A.kv_dtype, (j1 - j0) * Dh, &w.vf[j0 * Dh]);
    for (int64_t r = 0; r < R.n; ++r) {
      const int64_t a = std::max(R.lo[r], b * B) - b * B, e = std::min(R.hi[r], (b + 1) * B) - b * B;
      if (a < e)
        block_row_generic(&w.q[r * Dh], w.kf.data(), w.vf.data(), Dh, a, e, A.scale, &w.s[r * sB], w.m[r], w.l[r],
                          &w.acc[r * Dh]);
    }
  }
}

// Process one work item: all rows of the tile over the keys [kb, ke).
void run_item(const Args& A, const Item& it, Scratch& w, float* part_m, float* part_l, float* part_acc) {
  const int64_t HR = A.H / A.G, Dh = A.Dh, B = A.B;
  const int64_t qs = A.qsl[it.s], n = A.qsl[it.s + 1] - qs, L = A.context_lens[it.s];
  const bool simd = BGL_AVX2 && Dh % 8 == 0;
  const int64_t sB = (simd ? std::max(B, int64_t(64) / B * B) : B) + 8;
  w.q.resize(kRowTile * Dh); w.acc.assign(kRowTile * Dh, 0.f); w.s.resize(kRowTile * sB + 8);
  w.m.assign(kRowTile, -std::numeric_limits<float>::infinity()); w.l.assign(kRowTile, 0.f);
  if (!simd) { w.kf.resize(B * Dh); w.vf.resize(B * Dh); }
  Rows R;
  R.n = it.nrows; R.lo_min = it.ke; R.hi_max = it.kb; R.ngrp = 0;
  for (int64_t r = 0; r < it.nrows; ++r) {
    const int64_t row = it.row0 + r, i = row / HR, h = it.g * HR + row % HR, p = L - n + i;
    const size_t qesz = A.q_dtype == F32 ? 4 : 2;
    to_f32(static_cast<const char*>(A.q) + ((qs + i) * A.q_stride + h * Dh) * qesz, A.q_dtype, Dh, &w.q[r * Dh]);
    R.lo[r] = std::max(it.kb, A.window > 0 ? p - A.window + 1 : int64_t(0));
    R.hi[r] = std::min(it.ke, p + 1);
    R.lo_min = std::min(R.lo_min, R.lo[r]);
    R.hi_max = std::max(R.hi_max, R.hi[r]);
  }
  for (int64_t r = 0; r < it.nrows;) {
    int64_t n_same = 1;
    while (r + n_same < it.nrows && R.lo[r + n_same] == R.lo[r] && R.hi[r + n_same] == R.hi[r]) ++n_same;
    for (int64_t x = 0; x < n_same;) {
      const int64_t left = n_same - x, take = left <= 4 ? left : (left == 5 || left == 6 ? 3 : 4);
      R.grp0[R.ngrp] = r + x; R.grpn[R.ngrp++] = take; x += take;
    }
    r += n_same;
  }
#if BGL_AVX2
  if (simd && A.kv_dtype == F32) scan_simd<float>(A, it, R, w, sB);
  else if (simd) scan_simd<uint16_t>(A, it, R, w, sB);
  else scan_generic(A, it, R, w, sB);
#else
  scan_generic(A, it, R, w, sB);
#endif
  for (int64_t r = 0; r < it.nrows; ++r) {
    float* acc = &w.acc[r * Dh];
    if (it.part >= 0) {
      part_m[it.part + r] = w.m[r];
      part_l[it.part + r] = w.l[r];
      std::memcpy(part_acc + (it.part + r) * Dh, acc, size_t(Dh) * 4);
      continue;
    }
    const int64_t row = it.row0 + r, i = row / HR, h = it.g * HR + row % HR;
    const float inv = 1.f / w.l[r];
    for (int64_t c = 0; c < Dh; ++c) acc[c] *= inv;
    const size_t oesz = A.q_dtype == F32 ? 4 : 2;
    from_f32(acc, Dh, A.q_dtype, static_cast<char*>(A.out) + ((qs + i) * A.out_stride + h * Dh) * oesz);
  }
}

// Merge the partial states of one tile computed over nsplit context slices: out = sum e^(m_k-m) acc_k / ...
void merge(const Args& A, const Item& it, int64_t nsplit, const float* pm, const float* pl, const float* pacc,
           std::vector<float>& buf) {
  const int64_t R = A.H / A.G, Dh = A.Dh, qs = A.qsl[it.s];
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
    const int64_t row = it.row0 + r, i = row / R, h = it.g * R + row % R;
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
  const int64_t R = H / G;
  // Plan: tiles of rows per (sequence, kv head); split contexts when there are too few items for the cores.
  int64_t base_items = 0;
  for (int64_t s = 0; s < S; ++s) base_items += G * ((int64_t(qsl[s + 1] - qsl[s]) * R + kRowTile - 1) / kRowTile);
  const int64_t target = 4 * int64_t(std::max(num_threads, 1));
  std::vector<Item> items, merges;
  std::vector<int64_t> nsplits;
  int64_t part_rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qsl[s + 1] - qsl[s], L = context_lens[s], rows = n * R;
    int64_t nsplit = 1;
    if (num_threads > 1 && base_items < target)
      nsplit = std::max<int64_t>(1, std::min((target + base_items - 1) / base_items, L / kMinSplitKeys));
    const int64_t chunk = ((L + nsplit - 1) / nsplit + B - 1) / B * B;
    nsplit = (L + chunk - 1) / chunk;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
        const int64_t nr = std::min<int64_t>(kRowTile, rows - r0);
        if (nsplit == 1) {
          items.push_back({s, g, r0, nr, 0, L, -1, double(nr) * double(L), -1});
          continue;
        }
        merges.push_back({s, g, r0, nr, 0, L, part_rows, 0.0, -1});
        nsplits.push_back(nsplit);
        for (int64_t k = 0; k < nsplit; ++k) {
          const int64_t kb = k * chunk, ke = std::min(L, kb + chunk);
          items.push_back({s, g, r0, nr, kb, ke, part_rows, double(nr) * double(std::max<int64_t>(0, ke - kb)),
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
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && ni > 1)
  {
    // One barrier per call: the thread that finishes the last slice of a split context merges it, so
    // nobody waits for a second phase (a barrier costs a time slice when a thread is descheduled).
    Scratch w;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t x = 0; x < ni; ++x) {
      const Item& it = items[x];
      run_item(A, it, w, pm.data(), pl.data(), pacc.data());
      if (it.merge >= 0 && done[it.merge].fetch_add(1, std::memory_order_acq_rel) + 1 == nsplits[it.merge])
        merge(A, merges[it.merge], nsplits[it.merge], pm.data(), pl.data(), pacc.data(), w.s);
    }
  }
  return 0;
}

int bgl_simd_width() { return BGL_AVX2 ? 8 : 1; }

}  // extern "C"
