// y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]): the S-part's GEMMs at decode batch sizes, on AVX2 CPUs.
//
// Why not the BLAS torch calls: at the small M of decoding (1..64 rows) the library's sgemm on this
// class of CPU runs far below both the FMA peak and the memory bound (measured: 2-20 GFLOP/s where
// 60+ is the bound), and its bf16 GEMM has no hardware path here at all (~1 GFLOP/s). This kernel keeps
// the weights in their Hugging Face layout ([N, K], row-major), in fp32 or bf16 — bf16 weights halve
// the bytes a memory-bound decode step reads — and always accumulates in fp32.
//
// Loop nest, per chunk of NR-row tiles (the caller and helper threads claim chunks, see helpers.h):
//     for each tile of NR weight rows        (NR·K values: stays in L1 while ...)
//       for each tile of MR input rows       (... every input row streams past it from L2)
//         acc[MR][NR] += x[m, k:k+8] * w[n, k:k+8]   for k in steps of 8    (MR·NR ymm accumulators)
//         y[m, n] = hsum(acc[m][n]) (+ bias)
// so the weights are read from memory once per call whatever M is, and each FMA's operands come from
// registers (MR + NR loads per MR·NR FMAs).
//
// On AVX-512 CPUs the tiles are 4 x 6 on zmm registers (16 lanes, masked K tails); there they beat the
// packed GEMM (gemm_cpu.cpp) up to ~128 rows, since packing a weight costs a pass over it that a few
// rows do not pay back (measured on a Zen 5, ~110M Llama shapes, fp32 weights: 290-310 GFLOP/s at 32 rows
// against 170-265 packed; a batch-32 fp32 decode step of the ~110M Llama: 52 -> 44 ms). -DBGL_NO_AVX512
// builds the AVX2 tiles. The one exception to the Hugging Face layout: on AVX512-BF16 CPUs a caller may
// keep a copy of a bf16 weight repacked once for the BF16_PACKED tiles (see ptile), which the serving
// engine does for its batched decode steps; what a per-call pack could not pay back, a kept one does. On a
// CPU with AMX-BF16 those tiles run on the tile unit (namespace amx): same layout, same products.
//
// Build: compiled on first use by ops/native.py (-O3 -march=native). Without AVX2/FMA the same
// loops compile to scalar code (correct, slower); Python checks shapes, dtypes and strides.

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "gemm_problem.h"
#include "helpers.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(BGL_NO_AVX512)
#include <immintrin.h>
#define BGL_SIMD 2  // 512-bit tiles
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BGL_SIMD 1
#else
#define BGL_SIMD 0
#endif
#if BGL_SIMD == 2 && defined(__AVX512BF16__)
#define BGL_DPBF16 1  // bf16-operand products in hardware (vdpbf16ps)
#else
#define BGL_DPBF16 0
#endif
#if BGL_DPBF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && !defined(BGL_NO_AMX)
#define BGL_AMX 1  // the packed bf16 tiles on AMX (tdpbf16ps) where the OS grants the tile state
#include <sys/syscall.h>
#else
#define BGL_AMX 0
#endif

