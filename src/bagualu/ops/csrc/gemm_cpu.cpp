// C[M, N] (+)= A[M, K] · B[K, N] for a group of independent problems: the MoE experts' GEMMs (one per expert
// slice, forward and backward) as one job, and a training linear layer's three GEMMs (ops/dense.py).
//
// Why not a loop of torch.mm: the BLAS sgemm this build links runs the experts' shapes (a few hundred to a
// few thousand rows, K and N 512..5632) at 55-75% of an AVX2 CPU's FMA peak and, on AVX-512 CPUs, with
// 256-bit code at half their peak; and one call per expert leaves the second core idle at every call's
// ragged end. This is the BLIS scheme (Goto's algorithm) with an MR x NR register tile: per problem, C is cut
// into tiles (the job's chunks, claimed by the caller and the helper threads, helpers.h); per tile
//     for k0 in K by KC:                    pack B[k0:k0+KC, tile's columns] into NR-column panels (L2)
//       for i0 in the tile's rows by MC:    pack A[i0:i0+MC, k0:k0+KC] into MR-row panels (stays in L2)
//         for each NR-column panel:         (NR x KC: stays in L1 ...)
//           for each MR-row panel:          (... while every A panel streams past it)
//             C[MR, NR] (+)= A panel · B panel      in registers for the whole KC block
// AVX2: 6 x 16 (12 ymm accumulators, 2 loads + 6 broadcasts per k). AVX-512: 12 x 32 (24 zmm accumulators).
// AVX512-BF16, both operands bf16: panels of (k, k+1) bf16 pairs, 12 x 32 tiles of vdpbf16ps (twice the
// fp32 rate; each product exact in fp32, accumulated in fp32; the instruction flushes denormal inputs and
// results to zero, an absolute difference below 1.2e-38 per product from torch.mm, which keeps them).
// Operands are read through (row, column) strides, so transposed views (x @ w.T forward, dy.T @ x for the
// weight gradients) need no copy: packing reorders them anyway. A and B may be fp32 or bf16 (widened while
// packing, unless both are bf16 on a CPU with bf16 dot products), C fp32 or bf16 (a bf16 C tile is
// accumulated in fp32 and rounded once, to nearest even).
//
// Build: compiled on first use by ops/native.py (-O3 -march=native). Without AVX2/FMA the micro-kernel is
// scalar (correct, slower); Python checks shapes, dtypes and strides.

#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "gemm_problem.h"
#include "helpers.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(BGL_SCALAR)  // -DBGL_SCALAR: the tests' scalar build
#include <immintrin.h>
#define BGL_SIMD 1
#else
#define BGL_SIMD 0
#endif
// AVX-512 (-DBGL_NO_AVX512: the tests' AVX2 build on such a CPU): 12 x 32 tiles in 24 zmm accumulators; with
// AVX512-BF16, bf16 x bf16 problems keep their operands bf16, packed in k-pairs, and multiply them with
// vdpbf16ps (two bf16 products per fp32 lane per instruction: twice the fp32 rate).
#if BGL_SIMD && defined(__AVX512F__) && !defined(BGL_NO_AVX512)
#define BGL_AVX512 1
#else
#define BGL_AVX512 0
#endif
#if BGL_AVX512 && defined(__AVX512BF16__)
#define BGL_DPBF16 1
#else
#define BGL_DPBF16 0
#endif

