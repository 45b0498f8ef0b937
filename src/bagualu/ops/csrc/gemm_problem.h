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
