/* Paged decode attention for the CPU: one query token per sequence, K/V read in place through
 * the block table (no gathered copy), bfloat16 or float32 queries, a KV cache of the queries'
 * dtype or of fp8 (e4m3 or e5m2, each cache with one scale: K = stored * k_scale), float32
 * arithmetic (with bfloat16 queries and cache on CPUs with AVX-512 BF16, the q.K products are
 * bfloat16 dot products accumulated in float32, which is exact for the products, and so are the
 * P.V products, with the attention weights P rounded to bfloat16 first, as flash attention on
 * GPUs and PyTorch's CPU flash attention round them). The scales cost nothing per element:
 * k_scale joins the softmax scale, v_scale multiplies the output.
 *
 * Built at first use by kernels/cpu_kernels.py with the machine's C compiler
 * (-O3 -march=native -fopenmp: the loops over head_dim vectorise to the CPU's widest SIMD) and
 * loaded with ctypes. The OpenMP runtime is the one torch has already loaded (same soname), so
 * the kernel shares torch's thread pool rather than starting a second one.
 *
 * Work: one task per sequence (per (sequence, KV head) for small batches); the query heads that
 * share a KV head are its rows, so each K/V row is read and converted once for all of them, and
 * a task reads its context's blocks as contiguous streams. Two passes over the context:
 * scores (then an exact softmax), then the weighted sum of V. Positions outside the context or
 * the sliding window are never read. With bfloat16 queries (the CPU default) and head_dim a
 * multiple of 32, the passes go by tiles of 16 positions (attend_tiles_bf16: no horizontal sum
 * per score, V's accumulators in registers). Where the AVX-512 paths are not built (AVX2 and
 * other CPUs), head_dim a multiple of 8, by tiles of 8 positions in portable C
 * (tile_passes); otherwise position by position (attend).
 *
 * Prefill attention (paged_prefill_attention, below) goes by tiles of consecutive query tokens.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "common.h"

typedef struct {
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, table_stride;
    int64_t q_stride_s, q_stride_h, o_stride_s, o_stride_h;  /* in elements */
    int64_t kv_stride_b, kv_stride_t, kv_stride_h;           /* same for the K and V caches */
    int64_t bf16;                      /* queries and output: 1: bfloat16, 0: float32 */
    int64_t kv_format;                 /* the caches' FORMAT_* (common.h) */
    int64_t window;                    /* 0: no sliding window */
    float scale, k_scale, v_scale;
    float softcap;                     /* 0: none; else scores become softcap tanh(s / softcap) */
} DecodeShape;

/* DecodeShape's layout, for kernels/cpu_kernels.py to check its ctypes mirror of the struct at
 * load: returns the field names (space-separated) and points `*layout` at sizeof, then each
 * field's offset and size, in the same order. A field not listed here goes unchecked. */
#define DECODE_SHAPE_FIELDS(F) F(num_seqs) F(num_heads) F(num_kv_heads) F(head_dim) F(block_size) \
    F(table_stride) F(q_stride_s) F(q_stride_h) F(o_stride_s) F(o_stride_h) F(kv_stride_b)       \
    F(kv_stride_t) F(kv_stride_h) F(bf16) F(kv_format) F(window) F(scale) F(k_scale) F(v_scale)  \
    F(softcap)
#define FIELD_NAME(field) #field " "
#define FIELD_LAYOUT(field) offsetof(DecodeShape, field), sizeof(((DecodeShape *)0)->field),
const char *decode_shape_layout(const int64_t **layout) {
    static const int64_t values[] = {sizeof(DecodeShape), DECODE_SHAPE_FIELDS(FIELD_LAYOUT)};
    *layout = values;
    return DECODE_SHAPE_FIELDS(FIELD_NAME);
}
#undef DECODE_SHAPE_FIELDS
#undef FIELD_NAME
#undef FIELD_LAYOUT

#if FP8_TABLES
Fp8Table fp8_tables[2];

__attribute__((constructor)) static void fill_fp8_tables(void) {
    for (int i = 0; i < 128; i++)
        for (int f = 0; f < 2; f++) {
            const float value = f ? e5m2_to_f32((uint8_t)i) : e4m3_to_f32((uint8_t)i);
            union { float f; uint32_t u; } bits = { .f = value };
            fp8_tables[f].low[i] = (uint8_t)(bits.u >> 16);
            fp8_tables[f].high[i] = (uint8_t)(bits.u >> 24);
        }
}
#endif

/* scores[g * stride] = qf[g] . (the K row at `offset`) for each query row g. */
static inline void score_row(const void *k, int64_t offset, int64_t format, int64_t dim,
                             int64_t group, const float *qf, float *row, float *scores,
                             int64_t stride) {
#if defined(__AVX512F__)
    if (dim % 16 == 0) {  /* head sizes 64, 80, 96, 128, 256: one K row read for all rows */
        for (int64_t g = 0; g < group; g++) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16)
                sum = _mm512_fmadd_ps(load16(k, offset + d, format),
                                      _mm512_loadu_ps(qf + g * dim + d), sum);
            scores[g * stride] = _mm512_reduce_add_ps(sum);
        }
        return;
    }
#endif
    load_row(k, offset, format, dim, row);
    for (int64_t g = 0; g < group; g++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; d++) dot += qf[g * dim + d] * row[d];
        scores[g * stride] = dot;
    }
}

/* acc[g] += p[g * stride] * (the V row at `offset`) for each query row g. */
static inline void accumulate_row(const void *v, int64_t offset, int64_t format, int64_t dim,
                                  int64_t group, const float *p, int64_t stride, float *row,
                                  float *acc) {
#if defined(__AVX512F__)
    if (dim % 16 == 0) {
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512 value = load16(v, offset + d, format);
            for (int64_t g = 0; g < group; g++) {
                float *a = acc + g * dim + d;
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride]), value,
                                                    _mm512_loadu_ps(a)));
            }
        }
        return;
    }
#endif
    load_row(v, offset, format, dim, row);
    for (int64_t g = 0; g < group; g++) {
        const float weight = p[g * stride];
        for (int64_t d = 0; d < dim; d++) acc[g * dim + d] += weight * row[d];
    }
}

/* The first position a query with a context of `len` positions attends (its sliding window). */
static inline int64_t window_start(int64_t len, const DecodeShape *s) {
    return s->window > 0 && len > s->window ? len - s->window : 0;
}

/* p[0..n) = exp(p - max p), exactly as softmax's numerators (-inf entries become 0); returns
 * their sum. */
static inline float exp_row(float *p, int64_t n) {
    float max = -INFINITY, sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    /* The compiler keeps scalar loops for the max (its NaN rules) and the exp; these are
     * vectorised. */
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p + i));
    max = _mm512_reduce_max_ps(vmax);
#endif
    for (; i < n; i++) max = p[i] > max ? p[i] : max;
    i = 0;
#if defined(__AVX512F__)
    __m512 vsum = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(p + i),
                                                         _mm512_set1_ps(max)));
        _mm512_storeu_ps(p + i, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; i < n; i++) { p[i] = exp_nonpositive(p[i] - max); sum += p[i]; }
    return sum;
}

/* Gemma 2's soft-capping of a row of scaled scores: softcap * tanh(score / softcap), with tanh
 * from exp_nonpositive (no libm); masked scores (-inf) stay masked. */
static inline void softcap_row(float *p, int64_t n, float softcap) {
    for (int64_t i = 0; i < n; i++) {
        if (p[i] == -INFINITY) continue;
        const float x = p[i] / softcap, e = exp_nonpositive(-2.0f * fabsf(x));
        p[i] = copysignf(softcap * (1.0f - e) / (1.0f + e), x);
    }
}

/* A row of scaled scores into unnormalised attention weights (exp_row, after Gemma 2's soft
 * cap when the model has one), in place; returns the softmax's normaliser, 1 / their sum. */
static inline float weigh_row(float *p, int64_t n, const DecodeShape *s) {
    if (s->softcap > 0.0f) softcap_row(p, n, s->softcap);
    return 1.0f / exp_row(p, n);
}

/* A row of scaled scores into attention weights (the softmax), in place. */
static inline void softmax_row(float *p, int64_t n, const DecodeShape *s) {
    const float norm = weigh_row(p, n, s);
    for (int64_t i = 0; i < n; i++) p[i] *= norm;
}

/* Where position `pos` of a sequence starts in a KV cache (its first head), in elements. */
static inline int64_t slot_offset(const int64_t *table, int64_t pos, const DecodeShape *s) {
    return table[pos / s->block_size] * s->kv_stride_b + (pos % s->block_size) * s->kv_stride_t;
}

/* offsets[i] = where context position first + i starts in a KV cache (slot_offset), for
 * i < n, stepping through the block table without a division per position. */
