// Element-wise and row passes of the MoE experts in training (moe/experts.py, moe/local.py), also the SwiGLU
// activation of the MLPs, one pass each over contiguous fp32 or bf16 tensors, on the caller and the helper
// threads (helpers.h; the linear kernel's pool, adopted). ops/elementwise_cpu.py is the Python side.
//
//   silu_mul:           a = silu(g) * u   (also over rows with strides: the halves of a fused gate/up output)
//   silu_mul_backward:  du = da * silu(g),  dg = da * u * silu'(g),  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
//   scale_rows:       out[n, :] = x[n, :] * w[n]        (w fp32: the routing weights multiply in fp32)
//   row_dot:          out[n] = sum_d a[n, d] * b[n, d]  (fp32 accumulation)
//   index_add_rows:   out[idx[n], :] += src[n, :] (* w[n], rounded first), as index_add_
//
// index_add_rows sums as ATen's index_add_ on CPU (its expanded-index scatter_add_): each output row in fp32,
// from its value, adding the rows that index it in ascending order, rounded once; with w each added row is
// first scale_rows' product, rounded to the dtype. Bit for bit the reference's results, in one pass, an
// output row at a time (parallel over output rows) instead of scale_rows' pass and ATen's sort.
//
// Why: ATen runs them as separate passes with a bf16 rounding between each (silu, then the product: two
// passes forward, five backward), and a bf16 tensor times an fp32 column promotes through an fp32 copy of
// the whole tensor (6 ms for 24576 x 512 here, against 0.9 ms for a same-dtype product). Here each value is
// computed in fp32 and rounded once to the output dtype (nearest even, as torch); silu is g / (1 + exp(-g))
// as ATen's CPU kernel, with a polynomial exp within 2 ulp of libm's (results may differ from ATen's Sleef
// in the last bits of fp32, and by one bf16 rounding step where the double rounding of the ATen sequence
// lands differently).
//
// Build: compiled on first use by ops/native.py (-O3 -march=native -fopenmp: the loops are `omp simd`), with
// -ffp-contract=off: a product added to a sum must round as the reference rounds it (bgl_exp_f32's FMAs are
// explicit).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "exp_f32.h"
#include "helpers.h"

namespace {

constexpr int64_t kChunk = 16384;  // elements per job chunk (rows are never split for the row ops)

// Element access by storage type: float, or uint16_t holding bf16 (rounded to nearest even, NaN kept quiet).
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bgl::bf16_to_f32(p[i]); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = bgl::f32_to_bf16(v); }

// [lo, hi): chunk c's share of `total` items, `per` a chunk
struct Range {
  int64_t lo, hi;
  Range(int64_t c, int64_t per, int64_t total) : lo(c * per), hi(c * per + per < total ? c * per + per : total) {}
};

// v as T would hold it (fp32: v itself; bf16: rounded to nearest even, NaN quiet)
template <typename T>
inline float rounded(float v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else {
    uint16_t h;
    st(&h, 0, v);
    return ld(&h, 0);
  }
}

// a[i] = silu(g[i]) * u[i] for i in [0, n)
template <typename T>
inline void silu_mul_span(const T* g, const T* u, T* a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = ld(g, i);
    st(a, i, x / (1.0f + bgl_exp_f32(-x)) * ld(u, i));
  }
}

template <typename T>
struct SiluMul {
  const T* g;
  const T* u;
  T* a;
  int64_t n;
  static void run(const void* ctx, int64_t c) {
    const SiluMul& s = *static_cast<const SiluMul*>(ctx);
    const Range rg(c, kChunk, s.n);
    silu_mul_span(s.g + rg.lo, s.u + rg.lo, s.a + rg.lo, rg.hi - rg.lo);
  }
};

template <typename T>
struct SiluMulBackward {
  const T* da;
  const T* g;
  const T* u;
  T* du;
  T* dg;
  int64_t n;
  static void run(const void* ctx, int64_t c) {
    const SiluMulBackward& s = *static_cast<const SiluMulBackward*>(ctx);
    const Range rg(c, kChunk, s.n);
#pragma omp simd
    for (int64_t i = rg.lo; i < rg.hi; ++i) {
      const float g = ld(s.g, i), da = ld(s.da, i), u = ld(s.u, i);  // all read first: an output may be an input
      const float sg = 1.0f / (1.0f + bgl_exp_f32(-g));
      st(s.du, i, da * (g * sg));
      st(s.dg, i, da * u * (sg * (1.0f + g * (1.0f - sg))));
    }
  }
};