namespace {

constexpr int64_t kABf16 = 1, kBBf16 = 2, kCBf16 = 4, kAccumulate = 8;
#if BGL_AVX512
constexpr int MR = 12, NR = 32;
#ifndef BGL_KC
#define BGL_KC 256
#endif
constexpr int64_t KC = BGL_KC;  // a B panel KC x NR = 32 KB (L1), packed A block MC x KC = 120 KB (L2)
#else
constexpr int MR = 6, NR = 16;
constexpr int64_t KC = 256;  // a B panel KC x NR = 16 KB (L1), packed A block MC x KC = 120 KB (L2)
#endif
constexpr int64_t MC = 120;
constexpr int64_t KCB = 2 * KC;  // bf16 pairs: the same bytes per panel hold twice the k

using bgl::bf16_to_f32;
using bgl::f32_to_bf16;

// Where a tile's last K block writes a bf16 C directly (AVX-512 builds; see store_zmm_bf16).
struct Bf16Out {
  uint16_t* o;  // C at the tile's first row and column
  int64_t ldo;
  bool acc;
  const float* part;  // fp32 partial sums of the earlier K blocks (row stride ldc), or null
};


template <bool BF>
inline float at(const void* p, int64_t i) {
  if constexpr (BF) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<const float*>(p)[i];
}

#if BGL_SIMD
template <bool BF>
inline __m256 load8(const void* p, int64_t i) {  // 8 contiguous values as fp32
  if constexpr (BF) {
    return bgl::widen8_bf16(static_cast<const uint16_t*>(p) + i);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

// r[0..7] (rows) -> r[0..7] (columns): the 8 x 8 transpose by unpack / shuffle / permute.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// A[i0:i0+mc, k0:k0+kc] -> out[g][k][MR] for row groups g of MR rows (missing rows zero). out has room for
// 2 floats past the last group (the vector path stores 8 per k and lets the next k overwrite the extra 2).
template <bool BF>
void pack_a(const BglMM& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* out) {
  if (p.sa_m == 1 && p.sa_k != 1) {  // a transposed view: each k's row segment, read once in order
    const int64_t full = mc / MR * MR;
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t base = (k0 + k) * p.sa_k + i0;
      for (int64_t g = 0; g < full; g += MR)
        for (int64_t ii = 0; ii < MR; ++ii) out[g * kc + k * MR + ii] = at<BF>(p.a, base + g + ii);
    }
    if (full == mc) return;
    i0 += full;
    mc -= full;
    out += full * kc;
  }
  for (int64_t g = 0; g < mc; g += MR) {
    float* o = out + g * kc;
    const int64_t rows = mc - g < MR ? mc - g : MR;
    if (p.sa_k == 1) {  // rows contiguous in k
      int64_t k = 0;
#if BGL_SIMD
      if (rows == MR) {  // 8 k at a time: each 8 rows (the last group zero-padded) transposed to 8 k-rows
        const int64_t base = (i0 + g) * p.sa_m + k0;
        for (; k + 8 <= kc; k += 8)
          for (int h = 0; h < MR; h += 8) {
            const int n = MR - h < 8 ? MR - h : 8;
            __m256 r[8];
            for (int ii = 0; ii < 8; ++ii) r[ii] = ii < n ? load8<BF>(p.a, base + (h + ii) * p.sa_m + k) : _mm256_setzero_ps();
            transpose8(r);
            for (int q = 0; q < 8; ++q) {
              float* dst = o + (k + q) * MR + h;
              if (n == 8) _mm256_storeu_ps(dst, r[q]);
              else if (n == 4) _mm_storeu_ps(dst, _mm256_castps256_ps128(r[q]));
              else _mm256_storeu_ps(dst, r[q]);  // n == 6: 2 past, overwritten by the next k (+2 floats of room)
            }
          }
      }
#endif
      for (int64_t ii = 0; ii < MR; ++ii) {
        if (ii < rows) {
          const int64_t base = (i0 + g + ii) * p.sa_m + k0;
          for (int64_t kk = k; kk < kc; ++kk) o[kk * MR + ii] = at<BF>(p.a, base + kk);
        } else {
          for (int64_t kk = k; kk < kc; ++kk) o[kk * MR + ii] = 0.f;
        }
      }
    } else {  // a transposed view (columns contiguous) or general strides: one k at a time
      for (int64_t k = 0; k < kc; ++k) {
        const int64_t base = (i0 + g) * p.sa_m + (k0 + k) * p.sa_k;
        for (int64_t ii = 0; ii < MR; ++ii) o[k * MR + ii] = ii < rows ? at<BF>(p.a, base + ii * p.sa_m) : 0.f;
      }
    }
  }
}

// B[k0:k0+kc, j0:j0+nc] -> out[g][k][NR] for column groups g of NR columns (missing columns zero).
template <bool BF>
void pack_b(const BglMM& p, int64_t j0, int64_t nc, int64_t k0, int64_t kc, float* out) {
#if BGL_SIMD
  if (p.sb_n == 1) {  // rows of B contiguous: each k's row segment, read once in order, dealt to the panels
    const int64_t full = nc / NR * NR;
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t base = (k0 + k) * p.sb_k + j0;
      for (int64_t g = 0; g < full; g += NR)
        for (int h = 0; h < NR; h += 8) _mm256_storeu_ps(out + g * kc + k * NR + h, load8<BF>(p.b, base + g + h));
    }
    if (full == nc) return;
    j0 += full;
    nc -= full;
    out += full * kc;
  }
#endif
  for (int64_t g = 0; g < nc; g += NR) {
    float* o = out + g * kc;
    const int64_t cols = nc - g < NR ? nc - g : NR;
    if (p.sb_n == 1) {  // rows of B contiguous: NR values per k
      for (int64_t k = 0; k < kc; ++k) {
        const int64_t base = (k0 + k) * p.sb_k + j0 + g;
        for (int64_t jj = 0; jj < NR; ++jj) o[k * NR + jj] = jj < cols ? at<BF>(p.b, base + jj) : 0.f;
      }
    } else {  // a transposed view (w.T of a [N, K] weight: columns contiguous in k)
      int64_t k = 0;
#if BGL_SIMD
      if (cols == NR && p.sb_k == 1) {  // 8 x 8 blocks: 8 columns' next 8 k -> 8 k-rows of 8 columns
        for (; k + 8 <= kc; k += 8)
          for (int h = 0; h < NR; h += 8) {
            __m256 r[8];
            for (int jj = 0; jj < 8; ++jj) r[jj] = load8<BF>(p.b, (j0 + g + h + jj) * p.sb_n + k0 + k);
            transpose8(r);
            for (int q = 0; q < 8; ++q) _mm256_storeu_ps(o + (k + q) * NR + h, r[q]);
          }
      }
#endif
      for (int64_t jj = 0; jj < NR; ++jj) {
        if (jj < cols) {
          const int64_t base = (j0 + g + jj) * p.sb_n + k0 * p.sb_k;
          for (int64_t kk = k; kk < kc; ++kk) o[kk * NR + jj] = at<BF>(p.b, base + kk * p.sb_k);
        } else {
          for (int64_t kk = k; kk < kc; ++kk) o[kk * NR + jj] = 0.f;
        }
      }
    }
  }
}

// Writes the MR x NR accumulator tile t to C[mr, nr] (+=).
inline void store_tile(const float (&t)[MR][NR], float* c, int64_t ldc, bool acc, int64_t mr, int64_t nr) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = acc ? c[i * ldc + j] + t[i][j] : t[i][j];
}

