// One GEMM of a group, y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]): what linear_cpu.cpp's bgl_linear_group
// takes and decoder_layers_cpu.cpp passes (an MoE layer's expert projections in one call).

#pragma once

#include <cstdint>

struct BglGemm {
  const float* x;
  int64_t ldx;
  const void* w;
  const float* bias;
  float* y;
  int64_t ldy, M, N, K;
};

// One problem of gemm_cpu.cpp's bgl_gemm_group, C[M, N] (+)= A[M, K] · B[K, N] through strides (mirrored by
// ops/gemm_cpu.py's ctypes structure; every field 8 bytes, so no padding). linear_cpu.cpp hands it many-row
// GEMMs (see bgl_linear_set_gemm).
struct BglMM {
  const void* a;
  int64_t sa_m, sa_k;  // A(i, k) = a[i * sa_m + k * sa_k]
  const void* b;
  int64_t sb_k, sb_n;  // B(k, j) = b[k * sb_k + j * sb_n]
  void* c;
  int64_t ldc;  // C(i, j) = c[i * ldc + j]
  int64_t M, N, K;
  int64_t flags;  // kABf16 1 | kBBf16 2 | kCBf16 4 | kAccumulate 8
};
typedef void (*bgl_gemm_group_fn)(const BglMM*, int64_t, int);
