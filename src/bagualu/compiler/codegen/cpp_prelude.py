"""The C helpers every generated CPU kernel starts with (no headers beyond libc's math and OpenMP).

Written so GCC/Clang vectorise them inside ``#pragma omp simd`` loops: no branches, only selects, bit
casts and fused multiply-adds. ``pf_exp`` is the operator library's ``bgl_exp_f32``
(``ops/csrc/exp_f32.h``, embedded here: one definition for both): range reduction by ln 2 split in two
constants, n read from the low bits of an FMA with a shifter constant, a degree-6 minimax polynomial,
2^(n-1) made by shifting those bits; within 1 ulp of the correctly rounded result over all floats
(checked exhaustively against libm), except that results below 1.7e-38 (x < -86.99) are flushed to zero:
keeping the subnormals exact takes a second scaling step, which exp-bound kernels (softmax,
cross-entropy, SwiGLU) would pay on every element. libm's ``expf`` would be a call per element and never vectorise without ``-ffast-math`` (which would
also break NaN handling). Out-of-range inputs are not clamped on the way in (GCC turns a clamp with IEEE
NaN semantics into compares, mask logic and blends, not vminps/vmaxps: the exp 50% slower) but decided by
two selects on the way out; a NaN needs none. bf16 rounds to nearest even and keeps NaNs quiet, as PyTorch does.
"""

from bagualu.ops.native import CSRC

EXP_F32 = (CSRC / "exp_f32.h").read_text()

