// The 16-lane register type of paged_attention_cpu.cpp's QK and PV tiles (paged_attention_avx2.h), for
// head dims that are a multiple of 16 on AVX-512 CPUs (included there once, after the AVX2 header, inside
// its anonymous namespace): half the FMAs and loads per key, and (bf16 caches) half the widening; 32
// registers allow 4-key QK tiles for every group size. The online softmax stays on the AVX2 code.
struct Zmm {
  using R = __m512;
  static constexpr int L = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit shift
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static __m256 fold(R v) {  // the two 256-bit halves added: 8 lanes, for hsum4
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static constexpr int keys(int rt) { return rt == 1 ? 8 : 4; }       // <= 21 registers
  static constexpr int chunks(int rt) { return rt <= 3 ? 8 : 4; }     // <= 29 registers
};