#if BGL_AVX512
// The 24 accumulators r[i][h] (row i, 16-column half h) to C[mr, nr] (+=).
inline void store_zmm(const __m512 (&r)[MR][2], float* c, int64_t ldc, bool acc, int64_t mr, int64_t nr) {
  if (mr == MR && nr == NR) {
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) {
        float* ci = c + i * ldc + 16 * h;
        _mm512_storeu_ps(ci, acc ? _mm512_add_ps(_mm512_loadu_ps(ci), r[i][h]) : r[i][h]);
      }
    return;
  }
  alignas(64) float t[MR][NR];
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(t[i], r[i][0]);
    _mm512_store_ps(t[i] + 16, r[i][1]);
  }
  store_tile(t, c, ldc, acc, mr, nr);
}

// A bf16 C tile written straight from the accumulators on a tile's last K block (Bf16Out; no fp32 copy of
// the tile and no second pass over it): each value is the fp32 sum over K (the partial sums of earlier
// blocks at part, when there were any) plus, with acc, C's own value, rounded once to nearest even as
// f32_to_bf16 -- the same additions in the same order as accumulating the whole tile in fp32 first.
inline __m512 widen16_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m256i narrow16_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  const __m512i r = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_zmm_bf16(const __m512 (&r)[MR][2], const Bf16Out& out, int64_t row, int64_t col, int64_t ldc,
                           int64_t mr, int64_t nr) {
  uint16_t* o = out.o + row * out.ldo + col;
  const float* part = out.part ? out.part + row * ldc + col : nullptr;
  if (nr == NR) {
    for (int64_t i = 0; i < mr; ++i)
      for (int h = 0; h < 2; ++h) {
        __m512 v = r[i][h];
        if (part) v = _mm512_add_ps(_mm512_loadu_ps(part + i * ldc + 16 * h), v);
        uint16_t* oi = o + i * out.ldo + 16 * h;
        if (out.acc) v = _mm512_add_ps(widen16_bf16(oi), v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(oi), narrow16_bf16(v));
      }
    return;
  }
  alignas(64) float t[MR][NR];
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(t[i], r[i][0]);
    _mm512_store_ps(t[i] + 16, r[i][1]);
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      float v = part ? part[i * ldc + j] + t[i][j] : t[i][j];
      uint16_t* oij = o + i * out.ldo + j;
      if (out.acc) v = bf16_to_f32(*oij) + v;
      *oij = f32_to_bf16(v);
    }
}
#endif

