// A stack of pre-norm decoder layers (GQA attention over a paged KV cache; a SwiGLU MLP or a routed MoE
// block) for one micro-batch of T tokens, in one call from Python.
//
// Why: a batch-1 decode step of a ~110M Llama makes ~25 Python-level calls per layer (norms, projections,
// views, rope, KV write, attention, residual adds, activation), ~0.8 ms of interpreter and dispatch per
// layer on a 2-core box — a third of the token's time, while the GEMVs that should bound it stream the
// weights in the rest. Here the layer loop runs in C and calls the same kernels the Python path calls
// (linear_cpu, decode_ops_cpu, paged_attention_cpu), through function pointers that ops/decoder_layers_cpu.py
// takes from those libraries: one implementation of each kernel, each built with its own flags.
//
// Per layer, with x [T, D] updated in place:
//   h = rms_norm(x, ln1); qkv = h @ Wqkv^T (+b); q, k = rope(q, k); write_kv(k, v); o = attention(q)
//   x += o @ Wo^T (+b); h = rms_norm(x, ln2); g, u = h @ Wgu^T (+b); x += (silu(g) * u) @ Wd^T (+b)
// An MoE layer replaces the MLP line by (ops/decoder_layers.py states it in torch):
//   logits = h @ Wr^T; per token its K experts (softmax_topk: top-k of softmax(logits), optionally
//   renormalised; topk_softmax: softmax of the top-k logits); then per expert e in ascending order, on the
//   rows routed to it: y = ((silu(r @ Wg[e]^T) * (r @ Wu[e]^T)) @ Wd[e]^T) * w, summed per token in that
//   order; plus an optional shared SwiGLU MLP, optionally scaled by sigmoid(h @ wsg).
// The products and sums round as in the Python path; the SwiGLU activation is the platform's silu_mul
// kernel (elementwise_cpu.cpp), the one the Python path calls.
//
// bgl_decoder_layer_halves runs the same two halves of a layer (pre_attention, post_attention) around
// attention computed elsewhere: FastDecode's R-workers, which own the KV cache. One call per layer boundary
// of a micro-batch: post(l) then pre(l + 1).

#include <cmath>
#include <cstdint>
#include <vector>

#include "gemm_problem.h"

extern "C" {

typedef void (*bgl_linear_fn)(const float*, int64_t, const void*, int, const float*, float*, int64_t, int64_t,
                              int64_t, int64_t, int, int64_t, int64_t);
typedef void (*bgl_linear_group_fn)(const BglGemm*, int64_t, int, int, int64_t, int64_t);
typedef void (*bgl_silu_mul_fn)(const void*, const void*, void*, int64_t, int, int);
typedef void (*bgl_rms_norm_fn)(const float*, int64_t, const float*, float*, int64_t, int64_t, float);
typedef void (*bgl_rope_fn)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*, int64_t,
                            int64_t, int64_t, float*, float*);
typedef int (*bgl_write_kv_fn)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, void*, void*, int,
                               const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*);
typedef int (*bgl_attention_fn)(const void*, const void*, const void*, void*, int, int, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*,
                                const int32_t*, const int32_t*, float, int64_t, int, int64_t*);

// Mirrored by ctypes Structures in ops/decoder_layers_cpu.py: keep the field order and types in step.
struct BglKernels {
  bgl_linear_fn linear;
  bgl_linear_group_fn linear_group;
  bgl_rms_norm_fn rms_norm;
  bgl_rope_fn rope;
  bgl_write_kv_fn write_kv;
  bgl_attention_fn attention;
  bgl_silu_mul_fn silu_mul;  // a = silu(g) * u over n contiguous elements (dtype 0: fp32), on `threads`
};

struct BglMoE {
  const void* router_w;  // [E, D]
  const void* gate_w;    // [E, F, D]
  const void* up_w;      // [E, F, D]
  const void* down_w;    // [E, D, F]
  const void* shared_gu_w;    // [2 Fs, D] or null
  const void* shared_down_w;  // [D, Fs]
  const void* shared_gate_w;  // [1, D] or null
  int64_t E, K, F, Fs;
  int64_t router;  // 0 softmax_topk, 1 topk_softmax
  int64_t norm_topk;
  int64_t gate_dtype;  // of router_w and shared_gate_w (0 fp32, 1 bf16); the experts' is the layer's w_dtype
  // Where the layer's w_dtype is a packed code (3 bf16, 4 fp32: the layer array for large steps), the experts
  // also exist packed, and every routed expert multiplies by gate_wp/up_wp/down_wp (same per-expert strides:
  // F and D are multiples of 16). Measured on a Zen 5 (small Mixtral, 2 threads, decode steps): at 32
  // sequences bf16 9.97 -> 9.65 ms and fp32 18.7 -> 17.4 against packing only experts of >= 8 rows, the rest
  // on the row tiles in a second pair of grouped calls. The shared experts' pointers are then packed ones.
  // Null gate_wp: no packed experts.
  const void* gate_wp;
  const void* up_wp;
  const void* down_wp;
};

