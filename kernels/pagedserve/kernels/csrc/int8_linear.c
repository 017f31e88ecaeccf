/* Int8 linear layers: out = x W^T (+ bias), W int8 [N, K] with one float32 scale per output
 * channel (row of W), in two forms that read the same packed W:
 *  - W8A8 (`int8_linear_w8a8`): each row of x (a token) is quantized to int8 with its own scale
 *    (dynamic, symmetric: amax / levels, levels 127 (values in [-127, 127], as vLLM does) or
 *    127.5 (values in [-128, 127], as compressed-tensors defines it), and the products are summed in int32 by AVX-512 VNNI's
 *    vpdpbusd, 64 multiply-adds per instruction where bfloat16's vdpbf16ps does 32. Where a
 *    decode step at batch 64 is bound by arithmetic, this is what makes int8 faster than bf16
 *    (docs/performance.md).
 *  - W8A16 (`int8_linear_w8a16`): x stays bfloat16; W's int8 values are converted to bfloat16
 *    (exactly: every int8 is a bfloat16) and summed in float32 by vdpbf16ps. It halves the
 *    weight bytes a small batch streams, and keeps bf16's arithmetic.
 * Either way the scales are applied once per output, after the sum:
 *   W8A8:  out[m, n] = float(sum_k q[m, k] w[n, k]) * (x_scale[m] * w_scale[n]) + bias[n]
 *   W8A16: out[m, n] = (sum_k x[m, k] w[n, k]) * w_scale[n] + bias[n]
 *
 * vpdpbusd multiplies unsigned by signed bytes and can broadcast only its signed operand from
 * memory. The activations are that operand (a row's 4 bytes broadcast to every lane, taking no
 * register), and W's bytes are made unsigned as they load (w + 128, one XOR of the sign bits),
 * so each sum holds 128 * sum_k q[m, k] too, which is taken off per row. (Activations as the
 * unsigned operand need a register per row: 6 rows, 4 weight vectors and 24 accumulators are
 * 34 registers of 32, and GCC spilled an accumulator and reloaded weights in the loop.)
 *
 * Packed W (made by kernels/cpu_kernels.py, pack_int8_cpu): [G][K4 / 4][16][4] int8 with
 * G = ceil(N / 16) groups of 16 output channels and K4 = K rounded up to a multiple of 4, zero
 * padded: one 64-byte vector holds 4 consecutive k of 16 channels, the operand vpdpbusd takes.
 * w_scale is padded to G * 16.
 *
 * Work: the threads split the groups evenly; each walks its groups 4 at a time (64 channels,
 * a weight strip that stays in L2) and, for each strip, the rows of x 6 at a time, the tile
 * of 6 x 64 outputs held in 24 of the 32 vector registers over all of K. While it computes
 * a strip it prefetches its next one into the L2 (common.h, StripPrefetch), as bf16_linear.c
 * does (the default model's decode step at batch 64: W8A8 47.6 and 46.8 ms without it, 44.6
 * with; W8A16 72.7 and 72.5 against 66.5 and 67.0; docs/performance.md).
 *
 * Both exist only where the CPU has AVX-512 VNNI and BF16 (`int8_linear_simd`). Elsewhere
 * kernels/cpu_kernels.py packs an int8 weight for the grouped kernel below (8-bit values, one
 * group per channel), whose portable paths sum in float32, W8A8's activations quantized per
 * token first (w8a8_activations). AVX2 has no faster exact int8 arithmetic: vpmaddwd on 16-bit
 * values does no more multiply-adds per instruction than a float32 FMA, and vpmaddubsw's
 * 8-bit pairs saturate at 16 bits. (GGUF's 4-bit values on AVX2 are summed in integers all
 * the same, by activations rounded to 16 bits: there the values' conversion to float32, not
 * the multiply-adds, was what the float path spent its instructions on; grouped_block_a16.)
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define INT8_SIMD 1
#else
#define INT8_SIMD 0
#endif

enum { GROUP = 16, STRIP_GROUPS = 4, TILE_ROWS = 6, ROW_BLOCK = 192, SMALL_ROWS = 4,
       NARROW_SMALL_ROWS = 8 };

int int8_linear_simd(void) { return INT8_SIMD; }

typedef struct {
    int64_t rows, n, k, k4, x_stride, bf16;
} Int8Shape;

/* The groups [first, last) of thread `t` of `threads`. */
static inline void thread_groups(int64_t groups, int64_t *first, int64_t *last) {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    *first = groups * t / threads;
    *last = groups * (t + 1) / threads;
}

/* The prefetch of a thread's next strip: up to STRIP_GROUPS of its `left` groups (of
 * `group_bytes` each) from `next`, spread over the current strip's passes over `rows` rows of
 * `steps` iterations each. */
static inline StripPrefetch next_strip(const void *next, int64_t left, int64_t group_bytes,
                                       int64_t rows, int64_t steps) {
    const int64_t groups = left < STRIP_GROUPS ? left : STRIP_GROUPS;
    return strip_prefetch(next, groups * group_bytes, (rows + TILE_ROWS - 1) / TILE_ROWS * steps);
}

#if INT8_SIMD
/* Row `m` of x quantized: q[k] = clamp(round(x[k] * levels / amax), lowest, 127) for k < K, 0
 * up to K4, lowest = -128 for levels 127.5, else -127; returns the row's scale amax / levels (0
 * for a row of zeros) and 128 * sum_k q[k] in `*correction`. Rounding is to nearest even, as
 * torch.round. */
static float quantize_row(const void *x, int64_t bf16, int64_t k, int64_t k4, float levels,
                          int8_t *q8, int32_t *correction) {
    const int lowest = levels > 127.0f ? -128 : -127;
    int64_t i = 0;
    __m512 vmax = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x, i, bf16)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (; i < k; i++) {
        const float v = fabsf(load_one(x, i, bf16));
        amax = v > amax ? v : amax;
    }
    const float inv = amax > 0.0f ? levels / amax : 0.0f;
    i = 0;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(lowest), hi = _mm512_set1_epi32(127);
    __m512i vsum = _mm512_setzero_si512();
    for (; i + 16 <= k; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, i, bf16), vinv));
        q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        vsum = _mm512_add_epi32(vsum, q);
        _mm_storeu_si128((__m128i *)(q8 + i), _mm512_cvtepi32_epi8(q));
    }
    int32_t sum = _mm512_reduce_add_epi32(vsum);
    for (; i < k; i++) {
        long q = lrintf(load_one(x, i, bf16) * inv);
        q = q < lowest ? lowest : q > 127 ? 127 : q;
        q8[i] = (int8_t)q;
        sum += (int32_t)q;
    }
    for (; i < k4; i++) q8[i] = 0;
    *correction = 128 * sum;
    return amax / levels;
}

#define TILE static inline __attribute__((always_inline)) void

/* Lanes of group `g` of a strip starting at channel n0 that are inside N. */
static inline __mmask16 lanes(int64_t n, int64_t n0, int64_t g) {
    const int64_t left = n - n0 - g * GROUP;
    return left >= GROUP ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* y (16 outputs of row `out_row` at channel n0 + 16 g) + bias, stored in the output dtype. */
static inline void store16(void *out_row, const void *bias, int64_t bf16, int64_t n, int64_t n0,
                           int64_t g, __m512 y) {
    const int64_t at = n0 + g * GROUP;
    const __mmask16 mask = lanes(n, n0, g);
    if (bias) {
        const __m512 b = bf16
            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                  _mm256_maskz_loadu_epi16(mask, (const uint16_t *)bias + at)), 16))
            : _mm512_maskz_loadu_ps(mask, (const float *)bias + at);
        y = _mm512_add_ps(y, b);
    }
    if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)out_row + at, mask,
                                 (__m256i)_mm512_cvtneps_pbh(y));
    else
        _mm512_mask_storeu_ps((float *)out_row + at, mask, y);
}

/* Every (row, group) of a tile, as the names of its accumulator: the tiles keep them in named
 * variables, not an array, which GCC spills to the stack instead of keeping in registers. */
#define EACH_GROUP(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#define EACH_CELL(X) EACH_GROUP(X, 0) EACH_GROUP(X, 1) EACH_GROUP(X, 2) EACH_GROUP(X, 3) \
    EACH_GROUP(X, 4) EACH_GROUP(X, 5)
#define EACH_ROW(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define EACH_VECTOR(X) X(0) X(1) X(2) X(3)

/* acc += w (unsigned bytes) . (the 4 signed bytes at `q`, broadcast), by groups of 4. In asm
 * because GCC 12 copies each accumulator of the intrinsics to another register and back on
 * every iteration, and so that the broadcast is the instruction's memory operand. */
static inline __m512i dpbusd(__m512i acc, __m512i w, const int8_t *q) {
    __asm__("vpdpbusd %[q]%{1to16%}, %[w], %[acc]"
            : [acc] "+v"(acc) : [w] "v"(w), [q] "m"(*(const int32_t *)q));
    return acc;
}

/* acc += w . (the bfloat16 pair at `pair`, broadcast): the broadcast is the instruction's
 * memory operand, so that the rows' pairs take no registers. */