// C[mr, nr] (+)= a panel [kc][MR] · b panel [kc][NR] (C row stride ldc).
// With AVX-512, out (non-null): the tile goes to bf16 C instead (store_zmm_bf16 at row, col of the tile).
void micro(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool acc, int64_t mr, int64_t nr,
           const Bf16Out* out = nullptr, int64_t row = 0, int64_t col = 0) {
#if BGL_AVX512
  __m512 r[MR][2];
  for (int i = 0; i < MR; ++i) r[i][0] = r[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i]);
      r[i][0] = _mm512_fmadd_ps(x, b0, r[i][0]);
      r[i][1] = _mm512_fmadd_ps(x, b1, r[i][1]);
    }
    a += MR;
    b += NR;
  }
  if (out) store_zmm_bf16(r, *out, row, col, ldc, mr, nr);
  else store_zmm(r, c, ldc, acc, mr, nr);
#else
  (void)out, (void)row, (void)col;
  alignas(32) float t[MR][NR];
#if BGL_SIMD
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a), y = _mm256_broadcast_ss(a + 1);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    c10 = _mm256_fmadd_ps(y, b0, c10);
    c11 = _mm256_fmadd_ps(y, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    y = _mm256_broadcast_ss(a + 3);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    c30 = _mm256_fmadd_ps(y, b0, c30);
    c31 = _mm256_fmadd_ps(y, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    y = _mm256_broadcast_ss(a + 5);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    c50 = _mm256_fmadd_ps(y, b0, c50);
    c51 = _mm256_fmadd_ps(y, b1, c51);
    a += MR;
    b += NR;
  }
  const __m256 r[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (mr == MR && nr == NR) {
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (acc) {
        _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), r[i][0]));
        _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_loadu_ps(ci + 8), r[i][1]));
      } else {
        _mm256_storeu_ps(ci, r[i][0]);
        _mm256_storeu_ps(ci + 8, r[i][1]);
      }
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t[i], r[i][0]);
    _mm256_store_ps(t[i] + 8, r[i][1]);
  }
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) t[i][j] = 0.f;
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) t[i][j] += a[i] * b[j];
#endif
  store_tile(t, c, ldc, acc, mr, nr);
#endif
}

// Per-thread packing buffers and bf16-C scratch, kept at their largest size (helper threads live long).
float* scratch(int which, size_t n) {
  thread_local std::vector<float> bufs[3];
  if (bufs[which].size() < n) bufs[which].resize(n);
  return bufs[which].data();
}

