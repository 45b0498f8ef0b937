// Prefill tiles of paged_attention_cpu.cpp (AVX-512; included there once, inside its anonymous namespace): the
// query rows of several tokens of one sequence in one KV group (tokens x the group's heads, e.g. 32 x 3 = 96
// rows) against 32 keys at a time, as two small GEMMs in registers.
//
// Why: a row item of the decode path holds one token's heads (<= 4 rows a register tile), so a prefill chunk
// of n tokens streams each key about n / 2 times and spends ~12 cycles per (row, key) on loads, widening and
// horizontal sums. Measured on a Zen 5 (12 heads over 4 KV heads of 64, fp32 and bf16 caches): 1.4-1.9x the
// row path on 1 and 2 threads, for prompts of 128 to 2048 tokens and chunks after a cached prefix
// (python benchmarks/prefill_attention.py). All arithmetic is fp32, as in the row path (the exp is the
// library's, ops/csrc/exp_f32.h); only the summation order differs.
//
// Three details carried the speed (each measured): 8 independent FMA chains in QK (4 had left it bound by
// the FMA latency); V and K^T vectors held in registers across their 4 uses (GCC had folded them into the
// FMAs as memory operands, reloading each 4 times: load-bound); buffers on cache-line boundaries.
//
// Per step of 32 keys (two 16-key tiles, each inside one block: B % 16 == 0):
//     Kt[d][j] = K[j0+j][d] (widened and transposed: 16 keys per register), Vf[j][d] = V[j0+j][d]
//       (widened; rows past the context are zeros: a zero probability times NaN would be NaN)
//     for each 4-row tile: s = q . Kt (q pre-scaled), mask each row to its keys [lo, hi), online softmax
//       (m; l kept as 16 lane partial sums), acc = acc * alpha + p . Vf
// Rows are token-major, so a 4-row tile holds one token's heads or two adjacent tokens'; a tile whose rows
// see none of the step's keys (the causal upper triangle, keys before a sliding window) is skipped.

constexpr int kKeys = 32;               // keys per step: two 16-key tiles
// A sequence with fewer query rows keeps the row items. Measured (in-process A/B of builds, 12 heads over 4
// KV heads of 64, bf16 cache, 16-64 sequences of 192-512 keys): 4 query rows 1.25-2.0x faster on the tiles,
// 5 and 6 1.3-1.5x; 2 rows 0.8-0.95x; 3 inside the noise.
constexpr int64_t kMinTileTokens = 4;
constexpr int64_t kTileRows = 96;       // about this many rows (tokens x heads of a group) per tile

// Query tokens per tile for HR heads per KV group: ~kTileRows rows (32 tokens for 3 heads, measured best
// of 8, 16 and 32 there), at least 4 tokens.
inline int64_t tile_tokens(int64_t HR) { return std::max<int64_t>(4, kTileRows / std::max<int64_t>(HR, 1)); }