static inline void context_offsets(const int64_t *table, int64_t first, int64_t n,
                                   const DecodeShape *s, int64_t *offsets) {
    int64_t block = first / s->block_size, within = first % s->block_size;
    for (int64_t i = 0; i < n; i++) {
        offsets[i] = table[block] * s->kv_stride_b + within * s->kv_stride_t;
        if (++within == s->block_size) { within = 0; block++; }
    }
}

/* Positions ahead of the one being read whose rows are prefetched. Once the pool's blocks have
 * been freed and reused, a sequence's blocks lie anywhere in the cache, and the hardware
 * prefetcher loses the stream at every block boundary (a step with every table scattered ran
 * its attention at half the speed of one with contiguous tables). */
#define PREFETCH_AHEAD 8

/* A task's `rows` query rows from head `head0` of sequence `seq`, as float32 times the softmax
 * scale and the K cache's scale, into qf, and acc zeroed (both [rows][head_dim]). */
static inline void load_queries(const void *q, int64_t seq, int64_t head0, int64_t rows,
                                const DecodeShape *s, int64_t bf16, float *qf, float *acc) {
    const int64_t dim = s->head_dim;
    const float scale = s->scale * s->k_scale;
    for (int64_t r = 0; r < rows; r++) {
        load_row(q, seq * s->q_stride_s + (head0 + r) * s->q_stride_h, bf16, dim, qf + r * dim);
        for (int64_t d = 0; d < dim; d++) qf[r * dim + d] *= scale;
        for (int64_t d = 0; d < dim; d++) acc[r * dim + d] = 0.0f;
    }
}

/* Brings `bytes` bytes from `offset` elements (of `format`) into `cache` towards the L2 cache
 * (locality 1: prefetcht2), not the L1. A prefetch into the L1 holds one of the L1's few miss
 * buffers until its line arrives, so a tile's worth of them (6 cache lines a position) stalled
 * the kernel's own loads behind them: with the cache streamed from memory, the decode kernel
 * ran at 0.6 ms a layer with locality 3 against 0.35 ms with 1 or 2 (batch 32, ~250 positions,
 * 2-core EPYC; the same 0.27 ms either way with the cache hot). docs/performance.md has it. */
static inline void prefetch_bytes(const void *cache, int64_t offset, int64_t format,
                                  int64_t bytes) {
    const char *start = (const char *)cache + offset * format_size(format);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(start + b, 0, 1);
}

/* acc's `rows` rows of `dim`, each times its softmax normaliser (norms[r], where norms is not
 * null) and the V cache's scale, then stored. */
static inline void store_rows(void *out, int64_t offset, int64_t stride, int64_t bf16,
                              int64_t rows, int64_t dim, float *acc, const float *norms,
                              float v_scale) {
    for (int64_t r = 0; r < rows; r++) {
        const float factor = (norms ? norms[r] : 1.0f) * v_scale;
        if (factor != 1.0f)
            for (int64_t d = 0; d < dim; d++) acc[r * dim + d] *= factor;
        store_row(out, offset + r * stride, bf16, dim, acc + r * dim);
    }
}

#if defined(__AVX512F__)
/* Key positions scored at once: one per lane of a 512-bit float vector. */
#define KEY_TILE 16

/* acc[r] (+)= sum over the tile's positions p < count of probs[r][p] * V[p], for RB rows from
 * `r0`, over the 32 dimensions from `d0` (rows of acc and probs `dim` and `n` apart; V[p] is
 * the float32 row vt + p * dim). */
static inline __attribute__((always_inline)) void weigh_values(
        float *acc, const float *probs, const float *vt, int64_t r0, int64_t d0, int64_t count,
        int64_t dim, int64_t n, const int64_t rb) {
    __m512 lo[8], hi[8];
    for (int64_t i = 0; i < rb; i++) {
        lo[i] = _mm512_loadu_ps(acc + (r0 + i) * dim + d0);
        hi[i] = _mm512_loadu_ps(acc + (r0 + i) * dim + d0 + 16);
    }
    for (int64_t p = 0; p < count; p++) {
        const __m512 v0 = _mm512_loadu_ps(vt + p * dim + d0);
        const __m512 v1 = _mm512_loadu_ps(vt + p * dim + d0 + 16);
        for (int64_t i = 0; i < rb; i++) {
            const __m512 w = _mm512_set1_ps(probs[(r0 + i) * n + p]);
            lo[i] = _mm512_fmadd_ps(w, v0, lo[i]);
            hi[i] = _mm512_fmadd_ps(w, v1, hi[i]);
        }
    }
    for (int64_t i = 0; i < rb; i++) {
        _mm512_storeu_ps(acc + (r0 + i) * dim + d0, lo[i]);
        _mm512_storeu_ps(acc + (r0 + i) * dim + d0 + 16, hi[i]);
    }
}
#endif

#if defined(__AVX512BF16__)
/* The lane sums of v[0..16) as the lanes of one vector, in order: a tree of lane permutes and
 * adds (45 operations for 16 sums, where one horizontal sum alone takes about 10). Level by
 * level, each vector holds the partial sums of twice as many inputs in half as many lanes. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *v) {
    static const int32_t pick[4][2][16] = {
        {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
         {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
        {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
         {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
        {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
         {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
        {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
         {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}}};
    __m512 level[16];
    for (int i = 0; i < 16; i++) level[i] = v[i];
    for (int l = 0, count = 16; l < 4; l++, count /= 2) {
        const __m512i a = _mm512_loadu_si512(pick[l][0]), b = _mm512_loadu_si512(pick[l][1]);
        for (int i = 0; i < count / 2; i++)
            level[i] = _mm512_add_ps(_mm512_permutex2var_ps(level[2 * i], a, level[2 * i + 1]),
                                     _mm512_permutex2var_ps(level[2 * i], b, level[2 * i + 1]));
    }
    return level[0];
}

/* Word indices for vpermt2w that interleave two vectors' bfloat16 values into dwords
 * (a[l], b[l]): [0] for l = 0..15, [1] for l = 16..31 (b's indices are 32 on). */
static const uint16_t interleave_words[2][32] = {
    {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
    {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};

/* dst[d] = the bfloat16 pair (a[d], b[d]) for d < dim (a multiple of 32): two positions' V rows
 * as vdpbf16ps takes them, so that one instruction adds both positions' weighted values (where
 * a float32 FMA adds one's, after converting the row). */
static inline void interleave_rows(const uint16_t *a, const uint16_t *b, int64_t dim,
                                   uint32_t *dst) {
    const __m512i low = _mm512_loadu_si512(interleave_words[0]);
    const __m512i high = _mm512_loadu_si512(interleave_words[1]);
    for (int64_t d = 0; d < dim; d += 32) {
        const __m512i x = _mm512_loadu_si512(a + d), y = _mm512_loadu_si512(b + d);
        _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(x, low, y));
        _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(x, high, y));
    }
}

#if FP8_TABLES
/* Byte order for fp8_rows_to_pairs: 32 bytes of a (0..31) and of b (32..63) interleaved
 * (a0 b0 a1 b1 ...), arranged so that fp8_words gives pairs 0-15 and then 16-31 in order. */
static const uint8_t fp8_pair_order[64] = {
    0, 32, 1, 33, 2, 34, 3, 35, 16, 48, 17, 49, 18, 50, 19, 51,
    4, 36, 5, 37, 6, 38, 7, 39, 20, 52, 21, 53, 22, 54, 23, 55,
    8, 40, 9, 41, 10, 42, 11, 43, 24, 56, 25, 57, 26, 58, 27, 59,
    12, 44, 13, 45, 14, 46, 15, 47, 28, 60, 29, 61, 30, 62, 31, 63};

/* dst[d] = the bfloat16 pair (a[d], b[d]) of two fp8 rows, d < dim (a multiple of 32): the
 * conversion and the interleaving of two positions' V rows for vdpbf16ps in one pass. */
static inline void fp8_rows_to_pairs(const Fp8Lookup *t, const uint8_t *a, const uint8_t *b,
                                     int64_t dim, uint32_t *dst) {
    const __m512i order = _mm512_loadu_si512(fp8_pair_order);
    for (int64_t d = 0; d < dim; d += 32) {
        const __m512i both = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + d))),
            _mm256_loadu_si256((const __m256i *)(b + d)), 1);
        __m512i w0, w1;
        fp8_words(t, _mm512_permutexvar_epi8(order, both), &w0, &w1);
        _mm512_storeu_si512(dst + d, w0);
        _mm512_storeu_si512(dst + d + 16, w1);
    }
}
#endif

/* acc[r0 + i] (+)= sum over pairs p < count of weights(r0 + i, p) . vpairs[p], over the 32
 * dimensions from d0, for RB rows: each dword of weights a (bfloat16, bfloat16) pair of two
 * positions' attention weights, at weights[i * row_stride + p * pair_stride]; each vpairs row
 * `dim` dwords of interleave_rows. The accumulators stay in registers across the pairs. */