struct Plan {
  const BglMM* p;
  std::vector<int64_t> tm, tn, cols, first;  // per problem: tile rows/cols, tiles per row; first chunk
};

// Where the micro-kernels of the K block at k0 write: with a bf16 C written directly (out16, AVX-512), the
// last block's go to C through *o (the earlier blocks' partial sums, at c, added first); else to c (null).
inline const Bf16Out* block_sink(const Bf16Out* out16, int64_t k0, int64_t step, int64_t K, const float* c,
                                 Bf16Out& o) {
  if (!out16 || k0 + step < K) return nullptr;
  o = *out16;
  o.part = k0 > 0 ? c : nullptr;
  return &o;
}

// The K loop of a tile, fp32 panels: C[mt, nt] (+)= A[i0.., :] · B[:, j0..] (acc: add to what C holds);
// out16: see block_sink.
template <bool ABF, bool BBF>
void blocks(const BglMM& p, int64_t i0, int64_t mt, int64_t j0, int64_t nt, float* c, int64_t ldc, bool accumulate,
            const Bf16Out* out16) {
  const int64_t ntp = (nt + NR - 1) / NR * NR;
  float* pb = scratch(0, static_cast<size_t>(ntp * KC));
  float* pa = scratch(1, static_cast<size_t>((MC + MR) * KC + 8));
  for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
    const int64_t kc = p.K - k0 < KC ? p.K - k0 : KC;
    const bool acc = k0 > 0 || accumulate;
    Bf16Out o;
    const Bf16Out* sink = block_sink(out16, k0, KC, p.K, c, o);
    pack_b<BBF>(p, j0, nt, k0, kc, pb);
    for (int64_t ib = 0; ib < mt; ib += MC) {
      const int64_t mc = mt - ib < MC ? mt - ib : MC;
      pack_a<ABF>(p, i0 + ib, mc, k0, kc, pa);
      for (int64_t jr = 0; jr < nt; jr += NR)
        for (int64_t ir = 0; ir < mc; ir += MR)
          micro(kc, pa + ir * kc, pb + jr * kc, c + (ib + ir) * ldc + jr, ldc, acc, mc - ir < MR ? mc - ir : MR,
                nt - jr < NR ? nt - jr : NR, sink, ib + ir, jr);
    }
  }
}

#if BGL_DPBF16
// bf16 x bf16 with vdpbf16ps. Panels hold (k, k+1) pairs as 32-bit words (an odd block's last pair padded
// with zero): A[i0:i0+mc, k0:k0+kc] -> out[g][q][MR][2], B[k0:k0+kc, j0:j0+nc] -> out[g][q][NR][2].
inline uint32_t pair(const uint16_t* x, int64_t lo, int64_t step, bool odd) {
  return static_cast<uint32_t>(x[lo]) | (odd ? 0u : static_cast<uint32_t>(x[lo + step]) << 16);
}

// n <= 8 sources' next 8 pairs (8 dwords each, from src[i] + off) -> 8 rows of n dwords at dst, dst + ld, ...
inline void transpose_pairs(const uint16_t* const* src, int n, int64_t off, uint32_t* dst, int64_t ld) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = i < n ? _mm256_loadu_ps(reinterpret_cast<const float*>(src[i] + off)) : _mm256_setzero_ps();
  transpose8(r);
  for (int q = 0; q < 8; ++q) {
    float* d = reinterpret_cast<float*>(dst + q * ld);
    if (n == 8) _mm256_storeu_ps(d, r[q]);
    else _mm_storeu_ps(d, _mm256_castps256_ps128(r[q]));  // n == 4
  }
}