PRELUDE = r"""
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

static inline float pf_bits_f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint32_t pf_f_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float pf_bf2f(uint16_t h) { return pf_bits_f(((uint32_t)h) << 16); }
/* NaN is tested with a float compare: AVX2 has no unsigned 32-bit compare, and emulating one made the
   conversion a third of a bf16 SwiGLU kernel's time */
static inline uint16_t pf_f2bf(float f) {
  uint32_t u = pf_f_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(f != f ? ((u >> 16) | 0x40u) : r);
}
/* the value pf_bf2f(pf_f2bf(f)) without packing to 16 bits and back */
static inline float pf_round_bf16(float f) {
  uint32_t u = pf_f_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return f != f ? pf_bits_f(u | 0x400000u) : pf_bits_f(r);
}

""" + EXP_F32 + r"""
static inline float pf_exp(float x) { return bgl_exp_f32(x); }
static inline double pf_expd(double x) { return exp(x); }
static inline float pf_sigmoid(float x) { return 1.0f / (1.0f + pf_exp(-x)); }
static inline double pf_sigmoidd(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline float pf_maxf(float a, float b) { return (a != a || a > b) ? a : b; }
static inline float pf_minf(float a, float b) { return (a != a || a < b) ? a : b; }
static inline double pf_maxd(double a, double b) { return (a != a || a > b) ? a : b; }
static inline double pf_mind(double a, double b) { return (a != a || a < b) ? a : b; }
static inline float pf_signf(float a) { return a != a ? a : (float)((a > 0.0f) - (a < 0.0f)); }
static inline double pf_signd(double a) { return a != a ? a : (double)((a > 0.0) - (a < 0.0)); }
static inline int64_t pf_floordiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static inline int64_t pf_mod(int64_t a, int64_t b) {
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
static inline int64_t pf_clampi(int64_t i, int64_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }

/* Top-k (k <= 8) of a row of n >= 8 floats, descending, ties to the lower index (as ATen); returns 0,
   writing nothing, when the row holds a NaN (seen by the scan for the lane maxima: the caller needs no
   scan of its own; a 64-expert router kernel 4% faster), for the caller's NaN-aware insertion pass.
   The k-th largest of the 8 (AVX-512, n % 16 == 0: 16) lane-wise maxima bounds the k-th largest value from below (those k lane
   maxima are k distinct elements at least that large), so only elements >= it are candidates: about
   k + 3 on real data. With AVX2, each 64 elements' candidates form a bit mask (8 compares), walked
   lowest bit first; each candidate is inserted into a sorted 8-lane register of order-preserving integer
   keys (INT_MIN marks an empty slot, below -inf) without a data-dependent branch. (Compacting the
   candidates' indices through a permutation table first cost as much as the insertions.) */
static inline int32_t pf_fkey(float f) { int32_t b = (int32_t)pf_f_bits(f); return b ^ ((b >> 31) & 0x7fffffff); }
static inline float pf_fkey_inv(int32_t k) { return pf_bits_f((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }
static void pf_topk8_generic(const float* __restrict buf, int64_t n, int64_t k, float t, float* __restrict vals,
                             int64_t* __restrict idx) {
  int64_t cnt = 0;
  for (int64_t e = 0; e < n; ++e) {
    const float x = buf[e];
    if (!(x >= t)) continue;
    int64_t j;
    if (cnt < k) j = cnt++; else if (x > vals[k - 1]) j = k - 1; else continue;
    while (j > 0 && x > vals[j - 1]) { vals[j] = vals[j - 1]; idx[j] = idx[j - 1]; --j; }
    vals[j] = x; idx[j] = e;
  }
}
static inline int pf_topk8_f32(const float* __restrict buf, int64_t n, int64_t k, float* __restrict vals,
                               int64_t* __restrict idx) {
  const int64_t nv = n / 8;
  float t;
#ifdef __AVX512F__
  if (n % 16 == 0) {
    /* AVX-512: the k-th largest of 16 lane maxima, a tighter bound (6 of 64 random values: 6.9 candidates
       instead of 9.1; the router kernel 4-5% faster), found by counting in every lane the maxima above it
       over 15 rotations (independent of each other) and taking the least lane with fewer than k above */
    __m512 m16 = _mm512_loadu_ps(buf);
    __mmask16 nan = _mm512_cmp_ps_mask(m16, m16, _CMP_UNORD_Q);
    for (int64_t j = 1; j < n / 16; ++j) {
      const __m512 v = _mm512_loadu_ps(buf + 16 * j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m16 = _mm512_max_ps(m16, v);
    }
    if (nan) return 0;
    const __m512i mi = _mm512_castps_si512(m16), one = _mm512_set1_epi32(1);
    __m512i above = _mm512_setzero_si512();
#define PF_ABOVE(s) above = _mm512_mask_add_epi32(above, _mm512_cmp_ps_mask( \
      _mm512_castsi512_ps(_mm512_alignr_epi32(mi, mi, s)), m16, _CMP_GT_OQ), above, one);
    PF_ABOVE(1) PF_ABOVE(2) PF_ABOVE(3) PF_ABOVE(4) PF_ABOVE(5) PF_ABOVE(6) PF_ABOVE(7) PF_ABOVE(8)
    PF_ABOVE(9) PF_ABOVE(10) PF_ABOVE(11) PF_ABOVE(12) PF_ABOVE(13) PF_ABOVE(14) PF_ABOVE(15)
#undef PF_ABOVE
    t = _mm512_mask_reduce_min_ps(_mm512_cmplt_epi32_mask(above, _mm512_set1_epi32((int32_t)k)), m16);
  } else
#endif
  {
#ifdef __AVX2__
    __m256 mx = _mm256_loadu_ps(buf);
    __m256 nan = _mm256_cmp_ps(mx, mx, _CMP_UNORD_Q);
    for (int64_t j = 1; j < nv; ++j) {
      const __m256 v = _mm256_loadu_ps(buf + 8 * j);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      mx = _mm256_max_ps(mx, v);
    }
    for (int64_t e = 8 * nv; e < n; ++e) if (buf[e] != buf[e]) return 0;
    if (_mm256_movemask_ps(nan)) return 0;
    float lm[8];
    _mm256_storeu_ps(lm, mx);
#else
    for (int64_t e = 0; e < n; ++e) if (buf[e] != buf[e]) return 0;
    float lm[8];
    for (int l = 0; l < 8; ++l) lm[l] = buf[l];
    for (int64_t j = 1; j < nv; ++j)
      for (int l = 0; l < 8; ++l) lm[l] = buf[8 * j + l] > lm[l] ? buf[8 * j + l] : lm[l];
#endif
    /* the 8 lane maxima, descending: Batcher's 19-comparator network, unrolled (branch-free) */
#define PF_CE(a, b) { const float x_ = lm[a], y_ = lm[b]; lm[a] = x_ > y_ ? x_ : y_; lm[b] = x_ > y_ ? y_ : x_; }
    PF_CE(0, 1) PF_CE(2, 3) PF_CE(4, 5) PF_CE(6, 7) PF_CE(0, 2) PF_CE(1, 3) PF_CE(4, 6) PF_CE(5, 7) PF_CE(1, 2)
    PF_CE(5, 6) PF_CE(0, 4) PF_CE(3, 7) PF_CE(1, 5) PF_CE(2, 6) PF_CE(1, 4) PF_CE(3, 6) PF_CE(2, 4) PF_CE(3, 5)
    PF_CE(3, 4)
#undef PF_CE
    t = lm[k - 1];
  }
#ifdef __AVX2__
  if (n % 8 == 0) {
    /* keys are sorted descending, so inserting x is keys = max(keys, min(x, keys shifted up one lane, +inf
       entering lane 0)): a 6-cycle dependency per candidate (permute, blend, min, max), the loop's critical
       path; the ids follow the lanes that x beats (strictly: ties keep the earlier, lower index) */
    const __m256 tv = _mm256_set1_ps(t);
    __m256i keys = _mm256_set1_epi32(INT32_MIN), ids = _mm256_setzero_si256();
    const __m256i up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
    const __m256i top = _mm256_set1_epi32(INT32_MAX);
    for (int64_t j0 = 0; j0 < nv; j0 += 8) {
      const int64_t nj = nv - j0 < 8 ? nv - j0 : 8;
      uint64_t m = 0;
      for (int64_t j = 0; j < nj; ++j)
        m |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(buf + 8 * (j0 + j)), tv, _CMP_GE_OQ))
             << (8 * j);
      for (; m; m &= m - 1) {
        const int32_t e = (int32_t)(8 * j0 + __builtin_ctzll(m));
        const __m256i xk = _mm256_set1_epi32(pf_fkey(buf[e]));
        const __m256i shifted_k = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(keys, up), top, 1);
        const __m256i shifted_i = _mm256_permutevar8x32_epi32(ids, up);
        const __m256i beat = _mm256_cmpgt_epi32(xk, keys);  /* a suffix of lanes */
        const __m256i beat_prev = _mm256_cmpgt_epi32(xk, shifted_k);
        keys = _mm256_max_epi32(keys, _mm256_min_epi32(xk, shifted_k));
        ids = _mm256_blendv_epi8(ids, _mm256_blendv_epi8(_mm256_set1_epi32(e), shifted_i, beat_prev), beat);
      }
    }
    int32_t io[8];
    float vo[8];
    /* keys back to floats, all lanes at once */
    _mm256_storeu_si256((__m256i*)vo, _mm256_xor_si256(keys, _mm256_and_si256(_mm256_srai_epi32(keys, 31),
                                                                               _mm256_set1_epi32(0x7fffffff))));
    _mm256_storeu_si256((__m256i*)io, ids);
    for (int64_t j = 0; j < k; ++j) { vals[j] = vo[j]; idx[j] = io[j]; }
    return 1;
  }
#endif
  pf_topk8_generic(buf, n, k, t, vals, idx);
  return 1;
}

#ifdef __AVX512F__
/* Top-k (k <= 8) of 16 rows at once, a row per lane (the kernel writer's row blocks, cpp_topk.py): column e
   of the block is gathered, keyed as order-preserving integers (pf_fkey) and pushed through k max/min
   levels, the k sorted slots of every lane. A bf16 value's key has 16 spare low bits: the column rides in
   them (65535 - e, so that a tie keeps the lower index) and a level is one max and one min, two columns per
   gather (the pair e, e + 1 of an even e; n even), every key distinct; an fp32 key needs a compare and two
   blends more for the ids. Rows 0 .. nrows - 1 at base + r * stride (elements); writes vals[16 * j + r], idx[16 * j + r] and
   returns the rows (bits) holding a NaN, whose slots are left undefined for the caller's per-row path.
   A 64-expert top-6 router kernel on a Xeon with AVX-512: 2.2x (bf16) and 1.8x (fp32) faster than the
   row-at-a-time pf_topk8_f32. */
static inline __m512i pf_fkey16(__m512i b) {
  return _mm512_ternarylogic_epi32(b, _mm512_srai_epi32(b, 31), _mm512_set1_epi32(0x7fffffff), 0x78);
}
static inline void pf_store_ids16(int64_t* __restrict dst, __m512i col) {
  _mm512_storeu_si512((void*)dst, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(col)));
  _mm512_storeu_si512((void*)(dst + 8), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(col, 1)));
}
static inline uint32_t pf_topk_rows16(const void* base, int64_t stride, int bf16, int64_t nrows, int64_t n,
                                      int64_t k, float* __restrict vals, int64_t* __restrict idx) {
  const __mmask16 live = (__mmask16)(nrows >= 16 ? 0xffffu : ((1u << nrows) - 1u));
  const __m512i vix = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((int32_t)stride));
  const __m512i empty = _mm512_set1_epi32(INT32_MIN);  /* below every key, -inf's included */
  __m512i t[8], id[8];
  __mmask16 nan = 0;
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) { t[j] = empty; id[j] = _mm512_setzero_si512(); }
  {  /* the next block's rows, while this one computes: a gather waits on all 16 of its lines */
    const int64_t esz = bf16 ? 2 : 4;
    const char* next = (const char*)base + 16 * stride * esz;
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t b = 0; b < n * esz; b += 64) _mm_prefetch(next + r * stride * esz + b, _MM_HINT_T0);
  }
  if (bf16) {
    const uint16_t* b = (const uint16_t*)base;
    const __m512i hi = _mm512_set1_epi32((int32_t)0xffff0000u);
    for (int64_t e = 0; e < n; e += 2) {
      const __m512i pr = _mm512_mask_i32gather_epi32(empty, live, vix, (const void*)(b + e), 2);
      const __m512i c0 = _mm512_slli_epi32(pr, 16), c1 = _mm512_and_si512(pr, hi);
      nan |= _mm512_cmp_ps_mask(_mm512_castsi512_ps(c0), _mm512_castsi512_ps(c1), _CMP_UNORD_Q);
      __m512i x0 = _mm512_mask_mov_epi32(empty, live, _mm512_ternarylogic_epi32(
          pf_fkey16(c0), hi, _mm512_set1_epi32(0xffff - (int32_t)e), 0xea));  /* (a & b) | c */
      __m512i x1 = _mm512_mask_mov_epi32(empty, live, _mm512_ternarylogic_epi32(
          pf_fkey16(c1), hi, _mm512_set1_epi32(0xfffe - (int32_t)e), 0xea));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        if (j >= k) break;
        const __m512i a = _mm512_max_epi32(t[j], x0);
        x0 = _mm512_min_epi32(t[j], x0);
        t[j] = a;
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        if (j >= k) break;
        const __m512i a = _mm512_max_epi32(t[j], x1);
        x1 = _mm512_min_epi32(t[j], x1);
        t[j] = a;
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= k) break;
      const __m512i kh = _mm512_srai_epi32(t[j], 16);  /* the bf16 value's key */
      const __m512i bits = _mm512_slli_epi32(
          _mm512_xor_si512(kh, _mm512_and_si512(_mm512_srai_epi32(kh, 31), _mm512_set1_epi32(0x7fff))), 16);
      _mm512_storeu_ps(vals + 16 * j, _mm512_castsi512_ps(bits));
      pf_store_ids16(idx + 16 * j, _mm512_sub_epi32(_mm512_set1_epi32(0xffff),
                                                    _mm512_and_si512(t[j], _mm512_set1_epi32(0xffff))));
    }
  } else {
    /* last column first, and x takes a slot it equals: the newcomer has the lowest index so far, and a
       displaced slot's tie with the next one is an earlier index (the slots are in (key desc, index asc)
       order), so each insertion shifts the tail by one as it must. (First column first with a strict
       compare would leave a displaced earlier index behind a later tie.) */
    const float* f = (const float*)base;
    for (int64_t e = n - 1; e >= 0; --e) {
      const __m512i v = _mm512_mask_i32gather_epi32(empty, live, vix, (const void*)(f + e), 4);
      nan |= _mm512_cmp_ps_mask(_mm512_castsi512_ps(v), _mm512_castsi512_ps(v), _CMP_UNORD_Q);
      __m512i x = _mm512_mask_mov_epi32(empty, live, pf_fkey16(v));
      __m512i xi = _mm512_set1_epi32((int32_t)e);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        if (j >= k) break;
        const __mmask16 m = _mm512_cmpge_epi32_mask(x, t[j]);
        const __m512i a = _mm512_max_epi32(t[j], x);
        x = _mm512_min_epi32(t[j], x);
        t[j] = a;
        const __m512i ai = _mm512_mask_blend_epi32(m, id[j], xi);
        xi = _mm512_mask_blend_epi32(m, xi, id[j]);
        id[j] = ai;
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= k) break;
      _mm512_storeu_ps(vals + 16 * j, _mm512_castsi512_ps(pf_fkey16(t[j])));
      pf_store_ids16(idx + 16 * j, id[j]);
    }
  }
  return (uint32_t)(nan & live);
}
#endif

/* Non-temporal copy of a staged chunk to its place in an output (Mapping.stream): streaming stores of a
   vector register (a whole 64-byte line with AVX-512, half a line with AVX) from the first aligned byte,
   plain copies for the ragged ends. pf_sfence orders a thread's streaming stores before it leaves the
   parallel region. Whole-line stores on a Zen 5 (in-process A/B against half-line ones, benchmarks/
   compiler_fusion.py's cases): residual add + RMSNorm 1.5-4% faster, bf16 RoPE on two threads 6%, the
   rest within 1%. */
#include <string.h>
static inline void pf_stream(void* __restrict dst_, const void* __restrict src_, int64_t n) {
  char* dst = (char*)dst_;
  const char* src = (const char*)src_;
#if defined(__AVX512F__)
  int64_t head = (int64_t)((64u - ((uintptr_t)dst & 63u)) & 63u);
  if (head > n) head = n;
  memcpy(dst, src, (size_t)head);
  int64_t i = head;
  for (; i + 64 <= n; i += 64)
    _mm512_stream_si512((__m512i*)(dst + i), _mm512_loadu_si512((const void*)(src + i)));
  memcpy(dst + i, src + i, (size_t)(n - i));
#elif defined(__AVX__)
  int64_t head = (int64_t)((32u - ((uintptr_t)dst & 31u)) & 31u);
  if (head > n) head = n;
  memcpy(dst, src, (size_t)head);
  int64_t i = head;
  for (; i + 32 <= n; i += 32)
    _mm256_stream_si256((__m256i*)(dst + i), _mm256_loadu_si256((const __m256i*)(src + i)));
  memcpy(dst + i, src + i, (size_t)(n - i));
#else
  memcpy(dst, src, (size_t)n);
#endif
}
/* A staged chunk of fp32 values to a bf16 output (the writer stages a bf16 store contiguous along its loop
   where the CPU converts in hardware, codegen/cpp.py): 32 at a time by AVX512-BF16's vcvtne2ps2bf16, which
   rounds to nearest even and quiets NaNs as pf_f2bf does but reads subnormal inputs as zero, so a vector
   holding one goes through pf_f2bf instead: bit for bit pf_f2bf on every float (checked exhaustively over
   all 2^32). GCC vectorises pf_f2bf to ~10 instructions per 16 lanes plus the packing: a bf16 SwiGLU kernel
   (1024 x 11008, one Zen 5 core) spent a quarter of its time there, 3.67 -> 2.70 ms staged. pf_stream_bf16
   stores whole 64-byte lines non-temporally (Mapping.stream), from the first aligned one. */
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
static inline __m512i pf_cvt32_bf16(const float* __restrict src) {
  const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
  if (__builtin_expect(_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20), 0)) {
    uint16_t t[32] __attribute__((aligned(64)));
    for (int j = 0; j < 32; ++j) t[j] = pf_f2bf(src[j]);
    return _mm512_load_si512((const void*)t);
  }
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
#endif
static inline void pf_store_bf16(uint16_t* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  for (; i + 32 <= n; i += 32) _mm512_storeu_si512((void*)(dst + i), pf_cvt32_bf16(src + i));
#endif
  for (; i < n; ++i) dst[i] = pf_f2bf(src[i]);
}
static inline void pf_stream_bf16(uint16_t* __restrict dst, const float* __restrict src, int64_t n) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  int64_t head = (int64_t)(((64u - ((uintptr_t)dst & 63u)) & 63u) / 2u);
  if (head > n) head = n;
  pf_store_bf16(dst, src, head);
  int64_t i = head;
  for (; i + 32 <= n; i += 32) _mm512_stream_si512((__m512i*)(dst + i), pf_cvt32_bf16(src + i));
  pf_store_bf16(dst + i, src + i, n - i);
#else
  pf_store_bf16(dst, src, n);
#endif
}
static inline void pf_sfence(void) {
#ifdef __AVX__
  _mm_sfence();
#endif
}
"""
