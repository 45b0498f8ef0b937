// y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]): the S-part's GEMMs at decode batch sizes, on AVX2 CPUs.
//
// Why not the BLAS torch calls: at the small M of decoding (1..64 rows) the library's sgemm on this
// class of CPU runs far below both the FMA peak and the memory bound (measured: 2-20 GFLOP/s where
// 60+ is the bound), and its bf16 GEMM has no hardware path here at all (~1 GFLOP/s). This kernel keeps
// the weights in their Hugging Face layout ([N, K], row-major), in fp32 or bf16 — bf16 weights halve
// the bytes a memory-bound decode step reads — and always accumulates in fp32.
//
// Loop nest, per thread (OpenMP splits N into contiguous ranges of NR-row tiles):
//     for each tile of NR weight rows        (NR·K values: stays in L1 while ...)
//       for each tile of MR input rows       (... every input row streams past it from L2)
//         acc[MR][NR] += x[m, k:k+8] * w[n, k:k+8]   for k in steps of 8    (MR·NR ymm accumulators)
//         y[m, n] = hsum(acc[m][n]) (+ bias)
// so the weights are read from memory once per call whatever M is, and each FMA's operands come from
// registers (MR + NR loads per MR·NR FMAs).
//
// Build: compiled on first use by ops/native.py (-O3 -march=native -fopenmp). Without AVX2/FMA the same
// loops compile to scalar code (correct, slower); Python checks shapes, dtypes and strides.

#include <cstdint>
#include <cstring>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BGL_SIMD 1
#else
#define BGL_SIMD 0
#endif

namespace {

enum { F32 = 0, BF16 = 1 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if BGL_SIMD
template <int WD>
inline __m256 load_w(const void* w, int64_t i) {
  if constexpr (WD == F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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

// One MR x NR tile: rows m0.. of x against rows n0.. of w.
template <int WD, int MR, int NR>
inline void tile(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy, const float* bias,
                 int64_t m0, int64_t n0) {
  float out[MR][NR];
  int64_t k = 0;
#if BGL_SIMD
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
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

template <int WD, int NRr>
inline void rows_block(const float* x, int64_t ldx, const void* w, int64_t K, float* y, int64_t ldy,
                       const float* bias, int64_t M, int64_t n0) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<WD, MR, NRr>(x, ldx, w, K, y, ldy, bias, m, n0);
  switch (M - m) {
    case 2: tile<WD, 2, NRr>(x, ldx, w, K, y, ldy, bias, m, n0); break;
    case 1: tile<WD, 1, NRr>(x, ldx, w, K, y, ldy, bias, m, n0); break;
    default: break;
  }
}

// One input row (a batch-1 decode step): 8 weight rows per tile, so 8 independent FMA chains hide the FMA
// latency that 4 chains (one 1 x 4 tile) would expose.
constexpr int NR1 = 8;

template <int WD>
void linear(const float* x, int64_t ldx, const void* w, const float* bias, float* y, int64_t ldy, int64_t M,
            int64_t N, int64_t K, int threads) {
  // enough work per thread to pay for waking it (~1M multiply-adds, tens of microseconds): a parallel region
  // whose second thread is not running costs a scheduler time slice (milliseconds) on a busy machine
  constexpr int64_t kMinWork = int64_t(1) << 20;
  const int64_t work = M * N * K;
  int nt = static_cast<int>(work / kMinWork < threads ? work / kMinWork : threads);
  if (nt < 1) nt = 1;
  if (M == 1) {
    const int64_t tiles = N / NR1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < tiles; ++t) tile<WD, 1, NR1>(x, ldx, w, K, y, ldy, bias, 0, t * NR1);
    for (int64_t n = tiles * NR1; n < N; ++n) tile<WD, 1, 1>(x, ldx, w, K, y, ldy, bias, 0, n);
    return;
  }
  const int64_t tiles = N / NR;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t t = 0; t < tiles; ++t) rows_block<WD, NR>(x, ldx, w, K, y, ldy, bias, M, t * NR);
  for (int64_t n = tiles * NR; n < N; ++n) rows_block<WD, 1>(x, ldx, w, K, y, ldy, bias, M, n);
}

}  // namespace

extern "C" {

int bgl_linear_simd() { return BGL_SIMD; }

// x fp32 [M, K] (row stride ldx), w [N, K] contiguous in w_dtype (0 fp32, 1 bf16), bias fp32 [N] or null,
// y fp32 [M, N] (row stride ldy).
void bgl_linear(const float* x, int64_t ldx, const void* w, int w_dtype, const float* bias, float* y, int64_t ldy,
                int64_t M, int64_t N, int64_t K, int threads) {
  if (w_dtype == F32) linear<F32>(x, ldx, w, bias, y, ldy, M, N, K, threads);
  else linear<BF16>(x, ldx, w, bias, y, ldy, M, N, K, threads);
}
}
