/* The CPU kernels of the layers around attention: RMSNorm, fused residual-add + RMSNorm,
 * SiLU-and-mul and rotary embedding. Each is one pass over its rows, in float32, rounding to the
 * storage dtype where the PyTorch path (kernels/norm.py, activation.py, rotary.py) rounds, so
 * that both agree to the last bit or two. Rows are split over torch's OpenMP threads.
 *
 * Each row function is inlined with `bf16` (and `neox`) as constants and chosen per row: a loop
 * that tests the dtype per element does not vectorise (nor does one inside an OpenMP region,
 * which receives its parameters through memory).
 */
#include <stdint.h>

#include "common.h"

#define ROW_FUNCTION static inline __attribute__((always_inline)) void

static inline float stored(float x, int64_t bf16) {  /* x rounded to the storage dtype */
    return bf16 ? bf16_to_f32(to_bf16(x)) : x;
}

static inline void store_one(void *base, int64_t i, int64_t bf16, float x) {
    if (bf16) ((uint16_t *)base)[i] = to_bf16(x);
    else ((float *)base)[i] = x;
}

#if defined(__AVX512BF16__)
/* The vector paths for bfloat16 rows (16 lanes at a time, the same float32 arithmetic and the
 * same roundings as the row functions; GCC vectorises those too, but at a third of the speed
 * in their bfloat16 form: rounding lane by lane). */
static inline __m256i to_bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

static inline __m512 stored16(__m512 v) {  /* v rounded to bfloat16, as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(v)), 16));
}

/* rms_norm_row for bfloat16 and `hidden` a multiple of 16. */
static inline void rms_norm_bf16(uint16_t *out, uint16_t *residual_out, const uint16_t *x,
                                 const uint16_t *residual, const uint16_t *weight,
                                 int64_t hidden, float eps, float *row) {
    __m512 sum_sq = _mm512_setzero_ps();
    for (int64_t d = 0; d < hidden; d += 16) {
        __m512 v = load16(x, d, FORMAT_BF16);
        if (residual) {
            v = stored16(_mm512_add_ps(v, load16(residual, d, FORMAT_BF16)));
            _mm256_storeu_si256((__m256i *)(residual_out + d), to_bf16x16(v));
        }
        _mm512_storeu_ps(row + d, v);
        sum_sq = _mm512_fmadd_ps(v, v, sum_sq);
    }
    const __m512 scale = _mm512_set1_ps(
        1.0f / sqrtf(_mm512_reduce_add_ps(sum_sq) / (float)hidden + eps));
    for (int64_t d = 0; d < hidden; d += 16)
        _mm256_storeu_si256((__m256i *)(out + d), to_bf16x16(_mm512_mul_ps(
            load16(weight, d, FORMAT_BF16), stored16(_mm512_mul_ps(_mm512_loadu_ps(row + d),
                                                                   scale)))));
}

/* silu_and_mul_row for bfloat16, 16 outputs at a time: returns how many it wrote (the rest,
 * fewer than 16, are the row function's). */
static inline int64_t silu_and_mul_bf16(uint16_t *out, const uint16_t *x, int64_t d) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const __m512 gate = load16(x, i, FORMAT_BF16), up = load16(x, d + i, FORMAT_BF16);
        const __m512 t = exp_nonpositive16(_mm512_sub_ps(zero, _mm512_abs_ps(gate)));
        const __m512 sigmoid = _mm512_div_ps(
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask(gate, zero, _CMP_GE_OQ), t, one),
            _mm512_add_ps(one, t));
        _mm256_storeu_si256((__m256i *)(out + i),
                            to_bf16x16(_mm512_mul_ps(stored16(_mm512_mul_ps(gate, sigmoid)), up)));
    }
    return i;
}
#endif

ROW_FUNCTION rms_norm_row(void *out, void *residual_out, const void *x, const void *residual,
                          const void *weight, int64_t hidden, float eps, float *row,
                          const int64_t bf16) {
#if defined(__AVX512BF16__)
    if (bf16 && hidden % 16 == 0) {
        rms_norm_bf16(out, residual_out, x, residual, weight, hidden, eps, row);
        return;
    }
#endif
    float sum_sq = 0.0f;
    for (int64_t d = 0; d < hidden; d++) {
        float v = load_one(x, d, bf16);
        if (residual) v = stored(v + load_one(residual, d, bf16), bf16);
        row[d] = v;
        sum_sq += v * v;
    }
    if (residual) store_row(residual_out, 0, bf16, hidden, row);
    const float scale = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
    for (int64_t d = 0; d < hidden; d++)
        store_one(out, d, bf16, load_one(weight, d, bf16) * stored(row[d] * scale, bf16));
}