namespace {

// Weight dtype codes. BF16_OPS: bf16 weights and both operands bf16 — each x row is rounded to bf16 first
// (autocast's rule for a bf16 GEMM; fp32 accumulation and output), so on CPUs with AVX512-BF16 the
// products run as vdpbf16ps at twice the fp32 rate, with no widening of the weights.
// BF16_PACKED: BF16_OPS on weights repacked once (ops/linear_cpu.py's pack_bf16) as [ceil(N/16)][K/2][16][2]: per
// 16 output columns, each k pair's 16 (k, k+1) weight pairs in one 512-bit word (AVX512-BF16 CPUs only).
// F32_PACKED: fp32 weights repacked (pack_f32) as [ceil(N/16)][K][16] (AVX-512 CPUs only).
enum { F32 = 0, BF16 = 1, BF16_OPS = 2, BF16_PACKED = 3, F32_PACKED = 4 };

using bgl::bf16_to_f32;

#if BGL_SIMD
template <int WD>
inline __m256 load_w(const void* w, int64_t i) {
  if constexpr (WD == F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    return bgl::widen8_bf16(static_cast<const uint16_t*>(w) + i);
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}
#endif

template <int WD>
inline float w_at(const void* w, int64_t i) {
  if constexpr (WD == F32) return static_cast<const float*>(w)[i];
  else return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
}

constexpr int64_t kPrefetchRowBytes = 2048;

#if BGL_SIMD == 2
// 16 weights from element i (the first `n` of them when masked), widened to fp32.
template <int WD, bool MASKED = false>
inline __m512 load_w16(const void* w, int64_t i, __mmask16 n = 0xffff) {
  if constexpr (WD == F32) {
    const float* p = static_cast<const float*>(w) + i;
    return MASKED ? _mm512_maskz_loadu_ps(n, p) : _mm512_loadu_ps(p);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + i;
    const __m256i h = MASKED ? _mm256_maskz_loadu_epi16(n, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// A 512-bit tile's k-step: 16 k of fp32 x against F32 or BF16 weights (widened), FMA ...
template <int WD>
struct Fma16 {
  using XT = float;
  using V = __m512;
  static constexpr int64_t KS = 16, esz = WD == F32 ? 4 : 2;  // k per step, weight bytes per element
  static constexpr int64_t max_prefetch_passes = 2;  // see tile512
  template <bool MASKED>
  static V x(const float* p, uint32_t n) { return MASKED ? _mm512_maskz_loadu_ps(__mmask16(n), p) : _mm512_loadu_ps(p); }
  template <bool MASKED>
  static V w(const void* p, int64_t i, uint32_t n) { return load_w16<WD, MASKED>(p, i, __mmask16(n)); }
  static __m512 madd(__m512 acc, V a, V b) { return _mm512_fmadd_ps(a, b, acc); }
};

#if BGL_DPBF16
// ... or (BF16_OPS) 32 k of x already rounded to bf16 (once per call) against bf16 weights as 16 (k, k+1)
// pairs, vdpbf16ps into fp32 lanes.
struct Dp32 {
  using XT = uint16_t;
  using V = __m512bh;
  static constexpr int64_t KS = 32, esz = 2;
  static constexpr int64_t max_prefetch_passes = 1 << 30;  // see tile512
  template <bool MASKED>
  static V x(const uint16_t* p, uint32_t n) {
    return (V)(MASKED ? _mm512_maskz_loadu_epi16(__mmask32(n), p) : _mm512_loadu_si512(p));
  }
  template <bool MASKED>
  static V w(const void* p, int64_t i, uint32_t n) { return x<MASKED>(static_cast<const uint16_t*>(p) + i, n); }
  static __m512 madd(__m512 acc, V a, V b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

// One MR x NR tile on 512-bit registers: the x rows' values in registers, each weight row's loaded once per
// step and used by all MR rows; the last K % KS by masked loads (zeros add nothing; no scalar tail). Each
// output's sum runs in the same order whatever M, MR and NR are (lanes over k, then the lanes), so a row's
// result does not depend on the batch it came in. The first MR rows of a tile read its weights from memory
// (the others from cache), and the tile prefetches the next tile's, non-temporally (see row512): batched
// decode steps, in-process A/B on a Zen 5, ~110M Llama bf16 weights: 4 sequences 429 -> 515 tokens/s, 8
// 697 -> 996, 32 1675 -> 1818; fp32 8 522 -> 570, 32 822 -> 834; bf16 Mixtral 16 1093 -> 1141. Each of the
// `passes` passes of MR rows over a tile issues its share of those prefetches (line i by pass i % passes),
// so they go out at the rate the tile's work is done. When the first pass issued them all, in a fraction
// of the time, the core's miss buffers filled and it stalled until the lines came. In-process A/B of the
// two builds (Zen 5, 2 threads, bf16 projections of the ~110M Llama's 12 layers and its LM head): 8 rows
// 6.4 -> 5.1 ms, 32 rows 12.7 -> 10.3, 64 rows 22.2 -> 19.3 (two tiles ahead instead of one: slower). The
// widening FMA tiles (fp32 or bf16 weights, fp32 x) share them among the first two passes only (fp32
// weights, same A/B: 8 rows 11.1 -> 9.3 ms, 32 rows 24.4 -> 23.5, 64 rows 41.8 -> 42.4, noise-level; shared
// by all passes, 64 rows had run 41.2 -> 42.8).
//
// One input row (a batch-1 decode step) goes row by row instead: each weight row to the end, then the next,
// so the weights stream in address order (one stream per thread) rather than as NR interleaved rows, and a
// software prefetch runs kRowPrefetchBytes ahead of the loads, one per 64-byte line (past the matrix's end it
// touches, harmlessly, what lies beyond). Each row's k-steps form one FMA chain; the out-of-order core overlaps
// the chains of consecutive rows. Same sums, same order as the tiles. Measured on a Zen 5 (2 threads, bf16
// weights, copy bandwidth read + write 43 GB/s): 48 cold [4096, 768] matrices (302 MB) 40 GB/s with 8
// interleaved rows, 45-48 row by row with the prefetch 8 KB ahead (4-32 KB and hints T0-NTA measured alike);
// batch-1 decode, in-process A/B: bf16 ~110M Llama 158 -> 175 tokens/s, small Mixtral 366 -> 387, fp32 Llama
// unchanged. (On AVX2 with bf16 weights row by row was slower here: that path keeps its tiles.)
// The prefetch is non-temporal: a decode step streams ~200 MB of weights once, and fetched as ordinary lines
// they evict everything else from every cache level, so the interpreter, the dispatcher and the sampler
// between the kernels run cold (a decode step's Python work measured ~2x slower than the same calls in a
// loop). In-process A/B against the T1 hint (copy 75 GB/s): bf16 Llama 218-239 -> 232-256 tokens/s, Mixtral
// 459 -> 480, fp32 Llama 136 -> 150.
constexpr int64_t kRowPrefetchBytes = 8192;

template <class S, int NR_>
inline void row512(const typename S::XT* x, const void* w, int64_t K, float* y, const float* bias, int64_t n0) {
  for (int j = 0; j < NR_; ++j) {
    __m512 acc = _mm512_setzero_ps();
    const int64_t r = (n0 + j) * K;
    const char* pf = static_cast<const char*>(w) + r * S::esz + kRowPrefetchBytes;
    int64_t k = 0;
    for (; k + S::KS <= K; k += S::KS) {
      if (((k * S::esz) & 63) == 0) _mm_prefetch(pf + k * S::esz, _MM_HINT_NTA);
      acc = S::madd(acc, S::template x<false>(x + k, 0), S::template w<false>(w, r + k, 0));
    }
    if (k < K) {
      const uint32_t n = static_cast<uint32_t>((1ull << (K - k)) - 1);
      acc = S::madd(acc, S::template x<true>(x + k, n), S::template w<true>(w, r + k, n));
    }
    y[n0 + j] = _mm512_reduce_add_ps(acc) + (bias ? bias[n0 + j] : 0.f);
  }
}

template <class S, int MR_, int NR_>
inline void tile512(const typename S::XT* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy,
                    const float* bias, int64_t m0, int64_t n0, int64_t pass, int64_t passes) {
  if constexpr (MR_ == 1) {
    row512<S, NR_>(x + m0 * ldx, w, K, y + m0 * ldy, bias, n0);
    return;
  }
  __m512 acc[MR_][NR_];
  for (int i = 0; i < MR_; ++i)
    for (int j = 0; j < NR_; ++j) acc[i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, auto masked, uint32_t n) {
    constexpr bool M = decltype(masked)::value;
    typename S::V xv[MR_];
    for (int i = 0; i < MR_; ++i) xv[i] = S::template x<M>(x + (m0 + i) * ldx + k, n);
    for (int j = 0; j < NR_; ++j) {
      const typename S::V wv = S::template w<M>(w, (n0 + j) * K + k, n);
      for (int i = 0; i < MR_; ++i) acc[i][j] = S::madd(acc[i][j], xv[i], wv);
    }
  };
  int64_t k = 0;
  const char* nxt = static_cast<const char*>(w) + (n0 + NR_) * K * S::esz;  // the next tile's rows
  const int64_t sharing = passes < S::max_prefetch_passes ? passes : S::max_prefetch_passes;
  for (; k + S::KS <= K; k += S::KS) {
    const int64_t byte = k * S::esz;
    if (pass < sharing && (byte & 63) == 0 && (byte >> 6) % sharing == pass)  // its share of the next tile's lines
      for (int j = 0; j < NR_; ++j) _mm_prefetch(nxt + j * K * S::esz + byte, _MM_HINT_NTA);
    step(k, std::false_type{}, 0);
  }
  if (k < K) step(k, std::true_type{}, static_cast<uint32_t>((1ull << (K - k)) - 1));
  for (int i = 0; i < MR_; ++i)
    for (int j = 0; j < NR_; ++j) y[(m0 + i) * ldy + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[n0 + j] : 0.f);
}

template <int WD, int MR_, int NR_>
inline void tile(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy, const float* bias,
                 int64_t m0, int64_t n0, int64_t pass, int64_t passes) {
  tile512<Fma16<WD>, MR_, NR_>(x, ldx, w, K, y, ldy, bias, m0, n0, pass, passes);
}

constexpr int NR = 6;  // weight rows per tile
constexpr int MR = 4;  // input rows per tile: MR*NR = 24 accumulators + MR + 1 operand registers <= 32 zmm
#else
// One MR x NR tile: rows m0.. of x against rows n0.. of w (pass, passes: unused here).
template <int WD, int MR, int NR>
inline void tile(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy, const float* bias,
                 int64_t m0, int64_t n0, int64_t, int64_t) {
  float out[MR][NR];
  int64_t k = 0;
#if BGL_SIMD
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  constexpr int64_t esz = WD == F32 ? 4 : 2;
  // Batch 1 over short rows: prefetch the next tile (the NR rows after these, contiguous) into L2, a slice
  // per step. Reading NR rows of at most 2 KB side by side defeats the hardware prefetcher (measured with
  // bf16 rows of 1-1.5 KB: 10-12 -> 13-15 GB/s); longer rows it streams better alone.
  const bool prefetch = MR == 1 && K * esz <= kPrefetchRowBytes;
  const char* pf = static_cast<const char*>(w) + (n0 + NR) * K * esz;
  for (; k + 8 <= K; k += 8) {
    if (prefetch)
      for (int64_t b = 0; b < NR * 8 * esz; b += 64) _mm_prefetch(pf + k * NR * esz + b, _MM_HINT_T2);
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load_w<WD>(w, (n0 + j) * K + k);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(x + (m0 + i) * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = hsum(acc[i][j]);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = 0.f;
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) out[i][j] += x[(m0 + i) * ldx + k] * w_at<WD>(w, (n0 + j) * K + k);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * ldy + n0 + j] = out[i][j] + (bias ? bias[n0 + j] : 0.f);
}

constexpr int NR = 4;  // weight rows per tile
constexpr int MR = 3;  // input rows per tile: MR*NR = 12 accumulators + NR + 1 operand registers <= 16 ymm
#endif

// tile<WD> for F32 and BF16 weights; for BF16_OPS, x holds the rounded rows (round_rows below): bf16 words
// for the Dp32 tiles on AVX512-BF16 CPUs, else their fp32 values for the widening tiles (the same products).
// pass, passes: which of the passes of MR input rows over these weight rows this tile is (see tile512).
template <int WD, int MR_, int NR_>
inline void tile_any(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy,
                     const float* bias, int64_t m0, int64_t n0, int64_t pass = 0, int64_t passes = 1) {
  if constexpr (WD == BF16_OPS) {
#if BGL_DPBF16
    tile512<Dp32, MR_, NR_>(reinterpret_cast<const uint16_t*>(x), ldx, w, K, y, ldy, bias, m0, n0, pass, passes);
#else
    tile<BF16, MR_, NR_>(x, ldx, w, K, y, ldy, bias, m0, n0, pass, passes);
#endif
  } else {
    tile<WD, MR_, NR_>(x, ldx, w, K, y, ldy, bias, m0, n0, pass, passes);
  }
}

template <int WD, int NRr>
inline void rows_block(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy,
                       const float* bias, int64_t M, int64_t n0) {
  const int64_t passes = (M + MR - 1) / MR;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile_any<WD, MR, NRr>(x, ldx, w, K, y, ldy, bias, m, n0, m / MR, passes);
  switch (M - m) {
    case 3: if constexpr (MR > 3) tile_any<WD, 3, NRr>(x, ldx, w, K, y, ldy, bias, m, n0, m / MR, passes); break;
    case 2: tile_any<WD, 2, NRr>(x, ldx, w, K, y, ldy, bias, m, n0, m / MR, passes); break;
    case 1: tile_any<WD, 1, NRr>(x, ldx, w, K, y, ldy, bias, m, n0, m / MR, passes); break;
    default: break;
  }
}

#if BGL_SIMD == 2
// Tiles on packed weights (BF16_PACKED, F32_PACKED): MR x NB 512-bit accumulators, each holding 16 outputs,
// so no horizontal sums at the end. The weights are laid out per 16 output columns, one 64-byte word per
// step: bf16, each k pair's 16 (k, k+1) pairs, multiplied as vdpbf16ps against the row's broadcast pair;
// fp32, each k's 16 weights, an FMA against the row's broadcast value. Loads and arithmetic stay near the
// instructions' peak, where the dot-product tiles above (one weight row per register, 16 partial sums per
// output) lose to their reductions and loads. Measured on a Zen 5, one thread, weights cached, 32 rows x
// 768 x 4096: bf16 502 GFLOP/s against the 4 x 6 Dp32 tile's 330 (the core's vdpbf16ps peak measures 546).
// 8 x 3 tiles rather than 4 x 6 (same registers, half the passes over a tile's weights), on the ~110M
// Llama's 12 layers of projections and its LM head from DRAM, bf16, 2 threads: 8 rows 6.3 -> 5.4 ms, 16
// 6.4 -> 5.1, 32 9.9 -> 8.8, 64 16.6 -> 16.3; 5 x 4 and 6 x 4 in between. The next tile's weights are
// prefetched, shared among the passes as in tile512, into every cache level: a tile's weights outgrow the
// first-level cache (K x 96 bytes in bf16), and lines prefetched non-temporally were re-read from L3 by
// the later passes. 12 layers' projections from DRAM, 2 threads: the 2048 x 768 down projection at 32
// rows 147-152 -> 123-132 us in bf16, 282-285 -> 246-277 in fp32, at 64 rows 269-275 -> 236 (bf16); the
// other shapes and the LM head within noise. Each output's sum runs over k in
// order, one step at a time, whatever M is: a row's result does not depend on its batch. x: bf16, the rows
// rounded, K even; fp32, the rows as given.
constexpr int NBP = 3;  // 16-column blocks per packed tile (48 columns) ...
constexpr int PMR = 8;  // ... by input rows per tile: 24 accumulators + 3 weight words + 1 broadcast <= 32 zmm

struct PkF32 {  // one step: one k
  using XT = float;
  using W = __m512;
  static constexpr int64_t kpw = 1;  // k per step (per 64-byte weight word)
  static W w(const char* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static W x(const float* row, int64_t s) { return _mm512_set1_ps(row[s]); }
  static __m512 madd(__m512 acc, W a, W b) { return _mm512_fmadd_ps(a, b, acc); }
};
#if BGL_DPBF16
struct PkBf16 {  // one step: one k pair
  using XT = uint16_t;
  using W = __m512bh;
  static constexpr int64_t kpw = 2;
  static W w(const char* p) { return (W)_mm512_loadu_si512(p); }
  static W x(const uint16_t* row, int64_t s) {
    return (W)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(row)[s]);
  }
  static __m512 madd(__m512 acc, W a, W b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

template <class P, int MR_, int NB_>
inline void ptile(const typename P::XT* x, int64_t ldx, const char* wp, int64_t K, float* y, int64_t ldy,
                  const float* bias, int64_t N, int64_t m0, int64_t b0, int64_t pass, int64_t passes) {
  const int64_t steps = K / P::kpw, block = steps * 64;  // bytes per 16-column block
  __m512 acc[MR_][NB_];
  for (int i = 0; i < MR_; ++i)
    for (int j = 0; j < NB_; ++j) acc[i][j] = _mm512_setzero_ps();
  const char* wb = wp + b0 * block;            // this tile's first block
  const char* nxt = wp + (b0 + NB_) * block;   // the next tile's
  const typename P::XT* xr[MR_];
  for (int i = 0; i < MR_; ++i) xr[i] = x + (m0 + i) * ldx;
  for (int64_t s = 0; s < steps; ++s) {
    if (s % passes == pass)
      for (int j = 0; j < NB_; ++j) _mm_prefetch(nxt + j * block + s * 64, _MM_HINT_T0);
    typename P::W wv[NB_];
    for (int j = 0; j < NB_; ++j) wv[j] = P::w(wb + j * block + s * 64);
    for (int i = 0; i < MR_; ++i) {
      const typename P::W xb = P::x(xr[i], s);
      for (int j = 0; j < NB_; ++j) acc[i][j] = P::madd(acc[i][j], xb, wv[j]);
    }
  }
  for (int j = 0; j < NB_; ++j) {
    const int64_t n0 = (b0 + j) * 16, left = N - n0;
    const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MR_; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0, mk, _mm512_add_ps(acc[i][j], bv));
  }
}

template <class P, int NB_>
inline void prows_block(const typename P::XT* x, int64_t ldx, const char* wp, int64_t K, float* y, int64_t ldy,
                        const float* bias, int64_t M, int64_t N, int64_t b0) {
  const int64_t passes = (M + PMR - 1) / PMR;
  int64_t m = 0;
  for (; m + PMR <= M; m += PMR) ptile<P, PMR, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes);
  switch (M - m) {
    case 7: ptile<P, 7, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 6: ptile<P, 6, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 5: ptile<P, 5, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 4: ptile<P, 4, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 3: ptile<P, 3, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 2: ptile<P, 2, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    case 1: ptile<P, 1, NB_>(x, ldx, wp, K, y, ldy, bias, N, m, b0, m / PMR, passes); break;
    default: break;
  }
}

// Tiles [t0, t1) of NBP blocks, and with `last` the blocks no whole tile covers (the last one partial).
template <class P>
inline void prows(const BglGemm& g, int64_t t0, int64_t t1, bool last) {
  static_assert(NBP == 3, "one case per block count up to NBP");
  const typename P::XT* x = reinterpret_cast<const typename P::XT*>(g.x);
  const char* wp = static_cast<const char*>(g.w);
  for (int64_t t = t0; t < t1; ++t) prows_block<P, NBP>(x, g.ldx, wp, g.K, g.y, g.ldy, g.bias, g.M, g.N, t * NBP);
  if (!last) return;
  const int64_t b0 = (g.N / (NBP * 16)) * NBP;
  switch ((g.N + 15) / 16 - b0) {
    case 3: prows_block<P, 3>(x, g.ldx, wp, g.K, g.y, g.ldy, g.bias, g.M, g.N, b0); break;
    case 2: prows_block<P, 2>(x, g.ldx, wp, g.K, g.y, g.ldy, g.bias, g.M, g.N, b0); break;
    case 1: prows_block<P, 1>(x, g.ldx, wp, g.K, g.y, g.ldy, g.bias, g.M, g.N, b0); break;
    default: break;
  }
}
#endif

#if BGL_AMX
// The packed bf16 tiles on AMX. pack_bf16's layout is AMX's B operand as it stands: per 16 output columns,
// each k pair's 16 (k, k+1) weight pairs in one 64-byte row, so 16 such rows (32 k, 1 KiB, contiguous) are
// one B tile. The x rows, rounded to bf16 as for the vdpbf16ps tiles, are the A tiles (16 rows x 32 k, row
// stride K), zero rows padding M to a multiple of 16. Per 16 x rows and 48-column packed tile: three
// accumulator tiles (16 x 16 fp32 each), and per 32 k one A load and three B loads and tdpbf16ps. A
// tdpbf16ps is 8192 multiply-adds (16 x 16 outputs, 32 k), so on a CPU with AMX a batched decode step is
// bound by reading its weights, not by the 16-lane vdpbf16ps tiles. Same products as PkBf16 (bf16 x rounded
// to nearest even, bf16 weights, fp32 accumulation), summed in the tile unit's order; a row's result does
// not depend on the others in its batch. Needs K % 32 == 0 (a B tile past the last pair would read the next
// block); other K take the vdpbf16ps tiles.
namespace amx {
struct alignas(64) Config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Whether Linux lets this process use the tile data (asked once per process, for all its threads).
inline bool granted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Every tile 16 rows x 64 bytes: accumulators 16 x 16 fp32, x rows 16 x 32 bf16, weights 16 k pairs x 16
// columns (which tile holds which: block_rows, block_pair_rows).
// The configuration is per thread, and other code (oneDNN under torch) loads its own: set at each chunk.
inline void configure() {
  Config c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// The first row group's pass streams the weights from memory: each block's lines kPrefetchSteps steps ahead
// go to L1 (on a Xeon with AMX, 2 threads, the ~110M Llama's projections and LM head, bf16, in-process A/B
// against none: 8 rows 10.4 -> 9.4 ms, 32 rows 13.1 -> 11.8; 8 and 16 steps ahead in between; from 64 rows
// on, where a block's later row groups read it from L2, no change). Past a block's end it touches, harmlessly,
// the next block or what lies beyond.
constexpr int64_t kPrefetchSteps = 4;

template <int NB_>
inline void prefetch_ahead(const char* wb, int64_t block, int64_t s) {
  for (int j = 0; j < NB_; ++j)
    for (int l = 0; l < 1024; l += 64) _mm_prefetch(wb + j * block + (s + kPrefetchSteps) * 1024 + l, _MM_HINT_T0);
}

// y[0:rows, block b's 16 columns] = the first `rows` rows of a stored 16 x 16 accumulator tile (+ bias); the
// columns past N untouched.
inline void store_block(const float (*acc)[16], int64_t rows, float* y, int64_t ldy, const float* bias, int64_t N,
                        int64_t b) {
  const int64_t n0 = b * 16, left = N - n0;
  const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) _mm512_mask_storeu_ps(y + i * ldy + n0, mk, _mm512_add_ps(_mm512_load_ps(acc[i]), bv));
}

template <int NB_>
inline void block_rows(const uint16_t* x, int64_t K, const char* wp, float* y, int64_t ldy, const float* bias,
                       int64_t M, int64_t N, int64_t b0) {
  const int64_t block = K * 32, steps = K / 32;  // bytes per 16-column block; 32 k per step
  const char* wb = wp + b0 * block;
  alignas(64) float out[NB_][16][16];
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    _tile_zero(0);
    if constexpr (NB_ > 1) _tile_zero(1);
    if constexpr (NB_ > 2) _tile_zero(2);
    const uint16_t* xr = x + m0 * K;
    for (int64_t s = 0; s < steps; ++s) {
      if (m0 == 0) prefetch_ahead<NB_>(wb, block, s);
      _tile_loadd(3, xr + s * 32, K * 2);
      _tile_loadd(4, wb + s * 1024, 64);
      _tile_dpbf16ps(0, 3, 4);
      if constexpr (NB_ > 1) {
        _tile_loadd(5, wb + block + s * 1024, 64);
        _tile_dpbf16ps(1, 3, 5);
      }
      if constexpr (NB_ > 2) {
        _tile_loadd(6, wb + 2 * block + s * 1024, 64);
        _tile_dpbf16ps(2, 3, 6);
      }
    }
    _tile_stored(0, out[0], 64);
    if constexpr (NB_ > 1) _tile_stored(1, out[1], 64);
    if constexpr (NB_ > 2) _tile_stored(2, out[2], 64);
    const int64_t rows = M - m0 < 16 ? M - m0 : 16;
    for (int j = 0; j < NB_; ++j) store_block(out[j], rows, y + m0 * ldy, ldy, bias, N, b0 + j);
  }
}

// Two 16-column blocks by 32 rows: accumulators 0, 1 (rows 0-15) and 2, 4 (rows 16-31; tile 3 is taken),
// x tiles 3 and 7, weight tiles 5 and 6 -- each weight tile loaded once for both row groups. For M > 16.
template <int NB_>
inline void block_pair_rows(const uint16_t* x, int64_t K, const char* wp, float* y, int64_t ldy,
                            const float* bias, int64_t M, int64_t N, int64_t b0) {
  const int64_t block = K * 32, steps = K / 32;
  const char* wb = wp + b0 * block;
  alignas(64) float out[2][NB_][16][16];
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool two = M - m0 > 16;
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (NB_ > 1) {
      _tile_zero(1);
      _tile_zero(4);
    }
    const uint16_t* xr = x + m0 * K;
    for (int64_t s = 0; s < steps; ++s) {
      if (m0 == 0) prefetch_ahead<NB_>(wb, block, s);
      _tile_loadd(3, xr + s * 32, K * 2);
      _tile_loadd(5, wb + s * 1024, 64);
      _tile_dpbf16ps(0, 3, 5);
      if (two) {
        _tile_loadd(7, xr + 16 * K + s * 32, K * 2);
        _tile_dpbf16ps(2, 7, 5);
      }
      if constexpr (NB_ > 1) {
        _tile_loadd(6, wb + block + s * 1024, 64);
        _tile_dpbf16ps(1, 3, 6);
        if (two) _tile_dpbf16ps(4, 7, 6);
      }
    }
    _tile_stored(0, out[0][0], 64);
    _tile_stored(2, out[1][0], 64);
    if constexpr (NB_ > 1) {
      _tile_stored(1, out[0][1], 64);
      _tile_stored(4, out[1][1], 64);
    }
    const int64_t rows = M - m0 < 32 ? M - m0 : 32;
    for (int h = 0; h < 2 && h * 16 < rows; ++h)
      for (int jb = 0; jb < NB_; ++jb)
        store_block(out[h][jb], rows - h * 16 < 16 ? rows - h * 16 : 16, y + (m0 + h * 16) * ldy, ldy, bias, N, b0 + jb);
  }
}

// Many rows go a block of them at a time, each block's x rows (this many bytes) staying in L2 while every
// column pair of the chunk passes over them; the weights are re-read per block (from L3 or memory). Swept
// whole, 2048 rows of 768 (3 MiB) were re-read from L3 for every column pair.
constexpr int64_t kRowBlockBytes = 512 << 10;

// Tiles [t0, t1) of NBP blocks, and with `last` the blocks no whole tile covers; x: the rounded rows, padded.
inline void rows(const BglGemm& g, int64_t t0, int64_t t1, bool last) {
  static_assert(NBP == 3, "three accumulator tiles");
  const uint16_t* x = reinterpret_cast<const uint16_t*>(g.x);
  const char* wp = static_cast<const char*>(g.w);
  configure();
  const int64_t b1 = last ? (g.N + 15) / 16 : t1 * NBP;  // blocks [t0 * NBP, b1)
  if (g.M <= 16) {
    int64_t b = t0 * NBP;
    for (; b + 3 <= b1; b += 3) block_rows<3>(x, g.K, wp, g.y, g.ldy, g.bias, g.M, g.N, b);
    if (b1 - b == 2) block_rows<2>(x, g.K, wp, g.y, g.ldy, g.bias, g.M, g.N, b);
    if (b1 - b == 1) block_rows<1>(x, g.K, wp, g.y, g.ldy, g.bias, g.M, g.N, b);
  } else {  // a block of rows at a time, every column pair over it (see kRowBlockBytes)
    int64_t rb = kRowBlockBytes / (g.K * 2) / 32 * 32;
    if (rb < 32) rb = 32;
    for (int64_t m0 = 0; m0 < g.M; m0 += rb) {
      const int64_t mr = g.M - m0 < rb ? g.M - m0 : rb;
      const uint16_t* xm = x + m0 * g.K;
      float* ym = g.y + m0 * g.ldy;
      int64_t b = t0 * NBP;
      for (; b + 2 <= b1; b += 2) block_pair_rows<2>(xm, g.K, wp, ym, g.ldy, g.bias, mr, g.N, b);
      if (b < b1) block_pair_rows<1>(xm, g.K, wp, ym, g.ldy, g.bias, mr, g.N, b);
    }
  }
  _tile_release();  // back to the initial state: a context switch then saves no tile data
}
}  // namespace amx
#endif

// Whether BF16_PACKED calls run on AMX: built with it, the OS grants it, not switched off (bgl_linear_amx).
static bool g_amx_on = true;
inline bool amx_active() {
#if BGL_AMX
  return g_amx_on && amx::granted();
#else
  return false;
#endif
}
// ... and whether this problem does (K a multiple of 32).
inline bool amx_for(int64_t K) { return K % 32 == 0 && amx_active(); }

constexpr int64_t NBP_COLS = 48;  // columns per packed tile (NBP * 16)

// One input row (a batch-1 decode step): 8 weight rows per tile, so 8 independent FMA chains hide the FMA
// latency that 4 chains (one 1 x 4 tile) would expose.
constexpr int NR1 = 8;

struct Job : BglGemm {  // the problem and how it is cut
  int64_t tiles, per_chunk, nr;  // tiles of nr weight rows; chunk c covers tiles [c*per_chunk, ...)
  bool amx;  // BF16_PACKED on AMX tiles (decided by the caller, who rounded x for them: round_rows)
};

// Chunk c: its tiles; the last chunk also takes the N % nr weight rows no tile covers.
template <int WD>
void run_chunk(const void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t t0 = c * j.per_chunk, t1 = t0 + j.per_chunk < j.tiles ? t0 + j.per_chunk : j.tiles;
  const bool last = t1 == j.tiles;
#if BGL_SIMD == 2
  if constexpr (WD == F32_PACKED) {  // tiles of NBP 16-column blocks; nr = NBP_COLS
    prows<PkF32>(j, t0, t1, last);
    return;
  }
#endif
#if BGL_DPBF16
  if constexpr (WD == BF16_PACKED) {
#if BGL_AMX
    if (j.amx) {
      amx::rows(j, t0, t1, last);
      return;
    }
#endif
    prows<PkBf16>(j, t0, t1, last);
    return;
  }
#endif
  if (j.M == 1) {
    for (int64_t t = t0; t < t1; ++t) tile_any<WD, 1, NR1>(j.x, j.ldx, j.w, j.K, j.y, j.ldy, j.bias, 0, t * NR1);
    if (last)
      for (int64_t n = j.tiles * NR1; n < j.N; ++n) tile_any<WD, 1, 1>(j.x, j.ldx, j.w, j.K, j.y, j.ldy, j.bias, 0, n);
    return;
  }
  for (int64_t t = t0; t < t1; ++t) rows_block<WD, NR>(j.x, j.ldx, j.w, j.K, j.y, j.ldy, j.bias, j.M, t * NR);
  if (last)
    for (int64_t n = j.tiles * NR; n < j.N; ++n) rows_block<WD, 1>(j.x, j.ldx, j.w, j.K, j.y, j.ldy, j.bias, j.M, n);
}

// Threads: one per min_work multiply-adds, at most `threads`; the helpers (helpers.h) join when they can.
// Chunks: about chunk_work multiply-adds each (small, so a helper descheduled mid-chunk delays the
// caller little), at least one tile; with several input rows, runs of consecutive tiles as below. A
// several-row tile prefetches the next tile's weights, which only pays when the same thread runs it, and
// each chunk is an atomic claim on a word both cores write.
// With one tile per chunk (batch-32 decode: 147k multiply-adds a tile) the two threads took alternate
// tiles, each prefetching the tile the other would run. Measured on a Zen 5 (2 threads, bf16 ~110M Llama
// projections, 12 layers, in-process A/B), in the box's slow-memory phase: 16 tiles a chunk, 8 rows 9.2 ->
// 4.9 ms, 32 rows 16.0 -> 10.9, 64 rows 24.8 -> 17.7; the 32000-row LM head at 32 rows 5.4 -> 3.3 ms. In
// its fast phase the two measured alike (0.98-1.07x).
// The chunks of one call are equal, and their count a multiple of the threads: a round per thread for every
// kMinTilesPerChunk x threads tiles, at least one. Chunks of 16 tiles had left the last round uneven (the
// 4096-column gate/up projection: 85 tiles in 6 chunks, 48 tiles on one thread and 37 on the other; 1280
// columns: 26 tiles in 5 chunks). Same A/B (12 layers' projections from DRAM, 2 threads, Zen 5): bf16 at
// 32 rows 6.8-7.2 -> 6.2-6.3 ms, 16 rows 4.6 -> 3.9, 8 rows 3.5 -> 3.2, 64 rows 12.0 -> 11.9; fp32 at 32
// rows 12.9 -> 11.3. Decode step of the ~110M Llama at 32 sequences: bf16 13.0-13.4 -> 12.5-12.6 ms, fp32
// 23.5 -> 22.2.
constexpr int64_t kMinTilesPerChunk = 16;

inline int64_t tiles_per_chunk(int64_t M, int64_t tiles, int64_t tile_work, int64_t chunk_work, int nt) {
  int64_t per = chunk_work / tile_work > 1 ? chunk_work / tile_work : 1;
  if (M > 1) {
    const int64_t rounds = tiles / (kMinTilesPerChunk * nt) > 1 ? tiles / (kMinTilesPerChunk * nt) : 1;
    const int64_t even = (tiles + rounds * nt - 1) / (rounds * nt);
    if (even > per) per = even;
  }
  return per;
}

template <int WD>
void linear(const float* x, int64_t ldx, const void* w, const float* bias, float* y, int64_t ldy, int64_t M,
            int64_t N, int64_t K, int threads, int64_t min_work, int64_t chunk_work, bool amx = false) {
  const int64_t work = M * N * K;
  const int64_t per = min_work > 0 ? min_work : 1;
  int nt = static_cast<int>(work / per < threads ? work / per : threads);
  if (nt < 1) nt = 1;
  const int64_t nr = WD == BF16_PACKED || WD == F32_PACKED ? NBP_COLS : M == 1 ? NR1 : NR;
  Job j{{x, ldx, w, bias, y, ldy, M, N, K}, N / nr, 1, nr, amx};
  const int64_t tile_work = M * nr * K;
  int64_t chunks = 1;
  if (nt > 1 && j.tiles > 1) {
    j.per_chunk = tiles_per_chunk(M, j.tiles, tile_work, chunk_work, nt);
    chunks = (j.tiles + j.per_chunk - 1) / j.per_chunk;
    if (chunks > bgl::Helpers::kMaxChunks) {
      j.per_chunk = (j.tiles + bgl::Helpers::kMaxChunks - 1) / bgl::Helpers::kMaxChunks;
      chunks = (j.tiles + j.per_chunk - 1) / j.per_chunk;
    }
  } else {
    j.per_chunk = j.tiles > 0 ? j.tiles : 1;
  }
  bgl::Helpers::run(nt - 1, chunks, run_chunk<WD>, &j);
}

// A group of independent GEMMs as one job: the chunks of every problem back to back, shared by the caller
// and the helpers, so an MoE layer's expert projections (a few small GEMVs each) cost one post, not one per
// projection, and two experts' weights stream on two cores at once. Each output is computed exactly as
// linear() computes it (same tiles, same order).
struct Group {
  std::vector<Job> jobs;
  std::vector<int64_t> first;  // first[g]: job g's first chunk; first.back(): all chunks
};

template <int WD>
void run_group_chunk(const void* ctx, int64_t c) {
  const Group& g = *static_cast<const Group*>(ctx);
  int64_t i = 0;
  while (c >= g.first[i + 1]) ++i;
  run_chunk<WD>(&g.jobs[i], c - g.first[i]);
}

template <int WD>
void linear_group(const BglGemm* p, int64_t n, int threads, int64_t min_work, int64_t chunk_work,
                  const std::vector<bool>* amx = nullptr) {  // amx: per problem, as linear()'s
  int64_t work = 0;
  for (int64_t i = 0; i < n; ++i) work += p[i].M * p[i].N * p[i].K;
  const int64_t per = min_work > 0 ? min_work : 1;
  int nt = static_cast<int>(work / per < threads ? work / per : threads);
  if (nt < 1) nt = 1;
  Group g;
  g.jobs.reserve(n);
  g.first.assign(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const BglGemm& q = p[i];
    if (q.M == 0) continue;
    const int64_t nr = WD == BF16_PACKED || WD == F32_PACKED ? NBP_COLS : q.M == 1 ? NR1 : NR;
    Job j{q, q.N / nr, 1, nr, amx != nullptr && (*amx)[i]};
    int64_t chunks = 1;
    if (nt > 1 && j.tiles > 1) {
      j.per_chunk = tiles_per_chunk(q.M, j.tiles, q.M * nr * q.K, chunk_work, nt);
      chunks = (j.tiles + j.per_chunk - 1) / j.per_chunk;
    } else {
      j.per_chunk = j.tiles > 0 ? j.tiles : 1;
    }
    g.jobs.push_back(j);
    g.first.push_back(g.first.back() + chunks);
  }
  const int64_t total = g.first.back();
  if (total <= bgl::Helpers::kMaxChunks) {
    bgl::Helpers::run(nt - 1, total, run_group_chunk<WD>, &g);
  } else {  // beyond 2^20 chunks (never at decode sizes): on this thread
    for (int64_t c = 0; c < total; ++c) run_group_chunk<WD>(&g, c);
  }
}

// x [M, K] (row stride ldx) rounded to bf16 (nearest even) into buf from element offset `at` (in 4-byte
// units), rows of K: bf16 words where the tiles multiply them (AVX512-BF16), else their fp32 values; rows
// M..Mp zero (the AMX tiles' padding). Returns the rows as the tiles take them (through a float pointer
// either way); row stride K.
const float* round_rows(const float* x, int64_t ldx, int64_t M, int64_t K, std::vector<uint32_t>& buf, size_t at,
                        int64_t Mp = 0) {
#if BGL_DPBF16
  uint16_t* out = reinterpret_cast<uint16_t*>(buf.data() + at);
  for (int64_t i = 0; i < M; ++i) {
    const float* r = x + i * ldx;
    uint16_t* o = out + i * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r + k)));
    for (; k < K; ++k) o[k] = bgl::f32_to_bf16(r[k]);
  }
  if (Mp > M) std::memset(out + M * K, 0, (Mp - M) * K * sizeof(uint16_t));
  return reinterpret_cast<const float*>(out);
#else
  (void)Mp;  // (the AMX tiles need AVX512-BF16)
  float* out = reinterpret_cast<float*>(buf.data() + at);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) out[i * K + k] = bf16_to_f32(bgl::f32_to_bf16(x[i * ldx + k]));
  return out;
#endif
}

// 4-byte units that M rounded rows of K take (bf16 words pack two to a unit), plus a unit of slack
int64_t rounded_units(int64_t M, int64_t K) { return BGL_DPBF16 ? (M * K + 1) / 2 + 1 : M * K; }

// y = NaN: what a packed code gets from a build without its tiles (the Python side never packs for one), so a
// misuse shows, never a silently wrong result.
[[maybe_unused]] void poison(float* y, int64_t ldy, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) y[i * ldy + j] = std::numeric_limits<float>::quiet_NaN();
}