static inline __attribute__((always_inline)) void weigh_pairs(
        float *acc, const uint32_t *weights, int64_t row_stride, int64_t pair_stride,
        const uint32_t *vpairs, int64_t count, int64_t r0, int64_t d0, int64_t dim,
        const int64_t rb) {
    __m512 lo[8], hi[8];
    for (int64_t i = 0; i < rb; i++) {
        lo[i] = _mm512_loadu_ps(acc + (r0 + i) * dim + d0);
        hi[i] = _mm512_loadu_ps(acc + (r0 + i) * dim + d0 + 16);
    }
    for (int64_t p = 0; p < count; p++) {
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vpairs + p * dim + d0);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vpairs + p * dim + d0 + 16);
        for (int64_t i = 0; i < rb; i++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(
                (int)weights[i * row_stride + p * pair_stride]);
            lo[i] = _mm512_dpbf16_ps(lo[i], w, v0);
            hi[i] = _mm512_dpbf16_ps(hi[i], w, v1);
        }
    }
    for (int64_t i = 0; i < rb; i++) {
        _mm512_storeu_ps(acc + (r0 + i) * dim + d0, lo[i]);
        _mm512_storeu_ps(acc + (r0 + i) * dim + d0 + 16, hi[i]);
    }
}

/* weigh_pairs for `rows` rows from r0, 8 at a time (rows r0.. of weights from `weights`),
 * each call with its row count constant, over every 32 dimensions. */
static inline void weigh_pair_rows(float *acc, const uint32_t *weights, int64_t row_stride,
                                   int64_t pair_stride, const uint32_t *vpairs, int64_t count,
                                   int64_t r0, int64_t rows, int64_t dim) {
    for (; rows > 0; r0 += 8, rows -= 8, weights += 8 * row_stride)
        for (int64_t d0 = 0; d0 < dim; d0 += 32)
            switch (rows < 8 ? rows : 8) {
#define WEIGH(rb) case rb: \
                weigh_pairs(acc, weights, row_stride, pair_stride, vpairs, count, r0, d0, dim, \
                            rb); break;
            WEIGH(1) WEIGH(2) WEIGH(3) WEIGH(4) WEIGH(5) WEIGH(6) WEIGH(7) WEIGH(8)
#undef WEIGH
            }
}

/* A row of n attention weights into bfloat16, in place: dword i of `p` becomes the pair
 * (p[2i], p[2i + 1]) as weigh_pairs reads them (p[n] taken as 0 when n is odd). Dword i lands
 * on p[i], which has been read by then. */
static inline void pair_weights(float *p, int64_t n) {
    int64_t i = 0;
    for (; 2 * i + 32 <= n; i += 16)  /* 32 weights; the low half of the result from the second */
        _mm512_storeu_si512(p + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 2 * i + 16),
                                                                _mm512_loadu_ps(p + 2 * i)));
    for (; 2 * i < n; i++) {
        const uint32_t second = 2 * i + 1 < n ? to_bf16(p[2 * i + 1]) : 0;
        ((uint32_t *)p)[i] = (uint32_t)to_bf16(p[2 * i]) | second << 16;
    }
}

/* q . k over `dim` (a multiple of 32) bfloat16 values, as a vector of partial sums. */
static inline __attribute__((always_inline)) __m512 dot_bf16_partial(
        const uint16_t *k, const uint16_t *q, const int64_t dim) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 32)
        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(k + d),
                               (__m512bh)_mm512_loadu_si512(q + d));
    return sum;
}

#if FP8_TABLES
/* An fp8 K row is converted to bfloat16 64 values at a time by fp8_words on its bytes as they
 * lie, which leaves them in the order of fp8_dot_source (per 64 dimensions). The queries are
 * stored once in that order, so no permute per row is needed. */
static inline int64_t fp8_dot_source(int64_t j) {
    return (j % 32) / 8 * 16 + (j >= 32) * 8 + j % 8;
}

/* Dimensions of a row in that order: head_dim rounded up to 64 (zeros after it). */
static inline int64_t fp8_dot_dim(int64_t dim) { return (dim + 63) / 64 * 64; }

/* An fp8 K row of `dim` values (a multiple of 32) as fp8_dot_dim(dim) bfloat16 values in
 * fp8_dot_source's order into dst. */
static inline void fp8_row_unpacked(const Fp8Lookup *t, const uint8_t *k, int64_t dim,
                                    uint16_t *dst) {
    for (int64_t d = 0; d < dim; d += 64) {
        __m512i w0, w1;  /* past `dim`: bytes 0, the bfloat16 0 */
        fp8_words(t, _mm512_maskz_loadu_epi8(dim - d >= 64 ? ~0ULL : 0xffffffffULL, k + d),
                  &w0, &w1);
        _mm512_storeu_si512(dst + d, w0);
        _mm512_storeu_si512(dst + d + 32, w1);
    }
}
#endif

/* Query row q's unscaled scores against a tile's first `count` K rows, one per lane. */
static inline __attribute__((always_inline)) __m512 score16(
        const uint16_t *const *k_rows, const uint16_t *q, int64_t count, const int64_t dim) {
    __m512 partial[KEY_TILE];
    for (int64_t p = 0; p < KEY_TILE; p++)
        partial[p] = p < count ? dot_bf16_partial(k_rows[p], q, dim) : _mm512_setzero_ps();
    return sum16(partial);
}

/* score16, unrolled for the common head sizes (a loop of two or four dot products otherwise
 * costs as much as the products). */
static inline __m512 score16_any(const uint16_t *const *k_rows, const uint16_t *q,
                                 int64_t count, int64_t dim) {
    switch (dim) {
    case 64: return score16(k_rows, q, count, 64);
    case 128: return score16(k_rows, q, count, 128);
    default: return score16(k_rows, q, count, dim);
    }
}

/* Decode attention by tiles of 16 positions, for bfloat16 queries over a bfloat16 cache (or an
 * fp8 one, its rows converted to bfloat16 as they are read), head_dim a multiple of 32. Per
 * tile and KV head: each query row's 16 scores come from bfloat16 dot products summed by one
 * sum16 (no horizontal sum per score); after the softmax, the weights are rounded to bfloat16
 * pairs of positions and the tile's V rows interleaved in pairs (weigh_pairs), with the
 * accumulators of up to 8 query rows in registers. `work` as paged_decode_attention sizes it. */
