/* Helpers shared by the CPU kernels: rows of the storage formats <-> float32, and a
 * vectorisable exp. Every kernel computes in float32. A storage format is one of FORMAT_*:
 * float32, bfloat16 (stored as uint16_t), and the two fp8 formats a KV cache may hold (one byte:
 * e4m3 as PyTorch's float8_e4m3fn, finite only, at most 448; e5m2, at most 57344). The functions
 * that take a `format` were written for bfloat16 or not (0 / 1), which the codes keep. */
#ifndef PAGEDSERVE_COMMON_H
#define PAGEDSERVE_COMMON_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_E4M3 = 2, FORMAT_E5M2 = 3 };

/* GCC's generic vectors of 8 lanes for the portable paths (one AVX2 register, two NEON ones);
 * aligned(4): loads and stores through them need no alignment. */
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i32x8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));

static inline int64_t format_size(int64_t format) {
    return format == FORMAT_F32 ? 4 : format == FORMAT_BF16 ? 2 : 1;
}

static inline float bits_to_f32(uint32_t bits) {
    union { uint32_t u; float f; } v = { .u = bits };
    return v.f;
}

static inline float bf16_to_f32(uint16_t x) { return bits_to_f32((uint32_t)x << 16); }

/* float16 -> float32, exactly (subnormals, infinities and NaN included): one instruction
 * where the CPU has F16C (every AVX2 one), else by the bits. */
#if defined(__F16C__)
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0) {  /* subnormal: mantissa * 2^-24 */
        const float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
#endif

/* fp8 -> float32, exactly. e4m3: the 7 magnitude bits placed at float32's exponent and
 * mantissa (bit 20 up) read as a float32 of exponent bias 127 instead of 7, hence the 2^120
 * (a subnormal e4m3 becomes a float32 subnormal, which the product makes normal). e5m2: the
 * upper byte of a float16. */
static inline float e4m3_to_f32(uint8_t x) {
    return bits_to_f32((uint32_t)(x & 0x80) << 24 | (uint32_t)(x & 0x7f) << 20) * 0x1p120f;
}

static inline float e5m2_to_f32(uint8_t x) { return f16_to_f32((uint16_t)(x << 8)); }

/* float32 -> fp8 with `mantissa_bits` and exponent `bias`, rounded to nearest even and
 * saturated at `max` (NaN stays NaN): as PyTorch's .to(float8_*) of a value clamped first. */
static inline uint8_t f32_to_fp8(float f, int mantissa_bits, int bias, float max) {
    /* The sign from the bits: the kernels build with -fno-signed-zeros, under which signbit()
     * may call -0 positive, where PyTorch stores it negative. */
    union { float f; uint32_t u; } bits = { .f = f };
    const uint8_t sign = bits.u >> 31 ? 0x80 : 0;
    float a = fabsf(f);
    if (a != a) return sign | 0x7f;  /* a NaN in both formats */
    a = a > max ? max : a;
    const float min_normal = ldexpf(1.0f, 1 - bias);
    if (a < min_normal)  /* subnormal (or rounding up to the smallest normal: same encoding) */
        return sign | (uint8_t)__builtin_rintf(a * ldexpf(1.0f, bias - 1 + mantissa_bits));
    union { float f; uint32_t u; } v = { .f = a };
    const int drop = 23 - mantissa_bits;
    v.u += ((1u << (drop - 1)) - 1) + ((v.u >> drop) & 1u);
    const uint32_t exponent = (v.u >> 23) - 127 + bias, mantissa = (v.u >> drop)
                              & ((1u << mantissa_bits) - 1);
    return sign | (uint8_t)((exponent << mantissa_bits) | mantissa);
}

/* Element `i` of `base`, as float32. */
static inline float load_one(const void *base, int64_t i, int64_t format) {
    switch (format) {
    case FORMAT_BF16: return bf16_to_f32(((const uint16_t *)base)[i]);
    case FORMAT_E4M3: return e4m3_to_f32(((const uint8_t *)base)[i]);
    case FORMAT_E5M2: return e5m2_to_f32(((const uint8_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

#if defined(__F16C__)
/* 8 fp8 values (the low 8 bytes of `raw`) as float32 by F16C: e5m2 is a float16's upper byte;
 * e4m3's 7 magnitude bits sit at bit 7 of a float16 (exponent bias 15 instead of 7, hence the
 * 2^8; its subnormals land on float16 subnormals), the sign moved to bit 15 by sign-extending
 * the byte and clearing bit 14, which the extension filled. */
static inline __m256 fp8x8_to_f32(__m128i raw, int64_t format) {
    if (format == FORMAT_E5M2) return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(raw), 8));
    const __m128i half = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(raw), 7),
                                       _mm_set1_epi16((short)0xbfff));
    return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(0x1p8f));
}
#endif

/* Row `offset` elements into `base`, as float32. fp8 goes 8 at a time by F16C where the CPU has
 * it: element by element, _cvtsh_ss does not vectorize, and an e5m2 KV cache made the portable
 * decode attention (AVX2) 2.5x slower than a float32 one (docs/performance.md, "e5m2 KV rows by
 * F16C on AVX2"); e4m3 element by element took 1.5x e5m2's time there ("e4m3 KV rows by F16C,
 * and constant shifts for 5- and 6-bit values, on AVX2"). */
static inline void load_row(const void *base, int64_t offset, int64_t format, int64_t dim,
                            float *dst) {
    int64_t d = 0;
    if (format == FORMAT_F32) {
        const float *src = (const float *)base + offset;
        for (; d < dim; d++) dst[d] = src[d];
        return;
    }
    if (format == FORMAT_BF16) {  /* a loop of its own: load_one's switch does not vectorize */
        const uint16_t *src = (const uint16_t *)base + offset;
        for (; d < dim; d++) dst[d] = bf16_to_f32(src[d]);
        return;
    }
#if defined(__F16C__)
    if (format == FORMAT_E5M2 || format == FORMAT_E4M3)
        for (const uint8_t *src = (const uint8_t *)base + offset; d + 8 <= dim; d += 8)
            _mm256_storeu_ps(dst + d, fp8x8_to_f32(
                _mm_loadl_epi64((const __m128i *)(src + d)), format));
#endif
    for (; d < dim; d++) dst[d] = load_one(base, offset + d, format);
}

#if defined(__AVX512F__)
/* 16 elements `offset` into `base`, as float32 (bfloat16: the 16 bits moved up; fp8: as
 * e4m3_to_f32 and e5m2_to_f32, lane by lane). */
static inline __m512 load16(const void *base, int64_t offset, int64_t format) {
    if (format == FORMAT_BF16) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    if (format == FORMAT_E4M3 || format == FORMAT_E5M2) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)base + offset));
        if (format == FORMAT_E5M2)
            return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(raw), 8));
        const __m512i bytes = _mm512_cvtepu8_epi32(raw);
        const __m512 magnitude = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_and_si512(bytes, _mm512_set1_epi32(0x7f)), 20)),
            _mm512_set1_ps(0x1p120f));
        return _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(magnitude),
            _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)), 24)));
    }
    return _mm512_loadu_ps((const float *)base + offset);
}
#endif

