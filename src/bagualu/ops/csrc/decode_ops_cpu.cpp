// The small per-layer operators of a decode step, one pass each: RMSNorm, rotary embedding, KV-cache write;
// and the greedy pick over the vocabulary (argmax per row).
//
// Why: at batch 1 each of them is a chain of 5-15 tiny torch ops (RMSNorm: float, pow, mean, add, rsqrt,
// mul, to, mul; rope: per tensor two muls, chunk, neg, cat, add; write_kv: min, max, div, mod, two index_puts),
// ~5 us of dispatch each while the data is a few KiB: 1-2 ms of a Llama-110M token. Here each is one call.
//
// Numerics follow ops/reference.py: rope computes x*cos + rot(x)*sin with separately rounded products
// (built with -ffp-contract=off, so no FMA contraction): bit-identical to the reference in fp32. RMSNorm
// sums squares in a different order than torch's mean (last-bit differences), then h = x * (1/sqrt(var +
// eps)) and w * h as the reference. KV written to a bf16 cache rounds to nearest even, as Tensor.to.
// fp32 activations (with fp32 or bf16 KV caches) come here, and bf16 ones to the bf16 forms below;
// ops/decode_ops_cpu.py sends the rest to the reference.
//
// Large steps of a bf16 model (a prefill chunk runs its layers in bf16 around the half GEMMs) take the bf16
// forms: RMSNorm and rope rounding to bf16 wherever the reference's bf16 torch ops round (RMSNorm: the
// normalised row, then the weight product; rope: each product, then the sum), and the KV write copying bf16
// rows into a bf16 cache. Those split their rows among the caller and the helper threads (helpers.h, the
// linear kernel's pool adopted), each replacing 5-8 torch passes: a ~110M Llama's 32 x 128-token bf16 prefill
// took ~1.08 s with the torch passes and ~0.99 s with these (2 threads, Zen 5).

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "helpers.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define BGL_ARGMAX_SIMD 1
#else
#define BGL_ARGMAX_SIMD 0
#endif

namespace {

using bgl::bf16_to_f32;
using bgl::f32_to_bf16;

// v rounded to bf16 and widened back (as a bf16 torch op's result feeds the next op)
inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

constexpr int64_t kWork = 16384;  // elements per chunk of the threaded bf16 passes

int64_t chunks_for(int64_t rows, int64_t per_row, int64_t* rows_per_chunk) {
  int64_t r = kWork / (per_row > 0 ? per_row : 1);
  r = r > 0 ? r : 1;
  *rows_per_chunk = r;
  return (rows + r - 1) / r;
}

struct RmsBf16 {
  const uint16_t* x;
  int64_t ldx;
  const uint16_t* w;
  uint16_t* y;
  int64_t M, D, per;
  float eps;
  static void run(const void* ctx, int64_t c) {
    const RmsBf16& j = *static_cast<const RmsBf16*>(ctx);
    const int64_t m1 = (c + 1) * j.per < j.M ? (c + 1) * j.per : j.M;
    for (int64_t m = c * j.per; m < m1; ++m) {
      const uint16_t* xr = j.x + m * j.ldx;
      uint16_t* yr = j.y + m * j.D;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < j.D; ++d) {
        const float h = bf16_to_f32(xr[d]);
        ss += h * h;
      }
      const float r = 1.0f / std::sqrt(ss / float(j.D) + j.eps);
#pragma omp simd
      for (int64_t d = 0; d < j.D; ++d)
        yr[d] = f32_to_bf16(bf16_to_f32(j.w[d]) * round_bf16(bf16_to_f32(xr[d]) * r));
    }
  }
};

// rope over one tensor [B, H, S, Dh] (strides sb, sh, ss; unit last) in bf16: a chunk is a run of the
// flattened (b, h, s) rows
struct RopeBf16 {
  const uint16_t* x;
  int64_t H, S, Dh, sb, sh, ss;
  const uint16_t* cos;
  const uint16_t* sin;
  int64_t cb, cs, Dr;
  uint16_t* out;
  int64_t rows, per;
  static void run(const void* ctx, int64_t c) {
    const RopeBf16& j = *static_cast<const RopeBf16*>(ctx);
    const int64_t half = j.Dr / 2, r1 = (c + 1) * j.per < j.rows ? (c + 1) * j.per : j.rows;
    for (int64_t r = c * j.per; r < r1; ++r) {
      const int64_t s = r % j.S, h = (r / j.S) % j.H, b = r / (j.S * j.H);
      const uint16_t* xr = j.x + b * j.sb + h * j.sh + s * j.ss;
      const uint16_t* cr = j.cos + b * j.cb + s * j.cs;
      const uint16_t* sr = j.sin + b * j.cb + s * j.cs;
      uint16_t* o = j.out + r * j.Dh;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i)
        o[i] = f32_to_bf16(round_bf16(bf16_to_f32(xr[i]) * bf16_to_f32(cr[i])) +
                           round_bf16(-bf16_to_f32(xr[i + half]) * bf16_to_f32(sr[i])));
#pragma omp simd
      for (int64_t i = half; i < j.Dr; ++i)
        o[i] = f32_to_bf16(round_bf16(bf16_to_f32(xr[i]) * bf16_to_f32(cr[i])) +
                           round_bf16(bf16_to_f32(xr[i - half]) * bf16_to_f32(sr[i])));
      for (int64_t i = j.Dr; i < j.Dh; ++i) o[i] = xr[i];
    }
  }
};