static inline __attribute__((always_inline)) void attend_tiles_bf16(
        void *out, const void *q, const void *k_cache, const void *v_cache,
        const int64_t *table, int64_t seq, int64_t kv_first, int64_t kv_last, int64_t len,
        const DecodeShape *s, float *work, const int64_t kv) {
    const int64_t group = s->num_heads / s->num_kv_heads, dim = s->head_dim;
    const int64_t heads = kv_last - kv_first, rows = heads * group, head0 = kv_first * group;
    const int64_t first = window_start(len, s), n = len - first;
    int64_t *offsets = (int64_t *)work;  /* [n], first: malloc aligns it */
    float *acc = (float *)(offsets + n), *scores = acc + rows * dim;
    /* The queries, bfloat16 [rows][qdim], and their dot products' length: as they are, or in
     * fp8_dot_source's order. */
#if FP8_TABLES
    const int64_t qdim = kv == FORMAT_BF16 ? dim : fp8_dot_dim(dim);
#else
    const int64_t qdim = dim;
#endif
    uint16_t *qb = (uint16_t *)(scores + rows * n);
    uint16_t *kt = qb + rows * qdim;  /* fp8 K rows converted: [head][position][qdim] */
    uint32_t *vpairs = (uint32_t *)(kt + heads * KEY_TILE * qdim);  /* [KEY_TILE / 2][dim] */
    float *norms = (float *)(vpairs + KEY_TILE / 2 * dim);   /* [rows] */
    context_offsets(table, first, n, s, offsets);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = (const uint16_t *)q + seq * s->q_stride_s
                              + (head0 + r) * s->q_stride_h;
#if FP8_TABLES
        if (kv != FORMAT_BF16) {
            for (int64_t d = 0; d < qdim; d++) {
                const int64_t source = d / 64 * 64 + fp8_dot_source(d % 64);
                qb[r * qdim + d] = source < dim ? row[source] : 0;
            }
            continue;
        }
#endif
        memcpy(qb + r * dim, row, dim * sizeof(uint16_t));
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    const __m512 scale = _mm512_set1_ps(s->scale * s->k_scale);
    const int64_t row_bytes = ((heads - 1) * s->kv_stride_h + dim) * format_size(kv);
    const int64_t head_offset = kv_first * s->kv_stride_h;
    /* [K, V][head * KEY_TILE + position]: bfloat16 rows, fp8 K rows converted; fp8 V rows as
     * stored, converted as they are interleaved. */
    const void *rows_of[2][KEY_TILE * 8];
#if FP8_TABLES
    const Fp8Lookup table_of_kv = fp8_lookup(kv == FORMAT_BF16 ? FORMAT_E4M3 : kv);
    const Fp8Lookup *lookup = &table_of_kv;
#endif
    for (int pass = 0; pass < 2; pass++) {
        const void *cache = pass ? v_cache : k_cache;
        for (int64_t i0 = 0; i0 < n; i0 += KEY_TILE) {
            const int64_t count = n - i0 < KEY_TILE ? n - i0 : KEY_TILE;
            /* The tile's rows, position by position (the order they lie in memory). */
            for (int64_t p = 0; p < count; p++) {
                const int64_t base = offsets[i0 + p];
                if (i0 + KEY_TILE + p < n)
                    prefetch_bytes(cache, offsets[i0 + KEY_TILE + p] + head_offset, kv,
                                   row_bytes);
                for (int64_t h = 0; h < heads; h++) {
                    const int64_t at = base + (kv_first + h) * s->kv_stride_h;
                    const void **row = &rows_of[pass][h * KEY_TILE + p];
                    *row = (const char *)cache + at * format_size(kv);
#if FP8_TABLES
                    if (kv != FORMAT_BF16 && !pass) {  /* once for every query of the group */
                        uint16_t *converted = kt + (h * KEY_TILE + p) * qdim;
                        fp8_row_unpacked(lookup, *row, dim, converted);
                        *row = converted;
                    }
#endif
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                const void *const *tile_rows = rows_of[pass] + h * KEY_TILE;
                if (pass) {
                    const int64_t pairs = (count + 1) / 2;
                    for (int64_t i = 0; i < pairs; i++) {  /* odd: the last row with itself */
                        const void *a = tile_rows[2 * i];
                        const void *b = tile_rows[2 * i + 1 < count ? 2 * i + 1 : 2 * i];
#if FP8_TABLES
                        if (kv != FORMAT_BF16) {
                            fp8_rows_to_pairs(lookup, a, b, dim, vpairs + i * dim);
                            continue;
                        }
#endif
                        interleave_rows(a, b, dim, vpairs + i * dim);
                    }
                    weigh_pair_rows(acc, (const uint32_t *)scores + h * group * n + i0 / 2, n, 1,
                                    vpairs, pairs, h * group, group, dim);
                    continue;
                }
                for (int64_t r = h * group; r < (h + 1) * group; r++)
                    _mm512_mask_storeu_ps(scores + r * n + i0, (__mmask16)((1u << count) - 1),
                                          _mm512_mul_ps(score16_any(
                                              (const uint16_t *const *)tile_rows,
                                              qb + r * qdim, count, qdim), scale));
            }
        }
        if (!pass)
            for (int64_t r = 0; r < rows; r++) {
                norms[r] = weigh_row(scores + r * n, n, s);
                pair_weights(scores + r * n, n);
            }
    }
    store_rows(out, seq * s->o_stride_s + head0 * s->o_stride_h, s->o_stride_h, 1, rows, dim,
               acc, norms, s->v_scale);
}
#endif

/* Positions a tile of the portable path scores and weighs at once (attend's scratch holds as
 * many converted rows everywhere). */
#define PORTABLE_TILE 8

#if !defined(__AVX512F__)
/* [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]: within each half, as AVX's
 * vhaddps (two in-lane shuffles and an add). */
static inline __attribute__((always_inline)) f32x8 pair_sums(f32x8 x, f32x8 y) {
    return __builtin_shuffle(x, y, (i32x8){0, 2, 8, 10, 4, 6, 12, 14})
           + __builtin_shuffle(x, y, (i32x8){1, 3, 9, 11, 5, 7, 13, 15});
}

/* The lane sums of a[0..8) as the lanes of one vector, in order (21 operations for 8 sums,
 * where one horizontal sum alone takes about 6). */
static inline __attribute__((always_inline)) f32x8 sum8(const f32x8 a[8]) {
    const f32x8 c0 = pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3]));
    const f32x8 c1 = pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
    return __builtin_shuffle(c0, c1, (i32x8){0, 1, 2, 3, 8, 9, 10, 11})
           + __builtin_shuffle(c0, c1, (i32x8){4, 5, 6, 7, 12, 13, 14, 15});
}

/* rows[p] = the float32 row of head h at tile position p (positions past `count` repeat the
 * last one): in the cache itself for a float32 cache, else converted into `converted`
 * ([PORTABLE_TILE][dim]). */
static inline __attribute__((always_inline)) void tile_rows(
        const void *cache, const int64_t *offsets, int64_t count, int64_t h, const DecodeShape *s,
        const int64_t kv, float *converted, const float *rows[PORTABLE_TILE]) {
    for (int64_t p = 0; p < PORTABLE_TILE; p++) {
        const int64_t at = offsets[p < count ? p : count - 1] + h * s->kv_stride_h;
        if (kv == FORMAT_F32) {
            rows[p] = (const float *)cache + at;
        } else if (p < count) {
            load_row(cache, at, kv, s->head_dim, converted + p * s->head_dim);
            rows[p] = converted + p * s->head_dim;
        } else {
            rows[p] = rows[count - 1];
        }
    }
}

/* The positions of the tile from i0 (at most PORTABLE_TILE of the n), with the next tile's
 * rows of the task's heads (row_bytes from head_offset) prefetched. */
static inline int64_t tile_prefetching(const void *cache, const int64_t *offsets, int64_t i0,
                                       int64_t n, int64_t kv, int64_t head_offset,
                                       int64_t row_bytes) {
    for (int64_t i = i0 + PORTABLE_TILE; i < i0 + 2 * PORTABLE_TILE && i < n; i++)
        prefetch_bytes(cache, offsets[i] + head_offset, kv, row_bytes);
    return n - i0 < PORTABLE_TILE ? n - i0 : PORTABLE_TILE;
}

/* acc[j] (+)= sum over the tile's positions p < count of w[j * n + p] V[p], for `block` (<= 4;
 * a constant where inlined) query rows j, 8 dimensions at a time, the rows' sums in registers
 * across the tile. */
static inline __attribute__((always_inline)) void weigh_tile(
        float *acc, const float *w, const float *const rows[PORTABLE_TILE], int64_t count,
        int64_t n, int64_t dim, const int64_t block) {
    for (int64_t d = 0; d < dim; d += 8) {
        f32x8 o[4];
        for (int64_t j = 0; j < block; j++) o[j] = *(const f32x8 *)(acc + j * dim + d);
        for (int64_t p = 0; p < count; p++) {
            const f32x8 v = *(const f32x8 *)(rows[p] + d);
            for (int64_t j = 0; j < block; j++) o[j] += w[j * n + p] * v;
        }
        for (int64_t j = 0; j < block; j++) *(f32x8 *)(acc + j * dim + d) = o[j];
    }
}

/* `attend`'s two passes by tiles of PORTABLE_TILE positions where the AVX-512 paths are not
 * built (AVX2 and other CPUs), head_dim a multiple of 8, from its prepared queries qf (and
 * zeroed acc, `converted` [PORTABLE_TILE][dim] free, scores [rows][n]): a tile's K rows are
 * scored against each query row at once, 8 partial dot products summed by one lane-sum tree
 * (sum8) instead of a horizontal sum per position; V's weighted sum keeps up to 4 query rows'
 * outputs in registers across the tile instead of loading and storing them per position. Rows
 * of a bfloat16 or fp8 cache are converted once per tile for all the query rows of their KV
 * head; a float32 cache's are read in place. */