#if defined(__AVX512VBMI__) && defined(__AVX512BF16__)
#define FP8_TABLES 1
/* The bfloat16 of every fp8 magnitude (the 7 bits below the sign; exact: bfloat16 holds every
 * e4m3 and e5m2 value), split into the low and the high bytes, 128 entries each: vpermi2b looks
 * up 64 bytes at once in such a 128-byte table. Filled once, when the library loads. */
typedef struct { uint8_t low[128], high[128]; } Fp8Table;
extern Fp8Table fp8_tables[2];  /* [0]: e4m3, [1]: e5m2 */

/* A format's table in registers (loaded once per task, not per row). */
typedef struct { __m512i low_a, low_b, high_a, high_b; } Fp8Lookup;

static inline Fp8Lookup fp8_lookup(int64_t format) {
    const Fp8Table *t = &fp8_tables[format == FORMAT_E5M2];
    const Fp8Lookup lookup = {_mm512_loadu_si512(t->low), _mm512_loadu_si512(t->low + 64),
                              _mm512_loadu_si512(t->high), _mm512_loadu_si512(t->high + 64)};
    return lookup;
}

/* The bfloat16 of the 64 fp8 values in `bytes`, as words in the order that unpacking each
 * 128-bit lane's low and high 8 bytes gives (vpunpck[lh]bw): *w0 holds bytes 0-7, 16-23, 32-39
 * and 48-55, *w1 the others. The low and high bytes of each bfloat16 are two table lookups (the
 * sign is the fp8 byte's own). Callers permute the bytes first for the order they need. */