struct BglLayerWeights {
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
  const BglMoE* moe;  // null: the MLP (gu_w, down_w)
  int64_t w_dtype;  // 0 fp32, 1 bf16 (every projection of the layer)
  int64_t window;   // 0: full attention
};

struct BglDims {
  int64_t D, H, G, Dh, F, Dr;  // model dim, heads, KV heads, head dim, MLP width (MLP layers), rotated features
  int64_t N, Bs, kv_bf16;      // cache blocks, block size, cache dtype
  int64_t threads, min_work, chunk_work;
  double eps, scale;
};

struct BglStep {
  int64_t T, S, M;  // tokens, sequences, block-table columns
  const float* cos;  // [T, Dr]
  const float* sin;
  const int64_t* slots;        // [T]
  const int32_t* block_tables;  // [S, M]
  const int32_t* context_lens;  // [S]
  const int32_t* qsl;           // [S + 1]
};

// Scratch, contiguous fp32: h [T, D], qkv [T, (H + 2G) Dh], q [T, H, Dh], k [T, G, Dh], o [T, H, Dh],
// y [T, D], gu [T, 2W], a [T, W], logits [T, E], rows [T, K D], z [T, K D], route_w [T, K], route_e [T, K]
// (int64), where W = max(MLP width, K x expert width, shared width) over the layers.
struct BglScratch {
  float *h, *qkv, *q, *k, *o, *y, *gu, *a;
  float *logits, *rows, *z, *route_w;
  int64_t* route_e;
};

namespace {

// The K experts of one token from its logits l[E], in the router's order, with their fp32 weights.
void route(const float* l, int64_t E, int64_t K, int64_t kind, int64_t norm, int64_t* e_out, float* w_out) {
  // top-k of the logits, descending, ties to the lower index (softmax is monotonic, so the same experts
  // as top-k of the probabilities)
  for (int64_t j = 0; j < K; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= e_out[i] == e;
      if (!taken && (best < 0 || l[e] > l[best])) best = e;
    }
    e_out[j] = best;
  }
  if (kind == 0) {  // softmax over all E, take the chosen, optionally renormalise
    float mx = l[0];
    for (int64_t e = 1; e < E; ++e) mx = l[e] > mx ? l[e] : mx;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
    float ks = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      w_out[j] = std::exp(l[e_out[j]] - mx) / sum;
      ks += w_out[j];
    }
    if (norm)
      for (int64_t j = 0; j < K; ++j) w_out[j] = w_out[j] / ks;
  } else {  // softmax over the K chosen logits (the first is their maximum)
    const float mx = l[e_out[0]];
    float sum = 0.0f;
    for (int64_t j = 0; j < K; ++j) sum += (w_out[j] = std::exp(l[e_out[j]] - mx));
    for (int64_t j = 0; j < K; ++j) w_out[j] = w_out[j] / sum;
  }
}