static inline __attribute__((always_inline)) void tile_passes(
        const void *k_cache, const void *v_cache, const int64_t *offsets, int64_t n,
        int64_t kv_first, int64_t kv_last, const DecodeShape *s, const int64_t kv,
        const float *qf, float *acc, float *converted, float *scores) {
    const int64_t group = s->num_heads / s->num_kv_heads, dim = s->head_dim;
    const int64_t rows = (kv_last - kv_first) * group;
    const int64_t row_bytes = ((kv_last - kv_first - 1) * s->kv_stride_h + dim) * format_size(kv);
    const int64_t head_offset = kv_first * s->kv_stride_h;
    const float *tile[PORTABLE_TILE];
    for (int64_t i0 = 0; i0 < n; i0 += PORTABLE_TILE) {
        const int64_t count = tile_prefetching(k_cache, offsets, i0, n, kv, head_offset,
                                               row_bytes);
        for (int64_t h = kv_first; h < kv_last; h++) {
            tile_rows(k_cache, offsets + i0, count, h, s, kv, converted, tile);
            for (int64_t r = (h - kv_first) * group; r < (h - kv_first + 1) * group; r++) {
                f32x8 dots[PORTABLE_TILE] = {{0}};
                for (int64_t d = 0; d < dim; d += 8) {
                    const f32x8 qv = *(const f32x8 *)(qf + r * dim + d);
                    for (int64_t p = 0; p < PORTABLE_TILE; p++)
                        dots[p] += qv * *(const f32x8 *)(tile[p] + d);
                }
                const f32x8 sums = sum8(dots);
                for (int64_t p = 0; p < count; p++) scores[r * n + i0 + p] = sums[p];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) softmax_row(scores + r * n, n, s);
    for (int64_t i0 = 0; i0 < n; i0 += PORTABLE_TILE) {
        const int64_t count = tile_prefetching(v_cache, offsets, i0, n, kv, head_offset,
                                               row_bytes);
        for (int64_t h = kv_first; h < kv_last; h++) {
            tile_rows(v_cache, offsets + i0, count, h, s, kv, converted, tile);
            const int64_t r_end = (h - kv_first + 1) * group;
            for (int64_t r = (h - kv_first) * group; r < r_end; r += 4) {
                const float *w = scores + r * n + i0;
                switch (r_end - r < 4 ? r_end - r : 4) {
                case 1: weigh_tile(acc + r * dim, w, tile, count, n, dim, 1); break;
                case 2: weigh_tile(acc + r * dim, w, tile, count, n, dim, 2); break;
                case 3: weigh_tile(acc + r * dim, w, tile, count, n, dim, 3); break;
                default: weigh_tile(acc + r * dim, w, tile, count, n, dim, 4);
                }
            }
        }
    }
}
#endif

/* One sequence's KV heads [kv_first, kv_last). Position by position, the K (then V) rows of
 * those heads sit next to each other in the cache, so a task reads them as one stream.
 * Inlined into one copy per (query dtype, cache format) pair (`bf16` and `kv` constants in
 * each), so that none carries another's branches through its loops. */
static inline __attribute__((always_inline)) void attend(
        void *out, const void *q, const void *k_cache, const void *v_cache,
        const int64_t *table, int64_t seq, int64_t kv_first, int64_t kv_last, int64_t len,
        const DecodeShape *s, float *work, const int64_t bf16, const int64_t kv) {
#if defined(__AVX512BF16__)
    if (bf16 && s->head_dim % 32 == 0 && (kv == FORMAT_BF16 || (FP8_TABLES && kv != FORMAT_F32))) {
        attend_tiles_bf16(out, q, k_cache, v_cache, table, seq, kv_first, kv_last, len, s, work,
                          kv);
        return;
    }
#endif
    const int64_t group = s->num_heads / s->num_kv_heads, dim = s->head_dim;
    const int64_t rows = (kv_last - kv_first) * group, head0 = kv_first * group;
    const int64_t first = window_start(len, s);
    const int64_t n = len - first;
    int64_t *offsets = (int64_t *)work;  /* [n], first: malloc aligns it */
    context_offsets(table, first, n, s, offsets);
    float *qf = (float *)(offsets + n), *acc = qf + rows * dim, *row = acc + rows * dim;
    float *scores = row + PORTABLE_TILE * dim;  /* [rows][n] */
    load_queries(q, seq, head0, rows, s, bf16, qf, acc);
#if !defined(__AVX512F__)
    if (dim % 8 == 0) {
        tile_passes(k_cache, v_cache, offsets, n, kv_first, kv_last, s, kv, qf, acc, row,
                    scores);
        store_rows(out, seq * s->o_stride_s + head0 * s->o_stride_h, s->o_stride_h, bf16, rows,
                   dim, acc, 0, s->v_scale);
        return;
    }
#endif
    /* The bytes of one position's rows for this task's heads. */
    const int64_t row_bytes = ((kv_last - kv_first - 1) * s->kv_stride_h + dim) * format_size(kv);
    const int64_t head_offset = kv_first * s->kv_stride_h;
    for (int64_t i = 0; i < n; i++) {
        const int64_t base = offsets[i];
        if (i + PREFETCH_AHEAD < n)
            prefetch_bytes(k_cache, offsets[i + PREFETCH_AHEAD] + head_offset, kv, row_bytes);
        for (int64_t h = kv_first; h < kv_last; h++) {
            const int64_t r = (h - kv_first) * group;
            score_row(k_cache, base + h * s->kv_stride_h, kv, dim, group, qf + r * dim, row,
                      scores + r * n + i, n);
        }
    }
    for (int64_t r = 0; r < rows; r++) softmax_row(scores + r * n, n, s);
    for (int64_t i = 0; i < n; i++) {
        const int64_t base = offsets[i];
        if (i + PREFETCH_AHEAD < n)
            prefetch_bytes(v_cache, offsets[i + PREFETCH_AHEAD] + head_offset, kv, row_bytes);
        for (int64_t h = kv_first; h < kv_last; h++) {
            const int64_t r = (h - kv_first) * group;
            accumulate_row(v_cache, base + h * s->kv_stride_h, kv, dim, group,
                           scores + r * n + i, n, row, acc + r * dim);
        }
    }
    store_rows(out, seq * s->o_stride_s + head0 * s->o_stride_h, s->o_stride_h, bf16, rows, dim,
               acc, 0, s->v_scale);
}

typedef void (*AttendFunction)(void *, const void *, const void *, const void *,
                               const int64_t *, int64_t, int64_t, int64_t, int64_t,
                               const DecodeShape *, float *);

/* attend_<query dtype>_<cache format>: `attend` with both constant. */
#define ATTEND_COPY(name, bf16, kv)                                                            \
    static void name(void *out, const void *q, const void *k_cache, const void *v_cache,      \
                     const int64_t *table, int64_t seq, int64_t kv_first, int64_t kv_last,    \
                     int64_t len, const DecodeShape *s, float *work) {                        \
        attend(out, q, k_cache, v_cache, table, seq, kv_first, kv_last, len, s, work, bf16,   \
               kv);                                                                            \
    }
ATTEND_COPY(attend_f32_f32, 0, FORMAT_F32)
ATTEND_COPY(attend_f32_e4m3, 0, FORMAT_E4M3)
ATTEND_COPY(attend_f32_e5m2, 0, FORMAT_E5M2)
ATTEND_COPY(attend_bf16_bf16, 1, FORMAT_BF16)
ATTEND_COPY(attend_bf16_e4m3, 1, FORMAT_E4M3)
ATTEND_COPY(attend_bf16_e5m2, 1, FORMAT_E5M2)

/* The copy of `attend` for the shape's query dtype and cache format (a cache of the queries'
 * dtype, or fp8). */
static AttendFunction attend_for(const DecodeShape *s) {
    static const AttendFunction copies[2][4] = {
        {attend_f32_f32, 0, attend_f32_e4m3, attend_f32_e5m2},
        {0, attend_bf16_bf16, attend_bf16_e4m3, attend_bf16_e5m2}};
    return copies[s->bf16][s->kv_format];
}

/* Returns 0, or -1 when a task's scratch memory could not be allocated (out is then partly
 * written and must not be used). A task is one sequence, all its KV heads; with fewer
 * sequences than 4 per thread, one (sequence, KV head) so that every thread has work. */
int paged_decode_attention(void *out, const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, const int64_t *seq_lens,
                           const DecodeShape *s) {
    const int64_t group = s->num_heads / s->num_kv_heads;
    const int64_t heads_per_task = s->num_seqs >= 4 * omp_get_max_threads()
                                   ? s->num_kv_heads : 1;
    const int64_t chunks = s->num_kv_heads / heads_per_task;
    int failed = 0;
    #pragma omp parallel for schedule(static) reduction(|:failed)
    for (int64_t task = 0; task < s->num_seqs * chunks; task++) {
        const int64_t seq = task / chunks, kv_first = (task % chunks) * heads_per_task;
        const int64_t len = seq_lens[seq], rows = heads_per_task * group;
        /* The larger of attend's needs (2 rows + PORTABLE_TILE (8) rows of head_dim, the
         * scores) and attend_tiles_bf16's (a row of head_dim per query row, the queries in at
         * most as much again, 16 converted K rows per KV head in at most 8 rows' room each, 8
         * rows of V pairs, the scores, a normaliser per row), and each an int64 offset per
         * position. */
        float *work = malloc(sizeof(float) * ((2 * rows + 8 + 16 * heads_per_task) * s->head_dim
                                              + (rows + 2) * (len - window_start(len, s))
                                              + rows));
        if (!work) { failed = 1; continue; }
        attend_for(s)(out, q, k_cache, v_cache, block_tables + seq * s->table_stride, seq,
                      kv_first, kv_first + heads_per_task, len, s, work);
        free(work);
    }
    return failed ? -1 : 0;
}

/* Prefill attention by tiles: a tile of consecutive query tokens of one sequence (Python's
 * PREFILL_TILE_TOKENS, any count here) and one KV head per task, on AVX-512 CPUs, head_dim a
 * multiple of 32. Token by token (as decodes), a prefill is bound by one horizontal reduction
 * per (query row, position);
 * here a tile of 16 positions is scored against every query row of the tile at once, vectorised
 * over the positions (K transposed, no reductions, float32 FMAs), and the weighted sum of V keeps
 * blocks of query rows in registers across the positions. Each K and V row is read once per
 * tile instead of once per query token. With bfloat16 queries on CPUs with AVX-512 BF16, tiles
 * go through attend_tile_pairs instead (below), every product a bfloat16 dot product. */
#if defined(__AVX512F__)
/* sums[i] = the unscaled scores of query row r0 + i against the tile's 16 positions, for RB
 * rows: RB independent chains, each K vector loaded once for all of them (one chain would wait
 * on the instruction's latency at every step). kt holds K transposed (per dimension, 16
 * floats), qf the query rows. */
static inline __attribute__((always_inline)) void score_tile(
        __m512 *sums, const float *qf, const float *kf, int64_t r0, int64_t dim,
        const int64_t rb) {
    for (int64_t i = 0; i < rb; i++) sums[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        const __m512 k = _mm512_loadu_ps(kf + d * KEY_TILE);
        for (int64_t i = 0; i < rb; i++)
            sums[i] = _mm512_fmadd_ps(_mm512_set1_ps(qf[(r0 + i) * dim + d]), k, sums[i]);
    }
}

/* `tokens` query tokens from flat row `row0`, the first with a context of `len0` positions (the
 * next ones one more each), against KV head `h`; `work` as paged_prefill_attention sizes it.
 * Inlined into one copy per (query dtype, cache format) pair, each with constant flags. */
static inline __attribute__((always_inline)) void attend_tile(
        void *out, const void *q, const void *k_cache, const void *v_cache,
        const int64_t *table, int64_t row0, int64_t tokens, int64_t len0, int64_t h,
        const DecodeShape *s, float *work, const int64_t bf16, const int64_t kv) {
    const int64_t group = s->num_heads / s->num_kv_heads, dim = s->head_dim;
    const int64_t rows = tokens * group, size = format_size(kv);
    const int64_t first = window_start(len0, s);
    const int64_t n = len0 + tokens - 1 - first;
    float *acc = work, *vt = acc + rows * dim, *kt = vt + KEY_TILE * dim;
    float *qrows = kt + KEY_TILE * dim, *probs = qrows + rows * dim;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t g = 0; g < group; g++) {
            const int64_t offset = (row0 + t) * s->q_stride_s + (h * group + g) * s->q_stride_h;
            load_row(q, offset, bf16, dim, qrows + (t * group + g) * dim);
        }
    memset(acc, 0, sizeof(float) * rows * dim);
    const __m512i index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __m512 scale = _mm512_set1_ps(s->scale * s->k_scale);
    /* Scores: row r (token t, query head g) may attend relative positions [lo, hi). */
    for (int64_t p0 = 0; p0 < n; p0 += KEY_TILE) {
        const int64_t count = n - p0 < KEY_TILE ? n - p0 : KEY_TILE;
        for (int64_t p = 0; p < KEY_TILE; p++) {
            const char *krow = p < count ? (const char *)k_cache + size * (
                slot_offset(table, first + p0 + p, s) + h * s->kv_stride_h) : 0;
            int64_t row_format = kv;
#if FP8_TABLES
            uint16_t converted[dim];  /* an fp8 row as bfloat16 (exactly) */
            if (krow && kv != FORMAT_BF16 && kv != FORMAT_F32) {
                fp8_row_to_bf16((const uint8_t *)krow, dim, kv, converted);
                krow = (const char *)converted;
                row_format = FORMAT_BF16;
            }
#endif
            for (int64_t d = 0; d < dim; d++)
                kt[d * KEY_TILE + p] = krow ? load_one(krow, d, row_format) : 0.0f;
        }
        const __m512i position = _mm512_add_epi32(index, _mm512_set1_epi32((int)p0));
        const __mmask16 stored = (__mmask16)((1u << count) - 1);
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            __m512 sums[8];
            const int64_t rb = rows - r0 < 8 ? rows - r0 : 8;
            if (rb == 8)
                score_tile(sums, qrows, kt, r0, dim, 8);
            else
                for (int64_t i = 0; i < rb; i++)
                    score_tile(sums + i, qrows, kt, r0 + i, dim, 1);
            for (int64_t i = 0; i < rb; i++) {
                const int64_t t = (r0 + i) / group, hi = len0 + t - first;
                const int64_t lo = window_start(len0 + t, s) - first;
                const __mmask16 valid =
                    _mm512_cmplt_epi32_mask(position, _mm512_set1_epi32((int)hi))
                    & _mm512_cmpge_epi32_mask(position, _mm512_set1_epi32((int)lo));
                _mm512_mask_storeu_ps(probs + (r0 + i) * n + p0, stored,
                                      _mm512_mask_blend_ps(valid, minus_inf,
                                                           _mm512_mul_ps(sums[i], scale)));
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) softmax_row(probs + r * n, n, s);
    for (int64_t p0 = 0; p0 < n; p0 += KEY_TILE) {
        const int64_t count = n - p0 < KEY_TILE ? n - p0 : KEY_TILE;
        for (int64_t p = 0; p < count; p++) {
            const int64_t at = slot_offset(table, first + p0 + p, s) + h * s->kv_stride_h;
#if FP8_TABLES
            if (kv != FORMAT_BF16 && kv != FORMAT_F32) {
                uint16_t converted[dim];
                fp8_row_to_bf16((const uint8_t *)v_cache + at, dim, kv, converted);
                load_row(converted, 0, FORMAT_BF16, dim, vt + p * dim);
                continue;
            }
#endif
            load_row(v_cache, at, kv, dim, vt + p * dim);
        }
        for (int64_t d0 = 0; d0 < dim; d0 += 32) {
            int64_t r0 = 0;
            for (; r0 + 8 <= rows; r0 += 8)
                weigh_values(acc, probs + p0, vt, r0, d0, count, dim, n, 8);
            for (; r0 < rows; r0++)
                weigh_values(acc, probs + p0, vt, r0, d0, count, dim, n, 1);
        }
    }
    for (int64_t t = 0; t < tokens; t++)
        store_rows(out, (row0 + t) * s->o_stride_s + h * group * s->o_stride_h, s->o_stride_h,
                   bf16, group, dim, acc + t * group * dim, 0, s->v_scale);
}

#if defined(__AVX512BF16__)
/* Query rows scored at once by attend_tile_pairs: one per float32 lane. */
#define ROW_BLOCK 16
/* The widest head attend_tile_pairs takes, in dimension pairs: its K tile keeps this stride so
 * that each position's row lies at a constant offset (no register per row in the score loop). */
#define MAX_HALF_DIM 128

/* The scratch memory of attend_tile_pairs for `blocks` blocks of query rows, n positions. */
typedef struct {
    uint32_t *queries;  /* [blocks][dim / 2][ROW_BLOCK]: the rows' dimension pairs, rows across */
    float *scores;      /* [blocks][2 * pairs][ROW_BLOCK]; then the weights, in place */
    uint32_t *vpairs;   /* [pairs][dim] (interleave_rows) */
    uint16_t *keys;     /* [KEY_TILE][2 * MAX_HALF_DIM]: a tile's K rows */
    uint16_t *converted;  /* [2][dim]: fp8 rows as bfloat16 */
    float *acc;         /* [blocks * ROW_BLOCK][dim]: the rows' weighted sums of V */
    int32_t *bounds;    /* [blocks][2][ROW_BLOCK]: each row's first and end relative position */
    float *norms;       /* [blocks * ROW_BLOCK]: 1 / each row's sum of weights */
} PairsWork;

/* Points `w` into `base` (when not null) and returns the bytes it takes, each array aligned to
 * a cache line. */
static size_t pairs_work(char *base, int64_t blocks, int64_t pairs, int64_t dim, PairsWork *w) {
    size_t at = 0;
#define CARVE(field, count)                                                                    \
    if (base) w->field = (void *)(base + at);                                                  \
    at += ((size_t)(count) * sizeof(*w->field) + 63) / 64 * 64;
    CARVE(queries, blocks * dim / 2 * ROW_BLOCK)
    CARVE(scores, blocks * 2 * pairs * ROW_BLOCK)
    CARVE(vpairs, pairs * dim)
    CARVE(keys, KEY_TILE * 2 * MAX_HALF_DIM)
    CARVE(converted, 2 * dim)
    CARVE(acc, blocks * ROW_BLOCK * dim)
    CARVE(bounds, blocks * 2 * ROW_BLOCK)
    CARVE(norms, blocks * ROW_BLOCK)
#undef CARVE
    return at;
}

/* A K or V row of the cache as bfloat16: in place, or (fp8) converted into `converted`. */
static inline const uint16_t *bf16_row(const void *cache, int64_t at, int64_t kv, int64_t dim,
                                       uint16_t *converted) {
#if FP8_TABLES
    if (kv != FORMAT_BF16) {
        fp8_row_to_bf16((const uint8_t *)cache + at, dim, kv, converted);
        return converted;
    }
#else
    (void)kv; (void)dim; (void)converted;
#endif
    return (const uint16_t *)cache + at;
}

/* Scores of one block of 16 query rows (down the lanes) against the tile's 16 K rows (`keys`,
 * MAX_HALF_DIM pairs apart), scaled and masked to each row's [lo, hi), into scores[p][lane]
 * for the tile's first `count` positions from p0. Rows of `keys` from `count` on may hold
 * anything: their sums are never stored. */
static inline void score_block(float *scores, const uint32_t *queries, const uint32_t *keys,
                               const int32_t *bounds, int64_t p0, int64_t count, int64_t half,
                               __m512 scale) {
    __m512 sums[KEY_TILE];
    for (int p = 0; p < KEY_TILE; p++) sums[p] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; j++) {
        const __m512bh q = (__m512bh)_mm512_loadu_si512(queries + j * ROW_BLOCK);
        for (int p = 0; p < KEY_TILE; p++)
            sums[p] = _mm512_dpbf16_ps(
                sums[p], q, (__m512bh)_mm512_set1_epi32((int)keys[p * MAX_HALF_DIM + j]));
    }
    const __m512i lo = _mm512_loadu_si512(bounds), hi = _mm512_loadu_si512(bounds + ROW_BLOCK);
    for (int64_t p = 0; p < count; p++) {
        const __m512i position = _mm512_set1_epi32((int)(p0 + p));
        const __mmask16 valid = _mm512_cmplt_epi32_mask(position, hi)
                                & _mm512_cmpge_epi32_mask(position, lo);
        _mm512_storeu_ps(scores + (p0 + p) * ROW_BLOCK,
                         _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                                              _mm512_mul_ps(sums[p], scale)));
    }
}