static inline __m512 dpbf16(__m512 acc, const uint16_t *pair, __m512i w) {
    __asm__("vdpbf16ps %[x]%{1to16%}, %[w], %[acc]"
            : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*(const int32_t *)pair));
    return acc;
}

/* W8A8: `rows` x `nv` groups of outputs (both constants where it is inlined), summed over all
 * of K. `a` is the first row's quantized activations (rows K4 bytes apart; `correction` their
 * 128 * sums), `w` the strip's first group; every iteration prefetches a few lines of the next
 * strip (`prefetch`). */
TILE w8a8_tile(const int64_t rows, const int64_t nv, const int8_t *a, const int8_t *w,
               const int64_t k4, const float *x_scale, const int32_t *correction,
               const float *w_scale, const void *bias, void *out, const Int8Shape *s,
               int64_t n0, int64_t out_stride, StripPrefetch *prefetch) {
#define ZERO(r, g) __m512i acc##r##g = _mm512_setzero_si512();
    EACH_CELL(ZERO)
#undef ZERO
    const int64_t group_stride = k4 * GROUP;
    const __m512i sign_bits = _mm512_set1_epi8((char)0x80);
    for (int64_t k = 0; k < k4; k += 4) {
        prefetch_step(prefetch);
#define LOAD(g) const __m512i w##g = g < nv ? _mm512_xor_si512( \
            _mm512_loadu_si512(w + g * group_stride + k * GROUP), sign_bits) \
            : _mm512_setzero_si512();
        EACH_VECTOR(LOAD)
#undef LOAD
#define MAC(r, g) if (r < rows && g < nv) acc##r##g = dpbusd(acc##r##g, w##g, a + r * k4 + k);
        EACH_CELL(MAC)
#undef MAC
    }
#define STORE(r, g) if (r < rows && g < nv) { \
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32( \
            acc##r##g, _mm512_set1_epi32(correction[r]))); \
        const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(w_scale + n0 + g * GROUP), \
                                           _mm512_set1_ps(x_scale[r])); \
        store16((char *)out + r * out_stride, bias, s->bf16, s->n, n0, g, \
                _mm512_mul_ps(sum, scale)); }
    EACH_CELL(STORE)
#undef STORE
}

/* W8A16: as w8a8_tile with bfloat16 x (rows x_stride elements apart) and the strip converted
 * to bfloat16 pairs in `wb`: [nv][K4 / 2][16 channels][2 k]; `w_scale` NULL: no scales (a
 * strip dequantized already). `prefetch` pulls in the next strip's stored values. */
TILE w8a16_tile(const int64_t rows, const int64_t nv, const uint16_t *x, const uint16_t *wb,
                const int64_t k4, const float *w_scale, const void *bias, void *out,
                const Int8Shape *s, int64_t n0, int64_t out_stride, StripPrefetch *prefetch) {
#define ZERO(r, g) __m512 acc##r##g = _mm512_setzero_ps();
    EACH_CELL(ZERO)
#undef ZERO
    const int64_t group_stride = k4 * GROUP;  /* bf16 elements per converted group */
    for (int64_t k = 0; k < k4; k += 2) {
        prefetch_step(prefetch);
#define LOAD(g) const __m512i w##g = g < nv ? \
            _mm512_loadu_si512(wb + g * group_stride + k * GROUP) : _mm512_setzero_si512();
        EACH_VECTOR(LOAD)
#undef LOAD
#define MAC(r, g) if (r < rows && g < nv) \
            acc##r##g = dpbf16(acc##r##g, x + r * s->x_stride + k, w##g);
        EACH_CELL(MAC)
#undef MAC
    }
#define STORE(r, g) if (r < rows && g < nv) \
        store16((char *)out + r * out_stride, bias, s->bf16, s->n, n0, g, w_scale \
                ? _mm512_mul_ps(acc##r##g, _mm512_loadu_ps(w_scale + n0 + g * GROUP)) \
                : acc##r##g);
    EACH_CELL(STORE)
#undef STORE
}

/* Byte `byte` (0..3) of each dword of v, sign-extended, as float32. */
static inline __m512 byte_as_float(__m512i v, int byte) {
    const __m512i shifted = byte == 3 ? v : _mm512_slli_epi32(v, 24 - 8 * byte);
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(shifted, 24));
}

/* Two floats' bfloat16 (exact for int8 values: the low 16 bits are zero) as one pair per dword:
 * lo in the low half, hi in the high half. */
static inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
    return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16),
                           _mm512_and_si512(_mm512_castps_si512(hi),
                                            _mm512_set1_epi32((int32_t)0xffff0000)));
}

/* The strip's nv groups (from `w`) as bfloat16 pairs into `wb` (layout of w8a16_tile). */
static void convert_strip(const int8_t *w, int64_t nv, int64_t k4, uint16_t *wb) {
    for (int64_t g = 0; g < nv; g++) {
        const int8_t *src = w + g * k4 * GROUP;
        uint16_t *dst = wb + g * k4 * GROUP;
        for (int64_t k = 0; k < k4; k += 4) {
            const __m512i v = _mm512_loadu_si512(src + k * GROUP);
            _mm512_storeu_si512(dst + k * GROUP,
                                bf16_pairs(byte_as_float(v, 0), byte_as_float(v, 1)));
            _mm512_storeu_si512(dst + (k + 2) * GROUP,
                                bf16_pairs(byte_as_float(v, 2), byte_as_float(v, 3)));
        }
    }
}

/* W8A16 for at most 4 rows (a decode step of a few sequences), one group of 16 channels: no
 * strip is converted to bf16 first (at such batches that pass cost what the halved weight
 * bytes save). Each 16-byte quarter of a packed vector (4 channels x 4 k) is sign-extended to
 * float32 and multiplied by the row's 4 activations of those k, broadcast (`xf`: the rows in
 * float32, K apart); accumulator j of a row holds channel 4j + lane / 4's partial sums over
 * k = lane % 4, added up at the end. */
#define EACH_SMALL_ROW(X) X(0) X(1) X(2) X(3)
#define EACH_QUARTER(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#define EACH_SMALL_CELL(X) EACH_QUARTER(X, 0) EACH_QUARTER(X, 1) EACH_QUARTER(X, 2) \
    EACH_QUARTER(X, 3)

TILE w8a16_small_group(const int64_t rows, const float *xf, const int8_t *w, const int64_t k4,
                       const int64_t k, const float *w_scale, const void *bias, void *out,
                       const Int8Shape *s, int64_t n0, int64_t out_stride) {
#define ZERO(r, j) __m512 acc##r##j = _mm512_setzero_ps();
    EACH_SMALL_CELL(ZERO)
#undef ZERO
    for (int64_t i = 0; i < k4; i += 4) {
#define QUARTER(j) const __m512 w##j = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32( \
            _mm_loadu_si128((const __m128i *)(w + i * GROUP + 16 * j))));
        EACH_VECTOR(QUARTER)
#undef QUARTER
#define BROADCAST(r) const __m512 x##r = r < rows \
            ? _mm512_broadcast_f32x4(_mm_loadu_ps(xf + r * k4 + i)) : _mm512_setzero_ps();
        EACH_SMALL_ROW(BROADCAST)
#undef BROADCAST
#define MAC(r, j) if (r < rows) acc##r##j = _mm512_fmadd_ps(w##j, x##r, acc##r##j);
        EACH_SMALL_CELL(MAC)
#undef MAC
    }
    (void)k;
    float partial[4][64], sums[GROUP];
#define SPILL(r, j) if (r < rows) _mm512_storeu_ps(partial[r] + 16 * j, acc##r##j);
    EACH_SMALL_CELL(SPILL)
#undef SPILL
    const __m512 ws = _mm512_loadu_ps(w_scale + n0);
    for (int64_t r = 0; r < rows; r++) {
        for (int c = 0; c < GROUP; c++)
            sums[c] = (partial[r][4 * c] + partial[r][4 * c + 1])
                      + (partial[r][4 * c + 2] + partial[r][4 * c + 3]);
        store16((char *)out + r * out_stride, bias, s->bf16, s->n, n0, 0,
                _mm512_mul_ps(_mm512_loadu_ps(sums), ws));
    }
}

/* One call of a tile function with `rows` and `nv` as constants, so that it unrolls into
 * registers. */
#define TILE_CASE(r, v, call) case (r) * 8 + (v): call(r, v); break;
#define TILE_SWITCH(rows, nv, call) switch ((rows) * 8 + (nv)) { \
    TILE_CASE(1, 1, call) TILE_CASE(1, 2, call) TILE_CASE(1, 3, call) TILE_CASE(1, 4, call) \
    TILE_CASE(2, 1, call) TILE_CASE(2, 2, call) TILE_CASE(2, 3, call) TILE_CASE(2, 4, call) \
    TILE_CASE(3, 1, call) TILE_CASE(3, 2, call) TILE_CASE(3, 3, call) TILE_CASE(3, 4, call) \
    TILE_CASE(4, 1, call) TILE_CASE(4, 2, call) TILE_CASE(4, 3, call) TILE_CASE(4, 4, call) \
    TILE_CASE(5, 1, call) TILE_CASE(5, 2, call) TILE_CASE(5, 3, call) TILE_CASE(5, 4, call) \
    TILE_CASE(6, 1, call) TILE_CASE(6, 2, call) TILE_CASE(6, 3, call) TILE_CASE(6, 4, call) }

