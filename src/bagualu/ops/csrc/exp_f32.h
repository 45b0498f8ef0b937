/* The fp32 exponential shared by the operator library's C++ kernels (elementwise_cpu.cpp) and the C that
   PowerFusion generates (the compiler's prelude embeds this file): one definition, so the two cannot drift
   apart. Valid C11 and C++.

   exp(x): x = n ln2 + r, |r| <= ln2 / 2 (Cody-Waite split of ln2), a degree-7 polynomial in r (Cephes'
   single-precision coefficients), then 2^n by exponent arithmetic. Within 1 ulp; inf above 88.72, 0 below
   -86.28 (results under 3.4e-38 flushed: 2^n stays a normal number), NaN kept. Branch-free, so loops
   around it vectorise. */
#ifndef BGL_EXP_F32_H
#define BGL_EXP_F32_H

#include <math.h>
#include <stdint.h>

static inline float bgl_exp_f32(float x) {
  float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693359375f, x);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  float y = __builtin_fmaf(p, r * r, r) + 1.0f;
  int32_t ni = (int32_t)n; /* meaningless when x is out of range: the selects below decide those */
  /* y in [0.7, 1.42]: adding n-1 to its exponent stays a normal float for n in [-124, 128], and the
     doubling overflows to inf exactly when the result does */
  uint32_t u;
  __builtin_memcpy(&u, &y, 4);
  u += (uint32_t)(ni - 1) << 23;
  __builtin_memcpy(&y, &u, 4);
  y *= 2.0f;
  y = x > 88.72283935546875f ? INFINITY : y;
  y = x < -86.28f ? 0.0f : y;
  return x != x ? x : y;
}

#endif