/* A block's scores ([2 * pairs][ROW_BLOCK], the last row -inf when n is odd) into attention
 * weights: exp(score - the row's max) rounded to bfloat16 pairs of positions (as flash
 * attention on GPUs rounds its probabilities before P.V), written over the scores in place
 * (pair i's 16 dwords land on score row i, which positions 2i and 2i + 1 have been read by),
 * and `norms` = 1 / each row's sum of the unrounded weights (applied to the output). */
static inline void weigh_block(float *scores, int64_t pairs, float softcap, float *norms) {
    if (softcap > 0.0f) softcap_row(scores, 2 * pairs * ROW_BLOCK, softcap);
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t p = 0; p < 2 * pairs; p++)
        max = _mm512_max_ps(max, _mm512_loadu_ps(scores + p * ROW_BLOCK));
    const __m512i interleave = _mm512_loadu_si512(interleave_words[0]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; i++) {
        const __m512 a = exp_nonpositive16(
            _mm512_sub_ps(_mm512_loadu_ps(scores + 2 * i * ROW_BLOCK), max));
        const __m512 b = exp_nonpositive16(
            _mm512_sub_ps(_mm512_loadu_ps(scores + (2 * i + 1) * ROW_BLOCK), max));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512(scores + i * ROW_BLOCK, _mm512_permutex2var_epi16(
            _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a)), interleave,
            _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(b))));
    }
    _mm512_storeu_ps(norms, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
}