/* Quantized activations [rows][K4], their scales and their corrections (quantize_row), or
 * NULL when out of memory. */
static int8_t *quantize_rows(const void *x, const Int8Shape *s, float levels, float *x_scale,
                             int32_t *correction) {
    int8_t *a = malloc((size_t)(s->rows * s->k4));
    if (!a) return NULL;
    const int64_t size = s->bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) if (s->rows > 1)
    for (int64_t m = 0; m < s->rows; m++)
        x_scale[m] = quantize_row((const char *)x + m * s->x_stride * size, s->bf16, s->k,
                                  s->k4, levels, a + m * s->k4, correction + m);
    return a;
}

/* W8A8 (see the top of the file): x [rows][K] (float32 or bfloat16, rows x_stride apart),
 * quantized with `levels` (127 or 127.5); out [rows][N] contiguous, of x's dtype; bias NULL or
 * [N] of that dtype. Returns 0, or 1 when out of memory for the quantized activations. */
int int8_linear_w8a8(void *out, const void *x, const int8_t *w, const float *w_scale,
                     const void *bias, int64_t rows, int64_t n, int64_t k, int64_t x_stride,
                     int64_t bf16, float levels) {
    const Int8Shape s = {rows, n, k, (k + 3) / 4 * 4, x_stride, bf16};
    /* Per row: its scale (a float) and its correction (an int32), in one allocation. */
    float *x_scale = malloc((size_t)rows * (sizeof(float) + sizeof(int32_t)));
    int32_t *correction = x_scale ? (int32_t *)(x_scale + rows) : NULL;
    int8_t *a = x_scale ? quantize_rows(x, &s, levels, x_scale, correction) : NULL;
    if (!a) {
        free(x_scale);
        return 1;
    }
    const int64_t groups = (n + GROUP - 1) / GROUP, out_stride = n * (bf16 ? 2 : 4);
    #pragma omp parallel
    {
        int64_t first, last;
        thread_groups(groups, &first, &last);
        for (int64_t m0 = 0; m0 < rows; m0 += ROW_BLOCK)
            for (int64_t g0 = first; g0 < last; g0 += STRIP_GROUPS) {
                const int64_t nv = last - g0 < STRIP_GROUPS ? last - g0 : STRIP_GROUPS;
                const int8_t *strip = w + g0 * s.k4 * GROUP;
                const int64_t m_end = m0 + ROW_BLOCK < rows ? m0 + ROW_BLOCK : rows;
                StripPrefetch prefetch = next_strip(strip + nv * s.k4 * GROUP, last - g0 - nv,
                                                    s.k4 * GROUP, m_end - m0, s.k4 / 4);
                for (int64_t m = m0; m < m_end; m += TILE_ROWS) {
                    const int64_t tile_rows = m_end - m < TILE_ROWS ? m_end - m : TILE_ROWS;
                    char *o = (char *)out + m * out_stride;
#define W8A8(r, v) w8a8_tile(r, v, a + m * s.k4, strip, s.k4, x_scale + m, correction + m, \
                             w_scale, bias, o, &s, g0 * GROUP, out_stride, &prefetch)
                    TILE_SWITCH(tile_rows, nv, W8A8)
#undef W8A8
                }
            }
    }
    free(a);
    free(x_scale);
    return 0;
}

/* W8A16 (see the top of the file): x bfloat16 [rows][K] with K a multiple of 4 (rows x_stride
 * apart), out bfloat16 [rows][N] contiguous, bias NULL or bfloat16 [N]. Returns 0, or 1 when
 * out of memory for a thread's converted strip. */
int int8_linear_w8a16(void *out, const uint16_t *x, const int8_t *w, const float *w_scale,
                      const void *bias, int64_t rows, int64_t n, int64_t k, int64_t x_stride) {
    const Int8Shape s = {rows, n, k, k, x_stride, 1};
    const int64_t groups = (n + GROUP - 1) / GROUP, out_stride = n * 2;
    int failed = 0;
    if (rows <= SMALL_ROWS) {  /* the rows in float32, then one group of channels at a time */
        float *xf = malloc((size_t)(rows * k) * sizeof(float));
        if (!xf) return 1;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * x_stride + i]);
        #pragma omp parallel
        {
            int64_t first, last;
            thread_groups(groups, &first, &last);
            for (int64_t g = first; g < last; g++) {
#define SMALL(r) case r: w8a16_small_group(r, xf, w + g * k * GROUP, k, k, w_scale, bias, out, \
                                           &s, g * GROUP, out_stride); break;
                switch (rows) { SMALL(1) SMALL(2) SMALL(3) SMALL(4) }
#undef SMALL
            }
        }
        free(xf);
        return 0;
    }
    #pragma omp parallel reduction(|:failed)
    {
        int64_t first, last;
        thread_groups(groups, &first, &last);
        uint16_t *wb = malloc((size_t)(STRIP_GROUPS * s.k4 * GROUP) * sizeof(uint16_t));
        failed = wb == NULL;
        for (int64_t m0 = 0; m0 < rows && wb; m0 += ROW_BLOCK)
            for (int64_t g0 = first; g0 < last; g0 += STRIP_GROUPS) {
                const int64_t nv = last - g0 < STRIP_GROUPS ? last - g0 : STRIP_GROUPS;
                const int8_t *strip = w + g0 * s.k4 * GROUP;
                const int64_t m_end = m0 + ROW_BLOCK < rows ? m0 + ROW_BLOCK : rows;
                StripPrefetch prefetch = next_strip(strip + nv * s.k4 * GROUP, last - g0 - nv,
                                                    s.k4 * GROUP, m_end - m0, s.k4 / 2);
                convert_strip(strip, nv, s.k4, wb);
                for (int64_t m = m0; m < m_end; m += TILE_ROWS) {
                    const int64_t tile_rows = m_end - m < TILE_ROWS ? m_end - m : TILE_ROWS;
                    char *o = (char *)out + m * out_stride;
#define W8A16(r, v) w8a16_tile(r, v, x + m * x_stride, wb, s.k4, w_scale, bias, o, &s, \
                               g0 * GROUP, out_stride, &prefetch)
                    TILE_SWITCH(tile_rows, nv, W8A16)
#undef W8A16
                }
            }
        free(wb);
    }
    return failed;
}
#endif

/* Grouped weights (quantization.GroupedWeight: GGUF's block formats): out = x W^T (+ bias) with
 *   W[n, k] = scales[n, k / G] * q[n, k] + offsets[n, k / G]
 * for groups of G consecutive k (G a multiple of 8; offsets NULL: zero). Weight-only: x keeps
 * its dtype (float32 or bfloat16).
 *  - A few rows (a decode step of a few sequences: up to 4 of 8-bit values, up to
 *    NARROW_SMALL_ROWS of narrower ones), or float32 x: the products q x are summed in float32
 *    per group, then scaled: y += s * sum(q x) + o * sum(x). The weights stream once per 4
 *    rows, in their packed bytes.
 *  - More rows of bfloat16 x (prefill, large batches): a strip of 64 channels is dequantized
 *    to bfloat16 (s * q + o by one fused multiply-add, then rounded: the weights a bf16 model
 *    dequantized at load holds) and multiplied by w8a16_tile, without scales.
 *  Where the two meet was measured (docs/performance.md, "GGUF values in vdpbf16ps's order"):
 *  narrow values' small path costs little per pass of 4 rows, so two passes beat a strip's
 *  dequantization up to 8 rows (at 12, only 4-bit values still gain); 8-bit values' small
 *  path widens each value to float32, and loses from 5 rows on.
 *
 * Packed (kernels/cpu_kernels.py, pack_grouped_cpu, PackedGroupedWeight), per block of 16
 * output channels:
 *  - 8-bit values: int8 [K][16], k-major, so that 16 bytes are one k of the 16 channels;
 *  - 4-, 5- and 6-bit values, stored unsigned (6-bit ones as v + 32; the kernels take 32 s
 *    per group back off): planes of bit fields, the values' low 4 bits first, then (5 and 6
 *    bits) their high 1 or 2. A plane of w-bit fields is 16-bit units [K / (32 / w)][16][2]:
 *    unit (s, c, p) holds 16 / w values of channel c, k = (32 / w) s + 2 j + p at bits
 *    w j .. w j + w - 1. A 64-byte row of the low plane is 8 k of 16 channels with each
 *    channel's pairs of k in neighbouring 16-bit lanes, the order vdpbf16ps takes: a value is
 *    one shift and one mask away, no byte shuffled across lanes (the layout before, k-major
 *    nibbles, took two unpacks, two lane permutes and two widenings for every 4 k; the default
 *    model's 4-bit linears at batch 1: docs/performance.md, "GGUF values in vdpbf16ps's
 *    order");
 *  - scales and offsets: [K / G][16], float32, or float16 (`half`) where every factor is one
 *    exactly (GGUF's Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 store them so): 2 bytes a group
 *    instead of 4.
 * The threads split the channel blocks. */