// r[0..15] (rows) -> r[0..15] (columns): unpack ps, unpack pd, then two rounds of 128-bit lane shuffles.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  __m512 w[4][4];  // w[q][o], lane L: rows 4q..4q+3 of column 4L+o
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 1]), d = _mm512_castps_pd(t[4 * q + 3]);
    w[q][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    w[q][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    w[q][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    w[q][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int o = 0; o < 4; ++o) {  // column 4L+o gathers lane L of w[0..3][o]
    const __m512 x0 = _mm512_shuffle_f32x4(w[0][o], w[1][o], 0x44), x1 = _mm512_shuffle_f32x4(w[0][o], w[1][o], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(w[2][o], w[3][o], 0x44), x3 = _mm512_shuffle_f32x4(w[2][o], w[3][o], 0xEE);
    r[o] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    r[4 + o] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    r[8 + o] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    r[12 + o] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
}

// One 16-key tile into a step's buffers: Kt[d * kKeys + j] = K[j][d] and Vf[j * Dh + d] = V[j][d] for the 16 rows
// at K, V (Dh apart); V rows j >= nvalid become zeros (slots past the context may hold anything; a zero
// probability times NaN would be NaN). nvalid <= 0: no keys, both zeros.
template <typename T>
void widen_tile(const T* K, const T* V, int64_t Dh, int64_t nvalid, float* Kt, float* Vf) {
  for (int64_t d = 0; d < Dh; d += 16) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = nvalid > 0 ? Zmm::load(K + j * Dh + d) : _mm512_setzero_ps();
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(Kt + (d + j) * kKeys, r[j]);
  }
  for (int64_t j = 0; j < 16; ++j)
    for (int64_t d = 0; d < Dh; d += 16)
      _mm512_storeu_ps(Vf + j * Dh + d, j < nvalid ? Zmm::load(V + j * Dh + d) : _mm512_setzero_ps());
}

// acc[r] = acc[r] * alpha[r] + sum_j p[r][j] Vf[j] over kKeys keys, for 4 rows (acc rows Dh apart), features
// [c0, c0 + 16 NC); only the first nr rows are stored. The empty asm statement keeps each loaded V vector in
// a register for its 4 uses (one per row): folded into the FMAs as memory operands they were reloaded for
// every use, and the loads, not the FMAs, set the pace. (On an array of vectors the same statement made GCC
// spill the array to the stack every key: named variables.)
template <int NC>
inline void pv_tile(float* acc, int64_t Dh, const float* Vf, const float (*p)[kKeys], const float* alpha, int nr,
                    int64_t c0) {
  __m512 a[4][NC];
  for (int r = 0; r < 4; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NC; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dh + c0 + 16 * c), al);
  }
  for (int j = 0; j < kKeys; ++j) {
    const float* vj = Vf + j * Dh + c0;
    __m512 v0 = _mm512_loadu_ps(vj), v1 = NC > 1 ? _mm512_loadu_ps(vj + 16) : v0;
    __m512 v2 = NC > 2 ? _mm512_loadu_ps(vj + 32) : v0, v3 = NC > 3 ? _mm512_loadu_ps(vj + 48) : v0;
    __asm__("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));  // registers, not 4 reloads each (see above)
    for (int r = 0; r < 4; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      a[r][0] = _mm512_fmadd_ps(pj, v0, a[r][0]);
      if constexpr (NC > 1) a[r][1] = _mm512_fmadd_ps(pj, v1, a[r][1]);
      if constexpr (NC > 2) a[r][2] = _mm512_fmadd_ps(pj, v2, a[r][2]);
      if constexpr (NC > 3) a[r][3] = _mm512_fmadd_ps(pj, v3, a[r][3]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + r * Dh + c0 + 16 * c, a[r][c]);
}

// fp32 buffers whose data start on a cache line: the tiles' 64-byte loads and stores then never straddle two
// lines (std::vector's 16-byte alignment had every other one do so).
struct Lines {
  std::vector<float> buf;
  float* p = nullptr;
  float* resize(size_t n) {
    buf.resize(n + 16);
    p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    return p;
  }
  float* fill(size_t n, float v) {
    resize(n);
    std::fill(p, p + n, v);
    return p;
  }
};

struct TileScratch {
  Lines q, acc, kt, vf, l;  // l: each row's softmax sum as 16 lane partial sums, added up once at the end
  std::vector<float> m;
  std::vector<int64_t> lo, hi;
};

// One prefill tile: tokens [t0, t0 + nt) of sequence s (query indices within its rows), KV group g.
template <typename T>
void run_token_tile(const Args& A, int64_t s, int64_t g, int64_t t0, int64_t nt, TileScratch& w) {
  const int64_t HR = A.H / A.G, Dh = A.Dh, B = A.B;
  const int64_t qs = A.qsl[s], n = A.qsl[s + 1] - qs, L = A.context_lens[s];
  const int64_t R = nt * HR, R4 = (R + 3) / 4 * 4;  // rows, padded to whole 4-row tiles
  float* const Q = w.q.fill(R4 * Dh, 0.f);
  float* const ACC = w.acc.fill(R4 * Dh, 0.f);
  float* const Kt = w.kt.resize(kKeys * Dh);
  float* const Vf = w.vf.resize(kKeys * Dh);
  float* const LV = w.l.fill(R4 * 16, 0.f);
  w.m.assign(R4, -std::numeric_limits<float>::infinity());
  w.lo.assign(R4, 0); w.hi.assign(R4, 0);
  const size_t qesz = A.q_dtype == F32 ? 4 : 2;
  for (int64_t r = 0; r < R; ++r) {  // row r = token t0 + r / HR, head g * HR + r % HR
    const int64_t i = t0 + r / HR, h = g * HR + r % HR, p = L - n + i;
    float* q = Q + r * Dh;
    to_f32(static_cast<const char*>(A.q) + ((qs + i) * A.q_stride + h * Dh) * qesz, A.q_dtype, Dh, q);
    for (int64_t c = 0; c < Dh; ++c) q[c] *= A.scale;
    w.lo[r] = A.window > 0 ? std::max<int64_t>(0, p - A.window + 1) : 0;
    w.hi[r] = p + 1;
  }
  const int32_t* bt = A.block_tables + s * A.M;
  const T* kc = static_cast<const T*>(A.k);
  const T* vc = static_cast<const T*>(A.v);
  const int64_t kmin = w.lo[0] & ~int64_t(15), kmax = w.hi[R - 1];
  alignas(64) float pr[4][kKeys];
  float alpha[4];
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = kmin; j0 < kmax; j0 += kKeys) {
    for (int64_t h = 0; h < kKeys; h += 16) {  // two 16-key tiles, each inside one block (B % 16 == 0)
      const int64_t j = j0 + h;
      const int64_t base = j < kmax ? (int64_t(bt[j / B]) * A.G + g) * B * Dh + (j % B) * Dh : 0;
      widen_tile(kc + base, vc + base, Dh, j < kmax ? std::min<int64_t>(16, L - j) : 0, Kt + h, Vf + h * Dh);
    }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int nr = int(std::min<int64_t>(4, R - r0));
      if (j0 >= w.hi[r0 + nr - 1] || j0 + kKeys <= w.lo[r0]) continue;  // no row of the tile sees these keys
      __m512 sc[4][2];
      for (int r = 0; r < 4; ++r) sc[r][0] = sc[r][1] = _mm512_setzero_ps();
      const float* q = Q + r0 * Dh;
      for (int64_t d = 0; d < Dh; ++d) {  // 8 independent FMA chains, 6 loads per 8 FMAs
        __m512 k0 = _mm512_loadu_ps(Kt + d * kKeys), k1 = _mm512_loadu_ps(Kt + d * kKeys + 16);
        __asm__("" : "+v"(k0), "+v"(k1));  // kept in registers for their 4 uses each (GCC reloads them)
        for (int r = 0; r < 4; ++r) {
          const __m512 qb = _mm512_set1_ps(q[r * Dh + d]);
          sc[r][0] = _mm512_fmadd_ps(qb, k0, sc[r][0]);
          sc[r][1] = _mm512_fmadd_ps(qb, k1, sc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        const int64_t row = r0 + r;
        const int64_t a = std::clamp<int64_t>(w.lo[row] - j0, 0, kKeys), e = std::clamp<int64_t>(w.hi[row] - j0, 0, kKeys);
        const uint32_t bits = r < nr && a < e ? uint32_t((uint64_t(1) << e) - 1) & ~uint32_t((uint64_t(1) << a) - 1) : 0u;
        if (!bits) {  // (or a padding row) nothing here: state unchanged
          alpha[r] = 1.f;
          _mm512_store_ps(pr[r], _mm512_setzero_ps());
          _mm512_store_ps(pr[r] + 16, _mm512_setzero_ps());
          continue;
        }
        const __mmask16 v0 = __mmask16(bits), v1 = __mmask16(bits >> 16);
        const __m512 x0 = _mm512_mask_mov_ps(ninf, v0, sc[r][0]), x1 = _mm512_mask_mov_ps(ninf, v1, sc[r][1]);
        const float mn = std::max(w.m[row], _mm512_reduce_max_ps(_mm512_max_ps(x0, x1)));
        alpha[r] = std::exp(w.m[row] - mn);  // 0 on the row's first keys (m = -inf)
        const __m512 mv = _mm512_set1_ps(mn);
        float* pr_r = pr[r];
        _mm512_store_ps(pr_r, _mm512_sub_ps(x0, mv));  // masked keys: -inf, whose exp is 0
        _mm512_store_ps(pr_r + 16, _mm512_sub_ps(x1, mv));
#pragma omp simd simdlen(16) aligned(pr_r : 64)
        for (int j = 0; j < kKeys; ++j) pr_r[j] = bgl_exp_f32(pr_r[j]);  // the library's one exp (exp_f32.h)
        _mm512_store_ps(LV + row * 16, _mm512_fmadd_ps(_mm512_load_ps(LV + row * 16), _mm512_set1_ps(alpha[r]),
                                                       _mm512_add_ps(_mm512_load_ps(pr_r), _mm512_load_ps(pr_r + 16))));
        w.m[row] = mn;
      }
      float* acc = ACC + r0 * Dh;
      int64_t c0 = 0;
      for (; c0 + 64 <= Dh; c0 += 64) pv_tile<4>(acc, Dh, Vf, pr, alpha, nr, c0);
      switch ((Dh - c0) / 16) {
        case 1: pv_tile<1>(acc, Dh, Vf, pr, alpha, nr, c0); break;
        case 2: pv_tile<2>(acc, Dh, Vf, pr, alpha, nr, c0); break;
        case 3: pv_tile<3>(acc, Dh, Vf, pr, alpha, nr, c0); break;
        default: break;
      }
    }
  }
  const size_t oesz = A.q_dtype == F32 ? 4 : 2;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = t0 + r / HR, h = g * HR + r % HR;
    float* acc = ACC + r * Dh;
    const float inv = 1.f / _mm512_reduce_add_ps(_mm512_load_ps(LV + r * 16));
    for (int64_t c = 0; c < Dh; ++c) acc[c] *= inv;
    from_f32(acc, Dh, A.q_dtype, static_cast<char*>(A.out) + ((qs + i) * A.out_stride + h * Dh) * oesz);
  }
}
