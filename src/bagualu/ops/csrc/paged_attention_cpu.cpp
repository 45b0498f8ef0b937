// Paged-KV attention on CPU: flash-decoding with online softmax, GQA-aware, fp32/bf16, OpenMP.
//
// Work item = (sequence, KV head, tile of query rows, slice of the context). A tile holds the query rows
// that share one KV head -- for decode, the H/G query heads of a group -- so every K/V block is streamed
// from memory once per group and reused from L1 by all its rows. Long contexts with few items (batch-1
// decode) are split over the context and merged afterwards (log-sum-exp), so every core has work.
//
// Per row the state is (m = running max, l = running sum, acc[Dh]); for each block of keys:
//   s_j = scale * q.k_j,  m' = max(m, max_j s_j),  p_j = exp(s_j - m'),
//   l = l * exp(m - m') + sum_j p_j,  acc = acc * exp(m - m') + sum_j p_j v_j
// and out = acc / l. All arithmetic is fp32; bf16 K/V are widened as a block is loaded.
//
// SIMD: AVX2+FMA intrinsics when the compiler targets them (-march=native on x86-64), otherwise plain
// loops the compiler vectorises as it can (define BGL_SCALAR to force that path, as the tests do).
// Layout: cache [N blocks][G kv heads][B slots][Dh]; q/out rows of H*Dh with a token stride.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
// exp for x <= 0 (scores minus their max) and above; Cephes' polynomial, ~1 ulp, clamped to finite range.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// lane i = horizontal sum of a[i]
inline __m256 hsum8(const __m256* a) {
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[0:8*NC] = acc * alpha + sum_{j in [a,b)} p[j] * V[j, 0:8*NC]  (row stride ld)
template <int NC>
inline void pv_tile(float* acc, const float* V, int64_t ld, const float* p, int64_t a, int64_t b, float alpha) {
  __m256 r[NC];
  const __m256 al = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) r[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * c), al);
  for (int64_t j = a; j < b; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* v = V + j * ld;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) r[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), r[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(acc + 8 * c, r[c]);
}
#endif

// s[j] = scale * q . K[j] for j in [a, b); s has room for 8 floats past b.
void scores(const float* q, const float* K, int64_t Dh, int64_t a, int64_t b, float scale, float* s) {
#if BGL_AVX2
  const int64_t Dv = Dh & ~int64_t(7);
  for (int64_t j = a; j < b; j += 8) {
    const float* kp[8];
    for (int jj = 0; jj < 8; ++jj) kp[jj] = K + std::min(j + jj, b - 1) * Dh;  // extra lanes repeat key b-1
    __m256 acc[8];
    for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_setzero_ps();
    for (int64_t c = 0; c < Dv; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[jj] + c), acc[jj]);
    }
    __m256 r = hsum8(acc);
    if (Dv < Dh) {
      alignas(32) float tail[8];
      for (int jj = 0; jj < 8; ++jj) {
        float t = 0.f;
        for (int64_t c = Dv; c < Dh; ++c) t += q[c] * kp[jj][c];
        tail[jj] = t;
      }
      r = _mm256_add_ps(r, _mm256_load_ps(tail));
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
  }
#else
  for (int64_t j = a; j < b; ++j) {
    const float* k = K + j * Dh;
    float t = 0.f;
    for (int64_t c = 0; c < Dh; ++c) t += q[c] * k[c];
    s[j] = t * scale;
  }
#endif
}