/* Prefill attention of one tile (as attend_tile) for bfloat16 queries on CPUs with AVX-512
 * BF16, every product a bfloat16 dot product (vdpbf16ps) summed in float32:
 * - scores with the query rows down the vector lanes (16 rows a vector, their dimension pairs
 *   laid out once per task) and each position's K pair broadcast from its row, so that K is
 *   read as it lies (no transposition) and each instruction makes 16 rows' partial scores;
 * - the softmax lane-parallel over 16 rows (weigh_block);
 * - P.V with V's rows interleaved in pairs of positions (weigh_pairs): one instruction adds two
 *   positions' weighted values for 16 dimensions, where a float32 FMA adds one's.
 * 1.6x the throughput of the float32 P.V it replaced (docs/performance.md, fourth sitting). */
static inline __attribute__((always_inline)) void attend_tile_pairs(
        void *out, const void *q, const void *k_cache, const void *v_cache,
        const int64_t *table, int64_t row0, int64_t tokens, int64_t len0, int64_t h,
        const DecodeShape *s, char *work, const int64_t kv) {
    const int64_t group = s->num_heads / s->num_kv_heads, dim = s->head_dim, half = dim / 2;
    const int64_t rows = tokens * group, blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t first = window_start(len0, s), n = len0 + tokens - 1 - first;
    const int64_t pairs = (n + 1) / 2;
    PairsWork w;
    pairs_work(work, blocks, pairs, dim, &w);
    /* Each row's query pairs and its positions [lo, hi); padding rows (zero queries) attend
     * everything, so that their softmax stays finite. */
    for (int64_t r = 0; r < blocks * ROW_BLOCK; r++) {
        const int64_t b = r / ROW_BLOCK, lane = r % ROW_BLOCK, t = r / group;
        const uint32_t *row = r < rows ? (const uint32_t *)((const uint16_t *)q
            + (row0 + t) * s->q_stride_s + (h * group + r % group) * s->q_stride_h) : 0;
        for (int64_t j = 0; j < half; j++)
            w.queries[(b * half + j) * ROW_BLOCK + lane] = row ? row[j] : 0;
        w.bounds[b * 2 * ROW_BLOCK + lane] =
            r < rows ? (int32_t)(window_start(len0 + t, s) - first) : 0;
        w.bounds[(b * 2 + 1) * ROW_BLOCK + lane] =
            r < rows ? (int32_t)(len0 + t - first) : (int32_t)n;
    }
    const __m512 scale = _mm512_set1_ps(s->scale * s->k_scale);
    for (int64_t p0 = 0; p0 < n; p0 += KEY_TILE) {
        const int64_t count = n - p0 < KEY_TILE ? n - p0 : KEY_TILE;
        for (int64_t p = 0; p < count; p++) {
            const int64_t at = slot_offset(table, first + p0 + p, s) + h * s->kv_stride_h;
            memcpy(w.keys + p * 2 * MAX_HALF_DIM, bf16_row(k_cache, at, kv, dim, w.converted),
                   dim * sizeof(uint16_t));
        }
        for (int64_t b = 0; b < blocks; b++)
            score_block(w.scores + b * 2 * pairs * ROW_BLOCK,
                        w.queries + b * half * ROW_BLOCK, (const uint32_t *)w.keys,
                        w.bounds + b * 2 * ROW_BLOCK, p0, count, half, scale);
    }
    for (int64_t b = 0; b < blocks; b++) {
        float *scores = w.scores + b * 2 * pairs * ROW_BLOCK;
        if (n % 2)
            for (int l = 0; l < ROW_BLOCK; l++) scores[n * ROW_BLOCK + l] = -INFINITY;
        weigh_block(scores, pairs, s->softcap, w.norms + b * ROW_BLOCK);
    }
    for (int64_t i = 0; i < pairs; i++) {
        const int64_t at = slot_offset(table, first + 2 * i, s) + h * s->kv_stride_h;
        /* With n odd, the last position pairs with itself, its second weight 0. */
        const uint16_t *a = bf16_row(v_cache, at, kv, dim, w.converted), *b = a;
        if (2 * i + 1 < n)
            b = bf16_row(v_cache, slot_offset(table, first + 2 * i + 1, s) + h * s->kv_stride_h,
                         kv, dim, w.converted + dim);
        interleave_rows(a, b, dim, w.vpairs + i * dim);
    }
    /* The weights of block b, pair i, lane l: dword (2 * b * pairs + i) * ROW_BLOCK + l (the
     * first half of the block's scores). */
    float *acc = w.acc;
    memset(acc, 0, sizeof(float) * rows * dim);
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * ROW_BLOCK;
        weigh_pair_rows(acc, (const uint32_t *)w.scores + 2 * b * pairs * ROW_BLOCK, 1,
                        ROW_BLOCK, w.vpairs, pairs, r0,
                        rows - r0 < ROW_BLOCK ? rows - r0 : ROW_BLOCK, dim);
    }
    for (int64_t t = 0; t < tokens; t++)
        store_rows(out, (row0 + t) * s->o_stride_s + h * group * s->o_stride_h, s->o_stride_h, 1,
                   group, dim, acc + t * group * dim, w.norms + t * group, s->v_scale);
}
#endif

