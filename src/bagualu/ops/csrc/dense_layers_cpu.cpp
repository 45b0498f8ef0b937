// A stack of dense pre-norm decoder layers (GQA attention over a paged KV cache, SwiGLU MLP) for one
// micro-batch of T tokens, in one call from Python.
//
// Why: a batch-1 decode step of a ~110M Llama makes ~25 Python-level calls per layer (norms, projections,
// views, rope, KV write, attention, residual adds, activation), ~0.8 ms of interpreter and dispatch per
// layer on a 2-core box — a third of the token's time, while the GEMVs that should bound it stream the
// weights in the rest. Here the layer loop runs in C and calls the same kernels the Python path calls
// (linear_cpu, decode_ops_cpu, paged_attention_cpu), through function pointers that ops/dense_layers_cpu.py
// takes from those libraries: one implementation of each kernel, each built with its own flags.
//
// Per layer, with x [T, D] updated in place:
//   h = rms_norm(x, ln1); qkv = h @ Wqkv^T (+b); q, k = rope(q, k); write_kv(k, v); o = attention(q)
//   x += o @ Wo^T (+b); h = rms_norm(x, ln2); g, u = h @ Wgu^T (+b); x += (silu(g) * u) @ Wd^T (+b)
// The products and sums round as in the Python path; silu(g) = g / (1 + exp(-g)) as ATen's CPU kernel
// (with libm's exp instead of Sleef's: results may differ in the last bit).

#include <cmath>
#include <cstdint>

extern "C" {

typedef void (*bgl_linear_fn)(const float*, int64_t, const void*, int, const float*, float*, int64_t, int64_t,
                              int64_t, int64_t, int, int64_t, int64_t);
typedef void (*bgl_rms_norm_fn)(const float*, int64_t, const float*, float*, int64_t, int64_t, float);
typedef void (*bgl_rope_fn)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*, int64_t,
                            int64_t, int64_t, float*, float*);
typedef int (*bgl_write_kv_fn)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, void*, void*, int,
                               const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*);
typedef int (*bgl_attention_fn)(const void*, const void*, const void*, void*, int, int, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*,
                                const int32_t*, const int32_t*, float, int64_t, int, int64_t*);

// Mirrored by ctypes Structures in ops/dense_layers_cpu.py: keep the field order and types in step.
struct BglKernels {
  bgl_linear_fn linear;
  bgl_rms_norm_fn rms_norm;
  bgl_rope_fn rope;
  bgl_write_kv_fn write_kv;
  bgl_attention_fn attention;
};

struct BglDenseLayer {
  const float* ln1;
  const void* qkv_w;
  const float* qkv_b;
  const void* o_w;
  const float* o_b;
  const float* ln2;
  const void* gu_w;
  const float* gu_b;
  const void* down_w;
  const float* down_b;
  void* k_cache;
  void* v_cache;
  int64_t w_dtype;  // 0 fp32, 1 bf16 (all four projections)
  int64_t window;   // 0: full attention
};

struct BglDenseDims {
  int64_t D, H, G, Dh, F, Dr;  // model dim, heads, KV heads, head dim, MLP width, rotated features
  int64_t N, Bs, kv_bf16;      // cache blocks, block size, cache dtype
  int64_t threads, min_work, chunk_work;
  double eps, scale;
};

struct BglDenseStep {
  int64_t T, S, M;  // tokens, sequences, block-table columns
  const float* cos;  // [T, Dr]
  const float* sin;
  const int64_t* slots;        // [T]
  const int32_t* block_tables;  // [S, M]
  const int32_t* context_lens;  // [S]
  const int32_t* qsl;           // [S + 1]
};

// Scratch, contiguous fp32: h [T, D], qkv [T, (H + 2G) Dh], q [T, H, Dh], k [T, G, Dh], o [T, H, Dh],
// y [T, D], gu [T, 2F], a [T, F].
struct BglDenseScratch {
  float *h, *qkv, *q, *k, *o, *y, *gu, *a;
};

// Returns 0; or, with nothing of that layer's attention computed: 1 when a slot lies outside the cache
// (err = min, max slot), 10 + c when the attention kernel's index check fails with code c (err as it
// reports). err[3] is the layer.
int bgl_dense_layers(const BglKernels* kn, const BglDenseLayer* layers, int64_t L, const BglDenseDims* d,
                     const BglDenseStep* st, const BglDenseScratch* sc, float* x, int64_t* err) {
  const int64_t T = st->T, D = d->D, H = d->H, G = d->G, Dh = d->Dh, F = d->F;
  const int64_t Q = (H + 2 * G) * Dh;
  const int th = (int)d->threads;
  for (int64_t l = 0; l < L; ++l) {
    const BglDenseLayer& ly = layers[l];
    const int wd = (int)ly.w_dtype;
    err[3] = l;
    kn->rms_norm(x, D, ly.ln1, sc->h, T, D, (float)d->eps);
    kn->linear(sc->h, D, ly.qkv_w, wd, ly.qkv_b, sc->qkv, Q, T, Q, D, th, d->min_work, d->chunk_work);
    // q [T, H, 1, Dh] and k [T, G, 1, Dh] as strided views of qkv; cos/sin [T, 1, Dr]
    kn->rope(sc->qkv, H, Q, Dh, Dh, sc->qkv + H * Dh, G, Q, Dh, Dh, T, 1, Dh, st->cos, st->sin, d->Dr, d->Dr,
             d->Dr, sc->q, sc->k);
    if (kn->write_kv(sc->k, G * Dh, Dh, sc->qkv + (H + G) * Dh, Q, Dh, ly.k_cache, ly.v_cache, (int)d->kv_bf16,
                     st->slots, T, G, Dh, d->N, d->Bs, err))
      return 1;
    if (const int c = kn->attention(sc->q, ly.k_cache, ly.v_cache, sc->o, 0, (int)d->kv_bf16, H * Dh, H * Dh, T,
                                    st->S, H, G, Dh, d->N, d->Bs, st->M, st->block_tables, st->context_lens,
                                    st->qsl, (float)d->scale, ly.window, th, err))
      return 10 + c;
    kn->linear(sc->o, H * Dh, ly.o_w, wd, ly.o_b, sc->y, D, T, D, H * Dh, th, d->min_work, d->chunk_work);
    for (int64_t i = 0; i < T * D; ++i) x[i] = x[i] + sc->y[i];
    kn->rms_norm(x, D, ly.ln2, sc->h, T, D, (float)d->eps);
    kn->linear(sc->h, D, ly.gu_w, wd, ly.gu_b, sc->gu, 2 * F, T, 2 * F, D, th, d->min_work, d->chunk_work);
    for (int64_t t = 0; t < T; ++t) {
      const float* g = sc->gu + t * 2 * F;
      const float* u = g + F;
      float* a = sc->a + t * F;
      for (int64_t f = 0; f < F; ++f) a[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
    }
    kn->linear(sc->a, F, ly.down_w, wd, ly.down_b, sc->y, D, T, D, F, th, d->min_work, d->chunk_work);
    for (int64_t i = 0; i < T * D; ++i) x[i] = x[i] + sc->y[i];
  }
  return 0;
}

}  // extern "C"