// y[T, D] = the MoE block of h[T, D] (see the header comment). The R = T K routes are laid out expert by
// expert (ascending id, tokens in order within one): rows [R, D] the routed inputs, gu [R, 2F] their gate
// then up projections, a [R, F], z [R, D]. Every expert's gate and up projections are one linear_group
// call, their down projections another: the helper threads spread all experts' weights over the cores.
void moe_block(const BglKernels* kn, const BglMoE& m, int wd, int64_t esz, const BglDims* d, int64_t T,
               const BglScratch* sc, float* y) {
  const int64_t D = d->D, E = m.E, K = m.K, F = m.F, R = T * K;
  const int th = (int)d->threads;
  kn->linear(sc->h, D, m.router_w, (int)m.gate_dtype, nullptr, sc->logits, E, T, E, D, th, d->min_work,
             d->chunk_work);
  for (int64_t t = 0; t < T; ++t)
    route(sc->logits + t * E, E, K, m.router, m.norm_topk, sc->route_e + t * K, sc->route_w + t * K);
  std::vector<int64_t> start(E + 1, 0);  // routes of expert e: [start[e], start[e + 1])
  for (int64_t r = 0; r < R; ++r) ++start[sc->route_e[r] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> at(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = at[sc->route_e[t * K + j]]++;
      for (int64_t c = 0; c < D; ++c) sc->rows[r * D + c] = sc->h[t * D + c];
    }
  float* g = sc->gu;          // [R, F]
  float* u = sc->gu + R * F;  // [R, F]
  // the routed experts' projections, packed where the layer is (the packed copies hold the same element type)
  const bool packed = m.gate_wp != nullptr;
  const char* gw = static_cast<const char*>(packed ? m.gate_wp : m.gate_w);
  const char* uw = static_cast<const char*>(packed ? m.up_wp : m.up_w);
  const char* dw = static_cast<const char*>(packed ? m.down_wp : m.down_w);
  std::vector<BglGemm> up, down;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = start[e], n = start[e + 1] - r0;
    if (!n) continue;
    up.push_back({sc->rows + r0 * D, D, gw + e * F * D * esz, nullptr, g + r0 * F, F, n, F, D});
    up.push_back({sc->rows + r0 * D, D, uw + e * F * D * esz, nullptr, u + r0 * F, F, n, F, D});
    down.push_back({sc->a + r0 * F, F, dw + e * D * F * esz, nullptr, sc->z + r0 * D, D, n, D, F});
  }
  kn->linear_group(up.data(), (int64_t)up.size(), wd, th, d->min_work, d->chunk_work);
  kn->silu_mul(g, u, sc->a, R * F, 0, th);
  kn->linear_group(down.data(), (int64_t)down.size(), wd, th, d->min_work, d->chunk_work);
  for (int64_t i = 0; i < T * D; ++i) y[i] = 0.0f;
  for (int64_t e = 0; e < E; ++e) at[e] = start[e];
  for (int64_t e = 0; e < E; ++e)  // y[t] += z[r] * w: experts in ascending order, as the Python path sums
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j)
        if (sc->route_e[t * K + j] == e) {
          const int64_t r = at[e]++;
          const float w = sc->route_w[t * K + j];
          for (int64_t c = 0; c < D; ++c) y[t * D + c] = y[t * D + c] + sc->z[r * D + c] * w;
        }
  if (m.shared_gu_w) {
    const int64_t Fs = m.Fs;
    kn->linear(sc->h, D, m.shared_gu_w, wd, nullptr, sc->gu, 2 * Fs, T, 2 * Fs, D, th, d->min_work, d->chunk_work);
    for (int64_t t = 0; t < T; ++t)
      kn->silu_mul(sc->gu + t * 2 * Fs, sc->gu + t * 2 * Fs + Fs, sc->a + t * Fs, Fs, 0, 1);
    kn->linear(sc->a, Fs, m.shared_down_w, wd, nullptr, sc->z, D, T, D, Fs, th, d->min_work, d->chunk_work);
    if (m.shared_gate_w) {
      kn->linear(sc->h, D, m.shared_gate_w, (int)m.gate_dtype, nullptr, sc->logits, 1, T, 1, D, th, d->min_work,
                 d->chunk_work);
      for (int64_t t = 0; t < T; ++t) {
        const float s = 1.0f / (1.0f + std::exp(-sc->logits[t]));
        for (int64_t c = 0; c < D; ++c) sc->z[t * D + c] = s * sc->z[t * D + c];
      }
    }
    for (int64_t i = 0; i < T * D; ++i) y[i] = y[i] + sc->z[i];
  }
}

// The pre-attention half of layer ly: h = rms_norm(x); qkv = h @ Wqkv^T (+b); q, k = rope(q, k) into q_out
// [T, H, Dh] and k_out [T, G, Dh] (v stays in sc->qkv, columns (H + G) Dh.., row stride Q).
void pre_attention(const BglKernels* kn, const BglLayerWeights& ly, const BglDims* d, const BglStep* st,
                   const BglScratch* sc, const float* x, float* q_out, float* k_out) {
  const int64_t T = st->T, D = d->D, H = d->H, G = d->G, Dh = d->Dh, Q = (H + 2 * G) * Dh;
  kn->rms_norm(x, D, ly.ln1, sc->h, T, D, (float)d->eps);
  kn->linear(sc->h, D, ly.qkv_w, (int)ly.w_dtype, ly.qkv_b, sc->qkv, Q, T, Q, D, (int)d->threads, d->min_work,
             d->chunk_work);
  // q [T, H, 1, Dh] and k [T, G, 1, Dh] as strided views of qkv; cos/sin [T, 1, Dr]
  kn->rope(sc->qkv, H, Q, Dh, Dh, sc->qkv + H * Dh, G, Q, Dh, Dh, T, 1, Dh, st->cos, st->sin, d->Dr, d->Dr, d->Dr,
           q_out, k_out);
}