thread_local std::vector<uint32_t> t_rounded;  // the calling thread's rounded rows, kept at the largest size

}  // namespace

extern "C" {

// 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 with bf16 products in hardware (BF16_OPS at twice the fp32 rate)
int bgl_linear_simd() { return BGL_SIMD + BGL_DPBF16; }

// Whether BF16_PACKED calls run on AMX (built with it, granted by the OS, switched on); `on` >= 0 switches it
// first (the tests compare the two tile kinds; both compute the same products).
int bgl_linear_amx(int on) {
  if (on >= 0) g_amx_on = on != 0;
  return amx_active();
}

// This library's helper pool, for the other kernel libraries to adopt (helpers.h).
void* bgl_helpers_pool() { return bgl::Helpers::handle(); }

// x fp32 [M, K] (row stride ldx), w [N, K] contiguous in w_dtype (0 fp32, 1 bf16), bias fp32 [N] or null,
// y fp32 [M, N] (row stride ldy). threads: at most this many, one per min_work multiply-adds; chunks of
// about chunk_work multiply-adds.
// A GEMM kernel for calls of at least min_rows rows (0: none), set by ops/gemm_cpu.py where its packed tiles
// beat these row tiles from that many rows on (AVX-512 CPUs, from 128). Only bgl_linear hands off, never
// bgl_linear_group: its problems run inside a helper job, and the GEMM kernel's job uses the same helpers.
static bgl_gemm_group_fn g_gemm = nullptr;
static int64_t g_gemm_min_rows = 0;
void bgl_linear_set_gemm(void* fn, int64_t min_rows) {
  g_gemm = reinterpret_cast<bgl_gemm_group_fn>(fn);
  g_gemm_min_rows = fn ? min_rows : 0;
}

// w_dtype: 0 fp32, 1 bf16, 2 bf16 with the x rows rounded to bf16 first (BF16_OPS), 3 the same on weights
// packed as ops/linear_cpu.py's pack_bf16 lays them out (BF16_PACKED, AVX512-BF16 builds; K even), 4 fp32
// weights packed by pack_f32 (F32_PACKED, AVX-512 builds).
void bgl_linear(const float* x, int64_t ldx, const void* w, int w_dtype, const float* bias, float* y, int64_t ldy,
                int64_t M, int64_t N, int64_t K, int threads, int64_t min_work, int64_t chunk_work) {
  if (w_dtype == F32_PACKED) {  // the packed tiles whatever M
#if BGL_SIMD == 2
    if (M > 0) linear<F32_PACKED>(x, ldx, w, bias, y, ldy, M, N, K, threads, min_work, chunk_work);
#else
    poison(y, ldy, M, N);
#endif
    return;
  }
  if (w_dtype == BF16_PACKED) {  // x rounded to bf16, then the packed tiles whatever M (the layout is theirs)
#if BGL_DPBF16
    if (M == 0) return;
    const bool amx = amx_for(K);  // then the rows padded to whole A tiles
    const int64_t Mp = amx ? (M + 15) / 16 * 16 : M;
    if (t_rounded.size() < static_cast<size_t>(rounded_units(Mp, K))) t_rounded.resize(rounded_units(Mp, K));
    x = round_rows(x, ldx, M, K, t_rounded, 0, Mp);
    linear<BF16_PACKED>(x, K, w, bias, y, ldy, M, N, K, threads, min_work, chunk_work, amx);
#else
    poison(y, ldy, M, N);
#endif
    return;
  }
  int64_t a_bf16 = 0;
  if (w_dtype == BF16_OPS && M > 0) {
    if (t_rounded.size() < static_cast<size_t>(rounded_units(M, K))) t_rounded.resize(rounded_units(M, K));
    x = round_rows(x, ldx, M, K, t_rounded, 0);
    ldx = K;
    a_bf16 = BGL_DPBF16;
  }
  if (g_gemm_min_rows > 0 && M >= g_gemm_min_rows && K > 0) {  // y = bias, then y += x · w^T
    if (bias)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) y[i * ldy + j] = bias[j];
    const BglMM mm = {x, ldx, 1, w, 1, K, y, ldy, M, N, K, a_bf16 | (w_dtype == F32 ? 0 : 2) | (bias ? 8 : 0)};
    g_gemm(&mm, 1, threads);
    return;
  }
  if (w_dtype == F32) linear<F32>(x, ldx, w, bias, y, ldy, M, N, K, threads, min_work, chunk_work);
  else if (w_dtype == BF16) linear<BF16>(x, ldx, w, bias, y, ldy, M, N, K, threads, min_work, chunk_work);
  else linear<BF16_OPS>(x, ldx, w, bias, y, ldy, M, N, K, threads, min_work, chunk_work);
}