/* Factor `i` of scales or offsets (float32, or float16 when `half`). */
static inline float factor_at(const void *factors, int64_t i, int64_t half) {
    return half ? f16_to_f32(((const uint16_t *)factors)[i]) : ((const float *)factors)[i];
}

/* What 6-bit values are stored plus (so that every stored value is unsigned). */
enum { SIX_BIT_BIAS = 32 };

/* What a stored value of `bits` bits is plus the value. */
static inline float stored_bias(int64_t bits) { return bits == 6 ? SIX_BIT_BIAS : 0.0f; }

/* The plane of a 5- or 6-bit block's high bits: after its K / 2 rows of low nibbles. */
static inline const uint8_t *high_bits(const uint8_t *w, int64_t k) { return w + k / 2 * GROUP; }

#if INT8_SIMD
/* Factors i .. i + 15 (a group's 16 channels) as float32. */
static inline __m512 load_factors(const void *factors, int64_t i, int64_t half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)factors
                                                                       + i)))
                : _mm512_loadu_ps((const float *)factors + i);
}

/* bfloat16 128.0: with a value u below 128 in its low 7 bits, the bfloat16 128 + u exactly. */
enum { BF16_BASE_BITS = 0x4300, BF16_BASE = 128 };

/* A group's offsets (zero without) for values the kernel sees `base` above the values
 * themselves: s * (v + base) + o - base * s = s * v + o. */
static inline __m512 group_offsets(const void *offsets, __m512 s, float base, int64_t i,
                                   int64_t half) {
    const __m512 o = offsets ? load_factors(offsets, i, half) : _mm512_setzero_ps();
    return base == 0.0f ? o : _mm512_fnmadd_ps(_mm512_set1_ps(base), s, o);
}

/* (a & b) | c, bitwise, in one instruction. */
static inline __m512i and_or(__m512i a, __m512i b, __m512i c) {
    return _mm512_ternarylogic_epi32(a, b, c, 0xEA);
}

/* x shifted left by `bits` in each 16-bit lane (right where negative; a constant where
 * inlined). */
static inline __m512i shift16(__m512i x, int bits) {
    return bits >= 0 ? _mm512_slli_epi16(x, (unsigned)bits) : _mm512_srli_epi16(x, (unsigned)-bits);
}

/* The narrow values of k = i .. i + 7 (i a multiple of 8) of a channel block (K = k) as
 * vdpbf16ps's weight pairs, each stored value u as the bfloat16 128 + u: pair[m] holds
 * k = i + 2m, i + 2m + 1 of each of the 16 channels. The 16-bit shifts move fields across
 * bytes; each mask keeps the lane's own bits. */
static inline __attribute__((always_inline)) void narrow_pairs(
        const uint8_t *w, int64_t bits, int64_t k, int64_t i, __m512i pair[4]) {
    const __m512i low = _mm512_loadu_si512(w + i * GROUP / 2);
    const __m512i nibble = _mm512_set1_epi16(15), base = _mm512_set1_epi16(BF16_BASE_BITS);
    if (bits == 4) {
        for (int m = 0; m < 4; m++) pair[m] = and_or(shift16(low, -4 * m), nibble, base);
        return;
    }
    /* A unit of the high plane holds the fifth bits of 16 values of one parity (bit j: k =
     * 2j + p of its 32-k span), or the two high bits of 8 (bits 2j, 2j + 1; a 16-k span):
     * shift this row of 8 k's to the bottom, then each m's to bit 4. */
    const int64_t width = bits - 4, span_log2 = 6 - width;  /* a unit's span: 32 / width k */
    const __m512i units = _mm512_loadu_si512(high_bits(w, k) + (i >> span_log2) * 2 * GROUP * 2);
    const __m512i high = _mm512_srl_epi16(
        units, _mm_cvtsi64_si128(width * ((i & ((1 << span_log2) - 1)) >> 1)));
    const __m512i mask = _mm512_set1_epi16(width == 1 ? 0x10 : 0x30);
    for (int m = 0; m < 4; m++)
        pair[m] = and_or(shift16(low, -4 * m), nibble,
                         and_or(shift16(high, 4 - (int)width * m), mask, base));
}

/* The values of k = i .. i + 7 (i a multiple of 8) of a channel block as float32 vectors of
 * its 16 channels: 8-bit ones as stored, narrow ones `narrow_base` (0 or BF16_BASE) above the
 * stored (6-bit ones stored v + 32: stored_bias). Narrow values widen from their bfloat16
 * pairs as 128 + u: the bf16 strips keep that 128 (their sums are rounded to bfloat16, and
 * the subtraction cost 3-6 % of a step's linears at 16 rows), float32 x takes it off exactly,
 * so that its sums are no larger than the values make them. */
static inline __attribute__((always_inline)) void grouped_values(
        const uint8_t *w, int64_t bits, int64_t k, int64_t i, __m512 q[8],
        const float narrow_base) {
    if (bits == 8) {
        for (int j = 0; j < 8; j++)
            q[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(w + (i + j) * GROUP))));
        return;
    }
    __m512i pair[4];
    narrow_pairs(w, bits, k, i, pair);
    /* A 32-bit lane holds one channel's pair: its low half is k = i + 2m, its high half the
     * next; each bfloat16 is the top half of its float32. */
    for (int m = 0; m < 4; m++) {
        q[2 * m] = _mm512_castsi512_ps(_mm512_slli_epi32(pair[m], 16));
        q[2 * m + 1] = _mm512_castsi512_ps(_mm512_and_si512(pair[m],
                                                            _mm512_set1_epi32(-65536)));
        if (narrow_base != BF16_BASE)
            for (int j = 2 * m; j < 2 * m + 2; j++)
                q[j] = _mm512_sub_ps(q[j], _mm512_set1_ps(BF16_BASE - narrow_base));
    }
}

/* What grouped_values' values are above the values themselves. */
static inline float values_base(int64_t bits, float narrow_base) {
    return stored_bias(bits) + (bits == 8 ? 0.0f : narrow_base);
}

#define EACH_PAIR(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#define EACH_PAIR_CELL(X) EACH_PAIR(X, 0) EACH_PAIR(X, 1) EACH_PAIR(X, 2) EACH_PAIR(X, 3)

/* `rows` (at most 4) rows of bfloat16 x (x_stride apart; `xsum` their float32 sums per group,
 * K / G apart) times one channel block of narrow values: 16 outputs per row into `y`. Each
 * group sums (128 + u) x by vdpbf16ps (every product exact; four chains per row, one per pair
 * of k in a row of 8) and takes the 128 (and a 6-bit value's 32) back off with the offsets:
 * y += s acc + (o - base s) sum(x). */
TILE grouped_rows_bf16(const int64_t rows, const uint16_t *x, const int64_t x_stride,
                       const float *xsum, const int64_t k, const uint8_t *w, const int64_t bits,
                       const void *scales, const void *offsets, const int64_t half,
                       const int64_t group, __m512 *y) {
#define ZERO(r) __m512 total##r = _mm512_setzero_ps();
    EACH_SMALL_ROW(ZERO)
#undef ZERO
    const int64_t groups = k / group;
    for (int64_t g = 0; g < groups; g++) {
#define ZERO(r, m) __m512 acc##r##m = _mm512_setzero_ps();
        EACH_PAIR_CELL(ZERO)
#undef ZERO
        for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
            __m512i pair[4];
            narrow_pairs(w, bits, k, i, pair);
#define MAC(r, m) if (r < rows) acc##r##m = dpbf16(acc##r##m, x + r * x_stride + i + 2 * m, \
                                                   pair[m]);
            EACH_PAIR_CELL(MAC)
#undef MAC
        }
        const __m512 s = load_factors(scales, g * GROUP, half);
        const __m512 o = group_offsets(offsets, s, values_base(bits, BF16_BASE), g * GROUP,
                                       half);