void pack_a_pairs(const BglMM& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, uint32_t* out) {
  const uint16_t* a = static_cast<const uint16_t*>(p.a);
  const int64_t kp = (kc + 1) / 2;
  if (p.sa_m == 1 && p.sa_k != 1) {  // a transposed view: rows k and k + 1 hold a group's MR values; read in order
    const int64_t full = mc / MR * MR;
    const __mmask16 m = (1u << MR) - 1;
    for (int64_t q = 0; q < kp; ++q) {
      const uint16_t* r0 = a + (k0 + 2 * q) * p.sa_k + i0;
      const bool odd = 2 * q + 1 >= kc;
      for (int64_t g = 0; g < full; g += MR) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + g));
        const __m512i hi = odd ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + p.sa_k + g));
        _mm512_mask_storeu_epi32(out + g * kp + q * MR, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    if (full == mc) return;
    i0 += full;
    mc -= full;
    out += full * kp;
  }
  for (int64_t g = 0; g < mc; g += MR) {
    uint32_t* o = out + g * kp;
    const int64_t rows = mc - g < MR ? mc - g : MR;
    int64_t q = 0;
    if (p.sa_k == 1 && rows == MR) {  // rows contiguous in k: 8 pairs of 8 (then 4) rows at a time, transposed
      const uint16_t* src[MR];
      for (int ii = 0; ii < MR; ++ii) src[ii] = a + (i0 + g + ii) * p.sa_m + k0;
      for (; 2 * q + 16 <= kc; q += 8)
        for (int h = 0; h < MR; h += 8) transpose_pairs(src + h, MR - h < 8 ? MR - h : 8, 2 * q, o + q * MR + h, MR);
    }
    for (; q < kp; ++q) {
      const bool odd = 2 * q + 1 >= kc;
      const int64_t k = k0 + 2 * q;
      for (int64_t ii = 0; ii < MR; ++ii)
        o[q * MR + ii] = ii < rows ? pair(a, (i0 + g + ii) * p.sa_m + k * p.sa_k, p.sa_k, odd) : 0u;
    }
  }
}

void pack_b_pairs(const BglMM& p, int64_t j0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) {
  const uint16_t* b = static_cast<const uint16_t*>(p.b);
  const int64_t kp = (kc + 1) / 2;
  int64_t full = 0;
  if (p.sb_n == 1) {  // rows of B contiguous: two rows' segments, read once in order, interleaved 16 at a time
    full = nc / NR * NR;
    for (int64_t q = 0; q < kp; ++q) {
      const int64_t k = k0 + 2 * q;
      const uint16_t* r0 = b + k * p.sb_k + j0;
      const uint16_t* r1 = r0 + p.sb_k;
      const bool odd = 2 * q + 1 >= kc;
      for (int64_t g = 0; g < full; g += NR)
        for (int h = 0; h < NR; h += 16) {
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + g + h)));
          const __m512i hi = odd ? _mm512_setzero_si512()
                                 : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + g + h)));
          _mm512_storeu_si512(out + g * kp + q * NR + h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
  }
  for (int64_t g = full; g < nc; g += NR) {  // column by column (a transposed view: each column's pairs in order)
    uint32_t* o = out + g * kp;
    const int64_t cols = nc - g < NR ? nc - g : NR;
    int64_t q0 = 0;
    if (p.sb_k == 1 && cols == NR) {  // columns contiguous in k: 8 pairs of 8 columns at a time, transposed
      const uint16_t* src[NR];
      for (int jj = 0; jj < NR; ++jj) src[jj] = b + (j0 + g + jj) * p.sb_n + k0;
      for (; 2 * q0 + 16 <= kc; q0 += 8)
        for (int h = 0; h < NR; h += 8) transpose_pairs(src + h, 8, 2 * q0, o + q0 * NR + h, NR);
    }
    for (int64_t jj = 0; jj < NR; ++jj)
      for (int64_t q = q0; q < kp; ++q)
        o[q * NR + jj] = jj < cols ? pair(b, (k0 + 2 * q) * p.sb_k + (j0 + g + jj) * p.sb_n, p.sb_k, 2 * q + 1 >= kc) : 0u;
  }
}