// A row job's chunk: Job::row(r) for each of its rows_per_chunk rows.
template <typename Job>
void each_row(const void* ctx, int64_t c) {
  const Job& s = *static_cast<const Job*>(ctx);
  const Range rg(c, s.rows_per_chunk, s.rows);
  for (int64_t r = rg.lo; r < rg.hi; ++r) s.row(r);
}

// silu_mul over rows of d elements, each operand with its own row stride (the halves of a fused gate/up output)
template <typename T>
struct SiluMulRows {
  const T* g;
  const T* u;
  T* a;
  int64_t rows, d, ldg, ldu, lda, rows_per_chunk;
  void row(int64_t r) const { silu_mul_span(g + r * ldg, u + r * ldu, a + r * lda, d); }
  static void run(const void* ctx, int64_t c) { each_row<SiluMulRows>(ctx, c); }
};

template <typename T>
struct ScaleRows {
  const T* x;
  const float* w;
  T* out;
  int64_t rows, d, rows_per_chunk;
  void row(int64_t r) const {
    const float wr = w[r];
    const T* xr = x + r * d;
    T* o = out + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) st(o, j, ld(xr, j) * wr);
  }
  static void run(const void* ctx, int64_t c) { each_row<ScaleRows>(ctx, c); }
};

template <typename T>
struct RowDot {
  const T* a;
  const T* b;
  float* out;
  int64_t rows, d, rows_per_chunk;
  void row(int64_t r) const {
    const T* ar = a + r * d;
    const T* br = b + r * d;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j) acc += ld(ar, j) * ld(br, j);
    out[r] = acc;
  }
  static void run(const void* ctx, int64_t c) { each_row<RowDot>(ctx, c); }
};

template <typename T>
struct IndexAddRows {
  T* out;
  const int64_t* first;  // rows of src adding into out row t: order[first[t]:first[t + 1]], ascending
  const int64_t* order;
  const T* src;
  const float* w;  // or null
  int64_t d, rows_per_chunk, out_rows;
  static void run(const void* ctx, int64_t c) {
    const IndexAddRows& s = *static_cast<const IndexAddRows*>(ctx);
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < s.d) buf.resize(s.d);
    float* acc = buf.data();
    const Range rg(c, s.rows_per_chunk, s.out_rows);
    const int64_t t0 = rg.lo, t1 = rg.hi;
    constexpr int64_t kAhead = 2;  // output rows ahead whose source rows are prefetched (random rows: no
                                   // hardware prefetcher follows them)
    for (int64_t t = t0; t < t1; ++t) {
      if (t + kAhead < t1)
        for (int64_t q = s.first[t + kAhead]; q < s.first[t + kAhead + 1]; ++q) {
          const char* x = reinterpret_cast<const char*>(s.src + s.order[q] * s.d);
          for (int64_t b = 0; b < s.d * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(x + b, 0, 3);
        }
      if (s.first[t] == s.first[t + 1]) continue;
      T* o = s.out + t * s.d;
#pragma omp simd
      for (int64_t j = 0; j < s.d; ++j) acc[j] = ld(o, j);
      for (int64_t q = s.first[t]; q < s.first[t + 1]; ++q) {
        const int64_t r = s.order[q];
        const T* x = s.src + r * s.d;
        if (s.w) {
          const float w = s.w[r];
#pragma omp simd
          for (int64_t j = 0; j < s.d; ++j) acc[j] += rounded<T>(ld(x, j) * w);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < s.d; ++j) acc[j] += ld(x, j);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < s.d; ++j) st(o, j, acc[j]);
    }
  }
};

int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

int64_t rows_per_chunk(int64_t d) {
  const int64_t r = kChunk / (d > 0 ? d : 1);
  return r > 0 ? r : 1;
}

template <typename Job>
void launch(const Job& job, int64_t chunks, int threads) {
  if (chunks <= 0) return;
  bgl::Helpers::run(threads - 1, chunks, &Job::run, &job);
}

}  // namespace