// Online-softmax update of one row with the scores s[a:b) of one block (p overwrites s).
void softmax_pv(float* s, const float* V, int64_t Dh, int64_t a, int64_t b, float& m, float& l, float* acc) {
  float mb = -std::numeric_limits<float>::infinity();
  for (int64_t j = a; j < b; ++j) mb = std::max(mb, s[j]);
  const float mn = std::max(m, mb);
  const float alpha = std::exp(m - mn);  // 0 on the first block (m = -inf)
  float sum = 0.f;
  int64_t j = a;
#if BGL_AVX2
  __m256 vs = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mn);
  for (; j + 8 <= b; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  sum = hsum(vs);
#endif
  for (; j < b; ++j) {
    s[j] = std::exp(s[j] - mn);
    sum += s[j];
  }
  l = l * alpha + sum;
  m = mn;
  int64_t c = 0;
#if BGL_AVX2
  for (; c + 64 <= Dh; c += 64) pv_tile<8>(acc + c, V + c, Dh, s, a, b, alpha);
  if (c + 32 <= Dh) pv_tile<4>(acc + c, V + c, Dh, s, a, b, alpha), c += 32;
  if (c + 16 <= Dh) pv_tile<2>(acc + c, V + c, Dh, s, a, b, alpha), c += 16;
  if (c + 8 <= Dh) pv_tile<1>(acc + c, V + c, Dh, s, a, b, alpha), c += 8;
#endif
  for (; c < Dh; ++c) {
    float t = acc[c] * alpha;
    for (int64_t jj = a; jj < b; ++jj) t += s[jj] * V[jj * Dh + c];
    acc[c] = t;
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
};

struct Scratch {
  std::vector<float> q, acc, m, l, s, kf, vf;
};

// Process one work item: all rows of the tile over the keys [kb, ke).
void run_item(const Args& A, const Item& it, Scratch& w, float* part_m, float* part_l, float* part_acc) {
  const int64_t R = A.H / A.G, Dh = A.Dh, B = A.B, sB = B + 8;
  const int64_t qs = A.qsl[it.s], n = A.qsl[it.s + 1] - qs, L = A.context_lens[it.s];
  const size_t esz = A.kv_dtype == F32 ? 4 : 2;
  w.q.resize(kRowTile * Dh); w.acc.assign(kRowTile * Dh, 0.f); w.s.resize(kRowTile * sB + 8);
  w.m.assign(kRowTile, -std::numeric_limits<float>::infinity()); w.l.assign(kRowTile, 0.f);
  if (A.kv_dtype != F32) { w.kf.resize(B * Dh); w.vf.resize(B * Dh); }
  int64_t lo[kRowTile], hi[kRowTile], lo_min = it.ke, hi_max = it.kb;
  for (int64_t r = 0; r < it.nrows; ++r) {
    const int64_t row = it.row0 + r, i = row / R, h = it.g * R + row % R, p = L - n + i;
    const size_t qesz = A.q_dtype == F32 ? 4 : 2;
    to_f32(static_cast<const char*>(A.q) + ((qs + i) * A.q_stride + h * Dh) * qesz, A.q_dtype, Dh, &w.q[r * Dh]);
    lo[r] = std::max(it.kb, A.window > 0 ? p - A.window + 1 : int64_t(0));
    hi[r] = std::min(it.ke, p + 1);
    lo_min = std::min(lo_min, lo[r]);
    hi_max = std::max(hi_max, hi[r]);
  }
  const int32_t* bt = A.block_tables + it.s * A.M;
  const int64_t blk_elems = B * Dh, head_off = it.g * blk_elems, bstride = A.G * blk_elems;
  for (int64_t b = lo_min / B; b * B < hi_max; ++b) {
    const int64_t j0 = std::max(lo_min, b * B) - b * B, j1 = std::min(hi_max, (b + 1) * B) - b * B;
    const int64_t base = int64_t(bt[b]) * bstride + head_off;
    const char* kraw = static_cast<const char*>(A.k) + base * esz;
    const char* vraw = static_cast<const char*>(A.v) + base * esz;
    if (BGL_PREFETCH && (b + 1) * B < hi_max) {  // the next block is elsewhere in memory: start fetching it
      const int64_t nb = int64_t(bt[b + 1]) * bstride + head_off;
      const char* nk = static_cast<const char*>(A.k) + nb * esz;
      const char* nv = static_cast<const char*>(A.v) + nb * esz;
      for (int64_t off = 0; off < blk_elems * int64_t(esz); off += 64) {
        __builtin_prefetch(nk + off);
        __builtin_prefetch(nv + off);
      }
    }
    const float *K, *V;
    if (A.kv_dtype == F32) {
      K = reinterpret_cast<const float*>(kraw);
      V = reinterpret_cast<const float*>(vraw);
    } else {
      to_f32(kraw + j0 * Dh * esz, A.kv_dtype, (j1 - j0) * Dh, &w.kf[j0 * Dh]);
      to_f32(vraw + j0 * Dh * esz, A.kv_dtype, (j1 - j0) * Dh, &w.vf[j0 * Dh]);
      K = w.kf.data();
      V = w.vf.data();
    }
    for (int64_t r = 0; r < it.nrows; ++r) {
      const int64_t a = std::max(lo[r], b * B) - b * B, e = std::min(hi[r], (b + 1) * B) - b * B;
      if (a >= e) continue;
      float* s = &w.s[r * sB];
      scores(&w.q[r * Dh], K, Dh, a, e, A.scale, s);
      softmax_pv(s, V, Dh, a, e, w.m[r], w.l[r], &w.acc[r * Dh]);
    }
  }
  for (int64_t r = 0; r < it.nrows; ++r) {
    float* acc = &w.acc[r * Dh];
    if (it.part >= 0) {
      part_m[it.part + r] = w.m[r];
      part_l[it.part + r] = w.l[r];
      std::memcpy(part_acc + (it.part + r) * Dh, acc, size_t(Dh) * 4);
      continue;
    }
    const int64_t row = it.row0 + r, i = row / R, h = it.g * R + row % R;
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
          items.push_back({s, g, r0, nr, 0, L, -1, double(nr) * double(L)});
          continue;
        }
        merges.push_back({s, g, r0, nr, 0, L, part_rows, 0.0});
        nsplits.push_back(nsplit);
        for (int64_t k = 0; k < nsplit; ++k) {
          const int64_t kb = k * chunk, ke = std::min(L, kb + chunk);
          items.push_back({s, g, r0, nr, kb, ke, part_rows, double(nr) * double(std::max<int64_t>(0, ke - kb))});
          part_rows += nr;
        }
      }
  }
  // Longest first: with dynamic scheduling that balances uneven context lengths across threads.
  std::sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::vector<float> pm(part_rows), pl(part_rows), pacc(part_rows * Dh);
  const int64_t ni = int64_t(items.size()), nm = int64_t(merges.size());
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && ni > 1)
  {
    Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t x = 0; x < ni; ++x) run_item(A, items[x], w, pm.data(), pl.data(), pacc.data());
#pragma omp for schedule(static)
    for (int64_t x = 0; x < nm; ++x) merge(A, merges[x], nsplits[x], pm.data(), pl.data(), pacc.data(), w.s);
  }
  return 0;
}

int bgl_simd_width() { return BGL_AVX2 ? 8 : 1; }

}  // extern "C"