// Whether a slot of slots[0, T) lies outside [0, cap); then lo_hi = (min, max) of them.
bool slots_outside(const int64_t* slots, int64_t T, int64_t cap, int64_t* lo_hi) {
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int64_t t = 0; t < T; ++t) {
    lo = slots[t] < lo ? slots[t] : lo;
    hi = slots[t] > hi ? slots[t] : hi;
  }
  if (T && (lo < 0 || hi >= cap)) {
    lo_hi[0] = lo;
    lo_hi[1] = hi;
    return true;
  }
  return false;
}


// The index of the first maximum of x[0, n), n >= 1, as torch.argmax: a NaN counts as the maximum (the first
// NaN wins), -0.0 equals 0.0. Two passes over the row (a 32000-wide row is in cache after the first): the
// maximum and whether there is a NaN, then the first index holding it. On a Zen 5 core (single-threaded, as
// the engine runs small steps), 32000-wide fp32 rows, warm: 1 row 18.4 us with ATen's argmax, 5.8 us here
// (Python call included); 32 rows 553 us vs 52.
int64_t argmax_row(const float* x, int64_t n) {
  float m = x[0];
  bool nan = false;
  int64_t i = 0;
#if BGL_ARGMAX_SIMD
  __m512 mv = _mm512_set1_ps(x[0]);  // a NaN there is caught by the mask below
  __mmask16 un = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, v);
  }
  nan = un != 0;
  m = _mm512_reduce_max_ps(mv);
#endif
  for (int64_t j = i; j < n; ++j) {
    nan |= x[j] != x[j];
    m = x[j] > m ? x[j] : m;
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j)
      if (x[j] != x[j]) return j;
  }
  i = 0;
#if BGL_ARGMAX_SIMD
  const __m512 mb = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16)
    if (const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), mb, _CMP_EQ_OQ))
      return i + __builtin_ctz(eq);
#endif
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // unreachable: m is one of the values
}

}  // namespace

extern "C" {

// y[m, :] = w * (x[m, :] * (1 / sqrt(mean(x[m, :]^2) + eps))); x rows with stride ldx, y contiguous [M, D].
void bgl_rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* yr = y + m * D;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 lanes: vectorised, summed pairwise below
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int l = 0; l < 8; ++l) acc[l] += xr[d + l] * xr[d + l];
    float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; d < D; ++d) ss += xr[d] * xr[d];
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    for (d = 0; d < D; ++d) yr[d] = w[d] * (xr[d] * r);
  }
}

// Rotate-half rotary embedding of q [B, H, S, Dh] and k [B, G, S, Dh] (strides given, unit last dim) with
// cos/sin [B, S, Dr] (strides cb, cs; unit last; stride 0 broadcasts), into contiguous outputs; features
// from Dr on pass through.
static void rope_one(const float* x, int64_t B, int64_t H, int64_t S, int64_t Dh, int64_t sb, int64_t sh,
                     int64_t ss, const float* cos, const float* sin, int64_t cb, int64_t cs, int64_t Dr,
                     float* out) {
  const int64_t half = Dr / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const float* xr = x + b * sb + h * sh + s * ss;
        const float* c = cos + b * cb + s * cs;
        const float* sn = sin + b * cb + s * cs;
        float* o = out + ((b * H + h) * S + s) * Dh;
        for (int64_t i = 0; i < half; ++i) o[i] = xr[i] * c[i] + (-xr[i + half]) * sn[i];
        for (int64_t i = half; i < Dr; ++i) o[i] = xr[i] * c[i] + xr[i - half] * sn[i];
        for (int64_t i = Dr; i < Dh; ++i) o[i] = xr[i];
      }
}

void bgl_rope(const float* q, int64_t H, int64_t qb, int64_t qh, int64_t qs, const float* k, int64_t G, int64_t kb,
              int64_t kh, int64_t ks, int64_t B, int64_t S, int64_t Dh, const float* cos, const float* sin,
              int64_t cb, int64_t cs, int64_t Dr, float* q_out, float* k_out) {
  rope_one(q, B, H, S, Dh, qb, qh, qs, cos, sin, cb, cs, Dr, q_out);
  rope_one(k, B, G, S, Dh, kb, kh, ks, cos, sin, cb, cs, Dr, k_out);
}