extern "C" {

void* bgl_elementwise_helpers_pool() { return bgl::Helpers::handle(); }
void bgl_elementwise_adopt_helpers(void* pool) { bgl::Helpers::adopt(pool); }

// dtype: 0 fp32, 1 bf16 (every tensor of a call but w and row_dot's out, which are fp32). Contiguous tensors; an
// output may be one of the inputs (element i is read before it is written), never overlap one partially.
void bgl_silu_mul(const void* g, const void* u, void* a, int64_t n, int dtype, int threads) {
  if (dtype) launch(SiluMul<uint16_t>{static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u), static_cast<uint16_t*>(a), n}, chunks_of(n), threads);
  else launch(SiluMul<float>{static_cast<const float*>(g), static_cast<const float*>(u), static_cast<float*>(a), n}, chunks_of(n), threads);
}

// The same over `rows` rows of d elements; row r of g, u and a starts r * ldg, r * ldu, r * lda elements in.
void bgl_silu_mul_rows(const void* g, const void* u, void* a, int64_t rows, int64_t d, int64_t ldg, int64_t ldu,
                       int64_t lda, int dtype, int threads) {
  const int64_t rpc = rows_per_chunk(d), chunks = (rows + rpc - 1) / rpc;
  if (dtype)
    launch(SiluMulRows<uint16_t>{static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u),
                                 static_cast<uint16_t*>(a), rows, d, ldg, ldu, lda, rpc}, chunks, threads);
  else
    launch(SiluMulRows<float>{static_cast<const float*>(g), static_cast<const float*>(u), static_cast<float*>(a),
                              rows, d, ldg, ldu, lda, rpc}, chunks, threads);
}

void bgl_silu_mul_backward(const void* da, const void* g, const void* u, void* du, void* dg, int64_t n, int dtype,
                         int threads) {
  if (dtype)
    launch(SiluMulBackward<uint16_t>{static_cast<const uint16_t*>(da), static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u),
                                     static_cast<uint16_t*>(du), static_cast<uint16_t*>(dg), n}, chunks_of(n), threads);
  else
    launch(SiluMulBackward<float>{static_cast<const float*>(da), static_cast<const float*>(g), static_cast<const float*>(u),
                                  static_cast<float*>(du), static_cast<float*>(dg), n}, chunks_of(n), threads);
}

void bgl_scale_rows(const void* x, const float* w, void* out, int64_t rows, int64_t d, int dtype, int threads) {
  const int64_t rpc = rows_per_chunk(d), chunks = (rows + rpc - 1) / rpc;
  if (dtype) launch(ScaleRows<uint16_t>{static_cast<const uint16_t*>(x), w, static_cast<uint16_t*>(out), rows, d, rpc}, chunks, threads);
  else launch(ScaleRows<float>{static_cast<const float*>(x), w, static_cast<float*>(out), rows, d, rpc}, chunks, threads);
}

// Returns 0, or -1 (nothing written) when an index is outside [0, out_rows).
int bgl_index_add_rows(void* out, int64_t out_rows, const int64_t* idx, const void* src, const float* w, int64_t n,
                       int64_t d, int dtype, int threads) {
  for (int64_t r = 0; r < n; ++r)
    if (idx[r] < 0 || idx[r] >= out_rows) return -1;
  if (n <= 0 || d <= 0) return 0;
  // the rows adding into each output row, in ascending order (a counting sort)
  std::vector<int64_t> first(out_rows + 1, 0), order(n);
  for (int64_t r = 0; r < n; ++r) ++first[idx[r] + 1];
  for (int64_t t = 0; t < out_rows; ++t) first[t + 1] += first[t];
  {
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < n; ++r) order[fill[idx[r]]++] = r;
  }
  const int64_t rpc = rows_per_chunk(d * 4), chunks = (out_rows + rpc - 1) / rpc;
  if (dtype)
    launch(IndexAddRows<uint16_t>{static_cast<uint16_t*>(out), first.data(), order.data(), static_cast<const uint16_t*>(src), w, d, rpc, out_rows}, chunks, threads);
  else
    launch(IndexAddRows<float>{static_cast<float*>(out), first.data(), order.data(), static_cast<const float*>(src), w, d, rpc, out_rows}, chunks, threads);
  return 0;
}

void bgl_row_dot(const void* a, const void* b, float* out, int64_t rows, int64_t d, int dtype, int threads) {
  const int64_t rpc = rows_per_chunk(d), chunks = (rows + rpc - 1) / rpc;
  if (dtype) launch(RowDot<uint16_t>{static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), out, rows, d, rpc}, chunks, threads);
  else launch(RowDot<float>{static_cast<const float*>(a), static_cast<const float*>(b), out, rows, d, rpc}, chunks, threads);
}
}