/* out = weight * rms_norm(x + residual) and residual_out = x + residual (both rounded to the
 * storage dtype, both contiguous); without residual (NULL), out = weight * rms_norm(x). */
void rms_norm(void *out, void *residual_out, const void *x, const void *residual,
              const void *weight, int64_t rows, int64_t hidden, int64_t x_stride,
              int64_t r_stride, float eps, int64_t bf16) {
    const int64_t size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float row[hidden];
        char *o = (char *)out + r * hidden * size;
        char *ro = residual ? (char *)residual_out + r * hidden * size : 0;
        const char *xr = (const char *)x + r * x_stride * size;
        const char *rr = residual ? (const char *)residual + r * r_stride * size : 0;
        if (bf16) rms_norm_row(o, ro, xr, rr, weight, hidden, eps, row, 1);
        else rms_norm_row(o, ro, xr, rr, weight, hidden, eps, row, 0);
    }
}

ROW_FUNCTION silu_and_mul_row(void *out, const void *x, int64_t d, const int64_t bf16) {
    int64_t i = 0;
#if defined(__AVX512BF16__)
    if (bf16) i = silu_and_mul_bf16(out, x, d);
#endif
    for (; i < d; i++) {
        const float gate = load_one(x, i, bf16), up = load_one(x, d + i, bf16);
        const float t = exp_nonpositive(-fabsf(gate));  /* exp(-|gate|): never overflows */
        const float sigmoid = (gate >= 0.0f ? 1.0f : t) / (1.0f + t);
        store_one(out, i, bf16, stored(gate * sigmoid, bf16) * up);
    }
}

/* out [rows, d] (contiguous) = silu(gate) * up, x [rows, 2d] = (gate, up); silu rounded before
 * the product as torch's silu returns it. */
void silu_and_mul(void *out, const void *x, int64_t rows, int64_t d, int64_t x_stride,
                  int64_t bf16) {
    const int64_t size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        char *o = (char *)out + r * d * size;
        const char *xr = (const char *)x + r * x_stride * size;
        if (bf16) silu_and_mul_row(o, xr, d, 1);
        else silu_and_mul_row(o, xr, d, 0);
    }
}

ROW_FUNCTION rotary_head(void *out, const void *x, const float *cs, int64_t head_dim,
                         int64_t rotary_dim, const int64_t neox, const int64_t bf16) {
    const int64_t half = rotary_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float cos = stored(cs[i], bf16), sin = stored(cs[half + i], bf16);
        const float x1 = load_one(x, a, bf16), x2 = load_one(x, b, bf16);
        store_one(out, a, bf16, x1 * cos - x2 * sin);
        store_one(out, b, bf16, x2 * cos + x1 * sin);
    }
    for (int64_t i = rotary_dim; i < head_dim; i++) store_one(out, i, bf16, load_one(x, i, bf16));
}

/* Neox-style (rotate-half) or GPT-J-style (interleaved) rotary embedding of the first
 * rotary_dim channels of each head; the other channels are copied. x [tokens, heads, head_dim]
 * (strides in elements), out contiguous; cos_sin [positions, rotary_dim] float32, cos then sin,
 * rounded to the storage dtype first as the PyTorch path does. */
void rotary(void *out, const void *x, const int64_t *positions, const float *cos_sin,
            int64_t tokens, int64_t heads, int64_t head_dim, int64_t rotary_dim,
            int64_t x_stride_t, int64_t x_stride_h, int64_t neox, int64_t bf16) {
    const int64_t size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *cs = cos_sin + positions[t] * rotary_dim;
        for (int64_t h = 0; h < heads; h++) {
            char *o = (char *)out + (t * heads + h) * head_dim * size;
            const char *xh = (const char *)x + (t * x_stride_t + h * x_stride_h) * size;
            if (neox && bf16) rotary_head(o, xh, cs, head_dim, rotary_dim, 1, 1);
            else if (neox) rotary_head(o, xh, cs, head_dim, rotary_dim, 1, 0);
            else if (bf16) rotary_head(o, xh, cs, head_dim, rotary_dim, 0, 1);
            else rotary_head(o, xh, cs, head_dim, rotary_dim, 0, 0);
        }
    }
}