static inline void fp8_words(const Fp8Lookup *t, __m512i bytes, __m512i *w0, __m512i *w1) {
    const __m512i low = _mm512_permutex2var_epi8(t->low_a, bytes, t->low_b);
    const __m512i high = _mm512_or_si512(_mm512_permutex2var_epi8(t->high_a, bytes, t->high_b),
                                         _mm512_and_si512(bytes, _mm512_set1_epi8(-128)));
    *w0 = _mm512_unpacklo_epi8(low, high);
    *w1 = _mm512_unpackhi_epi8(low, high);
}

/* Byte order for fp8_row_to_bf16: fp8_words of bytes so placed come out as values 0-31, 32-63. */
static const uint8_t fp8_row_order[64] = {
    0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39,
    8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47,
    16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55,
    24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63};

/* `dim` (a multiple of 32) fp8 values to bfloat16, exactly, so that fp8 rows go through the
 * bfloat16 dot products: per 64 values one permute, two table lookups, the sign and two unpacks
 * (the float32 conversion of load16 takes seven operations per 16). */
static inline void fp8_row_to_bf16(const uint8_t *src, int64_t dim, int64_t format,
                                   uint16_t *dst) {
    const Fp8Lookup t = fp8_lookup(format);
    const __m512i order = _mm512_loadu_si512(fp8_row_order);
    for (int64_t d = 0; d < dim; d += 64) {
        const int full = dim - d >= 64;  /* else 32 values left */
        __m512i w0, w1;
        fp8_words(&t, _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(
                          full ? ~0ULL : 0xffffffffULL, src + d)), &w0, &w1);
        _mm512_storeu_si512(dst + d, w0);
        if (full) _mm512_storeu_si512(dst + d + 32, w1);
    }
}
#else
#define FP8_TABLES 0
#endif

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into an integer
 * power, built in the exponent bits, and a degree-6 polynomial for the fraction (relative error
 * below 2e-7); below -87 it is 0. exp_nonpositive takes one value, exp_nonpositive16 sixteen
 * (the compiler does not vectorise the scalar one in every loop). */
static const float exp2_fraction[7] = {  /* 2^f for f in [0, 1), highest degree first */
    1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
    5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

static inline float exp_nonpositive(float x) {
    float t = x * 1.4426950408889634f;
    t = t < -126.0f ? -126.0f : t;
    const float whole = __builtin_floorf(t), f = t - whole;
    float p = exp2_fraction[0];
    for (int i = 1; i < 7; i++) p = p * f + exp2_fraction[i];
    union { uint32_t u; float f; } scale = { .u = (uint32_t)((int32_t)whole + 127) << 23 };
    return x < -87.0f ? 0.0f : p * scale.f;
}

#if defined(__AVX512F__)
static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                   _mm512_set1_ps(-126.0f));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(exp2_fraction[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(exp2_fraction[i]));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), p,
                               scale);
}
#endif

static inline uint16_t to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    union { float f; uint32_t u; } v = { .f = f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

static inline void store_row(void *base, int64_t offset, int64_t bf16, int64_t dim,
                             const float *src) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int64_t d = 0; d < dim; d++) dst[d] = to_bf16(src[d]);
    } else {
        float *dst = (float *)base + offset;
        for (int64_t d = 0; d < dim; d++) dst[d] = src[d];
    }
}

/* The matmuls' software prefetch (bf16_linear.c, int8_linear.c): each thread walks its weights a
 * strip of output channels at a time and, while it computes one strip, pulls the next strip's
 * bytes into the L2 a few lines per inner iteration, so that streaming the weights from memory
 * overlaps the arithmetic instead of preceding it (the hardware prefetcher does not cross into
 * the next strip early enough: docs/performance.md, "Our own bfloat16 matmul"). */
typedef struct {
    const char *next, *end;  /* the lines still to prefetch */
    int64_t per_step;        /* lines per inner iteration */
} StripPrefetch;

/* A plan to prefetch `bytes` from `start` over `iterations` inner iterations. */
static inline StripPrefetch strip_prefetch(const void *start, int64_t bytes, int64_t iterations) {
    const int64_t lines = (bytes + 63) / 64;
    const StripPrefetch plan = {(const char *)start, (const char *)start + lines * 64,
                                iterations > 0 ? (lines + iterations - 1) / iterations : 0};
    return plan;
}

static inline void prefetch_step(StripPrefetch *plan) {
    for (int64_t i = 0; i < plan->per_step && plan->next < plan->end; i++, plan->next += 64)
        __builtin_prefetch(plan->next, 0, 2);
}

#endif
