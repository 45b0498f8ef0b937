"""The C helpers every generated CPU kernel starts with (no headers beyond libc's math and OpenMP).

Written so GCC/Clang vectorise them inside ``#pragma omp simd`` loops: no branches, only selects, bit
casts and fused multiply-adds. ``pf_exp`` is the Cephes single-precision exponential (range reduction
by ln 2 split in two constants, degree-6 polynomial, 2^n applied in two halves so results down to the
subnormal range stay exact), about 1 ulp; libm's ``expf`` would be a call per element and never
vectorise without ``-ffast-math`` (which would also break NaN handling). bf16 rounds to nearest even
and keeps NaNs quiet, as PyTorch does.
"""

PRELUDE = r"""
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

static inline float pf_bits_f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint32_t pf_f_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float pf_bf2f(uint16_t h) { return pf_bits_f(((uint32_t)h) << 16); }
static inline uint16_t pf_f2bf(float f) {
  uint32_t u = pf_f_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t q = (u >> 16) | 0x40u;
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? q : r);
}
static inline float pf_round_bf16(float f) { return pf_bf2f(pf_f2bf(f)); }

static inline float pf_exp(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  float n = __builtin_rintf(xc * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693359375f, xc);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  float y = __builtin_fmaf(p, r * r, r) + 1.0f;
  int32_t ni = (int32_t)n;
  int32_t n1 = ni >> 1;
  int32_t n2 = ni - n1;
  y = y * pf_bits_f((uint32_t)(n1 + 127) << 23) * pf_bits_f((uint32_t)(n2 + 127) << 23);
  return x != x ? x : y;
}
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
"""