#define SCALE(r) if (r < rows) total##r = _mm512_fmadd_ps( \
            o, _mm512_set1_ps(xsum[r * groups + g]), _mm512_fmadd_ps(_mm512_add_ps( \
            _mm512_add_ps(acc##r##0, acc##r##1), _mm512_add_ps(acc##r##2, acc##r##3)), s, \
            total##r));
        EACH_SMALL_ROW(SCALE)
#undef SCALE
    }
#define RESULT(r) if (r < rows) y[r] = total##r;
    EACH_SMALL_ROW(RESULT)
#undef RESULT
}

/* `rows` (at most 4) rows of float32 x (K apart; `xsum` their sums per group, K / G apart)
 * times one channel block: 16 outputs per row into `y`. Accumulator (r, j) sums row r's q x
 * of k = j (mod 4) within a group: four independent chains per row. */
TILE grouped_rows(const int64_t rows, const float *xf, const float *xsum, const int64_t k,
                  const uint8_t *w, const int64_t bits, const void *scales,
                  const void *offsets, const int64_t half, const int64_t group, __m512 *y) {
#define ZERO(r) __m512 total##r = _mm512_setzero_ps();
    EACH_SMALL_ROW(ZERO)
#undef ZERO
    const int64_t groups = k / group;
    for (int64_t g = 0; g < groups; g++) {
#define ZERO(r, j) __m512 acc##r##j = _mm512_setzero_ps();
        EACH_PAIR_CELL(ZERO)
#undef ZERO
        for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
            __m512 q[8];
            grouped_values(w, bits, k, i, q, 0.0f);
#define MAC(r, j) if (r < rows) acc##r##j = _mm512_fmadd_ps( \
                q[j + 4], _mm512_set1_ps(xf[r * k + i + j + 4]), _mm512_fmadd_ps( \
                q[j], _mm512_set1_ps(xf[r * k + i + j]), acc##r##j));
            EACH_PAIR_CELL(MAC)
#undef MAC
        }
        const __m512 s = load_factors(scales, g * GROUP, half);
#define SCALE(r) if (r < rows) total##r = _mm512_fmadd_ps(_mm512_add_ps( \
            _mm512_add_ps(acc##r##0, acc##r##1), _mm512_add_ps(acc##r##2, acc##r##3)), s, total##r);
        EACH_SMALL_ROW(SCALE)
#undef SCALE
        if (offsets || bits == 6) {
            const __m512 o = group_offsets(offsets, s, values_base(bits, 0.0f), g * GROUP, half);
#define OFFSET(r) if (r < rows) total##r = _mm512_fmadd_ps( \
                o, _mm512_set1_ps(xsum[r * groups + g]), total##r);
            EACH_SMALL_ROW(OFFSET)
#undef OFFSET
        }
    }
#define RESULT(r) if (r < rows) y[r] = total##r;
    EACH_SMALL_ROW(RESULT)
#undef RESULT
}

/* The strip's nv channel blocks (from `w`, `block_bytes` apart; scales and offsets
 * `block_groups` floats apart) dequantized to bfloat16 pairs in `wb`, w8a16_tile's layout
 * [nv][K / 2][16][2]. */
static void dequantize_strip(const uint8_t *w, int64_t bits, const void *scales,
                             const void *offsets, int64_t half, int64_t group, int64_t nv,
                             int64_t k, int64_t block_bytes, int64_t block_groups,
                             uint16_t *wb) {
    for (int64_t b = 0; b < nv; b++) {
        const uint8_t *src = w + b * block_bytes;
        uint16_t *dst = wb + b * k * GROUP;
        for (int64_t i = 0; i < k; i += 8) {
            const int64_t at = b * block_groups + i / group * GROUP;
            const __m512 s = load_factors(scales, at, half);
            const __m512 o = group_offsets(offsets, s, values_base(bits, BF16_BASE), at, half);
            __m512 q[8];
            grouped_values(src, bits, k, i, q, BF16_BASE);
            for (int j = 0; j < 8; j += 2) {
                const __m512i lo = _mm512_cvtepu16_epi32(
                    (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(q[j], s, o)));
                const __m512i hi = _mm512_cvtepu16_epi32(
                    (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(q[j + 1], s, o)));
                _mm512_storeu_si512(dst + (i + j) * GROUP,
                                    _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
    }
}
#endif

/* x in float32 [rows][K] and its sums per group [rows][K / G], in one allocation (NULL when out
 * of memory). */
static float *grouped_inputs(const void *x, int64_t rows, int64_t k, int64_t x_stride,
                             int64_t bf16, int64_t group) {
    const int64_t groups = k / group;
    float *xf = malloc((size_t)(rows * (k + groups)) * sizeof(float));
    if (!xf) return NULL;
    float *xsum = xf + rows * k;
    for (int64_t r = 0; r < rows; r++) {
        /* one row at a time, each loop vectorized (a decode step's thousands of calls) */
        load_row(x, r * x_stride, bf16, k, xf + r * k);
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.0f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) sum += xf[r * k + i];
            xsum[r * groups + g] = sum;
        }
    }
    return xf;
}

#if !INT8_SIMD
/* Without the AVX-512 kernels (AVX2 and other CPUs): portable C the compiler vectorizes for
 * whatever the machine has (-march=native), with GCC's generic vectors (8 floats: one AVX2
 * register, two NEON ones) where the loops need them. Two paths, as on AVX-512:
 *  - up to 4 rows (SMALL_ROWS: decode steps of a few sequences): the values read as they
 *    stream (grouped_block_streamed), nothing written;
 *  - more rows: each block of 16 channels dequantized once into float32, k-major (s q + o),
 *    then tiles of 6 rows x 16 channels accumulated in registers (block_tile).
 * Either way a block's values come out of values16 k-major, 16 channels in two vectors, for
 * every width. The crossover was measured on a 2-core AVX2 EPYC, weights streamed from
 * memory (docs/performance.md, "Narrow values in channel order on AVX2"): from 5 rows on the
 * tiles took 0.6-1.0x streaming's time for 4- to 6-bit values, 0.8-1.05x for 8-bit ones. The
 * tiles run at the FMA units' rate there (~100 GFLOP/s on 2 cores, as MKL's sgemm), so the
 * dequantization pass is all they add. On AVX2, 4-bit values whose weight allows it (GGUF's)
 * take a third path up to 8 rows, by x rounded to 16-bit integers, in integer sums
 * (grouped_block_a16). A thread pulls its next block into the cache while it streams or
 * dequantizes one (StripPrefetch, common.h; float32 values at one row, already at
 * the memory's rate, and their tiles, which read the block in place, do without): left to the
 * hardware prefetcher, values narrower than float32 streamed a fifth to a third under the
 * memory's rate there (docs/performance.md, "Weights prefetched a block ahead on AVX2"). */

/* 8 int8 values as float32 (GCC 12 converts generic int8 vectors lane by lane). */
static inline f32x8 widen8(const int8_t *p) {
#if defined(__AVX2__)
    return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    f32x8 v;
    for (int j = 0; j < 8; j++) v[j] = (float)p[j];
    return v;
#endif
}

/* 8 bfloat16 values as float32: their bits are a float32's upper half. */
static inline f32x8 bf16x8(const uint16_t *p) {
#if defined(__AVX2__)
    return (f32x8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)),
                                    16);
#else
    u32x8 v;
    for (int j = 0; j < 8; j++) v[j] = (uint32_t)p[j] << 16;
    return (f32x8)v;
#endif
}

/* Which 8 k of their high bits' 16-bit units (16 k of 6-bit values, 32 of 5-bit ones: 2 and 4
 * phases) the 8 from k = i (a multiple of 8) are. The loops that read values16 go through the
 * phases in turn, each a copy of its own, so that every shift of the high bits is a constant:
 * variable shifts and their counts' arithmetic made 6-bit values cost 2.4x 4-bit ones at one
 * row on AVX2, 1.9x since (docs/performance.md, "e4m3 KV rows by F16C, and constant shifts
 * for 5- and 6-bit values, on AVX2"). */
static inline int high_phases(int64_t bits) { return bits == 5 ? 4 : bits == 6 ? 2 : 1; }

static inline int high_phase(int64_t bits, int64_t i) {
    return (int)((i >> 3) & (high_phases(bits) - 1));
}

/* Value k = i + u (i a multiple of 8 of high_phase `phase`, u < 8: both constants where
 * inlined, and so are the shifts) of a block's 16 channels as float32, two vectors (channels
 * 0-7, 8-15): float_linear's float32 values as they are, its bfloat16 ones and 8-bit ones
 * widened; narrow ones read from their planes as 32-bit words, the two 16-bit units of a
 * channel's pair of k (p = 0 in the low half, see above), so that one shift and one mask give
 * k's value for 8 channels at once, in channel order: no lane moves. The values as stored:
 * 6-bit ones are SIX_BIT_BIAS above, which group_factors' offsets take back. */
static inline __attribute__((always_inline)) void values16(
        const uint8_t *w, const int64_t bits, int64_t k, int64_t i, const int u, const int phase,
        f32x8 q[2]) {
    if (bits == 32) {
        q[0] = *((const f32x8 *)w + (i + u) * 2);
        q[1] = *((const f32x8 *)w + (i + u) * 2 + 1);
        return;
    }
    if (bits == 16) {
        q[0] = bf16x8((const uint16_t *)w + (i + u) * GROUP);
        q[1] = bf16x8((const uint16_t *)w + (i + u) * GROUP + 8);
        return;
    }
    if (bits == 8) {
        q[0] = widen8((const int8_t *)w + (i + u) * GROUP);
        q[1] = widen8((const int8_t *)w + (i + u) * GROUP + 8);
        return;
    }
    /* Pair t = i / 2 + u / 2 of k, p = u % 2 its k within the pair. */
    const int64_t high_width = bits - 4;
    const u32x8 *low = (const u32x8 *)w + i / 8 * 2;
    const int ls = 16 * (u % 2) + 4 * (u / 2);
    i32x8 v[2] = {(i32x8)((low[0] >> ls) & 15), (i32x8)((low[1] >> ls) & 15)};
    if (high_width) {
        /* t's unit: i's (u / 2 < 4 more pairs stay in it); its field: 4 phase + u / 2. */
        const int64_t high_per = 16 / high_width;
        const u32x8 *high = (const u32x8 *)high_bits(w, k) + i / 2 / high_per * 2;
        const int hs = 16 * (u % 2) + (int)high_width * (4 * phase + u / 2);
        const uint32_t mask = (1u << high_width) - 1;
        /* (high >> hs & mask) << 4 in two operations */
        for (int h = 0; h < 2; h++)
            v[h] |= (i32x8)((hs >= 4 ? high[h] >> (hs - 4) : high[h] << (4 - hs)) & mask << 4);
    }
    for (int h = 0; h < 2; h++)
        q[h] = __builtin_convertvector(v[h], f32x8);
}

/* Group g's 16 scales and offsets (zeros without) as float32, for the values as stored
 * (values16): s (v + bias) + o - bias s = s v + o, so a 6-bit value's bias costs nothing per
 * value. float16 factors by F16C's vector conversion where the CPU has it (one instruction
 * for 8, where factor_at takes two for 1). */
static inline void group_factors(const void *scales, const void *offsets, int64_t g,
                                 int64_t half, int64_t bits, float s[GROUP], float o[GROUP]) {
    int64_t c = 0;
    if (!scales) {  /* float values (float_linear): the weights themselves */
        for (; c < GROUP; c++) s[c] = 1.0f, o[c] = 0.0f;
        return;
    }
#if defined(__F16C__)
    if (half)
        for (; c < GROUP; c += 8) {
            _mm256_storeu_ps(s + c, _mm256_cvtph_ps(_mm_loadu_si128(
                (const __m128i *)((const uint16_t *)scales + g * GROUP + c))));
            _mm256_storeu_ps(o + c, offsets ? _mm256_cvtph_ps(_mm_loadu_si128(
                (const __m128i *)((const uint16_t *)offsets + g * GROUP + c)))
                                            : _mm256_setzero_ps());
        }
#endif
    for (; c < GROUP; c++) {
        s[c] = factor_at(scales, g * GROUP + c, half);
        o[c] = offsets ? factor_at(offsets, g * GROUP + c, half) : 0.0f;
    }
    if (stored_bias(bits) != 0.0f)  /* not o - 0 s for the others: s may be inf */
        for (c = 0; c < GROUP; c++) o[c] -= stored_bias(bits) * s[c];
}

/* The 8 k from i (high_phase `phase`) of dequantize_block. */
static inline __attribute__((always_inline)) void dequantize_eight(
        const uint8_t *w, const int64_t bits, int64_t k, int64_t i, const int phase, f32x8 s0,
        f32x8 s1, f32x8 o0, f32x8 o1, float *wk) {
    #pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
        f32x8 q[2];
        values16(w, bits, k, i, u, phase, q);
        *(f32x8 *)(wk + (i + u) * GROUP) = s0 * q[0] + o0;
        *(f32x8 *)(wk + (i + u) * GROUP + 8) = s1 * q[1] + o1;
    }
}

