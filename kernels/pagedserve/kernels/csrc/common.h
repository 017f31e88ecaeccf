/* Helpers shared by the CPU kernels: bfloat16 <-> float32 rows and a vectorisable exp.
 * bfloat16 is stored as uint16_t; every kernel computes in float32. */
#ifndef PAGEDSERVE_COMMON_H
#define PAGEDSERVE_COMMON_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)x << 16 };
    return v.f;
}

/* Element `i` of `base`, as float32. */
static inline float load_one(const void *base, int64_t i, int64_t bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* Row `offset` elements into `base`, as float32. */
static inline void load_row(const void *base, int64_t offset, int64_t bf16, int64_t dim,
                            float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int64_t d = 0; d < dim; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        const float *src = (const float *)base + offset;
        for (int64_t d = 0; d < dim; d++) dst[d] = src[d];
    }
}

#if defined(__AVX512F__)
/* 16 elements `offset` into `base`, as float32 (bfloat16: the 16 bits moved up). */
static inline __m512 load16(const void *base, int64_t offset, int64_t bf16) {
    if (bf16) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)base + offset);
}
#endif

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into an integer
 * power, built in the exponent bits, and a degree-6 polynomial for the fraction (relative error
 * below 2e-7). Unlike libm's expf it vectorises; below -87 it returns 0. */
static inline float exp_nonpositive(float x) {
    float t = x * 1.4426950408889634f;
    t = t < -126.0f ? -126.0f : t;
    const float whole = __builtin_floorf(t), f = t - whole;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale = { .u = (uint32_t)((int32_t)whole + 127) << 23 };
    return x < -87.0f ? 0.0f : p * scale.f;
}

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


#endif
