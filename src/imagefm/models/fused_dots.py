"""The C of the fused decoding step's arithmetic (``imagefm.models.fused_kernel`` builds it with
the step): 16-float vector helpers, the input vector quantised to int8 blocks, and one weight
row's dot product with it, for 4-bit blocks (``w = d*q + m``), 8-bit blocks (``w = d*q``) and
float rows.

A block's product with the quantised input ``x ~ dx*qx`` is ``d*dx*sum(q*qx) + m*dx*sum(qx)``:
the integer sum is what the CPU instructions are for, chosen when the C is compiled
(``-march=native`` on the machine that runs it):

    AVX-512 VNNI   vpdpbusd: unsigned 4-bit values (or |w| of 8-bit ones) times signed int8,
                   64 products a step; 4 blocks an iteration; the 8-bit weights' signs move
                   onto the input (|w| * sign(w)x = w*x)
    AVX2 + FMA     vpmaddubsw + vpmaddwd on one block of 32 at a time (llama.cpp's sums)
    portable C     the same sums in plain loops

All three compute the same integer block sums; only the order of the float additions across
blocks differs (tests/test_fused_decode.py checks each against an integer reference).
"""

DOTS_SOURCE = r"""#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
/* Block scales are stored as IEEE float16 bits, as in the GGUF file (the quantisers round them
   to float16 anyway): 20 bytes a Q4_1 block instead of 24 with float32, 34 a Q8_0 block. */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  float f;
  if (e == 31) bits = sign | 0x7F800000u | (man << 13);
  else if (e) bits = sign | ((e + 112) << 23) | (man << 13);
  else { /* zero or subnormal: man * 2^-24, exact in float32 */
    f = ldexpf((float)man, -24);
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PATH 512
#elif defined(__AVX2__) && defined(__FMA__)
#define PATH 256
#else
#define PATH 0
#endif

/* 16 floats as a GCC/Clang vector: compiled to whatever SIMD the target has */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline v16f splat(float f) { return (v16f){0} + f; }
static inline v16f pick(v16i m, v16f a, v16f b) { return (v16f)(((v16i)a & m) | ((v16i)b & ~m)); }
static inline v16f vmax(v16f a, v16f b) { return pick(a < b, b, a); }
static inline v16f vmin(v16f a, v16f b) { return pick(a < b, a, b); }
static inline v16f vabs(v16f a) { return (v16f)((v16i)a & 0x7FFFFFFF); }
/* round half to even (|x| < 2^22), as nearbyintf in the default rounding mode */
static inline v16f vround(v16f x) {
  const v16f magic = splat(12582912.0f);
  return (x + magic) - magic;
}
static inline float vsum(v16f v) { /* pairwise: a short dependency chain */
#if defined(__clang__) || __GNUC__ >= 12
  typedef float v8f __attribute__((vector_size(32)));
  typedef float v4f __attribute__((vector_size(16)));
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
              + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3)
              + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else
  float s = 0.0f;
  for (int j = 0; j < 16; j++) s += v[j];
  return s;
#endif
}

/* e^x (Cephes' expf: 2^n times a degree-7 polynomial of the rest; within 2 ulp) */
static inline v16f vexp(v16f x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.7f));
  const v16f n = vround(x * 1.44269504088896341f);
  v16f r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * (v16f)bits;
}

typedef struct {      /* an input vector, quantised (padded to whole groups of 4 blocks) */
  const float *x;     /* the float vector itself (float weights read it) */
  int8_t *q;          /* values, natural order */
  int8_t *split;      /* per 4 blocks: the 4 first halves, then the 4 second halves */
  float *d, *s;       /* per block: scale, scale * sum of values */
  float *de, *se;     /* d and s/4, each repeated 4 times (the 4-bit AVX-512 lane layout) */
} Act;

static void act_init(Act *a, int64_t kmax) {
  int64_t groups = (kmax / 32 + 3) / 4 + 1;
  a->q = calloc(groups * 128, 1);
  a->split = calloc(groups * 128, 1);
  a->d = calloc(groups * 4, sizeof(float));
  a->s = calloc(groups * 4, sizeof(float));
  a->de = calloc(groups * 16, sizeof(float));
  a->se = calloc(groups * 16, sizeof(float));
}

static void act_free(Act *a) {
  free(a->q); free(a->split); free(a->d); free(a->s); free(a->de); free(a->se);
}

/* llama.cpp's Q8_0/Q8_1 rounding of the input: d = max|x| / 127, q = round(x / d) */
static void act_quantize(Act *a, const float *x, int64_t k) {
  a->x = x;
  if (k % 32) return;
  const int64_t G = k / 32, padded = (G + 3) / 4 * 4;
  for (int64_t g = 0; g < G; g++) {
    const v16f v0 = load16(x + 32 * g), v1 = load16(x + 32 * g + 16);
    const v16f top = vmax(vabs(v0), vabs(v1));
    float amax = 0.0f;
    for (int j = 0; j < 16; j++) amax = fmaxf(amax, top[j]);
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const v16i q0 = __builtin_convertvector(vround(v0 * id), v16i);
    const v16i q1 = __builtin_convertvector(vround(v1 * id), v16i);
    int sum = 0;
    for (int j = 0; j < 16; j++) {
      a->q[32 * g + j] = (int8_t)q0[j];
      a->q[32 * g + 16 + j] = (int8_t)q1[j];
      sum += q0[j] + q1[j];
    }
    a->d[g] = d;
    a->s[g] = d * (float)sum;
  }
  for (int64_t g = G; g < padded; g++) {
    memset(a->q + 32 * g, 0, 32);
    a->d[g] = a->s[g] = 0.0f;
  }
  for (int64_t g = 0; g < padded; g++) {
    const int64_t group = g / 4, b = g % 4;
    memcpy(a->split + 128 * group + 16 * b, a->q + 32 * g, 16);
    memcpy(a->split + 128 * group + 64 + 16 * b, a->q + 32 * g + 16, 16);
    for (int l = 0; l < 4; l++) {
      a->de[4 * g + l] = a->d[g];
      a->se[4 * g + l] = a->s[g] * 0.25f;
    }
  }
}

/* --- one row's dot product with a quantised input ------------------------------------------- */
#if PATH == 512
/* ROWS rows at once share the input's loads; measured on Zen 4, 2 or 4 rows were no faster
   than 1 (the products wait on memory, not on arithmetic), so 1. */
#define ROWS 1
static inline __attribute__((always_inline)) void dot_q4_tile(
    const uint8_t *w, const uint16_t *dm, const Act *a, int64_t G, int rows, float *out) {
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i pick_d = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i pick_m = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
  __m512 acc[ROWS], accm[ROWS];
  for (int r = 0; r < rows; r++) acc[r] = accm[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 4) { /* 4 blocks: 64 bytes, 128 values */
    const int64_t rem = G - g;
    const __mmask64 bmask = rem >= 4 ? ~0ULL : (1ULL << (16 * rem)) - 1;
    const __mmask8 smask = rem >= 4 ? 0xFF : (1u << (2 * rem)) - 1;
    const __m512i xlo = _mm512_loadu_si512(a->split + 32 * g);
    const __m512i xhi = _mm512_loadu_si512(a->split + 32 * g + 64);
    const __m512 de = _mm512_loadu_ps(a->de + 4 * g), se = _mm512_loadu_ps(a->se + 4 * g);
    for (int r = 0; r < rows; r++) {
      const uint8_t *wr = w + r * 8 * G + 16 * g;
      const uint16_t *sr = dm + r * 2 * G + 2 * g;
      const __m512i bytes = rem >= 4 ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(bmask, wr);
      const __m512 scales = _mm512_castps256_ps512(_mm256_cvtph_ps(
          rem >= 4 ? _mm_loadu_si128((const __m128i *)sr) : _mm_maskz_loadu_epi16(smask, sr)));
      __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(bytes, m4),
                                        xlo);
      sum = _mm512_dpbusd_epi32(sum, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4), xhi);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                               _mm512_mul_ps(_mm512_permutexvar_ps(pick_d, scales), de), acc[r]);
      accm[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick_m, scales), se, accm[r]);
    }
  }
  for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], accm[r]));
}

static inline __attribute__((always_inline)) void dot_q8_tile(
    const int8_t *w, const uint16_t *dw, const Act *a, int64_t G, int rows, float *out) {
  const __m512i pick01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i pick23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[ROWS], acc2[ROWS];
  for (int r = 0; r < rows; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 4) { /* 4 blocks: 128 bytes */
    const int64_t rem = G - g;
    const __mmask64 mask0 = rem >= 2 ? ~0ULL : (1ULL << (32 * rem)) - 1;
    const __mmask64 mask1 = rem >= 4 ? ~0ULL : rem > 2 ? (1ULL << (32 * (rem - 2))) - 1 : 0;
    const __mmask8 dmask = rem >= 4 ? 0xF : (1u << rem) - 1;
    const __m512i x0 = _mm512_loadu_si512(a->q + 32 * g);
    const __m512i x1 = _mm512_loadu_si512(a->q + 32 * g + 64);
    const __m128 dx = _mm_loadu_ps(a->d + g);
    for (int r = 0; r < rows; r++) {
      const int8_t *wr = w + r * 32 * G + 32 * g;
      const __m512i w0 = rem >= 4 ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(mask0, wr);
      const __m512i w1 = rem >= 4 ? _mm512_loadu_si512(wr + 64)
                                  : _mm512_maskz_loadu_epi8(mask1, wr + 64);
      /* signed x signed as |w| (unsigned) x (x with w's sign) */
      const __m512i y0 = _mm512_mask_sub_epi8(x0, _mm512_movepi8_mask(w0), zero, x0);
      const __m512i y1 = _mm512_mask_sub_epi8(x1, _mm512_movepi8_mask(w1), zero, x1);
      const __m512i s0 = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w0), y0);
      const __m512i s1 = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w1), y1);
      const __m512 d = _mm512_castps128_ps512(
          _mm_mul_ps(_mm_cvtph_ps(rem >= 4 ? _mm_loadl_epi64((const __m128i *)(dw + r * G + g))
                                           : _mm_maskz_loadu_epi16(dmask, dw + r * G + g)), dx));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(pick01, d), acc[r]);
      acc2[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(pick23, d),
                                acc2[r]);
    }
  }
  for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
}
#elif PATH == 256
#define ROWS 1
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float dot_q4(const uint8_t *w, const uint16_t *dm, const Act *a, int64_t G) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i m4 = _mm_set1_epi8(15);
  __m256 acc = _mm256_setzero_ps();
  float minima = 0.0f;
  for (int64_t g = 0; g < G; g++) {
    const __m128i b = _mm_loadu_si128((const __m128i *)(w + 16 * g));
    const __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4),
                                       _mm_and_si128(b, m4));
    const __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + 32 * g));
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(v, x), ones);
    const float d = half_to_float(dm[2 * g]) * a->d[g];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d), acc);
    minima += half_to_float(dm[2 * g + 1]) * a->s[g];
  }
  return hsum8(acc) + minima;
}

static inline float dot_q8(const int8_t *w, const uint16_t *dw, const Act *a, int64_t G) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * g));
    const __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + 32 * g));
    const __m256i p = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v)), ones);
    const float d = half_to_float(dw[g]) * a->d[g];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d), acc);
  }
  return hsum8(acc);
}
#else
#define ROWS 1
static inline float dot_q4(const uint8_t *w, const uint16_t *dm, const Act *a, int64_t G) {
  float acc = 0.0f;
  for (int64_t g = 0; g < G; g++) {
    int32_t sum = 0;
    for (int i = 0; i < 16; i++)
      sum += (w[16 * g + i] & 15) * a->q[32 * g + i] + (w[16 * g + i] >> 4) * a->q[32 * g + 16 + i];
    acc += half_to_float(dm[2 * g]) * a->d[g] * (float)sum
           + half_to_float(dm[2 * g + 1]) * a->s[g];
  }
  return acc;
}

static inline float dot_q8(const int8_t *w, const uint16_t *dw, const Act *a, int64_t G) {
  float acc = 0.0f;
  for (int64_t g = 0; g < G; g++) {
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += w[32 * g + i] * a->q[32 * g + i];
    acc += half_to_float(dw[g]) * a->d[g] * (float)sum;
  }
  return acc;
}
#endif
#if PATH != 512
static inline void dot_q4_tile(const uint8_t *w, const uint16_t *dm, const Act *a, int64_t G,
                               int rows, float *out) {
  for (int r = 0; r < rows; r++) out[r] = dot_q4(w + r * 16 * G, dm + r * 2 * G, a, G);
}

static inline void dot_q8_tile(const int8_t *w, const uint16_t *dw, const Act *a, int64_t G,
                               int rows, float *out) {
  for (int r = 0; r < rows; r++) out[r] = dot_q8(w + r * 32 * G, dw + r * G, a, G);
}
#endif

static inline float dot_f32(const float *w, const float *x, int64_t k) {
  v16f acc = {0};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) acc += load16(w + i) * load16(x + i);
  float s = vsum(acc);
  for (; i < k; i++) s += w[i] * x[i];
  return s;
}
"""