// C[mr, nr] (+)= a pair panel [kp][MR] · b pair panel [kp][NR]: 24 vdpbf16ps per pair of k.
void micro_pairs(int64_t kp, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc, bool acc, int64_t mr,
                 int64_t nr, const Bf16Out* out, int64_t row, int64_t col) {
  __m512 r[MR][2];
  for (int i = 0; i < MR; ++i) r[i][0] = r[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t q = 0; q < kp; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i]));
      r[i][0] = _mm512_dpbf16_ps(r[i][0], x, b0);
      r[i][1] = _mm512_dpbf16_ps(r[i][1], x, b1);
    }
    a += MR;
    b += NR;
  }
  if (out) store_zmm_bf16(r, *out, row, col, ldc, mr, nr);
  else store_zmm(r, c, ldc, acc, mr, nr);
}

void blocks_pairs(const BglMM& p, int64_t i0, int64_t mt, int64_t j0, int64_t nt, float* c, int64_t ldc,
                  bool accumulate, const Bf16Out* out16) {
  const int64_t ntp = (nt + NR - 1) / NR * NR;
  uint32_t* pb = reinterpret_cast<uint32_t*>(scratch(0, static_cast<size_t>(ntp * KCB / 2)));
  uint32_t* pa = reinterpret_cast<uint32_t*>(scratch(1, static_cast<size_t>((MC + MR) * KCB / 2)));
  for (int64_t k0 = 0; k0 < p.K; k0 += KCB) {
    const int64_t kc = p.K - k0 < KCB ? p.K - k0 : KCB, kp = (kc + 1) / 2;
    const bool acc = k0 > 0 || accumulate;
    Bf16Out o;
    const Bf16Out* sink = block_sink(out16, k0, KCB, p.K, c, o);
    pack_b_pairs(p, j0, nt, k0, kc, pb);
    for (int64_t ib = 0; ib < mt; ib += MC) {
      const int64_t mc = mt - ib < MC ? mt - ib : MC;
      pack_a_pairs(p, i0 + ib, mc, k0, kc, pa);
      for (int64_t jr = 0; jr < nt; jr += NR)
        for (int64_t ir = 0; ir < mc; ir += MR)
          micro_pairs(kp, pa + ir * kp, pb + jr * kp, c + (ib + ir) * ldc + jr, ldc, acc, mc - ir < MR ? mc - ir : MR,
                      nt - jr < NR ? nt - jr : NR, sink, ib + ir, jr);
    }
  }
}
#endif

template <bool ABF, bool BBF>
void tile(const BglMM& p, int64_t i0, int64_t mt, int64_t j0, int64_t nt) {
  const bool cbf = p.flags & kCBf16, accumulate = p.flags & kAccumulate;
  // a bf16 C: on AVX-512 written from the accumulators on the last K block (store_zmm_bf16; the earlier blocks,
  // if any, sum into an fp32 scratch tile); otherwise the whole tile sums in fp32 scratch, then is rounded
  const bool direct = BGL_AVX512 && cbf && p.K > 0;
  float* c = cbf ? scratch(2, static_cast<size_t>(mt * nt)) : static_cast<float*>(p.c) + i0 * p.ldc + j0;
  const int64_t ldc = cbf ? nt : p.ldc;
  const Bf16Out out16{static_cast<uint16_t*>(p.c) + i0 * p.ldc + j0, p.ldc, accumulate, nullptr};
  const Bf16Out* sink = direct ? &out16 : nullptr;
  if (p.K == 0) {
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t j = 0; j < nt; ++j)
        if (cbf || !accumulate) c[i * ldc + j] = 0.f;
  }
#if BGL_DPBF16
  if constexpr (ABF && BBF) blocks_pairs(p, i0, mt, j0, nt, c, ldc, accumulate && !cbf, sink);
  else
