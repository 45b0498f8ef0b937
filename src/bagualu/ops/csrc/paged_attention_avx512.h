// AVX-512F micro-kernels of paged_attention_cpu.cpp for head dims that are a multiple of 16 (included there
// once, after the AVX2 ones, inside its anonymous namespace). Same tiles and contracts as the AVX2
// qk_group / pv_group, on 16-lane registers: half the FMAs and loads per key, and (bf16 caches) half the
// widening; 32 registers allow 4-key tiles for every group size. The online softmax stays on the AVX2 code.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// the two 256-bit halves added: a 16-lane sum becomes an 8-lane one for hsum4
inline __m256 fold16(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// QK: RT query vectors + one key vector + RT*JT accumulators (<= 21 registers).
template <int RT> constexpr int kKeysPerTile512 = RT == 1 ? 8 : 4;
// PV: RT broadcast probabilities + one value vector + RT*NC accumulators (<= 29 registers).
template <int RT> constexpr int kChunksPerTile512 = RT <= 2 ? 8 : (RT == 3 ? 8 : 4);

// As qk_group: s[r * ss + j] = scale * q_r . K[j] for keys j in [a, e); s has room for 8 entries past e.
template <int RT, typename T>
void qk_group512(const float* q, const T* K, int64_t Dh, int64_t a, int64_t e, float scale, float* s, int64_t ss) {
  constexpr int JT = kKeysPerTile512<RT>;
  static_assert((RT * JT) % 4 == 0, "tiles reduce in fours");
  for (int64_t j = a; j < e; j += JT) {
    const T* kp[JT];
    for (int jj = 0; jj < JT; ++jj) kp[jj] = K + std::min(j + jj, e - 1) * Dh;
    __m512 acc[RT * JT];
    for (int x = 0; x < RT * JT; ++x) acc[x] = _mm512_setzero_ps();
    for (int64_t c = 0; c < Dh; c += 16) {
      __m512 qv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) qv[r] = _mm512_loadu_ps(q + r * Dh + c);
#pragma GCC unroll 8
      for (int jj = 0; jj < JT; ++jj) {
        const __m512 kv = load16(kp[jj] + c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * JT + jj] = _mm512_fmadd_ps(qv[r], kv, acc[r * JT + jj]);
      }
    }
    alignas(16) float sums[RT * JT];
    for (int x = 0; x < RT * JT; x += 4)
      _mm_store_ps(sums + x, _mm_mul_ps(hsum4(fold16(acc[x]), fold16(acc[x + 1]), fold16(acc[x + 2]),
                                              fold16(acc[x + 3])), _mm_set1_ps(scale)));
    for (int r = 0; r < RT; ++r)
      for (int jj = 0; jj < JT; ++jj) s[r * ss + j + jj] = sums[r * JT + jj];
  }
}

// As pv_tile: acc_r[c0 : c0+16NC] = acc_r * alpha_r + sum_{j in [a,e)} p_r[j] * V[j, c0 : c0+16NC].
template <int RT, int NC, typename T>
void pv_tile512(float* acc, const T* V, int64_t Dh, const float* p, int64_t ss, int64_t a, int64_t e,
                const float* alpha, int64_t c0) {
  __m512 r_[RT * NC];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) r_[r * NC + c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dh + c0 + 16 * c), al);
  }
  for (int64_t j = a; j < e; ++j) {
    const T* v = V + j * Dh + c0;
    __m512 pj[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) pj[r] = _mm512_set1_ps(p[r * ss + j]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 vv = load16(v + 16 * c);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) r_[r * NC + c] = _mm512_fmadd_ps(pj[r], vv, r_[r * NC + c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + r * Dh + c0 + 16 * c, r_[r * NC + c]);
}

template <int RT, typename T>
void pv_group512(float* acc, const T* V, int64_t Dh, const float* p, int64_t ss, int64_t a, int64_t e,
                 const float* alpha) {
  constexpr int NC = kChunksPerTile512<RT>;
  int64_t c0 = 0;
  for (; c0 + 16 * NC <= Dh; c0 += 16 * NC) pv_tile512<RT, NC>(acc, V, Dh, p, ss, a, e, alpha, c0);
  switch ((Dh - c0) / 16) {  // fewer than NC chunks left
    case 1: pv_tile512<RT, 1>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 2: if constexpr (NC > 2) pv_tile512<RT, 2>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 3: if constexpr (NC > 3) pv_tile512<RT, 3>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 4: if constexpr (NC > 4) pv_tile512<RT, 4>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 5: if constexpr (NC > 5) pv_tile512<RT, 5>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 6: if constexpr (NC > 6) pv_tile512<RT, 6>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    case 7: if constexpr (NC > 7) pv_tile512<RT, 7>(acc, V, Dh, p, ss, a, e, alpha, c0); break;
    default: break;
  }
}
