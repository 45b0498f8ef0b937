// AVX2+FMA micro-kernels of paged_attention_cpu.cpp (included there once, inside its anonymous namespace).
//
// Register tiles: the RT query rows of one KV group share every K/V vector they load (GQA packing), so
// loads and the widening of bf16 are paid once per group, not per head.

// exp for scores minus their max (and above); Cephes' polynomial, ~1 ulp, clamped to the finite range (the
// intrinsics give vminps/vmaxps; ops/csrc/exp_f32.h is the scalar-C exp that compilers vectorise).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// lane i = horizontal sum of a[i], i < 4
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// The QK and PV tiles are written once over a register type: Ymm (8 lanes, AVX2) here, Zmm (16 lanes,
// paged_attention_avx512.h) on AVX-512 CPUs for head dims that are a multiple of 16. Each says its tile
// sizes: QK holds RT query vectors + one key vector + RT*keys(RT) accumulators, PV RT broadcast
// probabilities + one value vector + RT*chunks(RT) accumulators, within the register file (16 or 32).
struct Ymm {
  using R = __m256;
  static constexpr int L = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const uint16_t* p) { return bgl::widen8_bf16(p); }  // bf16 -> fp32 is a 16-bit shift
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static __m256 fold(R v) { return v; }  // to 8 lanes, for hsum4
  static constexpr int keys(int rt) { return rt == 1 ? 8 : (rt == 4 ? 2 : 4); }
  static constexpr int chunks(int rt) { return rt == 1 ? 8 : (rt == 4 ? 2 : 4); }
};

// Prefetch of the KV rows [a, e) of a block to come (`ahead`, laid out as the block being read), issued by
// the QK and PV loops a key at a time, so the requests leave at the rate the data is consumed. Fetching a
// block's rows as one burst instead fills the core's miss buffers, and the core stalls until the lines
// arrive: memory time then adds to compute time instead of hiding under it (paged_attention_cpu.cpp).
template <typename T>
inline void prefetch_rows(const T* ahead, int64_t Dh, int64_t a, int64_t e) {
  if (!ahead) return;
  const char* p = reinterpret_cast<const char*>(ahead);
  for (int64_t o = a * Dh * int64_t(sizeof(T)); o < e * Dh * int64_t(sizeof(T)); o += 64) __builtin_prefetch(p + o);
}

// s[r * ss + j] = scale * q_r . K[j] for the RT rows (q rows Dh apart) and keys j in [a, e); s has room
// for 8 entries past e (extra lanes repeat key e-1). Scores are reduced horizontally four at a time.
// `ahead` (or nullptr): the block whose same rows are prefetched meanwhile.
template <class V, int RT, typename T>
void qk_group(const float* q, const T* K, int64_t Dh, int64_t a, int64_t e, float scale, float* s, int64_t ss,
              const T* ahead) {
  constexpr int JT = V::keys(RT);
  static_assert((RT * JT) % 4 == 0, "tiles reduce in fours");
  for (int64_t j = a; j < e; j += JT) {
    prefetch_rows(ahead, Dh, j, std::min<int64_t>(j + JT, e));
    const T* kp[JT];
    for (int jj = 0; jj < JT; ++jj) kp[jj] = K + std::min(j + jj, e - 1) * Dh;
    typename V::R acc[RT * JT];
    for (int x = 0; x < RT * JT; ++x) acc[x] = V::zero();
    for (int64_t c = 0; c < Dh; c += V::L) {
      typename V::R qv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) qv[r] = V::load(q + r * Dh + c);
#pragma GCC unroll 12
      for (int jj = 0; jj < JT; ++jj) {
        const typename V::R kv = V::load(kp[jj] + c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * JT + jj] = V::fmadd(qv[r], kv, acc[r * JT + jj]);
      }
    }
    alignas(16) float sums[RT * JT];
    for (int x = 0; x < RT * JT; x += 4)
      _mm_store_ps(sums + x, _mm_mul_ps(hsum4(V::fold(acc[x]), V::fold(acc[x + 1]), V::fold(acc[x + 2]),
                                              V::fold(acc[x + 3])), _mm_set1_ps(scale)));
    for (int r = 0; r < RT; ++r)
      for (int jj = 0; jj < JT; ++jj) s[r * ss + j + jj] = sums[r * JT + jj];
  }
}