/* A block's weights W[c0 + c, i] = s q + o into wk [k][16] (k-major: the 16 channels of one
 * k side by side, two vectors). */
static inline __attribute__((always_inline)) void dequantize_block(
        const uint8_t *w, const int64_t bits, const void *scales, const void *offsets,
        int64_t half, int64_t group, int64_t k, StripPrefetch *prefetch, float *wk) {
    float s[GROUP], o[GROUP];
    for (int64_t g = 0; g < k / group; g++) {
        group_factors(scales, offsets, g, half, bits, s, o);
        const f32x8 s0 = *(const f32x8 *)s, s1 = *(const f32x8 *)(s + 8);
        const f32x8 o0 = *(const f32x8 *)o, o1 = *(const f32x8 *)(o + 8);
        for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
            prefetch_step(prefetch);
            switch (high_phase(bits, i)) {
            case 0: dequantize_eight(w, bits, k, i, 0, s0, s1, o0, o1, wk); break;
            case 1: dequantize_eight(w, bits, k, i, 1, s0, s1, o0, o1, wk); break;
            case 2: dequantize_eight(w, bits, k, i, 2, s0, s1, o0, o1, wk); break;
            default: dequantize_eight(w, bits, k, i, 3, s0, s1, o0, o1, wk);
            }
        }
    }
}

/* y[r][0..15] = sum over i of wk[i][.] x[r][i] for `rows` (<= 6; a constant where inlined)
 * rows of xf (k apart): 12 accumulators, each weight vector loaded once per 6 rows. */
static inline __attribute__((always_inline)) void block_tile(
        const int64_t rows, const float *xf, const float *wk, int64_t k, float y[6][GROUP]) {
    f32x8 acc[6][2];
    for (int64_t r = 0; r < rows; r++) acc[r][0] = acc[r][1] = (f32x8){0};
    for (int64_t i = 0; i < k; i++) {
        const f32x8 w0 = *(const f32x8 *)(wk + i * GROUP);
        const f32x8 w1 = *(const f32x8 *)(wk + i * GROUP + 8);
        for (int64_t r = 0; r < rows; r++) {
            const float xv = xf[r * k + i];
            acc[r][0] += w0 * xv;
            acc[r][1] += w1 * xv;
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < 8; c++) {
            y[r][c] = acc[r][0][c];
            y[r][8 + c] = acc[r][1][c];
        }
}

static inline void store_out(void *out, int64_t bf16, int64_t i, float y) {
    if (bf16) ((uint16_t *)out)[i] = to_bf16(y);
    else ((float *)out)[i] = y;
}

/* Rows `rows` of out (out_stride bytes apart), channels c0 .. c0 + 15 below n: y + bias. */
static void store_block(int64_t rows, float y[][GROUP], const void *bias, int64_t bf16,
                        int64_t n, int64_t c0, char *out, int64_t out_stride) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < GROUP && c0 + c < n; c++)
            store_out(out + r * out_stride, bf16, c0 + c,
                      y[r][c] + (bias ? load_one(bias, c0 + c, bf16) : 0.0f));
}

/* The 8 k from i (high_phase `phase`) of value_sums, into its accumulators a. */
static inline __attribute__((always_inline)) void sum_eight(
        const uint8_t *w, const int64_t bits, const float *xf, int64_t k, int64_t i,
        const int phase, const int64_t rows, const int64_t unroll, f32x8 a[4][4][2]) {
    #pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
        f32x8 q[2];
        values16(w, bits, k, i, u, phase, q);
        for (int64_t r = 0; r < rows; r++) {
            const float xv = xf[r * k + i + u];
            a[r][u % unroll][0] += q[0] * xv;
            a[r][u % unroll][1] += q[1] * xv;
        }
    }
}

/* acc[r][c] = sum over k in [i0, i1) of q[k][c] x[r][k] for a block's values (values16) and
 * `rows` (<= 4; a constant where inlined) rows of xf (k apart), i0 and i1 multiples of 8.
 * A chain of FMAs into one accumulator waits on each FMA's latency, so the sums are split over
 * 8 independent accumulators (few rows: over k too), all in registers. */
static inline __attribute__((always_inline)) void value_sums(
        const uint8_t *w, const int64_t bits, const float *xf, int64_t k, int64_t i0,
        int64_t i1, const int64_t rows, StripPrefetch *prefetch, f32x8 acc[4][2]) {
    const int64_t unroll = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    f32x8 a[4][4][2];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t u = 0; u < unroll; u++) a[r][u][0] = a[r][u][1] = (f32x8){0};
    for (int64_t i = i0; i < i1; i += 8) {
        prefetch_step(prefetch);
        switch (high_phase(bits, i)) {
        case 0: sum_eight(w, bits, xf, k, i, 0, rows, unroll, a); break;
        case 1: sum_eight(w, bits, xf, k, i, 1, rows, unroll, a); break;
        case 2: sum_eight(w, bits, xf, k, i, 2, rows, unroll, a); break;
        default: sum_eight(w, bits, xf, k, i, 3, rows, unroll, a);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t u = 1; u < unroll; u++) {
            a[r][0][0] += a[r][u][0];
            a[r][0][1] += a[r][u][1];
        }
        acc[r][0] = a[r][0][0];
        acc[r][1] = a[r][0][1];
    }
}

/* y[r][c] = sum over k of W[c0 + c, k] x[r, k] for a block's 16 channels and `rows` (<= 4;
 * a constant where inlined) rows, the values read as they stream (values16), summed against x,
 * then scaled per group as the AVX-512 path does (y += s sum(q x) + o sum(x)). Nothing is
 * written but y: a decode step's few rows read each weight once. */
static inline __attribute__((always_inline)) void grouped_block_streamed(
        const int64_t rows, const int64_t bits, const float *xf, const float *xsum, int64_t k,
        const uint8_t *w, const void *sb, const void *ob, int64_t half, int64_t group,
        StripPrefetch *prefetch, float y[4][GROUP]) {
    const int64_t groups = k / group;
    f32x8 yv[4][2] = {{{0}}};
    for (int64_t g = 0; g < groups; g++) {
        f32x8 acc[4][2];
        value_sums(w, bits, xf, k, g * group, (g + 1) * group, rows, prefetch, acc);
        float s[GROUP], o[GROUP];
        group_factors(sb, ob, g, half, bits, s, o);
        for (int64_t h = 0; h < 2; h++) {
            const f32x8 sh = *(const f32x8 *)(s + 8 * h), oh = *(const f32x8 *)(o + 8 * h);
            for (int64_t r = 0; r < rows; r++)
                yv[r][h] += sh * acc[r][h] + oh * xsum[r * groups + g];
        }
    }
    for (int64_t r = 0; r < rows; r++) memcpy(y[r], yv[r], sizeof yv[r]);
}