// Token t's k/v [G, Dh] (strides: token kt/vt, head kg/vg; unit last) go to slot slots[t] of the caches
// [N, G, Bs, Dh] (contiguous, fp32 or bf16 per cache_bf16). Returns 0, or 1 with lo_hi = (min, max) of the
// slots when one lies outside [0, N*Bs) (then nothing is written).
int bgl_write_kv(const float* k, int64_t kt, int64_t kg, const float* v, int64_t vt, int64_t vg, void* k_cache,
                 void* v_cache, int cache_bf16, const int64_t* slots, int64_t T, int64_t G, int64_t Dh, int64_t N,
                 int64_t Bs, int64_t* lo_hi) {
  if (slots_outside(slots, T, N * Bs, lo_hi)) return 1;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t blk = slots[t] / Bs, off = slots[t] % Bs;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t dst = ((blk * G + g) * Bs + off) * Dh;
      const float* ks = k + t * kt + g * kg;
      const float* vs = v + t * vt + g * vg;
      if (cache_bf16) {
        uint16_t* kd = static_cast<uint16_t*>(k_cache) + dst;
        uint16_t* vd = static_cast<uint16_t*>(v_cache) + dst;
        for (int64_t d = 0; d < Dh; ++d) {
          kd[d] = f32_to_bf16(ks[d]);
          vd[d] = f32_to_bf16(vs[d]);
        }
      } else {
        std::memcpy(static_cast<float*>(k_cache) + dst, ks, Dh * sizeof(float));
        std::memcpy(static_cast<float*>(v_cache) + dst, vs, Dh * sizeof(float));
      }
    }
  }
  return 0;
}

// bgl_write_kv for bf16 k/v into bf16 caches: the rows copied as they are.
int bgl_write_kv_bf16(const uint16_t* k, int64_t kt, int64_t kg, const uint16_t* v, int64_t vt, int64_t vg,
                      uint16_t* k_cache, uint16_t* v_cache, const int64_t* slots, int64_t T, int64_t G, int64_t Dh,
                      int64_t N, int64_t Bs, int64_t* lo_hi) {
  if (slots_outside(slots, T, N * Bs, lo_hi)) return 1;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t blk = slots[t] / Bs, off = slots[t] % Bs;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t dst = ((blk * G + g) * Bs + off) * Dh;
      std::memcpy(k_cache + dst, k + t * kt + g * kg, Dh * sizeof(uint16_t));
      std::memcpy(v_cache + dst, v + t * vt + g * vg, Dh * sizeof(uint16_t));
    }
  }
  return 0;
}

void bgl_decode_adopt_helpers(void* pool) { bgl::Helpers::adopt(pool); }

// bf16 RMSNorm: y[m, :] = bf16(w * bf16(x[m, :] * (1 / sqrt(mean(x[m, :]^2) + eps)))), the mean in fp32;
// x rows with stride ldx, y contiguous [M, D]; rows split among `threads` threads.
void bgl_rms_norm_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, uint16_t* y, int64_t M, int64_t D,
                       float eps, int threads) {
  RmsBf16 job{x, ldx, w, y, M, D, 0, eps};
  const int64_t n = chunks_for(M, D, &job.per);
  bgl::Helpers::run(threads - 1, n, &RmsBf16::run, &job);
}

// bf16 rope of q [B, H, S, Dh] and k [B, G, S, Dh] with bf16 cos/sin (as bgl_rope's arguments), each product
// and the sum rounded to bf16 as the reference's bf16 ops round them.
void bgl_rope_bf16(const uint16_t* q, int64_t H, int64_t qb, int64_t qh, int64_t qs, const uint16_t* k, int64_t G,
                   int64_t kb, int64_t kh, int64_t ks, int64_t B, int64_t S, int64_t Dh, const uint16_t* cos,
                   const uint16_t* sin, int64_t cb, int64_t cs, int64_t Dr, uint16_t* q_out, uint16_t* k_out,
                   int threads) {
  RopeBf16 jq{q, H, S, Dh, qb, qh, qs, cos, sin, cb, cs, Dr, q_out, B * H * S, 0};
  bgl::Helpers::run(threads - 1, chunks_for(jq.rows, Dh, &jq.per), &RopeBf16::run, &jq);
  RopeBf16 jk{k, G, S, Dh, kb, kh, ks, cos, sin, cb, cs, Dr, k_out, B * G * S, 0};
  bgl::Helpers::run(threads - 1, chunks_for(jk.rows, Dh, &jk.per), &RopeBf16::run, &jk);
}

// 1 where argmax_row is vectorised (AVX-512 builds); elsewhere ops/decode_ops_cpu.py keeps ATen's.
int bgl_argmax_simd() { return BGL_ARGMAX_SIMD; }

// out[r] = argmax_row(x + r * ldx, n) for r < rows (fp32 rows, n >= 1).
void bgl_argmax_rows(const float* x, int64_t ldx, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * ldx, n);
}

}  // extern "C"