// n problems (weights all in w_dtype), as bgl_linear each, run as one job (see linear_group).
void bgl_linear_group(const BglGemm* problems, int64_t n, int w_dtype, int threads, int64_t min_work,
                      int64_t chunk_work) {
  if (w_dtype == F32) {
    linear_group<F32>(problems, n, threads, min_work, chunk_work);
  } else if (w_dtype == BF16) {
    linear_group<BF16>(problems, n, threads, min_work, chunk_work);
  } else if (w_dtype == F32_PACKED) {
#if BGL_SIMD == 2
    linear_group<F32_PACKED>(problems, n, threads, min_work, chunk_work);
#else
    for (int64_t p = 0; p < n; ++p) poison(problems[p].y, problems[p].ldy, problems[p].M, problems[p].N);
#endif
  } else {  // every problem's x rows rounded (one buffer), then the tiles
    std::vector<bool> amx(n);  // which problems run on AMX tiles (their rows padded to whole A tiles)
    std::vector<int64_t> rows(n);
    int64_t units = 0;
    for (int64_t i = 0; i < n; ++i) {
      amx[i] = w_dtype == BF16_PACKED && amx_for(problems[i].K);
      rows[i] = amx[i] ? (problems[i].M + 15) / 16 * 16 : problems[i].M;
      units += rounded_units(rows[i], problems[i].K);
    }
    if (t_rounded.size() < static_cast<size_t>(units)) t_rounded.resize(units);
    std::vector<BglGemm> r(problems, problems + n);
    size_t at = 0;
    for (int64_t i = 0; i < n; ++i) {
      BglGemm& q = r[i];
      q.x = round_rows(q.x, q.ldx, q.M, q.K, t_rounded, at, rows[i]);
      q.ldx = q.K;
      at += rounded_units(rows[i], q.K);
    }
#if BGL_DPBF16
    if (w_dtype == BF16_PACKED) {
      linear_group<BF16_PACKED>(r.data(), n, threads, min_work, chunk_work, &amx);
      return;
    }
#else
    if (w_dtype == BF16_PACKED) {
      for (const BglGemm& q : r) poison(q.y, q.ldy, q.M, q.N);
      return;
    }
#endif
    linear_group<BF16_OPS>(r.data(), n, threads, min_work, chunk_work);
  }
}
}