#if defined(__AVX2__)
/* 4-bit values by 16-bit activations (`int16_x`: GGUF's weights), up to A16_ROWS rows,
 * SMALL_ROWS at a time: each group of a row of x (the weights' groups: 16 or 32 k in GGUF's
 * formats) rounded to int16 by its largest magnitude, q = rint(x 32767 / amax),
 * dx = amax / 32767, and the products q_w q_x summed in int32 by vpmaddwd: a channel's 32-bit
 * word of low nibbles (values16's layout) shifted by 4 j and masked holds its values
 * k = 2 j and 2 j + 1 in its two 16-bit lanes, the pair vpmaddwd multiplies by a broadcast
 * pair of x. Per group and channel then y += s dx sum(q_w q_x) + o sum(x), sum(x) the float32
 * one. A value of x moves by at most dx / 2 (2^-16 of its group's largest), so
 * |y - x W^T| <= sum |s q_w| dx / 2: below bfloat16's rounding of x, which the AVX-512
 * paths multiply. The float path spends ~9 vector instructions a k of 16 channels at one
 * row on converting values and FMAs, this one ~4.5: on a 2-core AVX2 EPYC the default model's
 * 4-bit layers took 0.73-0.87x the float path's time at 1 to 4 rows and 0.96x at 8, but
 * 1.26x at 64, where the dequantized tiles run at the FMA units' rate (docs/performance.md,
 * "4-bit values by 16-bit activations on AVX2"). */

/* The largest group grouped_block_a16 sums in int32 (8 products of at most 15 x 32767 a lane
 * and step of 8 k: 546 steps, 4368 k; GGUF's groups are 16 and 32 k), and the most rows it
 * takes: past 8 the dequantized tiles were faster (the comment above). */
enum { A16_MAX_GROUP = 4096, A16_ROWS = 8 };

/* xf's rows [rows][K] quantized per group, in one allocation (NULL when out of memory): dx
 * [rows][K / group], their scales, then xq [rows][K] int16. A q out of range (x not finite)
 * becomes 0, so that its conversion is defined; such a group's float32 sum (xsum) is not
 * finite, and the outputs with it, as the float path's. */
static float *a16_inputs(const float *xf, int64_t rows, int64_t k, int64_t group) {
    const int64_t groups = k / group;
    float *dx = malloc((size_t)(rows * groups) * sizeof(float) + (size_t)(rows * k) * 2);
    if (!dx) return NULL;
    int16_t *xq = (int16_t *)(dx + rows * groups);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float *v = xf + r * k + g * group;
            float amax = 0.0f;
            for (int64_t i = 0; i < group; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
            const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            dx[r * groups + g] = amax / 32767.0f;
            int16_t *q = xq + r * k + g * group;
            for (int64_t i = 0; i < group; i++) {
                const float value = rintf(v[i] * inv);
                q[i] = (int16_t)(value >= -32767.0f && value <= 32767.0f ? value : 0.0f);
            }
        }
    return dx;
}

/* grouped_block_streamed for 4-bit values by 16-bit activations (above). */
static inline __attribute__((always_inline)) void grouped_block_a16(
        const int64_t rows, const int16_t *xq, const float *dx, const float *xsum, int64_t k,
        const uint8_t *w, const void *sb, const void *ob, int64_t half, int64_t group,
        StripPrefetch *prefetch, float y[4][GROUP]) {
    const int64_t groups = k / group;
    const __m256i nibbles = _mm256_set1_epi32(0x000F000F);
    __m256 yv[4][2];
    for (int64_t r = 0; r < rows; r++) yv[r][0] = yv[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i acc[4][2];
        for (int64_t r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
            prefetch_step(prefetch);
            const __m256i packed[2] = {_mm256_load_si256((const __m256i *)w + i / 8 * 2),
                                       _mm256_load_si256((const __m256i *)w + i / 8 * 2 + 1)};
            /* a channel's 32-bit word shifted by 4 j and masked: its values k = i + 2 j and
             * i + 2 j + 1 in its two 16-bit lanes, the pair vpmaddwd takes */
            #pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m256i pairs[2];
                for (int h = 0; h < 2; h++)
                    pairs[h] = _mm256_and_si256(_mm256_srli_epi32(packed[h], 4 * j), nibbles);
                for (int64_t r = 0; r < rows; r++) {
                    int32_t two;
                    memcpy(&two, xq + r * k + i + 2 * j, 4);
                    const __m256i xp = _mm256_set1_epi32(two);
                    for (int h = 0; h < 2; h++)
                        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs[h], xp));
                }
            }
        }
        float s[GROUP], o[GROUP];
        group_factors(sb, ob, g, half, 4, s, o);
        for (int h = 0; h < 2; h++) {
            const __m256 sh = _mm256_loadu_ps(s + 8 * h), oh = _mm256_loadu_ps(o + 8 * h);
            for (int64_t r = 0; r < rows; r++)
                yv[r][h] = _mm256_fmadd_ps(
                    _mm256_mul_ps(sh, _mm256_set1_ps(dx[r * groups + g])),
                    _mm256_cvtepi32_ps(acc[r][h]),
                    _mm256_fmadd_ps(oh, _mm256_set1_ps(xsum[r * groups + g]), yv[r][h]));
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        _mm256_storeu_ps(y[r], yv[r][0]);
        _mm256_storeu_ps(y[r] + 8, yv[r][1]);
    }
}
#endif

/* W8A8's activations where int8_linear_w8a8 is not built: each row of x (float32 or bfloat16,
 * rows x_stride apart) quantized per token as that kernel does (quantize_row: values
 * clamp(round(x levels / amax), lowest, 127), rounded to nearest even; scale amax / levels)
 * and multiplied back by its scale, into out [rows][K] float32, for the grouped kernel. */
void w8a8_activations(float *out, const void *x, int64_t rows, int64_t k, int64_t x_stride,
                      int64_t bf16, float levels) {
    const float lowest = levels > 127.0f ? -128.0f : -127.0f;
    #pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t m = 0; m < rows; m++) {
        float *o = out + m * k;
        float amax = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            o[i] = load_one(x, m * x_stride + i, bf16);
            amax = fmaxf(amax, fabsf(o[i]));
        }
        const float inv = amax > 0.0f ? levels / amax : 0.0f, scale = amax / levels;
        #pragma omp simd
        for (int64_t i = 0; i < k; i++)
            o[i] = fminf(fmaxf(rintf(o[i] * inv), lowest), 127.0f) * scale;
    }
}

static int grouped_linear_portable(void *out, const void *x, const uint8_t *w, int64_t bits,
                                   const void *scales, const void *offsets, int64_t half,
                                   int64_t group, const void *bias, int64_t rows, int64_t n,
                                   int64_t k, int64_t x_stride, int64_t bf16, int64_t int16_x) {
    const int64_t blocks = (n + GROUP - 1) / GROUP, out_stride = n * (bf16 ? 2 : 4);
    const int64_t block_bytes = k * GROUP * bits / 8, block_groups = k / group * GROUP;
    const int64_t factor_size = half ? 2 : 4;
    float *xf = grouped_inputs(x, rows, k, x_stride, bf16, group);
    if (!xf) return 1;
    const float *xsum = xf + rows * k;
#if defined(__AVX2__)
    /* x's rows as int16 where 4-bit values are multiplied by them */
    const int a16 = int16_x && bits == 4 && group <= A16_MAX_GROUP && rows <= A16_ROWS;
    float *dx = a16 ? a16_inputs(xf, rows, k, group) : NULL;
    if (a16 && !dx) {
        free(xf);
        return 1;
    }
    const int16_t *xq = a16 ? (const int16_t *)(dx + rows * (k / group)) : NULL;
#else
    (void)int16_x;  /* the float path */
#endif
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
        int64_t first, last;
        thread_groups(blocks, &first, &last);
        float *wf = malloc((size_t)(GROUP * k) * sizeof(float));
        failed = wf == NULL;
        for (int64_t b0 = first; b0 < last && wf; b0++) {
            const int64_t at = b0 * block_groups * factor_size;
            const uint8_t *wb = w + b0 * block_bytes;
            const void *sb = scales ? (const char *)scales + at : NULL;
            const void *ob = offsets ? (const char *)offsets + at : NULL;
#if defined(__AVX2__)
            if (a16) {  /* SMALL_ROWS rows at a time, the block in L1 after the first */
                StripPrefetch prefetch = strip_prefetch(wb + block_bytes,
                                                        b0 + 1 < last ? block_bytes : 0, k / 8);
                for (int64_t m = 0; m < rows; m += SMALL_ROWS) {
                    const int64_t chunk = rows - m < SMALL_ROWS ? rows - m : SMALL_ROWS;
                    const int64_t at_row = m * (k / group);
                    float y[SMALL_ROWS][GROUP];
#define ROWS(r) case r: grouped_block_a16(r, xq + m * k, dx + at_row, xsum + at_row, k, wb, sb, \
                                         ob, half, group, &prefetch, y); break;
                    switch (chunk) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) }
#undef ROWS
                    store_block(chunk, y, bias, bf16, n, b0 * GROUP, (char *)out + m * out_stride,
                                out_stride);
                }
                continue;
            }