#endif
    blocks<ABF, BBF>(p, i0, mt, j0, nt, c, ldc, accumulate && !cbf, sink);
  if (cbf && !direct) {
    uint16_t* out = static_cast<uint16_t*>(p.c);
    for (int64_t i = 0; i < mt; ++i) {
      uint16_t* row = out + (i0 + i) * p.ldc + j0;
      const float* ci = c + i * nt;
      int64_t j = 0;
#if BGL_SIMD
      for (; j + 8 <= nt; j += 8) {
        const __m256 v = _mm256_loadu_ps(ci + j);
        bgl::narrow8_bf16(accumulate ? _mm256_add_ps(bgl::widen8_bf16(row + j), v) : v, row + j);
      }
#endif
      for (; j < nt; ++j) row[j] = f32_to_bf16(accumulate ? bf16_to_f32(row[j]) + ci[j] : ci[j]);
    }
  }
}

void run_chunk(const void* ctx, int64_t c) {
  const Plan& pl = *static_cast<const Plan*>(ctx);
  int64_t i = 0;
  while (c >= pl.first[i + 1]) ++i;
  const BglMM& p = pl.p[i];
  const int64_t q = c - pl.first[i], i0 = q / pl.cols[i] * pl.tm[i], j0 = q % pl.cols[i] * pl.tn[i];
  const int64_t mt = p.M - i0 < pl.tm[i] ? p.M - i0 : pl.tm[i], nt = p.N - j0 < pl.tn[i] ? p.N - j0 : pl.tn[i];
  const bool abf = p.flags & kABf16, bbf = p.flags & kBBf16;
  if (abf) {
    if (bbf) tile<true, true>(p, i0, mt, j0, nt);
    else tile<true, false>(p, i0, mt, j0, nt);
  } else {
    if (bbf) tile<false, true>(p, i0, mt, j0, nt);
    else tile<false, false>(p, i0, mt, j0, nt);
  }
}

// Tiles of 1026 x 768 (each packs its own A rows and B columns; an expert's slice is usually one tile):
// packing is 5-7% of a tile's time (perf, 1024 x 1024 x 2816).
constexpr int64_t kTileRows = (1026 + MR - 1) / MR * MR, kTileCols = 768;

int64_t count_tiles(const BglMM* p, int64_t n, int64_t tm, int64_t tn) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i)
    if (p[i].M > 0 && p[i].N > 0) total += ((p[i].M + tm - 1) / tm) * ((p[i].N + tn - 1) / tn);
  return total;
}

}  // namespace

extern "C" {

// 0: scalar, 1: AVX2, 2: AVX-512, 3: AVX-512 with bf16 dot products
int bgl_gemm_simd() { return BGL_DPBF16 ? 3 : BGL_AVX512 ? 2 : BGL_SIMD; }

// This library's helper pool (helpers.h), and adopting another library's.
void* bgl_gemm_helpers_pool() { return bgl::Helpers::handle(); }
void bgl_gemm_adopt_helpers(void* pool) { bgl::Helpers::adopt(pool); }

// Every problem of the group, on the caller and up to threads - 1 helpers. Tiles: 1026 x 768 of C, smaller
// (columns first, then rows, halving) until there are 4 per thread or they reach 128 columns and 48 rows.
void bgl_gemm_group(const BglMM* problems, int64_t n, int threads) {
  int64_t tm = kTileRows, tn = kTileCols;
  while (count_tiles(problems, n, tm, tn) < 4 * threads) {
    if (tn > 128) tn = (tn / 2 + NR - 1) / NR * NR;
    else if (tm > 48) tm = (tm / 2 + MR - 1) / MR * MR;
    else break;
  }
  Plan pl;
  pl.p = problems;
  pl.first.assign(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const BglMM& q = problems[i];
    const bool empty = q.M <= 0 || q.N <= 0;
    pl.tm.push_back(tm);
    pl.tn.push_back(tn);
    pl.cols.push_back(empty ? 1 : (q.N + tn - 1) / tn);
    pl.first.push_back(pl.first.back() + (empty ? 0 : ((q.M + tm - 1) / tm) * pl.cols.back()));
  }
  const int64_t total = pl.first.back();
  if (total <= bgl::Helpers::kMaxChunks) {
    bgl::Helpers::run(threads - 1, total, run_chunk, &pl);
  } else {
    for (int64_t c = 0; c < total; ++c) run_chunk(&pl, c);
  }
}
}