// The post-attention half of layer ly, on the attention's output o [T, H Dh]: x += o @ Wo^T (+b);
// h = rms_norm(x); x += the MLP or MoE block of h.
void post_attention(const BglKernels* kn, const BglLayerWeights& ly, const BglDims* d, const BglStep* st,
                    const BglScratch* sc, const float* o, float* x) {
  const int64_t T = st->T, D = d->D, HD = d->H * d->Dh, F = d->F;
  const int th = (int)d->threads, wd = (int)ly.w_dtype;
  kn->linear(o, HD, ly.o_w, wd, ly.o_b, sc->y, D, T, D, HD, th, d->min_work, d->chunk_work);
  for (int64_t i = 0; i < T * D; ++i) x[i] = x[i] + sc->y[i];
  kn->rms_norm(x, D, ly.ln2, sc->h, T, D, (float)d->eps);
  if (ly.moe) {
    moe_block(kn, *ly.moe, wd, wd == 0 || wd == 4 ? 4 : 2, d, T, sc, sc->y);  // codes 0, 4: fp32 elements
  } else {
    kn->linear(sc->h, D, ly.gu_w, wd, ly.gu_b, sc->gu, 2 * F, T, 2 * F, D, th, d->min_work, d->chunk_work);
    for (int64_t t = 0; t < T; ++t) kn->silu_mul(sc->gu + t * 2 * F, sc->gu + t * 2 * F + F, sc->a + t * F, F, 0, 1);
    kn->linear(sc->a, F, ly.down_w, wd, ly.down_b, sc->y, D, T, D, F, th, d->min_work, d->chunk_work);
  }
  for (int64_t i = 0; i < T * D; ++i) x[i] = x[i] + sc->y[i];
}

}  // namespace

// Returns 0; or, with nothing of that layer's attention computed: 1 when a slot lies outside the cache
// (err = min, max slot), 10 + c when the attention kernel's index check fails with code c (err as it
// reports). err[3] is the layer.
int bgl_decoder_layers(const BglKernels* kn, const BglLayerWeights* layers, int64_t L, const BglDims* d,
                     const BglStep* st, const BglScratch* sc, float* x, int64_t* err) {
  const int64_t T = st->T, H = d->H, G = d->G, Dh = d->Dh;
  const int64_t Q = (H + 2 * G) * Dh;
  for (int64_t l = 0; l < L; ++l) {
    const BglLayerWeights& ly = layers[l];
    err[3] = l;
    pre_attention(kn, ly, d, st, sc, x, sc->q, sc->k);
    if (kn->write_kv(sc->k, G * Dh, Dh, sc->qkv + (H + G) * Dh, Q, Dh, ly.k_cache, ly.v_cache, (int)d->kv_bf16,
                     st->slots, T, G, Dh, d->N, d->Bs, err))
      return 1;
    if (const int c = kn->attention(sc->q, ly.k_cache, ly.v_cache, sc->o, 0, (int)d->kv_bf16, H * Dh, H * Dh, T,
                                    st->S, H, G, Dh, d->N, d->Bs, st->M, st->block_tables, st->context_lens,
                                    st->qsl, (float)d->scale, ly.window, (int)d->threads, err))
      return 10 + c;
    post_attention(kn, ly, d, st, sc, sc->o, x);
  }
  return 0;
}

// The S-part around attention computed elsewhere (FastDecode's R-workers), for one micro-batch: the
// post-attention half of layer `post` on o [T, H Dh] (x updated in place), then the pre-attention half of
// layer `pre` into q [T, H, Dh], k and v [T, G, Dh]. A negative index skips that half. Only st->T, cos and
// sin of the step are read.
void bgl_decoder_layer_halves(const BglKernels* kn, const BglLayerWeights* layers, const BglDims* d,
                              const BglStep* st, const BglScratch* sc, float* x, int64_t post, const float* o,
                              int64_t pre, float* q, float* k, float* v) {
  if (post >= 0) post_attention(kn, layers[post], d, st, sc, o, x);
  if (pre < 0) return;
  pre_attention(kn, layers[pre], d, st, sc, x, q, k);
  const int64_t T = st->T, H = d->H, G = d->G, Dh = d->Dh, Q = (H + 2 * G) * Dh;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < G * Dh; ++c) v[t * G * Dh + c] = sc->qkv[t * Q + (H + G) * Dh + c];
}

}  // extern "C"