#endif
            if (rows <= SMALL_ROWS) {
                float y[SMALL_ROWS][GROUP];
                /* The thread's next block pulled in while this one streams, except float32
                 * values for one row, which stream at the memory's rate without (and lose
                 * 6-15 % with it). */
                const int prefetched = b0 + 1 < last && !(bits == 32 && rows == 1);
                StripPrefetch prefetch = strip_prefetch(wb + block_bytes,
                                                        prefetched ? block_bytes : 0, k / 8);
                /* Rows and width constants in each inlined copy. */
#define ROWS(r, b) case r: grouped_block_streamed(r, b, xf, xsum, k, wb, sb, ob, half, group, \
                                                  &prefetch, y); break;
#define WIDTH(b) case b: switch (rows) { ROWS(1, b) ROWS(2, b) ROWS(3, b) ROWS(4, b) } break;
                switch (bits) { WIDTH(4) WIDTH(5) WIDTH(6) WIDTH(8) WIDTH(16) WIDTH(32) }
#undef WIDTH
#undef ROWS
                store_block(rows, y, bias, bf16, n, b0 * GROUP, out, out_stride);
                continue;
            }
            /* float32 values are already the tiles' k-major floats */
            const float *wk = bits == 32 ? (const float *)wb : wf;
            StripPrefetch prefetch = strip_prefetch(wb + block_bytes,
                                                    b0 + 1 < last ? block_bytes : 0, k / 8);
#define WIDTH(b) case b: dequantize_block(wb, b, sb, ob, half, group, k, &prefetch, wf); break;
            switch (bits) { WIDTH(4) WIDTH(5) WIDTH(6) WIDTH(8) WIDTH(16) }
#undef WIDTH
            for (int64_t m = 0; m < rows; m += TILE_ROWS) {
                const int64_t tile_rows = rows - m < TILE_ROWS ? rows - m : TILE_ROWS;
                float y[TILE_ROWS][GROUP];
#define ROWS(r) case r: block_tile(r, xf + m * k, wk, k, y); break;
                switch (tile_rows) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) }
#undef ROWS
                store_block(tile_rows, y, bias, bf16, n, b0 * GROUP,
                            (char *)out + m * out_stride, out_stride);
            }
        }
        free(wf);
    }
#if defined(__AVX2__)
    free(dx);
#endif
    free(xf);
    return failed;
}
#endif

/* Whether grouped_linear multiplies 4-bit values by 16-bit activations where asked
 * (grouped_block_a16: AVX2 CPUs without AVX-512's int8 kernels). */
int grouped_int16_activations(void) {
#if !INT8_SIMD && defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* See above: x [rows][K] float32 or bfloat16 (rows x_stride apart), out [rows][N] contiguous
 * of x's dtype, bias NULL or [N] of that dtype; `bits` 4, 5, 6 or 8; scales and offsets float16
 * when `half`, else float32; `int16_x`: 4-bit values may be multiplied by x rounded to 16-bit
 * integers per group (grouped_block_a16: on AVX2 CPUs without AVX-512, up to 8 rows). Returns
 * 0, or 1 when out of memory for its scratch buffers. */
int grouped_linear(void *out, const void *x, const uint8_t *w, int64_t bits,
                   const void *scales, const void *offsets, int64_t half, int64_t group,
                   const void *bias, int64_t rows, int64_t n, int64_t k, int64_t x_stride,
                   int64_t bf16, int64_t int16_x) {
#if !INT8_SIMD
    return grouped_linear_portable(out, x, w, bits, scales, offsets, half, group, bias, rows, n,
                                   k, x_stride, bf16, int16_x);
#else
    (void)int16_x;  /* vdpbf16ps's bfloat16 products (above) */
    const int64_t blocks = (n + GROUP - 1) / GROUP, out_stride = n * (bf16 ? 2 : 4);
    const int64_t block_bytes = k * GROUP * bits / 8, block_groups = k / group * GROUP;
    const int64_t factor_size = half ? 2 : 4;
    int failed = 0;
    if (bf16 && rows > (bits == 8 ? SMALL_ROWS : NARROW_SMALL_ROWS)) {
        const Int8Shape s = {rows, n, k, k, x_stride, 1};
        #pragma omp parallel reduction(|:failed)
        {
            int64_t first, last;
            thread_groups(blocks, &first, &last);
            uint16_t *wb = malloc((size_t)(STRIP_GROUPS * k * GROUP) * sizeof(uint16_t));
            failed = wb == NULL;
            for (int64_t b0 = first; b0 < last && wb; b0 += STRIP_GROUPS) {
                const int64_t nv = last - b0 < STRIP_GROUPS ? last - b0 : STRIP_GROUPS;
                const int64_t at = b0 * block_groups * factor_size;
                StripPrefetch prefetch = next_strip(w + (b0 + nv) * block_bytes, last - b0 - nv,
                                                    block_bytes, rows, k / 2);
                dequantize_strip(w + b0 * block_bytes, bits, (const char *)scales + at,
                                 offsets ? (const char *)offsets + at : NULL, half, group, nv,
                                 k, block_bytes, block_groups, wb);
                for (int64_t m = 0; m < rows; m += TILE_ROWS) {
                    const int64_t tile_rows = rows - m < TILE_ROWS ? rows - m : TILE_ROWS;
                    char *o = (char *)out + m * out_stride;
#define TILE16(r, v) w8a16_tile(r, v, (const uint16_t *)x + m * x_stride, wb, k, NULL, bias, \
                                o, &s, b0 * GROUP, out_stride, &prefetch)
                    TILE_SWITCH(tile_rows, nv, TILE16)
#undef TILE16
                }
            }
            free(wb);
        }
        return failed;
    }
    float *xf = grouped_inputs(x, rows, k, x_stride, bf16, group);
    if (!xf) return 1;
    const float *xsum = xf + rows * k;
    const int64_t groups = k / group;
    #pragma omp parallel
    {
        int64_t first, last;
        thread_groups(blocks, &first, &last);
        for (int64_t b = first; b < last; b++) {
            const uint8_t *wb = w + b * block_bytes;
            const char *sb = (const char *)scales + b * block_groups * factor_size;
            const char *ob = offsets ? (const char *)offsets + b * block_groups * factor_size
                                     : NULL;
            for (int64_t m = 0; m < rows; m += SMALL_ROWS) {
                const int64_t chunk = rows - m < SMALL_ROWS ? rows - m : SMALL_ROWS;
                char *o = (char *)out + m * out_stride;
                __m512 y[SMALL_ROWS];
                if (bf16 && bits != 8) {
                    /* Rows and widths constants in each inlined copy: no branch on either
                     * in the loop. */
#define ROWS(r, b) case r: grouped_rows_bf16(r, (const uint16_t *)x + m * x_stride, x_stride, \
                                             xsum + m * groups, k, wb, b, sb, ob, half, group, \
                                             y); break;
#define WIDTH(b) case b: switch (chunk) { ROWS(1, b) ROWS(2, b) ROWS(3, b) ROWS(4, b) } break;
                    switch (bits) { WIDTH(4) WIDTH(5) WIDTH(6) }
#undef WIDTH
#undef ROWS
                } else {
#define ROWS(r) case r: grouped_rows(r, xf + m * k, xsum + m * groups, k, wb, bits, sb, ob, \
                                     half, group, y); break;
                    switch (chunk) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) }
#undef ROWS
                }
                for (int64_t r = 0; r < chunk; r++)
                    store16(o + r * out_stride, bias, bf16, n, b * GROUP, 0, y[r]);
            }
        }
    }
    free(xf);
    return 0;
#endif
}

/* Float linear layers where the CPU has no AVX-512 (AVX2 and others): out = x W^T (+ bias),
 * W's values bfloat16 (`bits` 16) or float32 (32) in the grouped layout's blocks of 16
 * channels, k-major ([K][16] per block, zero-padded channels), summed in float32 by the
 * grouped kernel's portable paths with no scales. PyTorch's float32 matmuls (MKL, or oneDNN
 * on packed weights) ran the default model's decode-sized linears at 4-11 GB/s on a 2-core
 * AVX2 EPYC, far from its memory bandwidth; and a bfloat16 checkpoint served in float32 (the
 * auto dtype without AVX-512 BF16) keeps its weights in half the bytes here, exactly
 * (docs/performance.md, "Float linears on AVX2"). x float32 or bfloat16 as in
 * grouped_linear; K a multiple of 8. Returns 0; 1 when out of memory for its scratch
 * buffers; 2 where not built (float_linear_supported). */
int float_linear_supported(void) {
#if !INT8_SIMD && !defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

int float_linear(void *out, const void *x, const void *w, int64_t bits, const void *bias,
                 int64_t rows, int64_t n, int64_t k, int64_t x_stride, int64_t bf16) {
#if !INT8_SIMD && !defined(__AVX512F__)
    return grouped_linear_portable(out, x, w, bits, NULL, NULL, 0, k, bias, rows, n, k,
                                   x_stride, bf16, 0);
#else
    return 2;
#endif
}