// acc_r[c0 : c0+L*NC] = acc_r * alpha_r + sum_{j in [a,e)} p_r[j] * V[j, c0 : c0+L*NC] for the RT rows;
// prefetching row j of `ahead` (or nullptr) with row j's work.
template <class V, int RT, int NC, typename T>
void pv_tile(float* acc, const T* Vc, int64_t Dh, const float* p, int64_t ss, int64_t a, int64_t e,
             const float* alpha, int64_t c0, const T* ahead) {
  typename V::R r_[RT * NC];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const typename V::R al = V::set1(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) r_[r * NC + c] = V::mul(V::load(acc + r * Dh + c0 + V::L * c), al);
  }
  for (int64_t j = a; j < e; ++j) {
    prefetch_rows(ahead, Dh, j, j + 1);
    const T* v = Vc + j * Dh + c0;
    typename V::R pj[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) pj[r] = V::set1(p[r * ss + j]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const typename V::R vv = V::load(v + V::L * c);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) r_[r * NC + c] = V::fmadd(pj[r], vv, r_[r * NC + c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) V::store(acc + r * Dh + c0 + V::L * c, r_[r * NC + c]);
}

// The first tile of the row (c0 = 0) prefetches `ahead`'s rows, whole.
template <class V, int RT, typename T>
void pv_group(float* acc, const T* Vc, int64_t Dh, const float* p, int64_t ss, int64_t a, int64_t e,
              const float* alpha, const T* ahead) {
  constexpr int NC = V::chunks(RT);
  int64_t c0 = 0;
  for (; c0 + V::L * NC <= Dh; c0 += V::L * NC)
    pv_tile<V, RT, NC>(acc, Vc, Dh, p, ss, a, e, alpha, c0, c0 == 0 ? ahead : nullptr);
  const T* pf = c0 == 0 ? ahead : nullptr;
  switch ((Dh - c0) / V::L) {  // fewer than NC chunks left
    case 1: pv_tile<V, RT, 1>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 2: if constexpr (NC > 2) pv_tile<V, RT, 2>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 3: if constexpr (NC > 3) pv_tile<V, RT, 3>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 4: if constexpr (NC > 4) pv_tile<V, RT, 4>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 5: if constexpr (NC > 5) pv_tile<V, RT, 5>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 6: if constexpr (NC > 6) pv_tile<V, RT, 6>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    case 7: if constexpr (NC > 7) pv_tile<V, RT, 7>(acc, Vc, Dh, p, ss, a, e, alpha, c0, pf); break;
    default: break;
  }
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// Online-softmax step of RT rows over scores s[r * ss + a : e): s becomes p, (m, l) are updated and
// alpha[r] = exp(m_old - m_new) is what each accumulator must be scaled by. Vectorised over keys; the
// lanes past e are padded with -inf for the max and masked out of the sum.
template <int RT>
void softmax_group(float* s, int64_t ss, int64_t a, int64_t e, float* m, float* l, float* alpha) {
  const int64_t end8 = a + (e - a + 7) / 8 * 8;
  const float ninf = -std::numeric_limits<float>::infinity();
  alignas(32) float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float mn[RT];
  for (int r = 0; r < RT; ++r) {
    float* sr = s + r * ss;
    for (int64_t j = e; j < end8; ++j) sr[j] = ninf;
    __m256 vmax = _mm256_set1_ps(ninf);
    for (int64_t j = a; j < end8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + j));
    mn[r] = std::max(m[r], hmax(vmax));
    d[r] = m[r] - mn[r];  // -inf on the first block: exp256 clamps it to ~1e-38 times a zero state
  }
  _mm256_storeu_ps(d, exp256(_mm256_load_ps(d)));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < RT; ++r) {
    float* sr = s + r * ss;
    const __m256 vm = _mm256_set1_ps(mn[r]);
    __m256 vs = _mm256_setzero_ps();
    for (int64_t j = a; j < end8; j += 8) {
      __m256 x = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vm));
      if (j + 8 > e)  // zero the padding lanes
        x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(e - j)), lane)));
      _mm256_storeu_ps(sr + j, x);
      vs = _mm256_add_ps(vs, x);
    }
    alpha[r] = d[r];
    l[r] = l[r] * d[r] + hsum(vs);
    m[r] = mn[r];
  }
}