typedef void (*AttendTileFunction)(void *, const void *, const void *, const void *,
                                   const int64_t *, int64_t, int64_t, int64_t, int64_t,
                                   const DecodeShape *, float *);

/* attend_tile_<query dtype>_<cache format>: `attend_tile` with its flags constant. */
#define ATTEND_TILE_COPY(name, bf16, kv)                                                       \
    static void name(void *out, const void *q, const void *k_cache, const void *v_cache,      \
                     const int64_t *table, int64_t row0, int64_t tokens, int64_t len0,        \
                     int64_t h, const DecodeShape *s, float *work) {                          \
        attend_tile(out, q, k_cache, v_cache, table, row0, tokens, len0, h, s, work, bf16,    \
                    kv);                                                                       \
    }
ATTEND_TILE_COPY(attend_tile_f32_f32, 0, FORMAT_F32)
ATTEND_TILE_COPY(attend_tile_f32_e4m3, 0, FORMAT_E4M3)
ATTEND_TILE_COPY(attend_tile_f32_e5m2, 0, FORMAT_E5M2)
ATTEND_TILE_COPY(attend_tile_bf16_bf16, 1, FORMAT_BF16)
ATTEND_TILE_COPY(attend_tile_bf16_e4m3, 1, FORMAT_E4M3)
ATTEND_TILE_COPY(attend_tile_bf16_e5m2, 1, FORMAT_E5M2)

/* Whether a tile goes through attend_tile_pairs: bfloat16 queries over a bfloat16 cache (or an
 * fp8 one, where the tables convert its rows to bfloat16) on CPUs with AVX-512 BF16, heads of
 * up to 2 * MAX_HALF_DIM. */
static int tile_pairs(const DecodeShape *s) {
#if defined(__AVX512BF16__)
    return s->bf16 && s->head_dim <= 2 * MAX_HALF_DIM
           && (s->kv_format == FORMAT_BF16 || (FP8_TABLES && s->kv_format != FORMAT_F32));
#else
    (void)s;
    return 0;
#endif
}

#if defined(__AVX512BF16__)
/* attend_tile_pairs_<cache format>: `attend_tile_pairs` with its cache format constant. */
#define ATTEND_TILE_PAIRS_COPY(name, kv)                                                       \
    static void name(void *out, const void *q, const void *k_cache, const void *v_cache,      \
                     const int64_t *table, int64_t row0, int64_t tokens, int64_t len0,        \
                     int64_t h, const DecodeShape *s, float *work) {                          \
        attend_tile_pairs(out, q, k_cache, v_cache, table, row0, tokens, len0, h, s,          \
                          (char *)work, kv);                                                   \
    }
ATTEND_TILE_PAIRS_COPY(attend_tile_pairs_bf16, FORMAT_BF16)
#if FP8_TABLES
ATTEND_TILE_PAIRS_COPY(attend_tile_pairs_e4m3, FORMAT_E4M3)
ATTEND_TILE_PAIRS_COPY(attend_tile_pairs_e5m2, FORMAT_E5M2)
#else
#define attend_tile_pairs_e4m3 0
#define attend_tile_pairs_e5m2 0
#endif
#endif

static AttendTileFunction attend_tile_for(const DecodeShape *s) {
#if defined(__AVX512BF16__)
    static const AttendTileFunction pairs[4] = {
        0, attend_tile_pairs_bf16, attend_tile_pairs_e4m3, attend_tile_pairs_e5m2};
    if (tile_pairs(s)) return pairs[s->kv_format];
#endif
    static const AttendTileFunction copies[2][4] = {
        {attend_tile_f32_f32, 0, attend_tile_f32_e4m3, attend_tile_f32_e5m2},
        {0, attend_tile_bf16_bf16, attend_tile_bf16_e4m3, attend_tile_bf16_e5m2}};
    return copies[s->bf16][s->kv_format];
}

/* The scratch bytes of a tile of `rows` query rows over n positions, for attend_tile_for(s). */
static size_t tile_work_bytes(const DecodeShape *s, int64_t rows, int64_t n) {
#if defined(__AVX512BF16__)
    if (tile_pairs(s))
        return pairs_work(0, (rows + ROW_BLOCK - 1) / ROW_BLOCK, (n + 1) / 2, s->head_dim, 0);
#endif
    /* acc, query rows [rows][dim]; V and K tiles [16][dim]; scores [rows][n] */
    return sizeof(float) * (2 * rows * s->head_dim + 2 * KEY_TILE * s->head_dim + rows * n);
}
#endif

/* 1 when `paged_prefill_attention` runs for this head size (else prefill tokens go through
 * `paged_decode_attention` one by one). */
int prefill_tiles_supported(int64_t head_dim) {
#if defined(__AVX512F__)
    return head_dim % 32 == 0;
#else
    (void)head_dim;
    return 0;
#endif
}

/* tiles [num_tiles][4]: the block-table row, the first query row, the number of query tokens
 * (consecutive positions of one sequence) and the first token's context length; s->num_seqs is
 * the number of tiles. Returns 0; -1 when scratch memory could not be allocated; -2 when not
 * supported (see prefill_tiles_supported). */
int paged_prefill_attention(void *out, const void *q, const void *k_cache, const void *v_cache,
                            const int64_t *block_tables, const int64_t *tiles,
                            const DecodeShape *s) {
#if defined(__AVX512F__)
    if (!prefill_tiles_supported(s->head_dim)) return -2;
    const int64_t group = s->num_heads / s->num_kv_heads;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) reduction(|:failed)
    for (int64_t task = 0; task < s->num_seqs * s->num_kv_heads; task++) {
        const int64_t *tile = tiles + 4 * (task / s->num_kv_heads);
        const int64_t tokens = tile[2], len0 = tile[3], rows = tokens * group;
        const int64_t first = window_start(len0, s);
        const int64_t n = len0 + tokens - 1 - first;  /* the positions attend_tile scores */
        float *work = malloc(tile_work_bytes(s, rows, n));
        if (!work) { failed = 1; continue; }
        attend_tile_for(s)(out, q, k_cache, v_cache, block_tables + tile[0] * s->table_stride,
                           tile[1], tokens, len0, task % s->num_kv_heads, s, work);
        free(work);
    }
    return failed ? -1 : 0;
#else
    (void)out; (void)q; (void)k_cache; (void)v_cache; (void)block_tables; (void)tiles; (void)s;
    return -2;
#endif
}

/* One row of `dim` elements of `src_format` into the cache's `kv_format`: copied as it is when
 * the formats agree, else divided by the cache's scale and rounded to fp8 (saturating). */
static inline void store_kv_row(char *dst, const char *src, int64_t dim, int64_t src_format,
                                int64_t kv_format, float scale) {
    if (kv_format == src_format) {
        memcpy(dst, src, dim * format_size(src_format));
        return;
    }
    const float inverse = 1.0f / scale;
    for (int64_t d = 0; d < dim; d++) {
        const float x = load_one(src, d, src_format) * inverse;
        dst[d] = (char)(kv_format == FORMAT_E4M3 ? f32_to_fp8(x, 3, 7, 448.0f)
                                                : f32_to_fp8(x, 2, 15, 57344.0f));
    }
}

/* The step's new K and V rows ([tokens][kv_heads][head_dim] of `src_format`, any token and head
 * strides, unit stride within a row) into their cache slots ([slots][kv_heads][head_dim] of
 * `kv_format`, contiguous): one call for both caches instead of two index_copy_ calls of
 * ~27 us each in a decode step. A negative slot marks a padding token: nothing is stored. */
void write_kv_cache(void *key_cache, void *value_cache, const void *key, const void *value,
                    const int64_t *slots, int64_t tokens, int64_t kv_heads, int64_t head_dim,
                    int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                    int64_t v_stride_h, int64_t src_format, int64_t kv_format, float k_scale,
                    float v_scale) {
    const int64_t src_size = format_size(src_format);
    const int64_t row_bytes = head_dim * format_size(kv_format);
    char *kc = key_cache, *vc = value_cache;
    const char *k = key, *v = value;
    #pragma omp parallel for schedule(static) if (tokens > 256)
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0)
            continue;
        const int64_t slot = slots[t] * kv_heads * row_bytes;
        for (int64_t h = 0; h < kv_heads; h++) {
            store_kv_row(kc + slot + h * row_bytes, k + (t * k_stride_t + h * k_stride_h) * src_size,
                         head_dim, src_format, kv_format, k_scale);
            store_kv_row(vc + slot + h * row_bytes, v + (t * v_stride_t + h * v_stride_h) * src_size,
                         head_dim, src_format, kv_format, v_scale);
        }
    }
}
