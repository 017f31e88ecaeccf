/* bfloat16 linear layers for the CPU: y = x W^T (+ b), x [M][K] and y [M][N] bfloat16, W packed
 * once at load as [ceil(N / 16)][K / 2][16] dwords, each the bfloat16 pair of two consecutive
 * k of one output channel, so that one AVX-512 BF16 dot product (vdpbf16ps) adds two k of 16
 * channels for one row of x, summed in float32. Built only for CPUs with AVX-512 BF16
 * (bf16_linear_supported); elsewhere kernels/cpu_kernels.py packs for oneDNN (other AVX-512
 * CPUs) or for int8_linear.c's float_linear (CPUs without AVX-512).
 *
 * Work: each thread takes an equal run of 16-channel blocks and walks it 64 channels (four
 * blocks) at a time: every 6 rows of x against those channels' W, with the 24 accumulators in
 * registers, W reloaded from the L2 cache for each 6 rows. Meanwhile it prefetches its next 64
 * channels' W into the L2, spread over the current ones' iterations, so that streaming the
 * weights from memory overlaps the arithmetic: a decode step reads every weight once, and
 * oneDNN's matmul (what PyTorch's mkldnn linear runs) left that stream unoverlapped: the
 * default model's linears at 32 rows took 22.7-25.0 ms through oneDNN against 17.1-17.3 ms here,
 * cycling through 30 layers' weights (docs/performance.md, "Our own bfloat16 matmul"). */
#include <stdint.h>
#include <omp.h>

#include "common.h"

/* Output channels per packed block: one per float32 lane. */
#define CHANNELS 16
/* Rows of x per pass over a group of W, and 16-channel blocks per group: 6 x 4 accumulators. */
#define ROWS 6
#define BLOCKS 4

int bf16_linear_supported(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
/* Rows [m0, m0 + RB) of y for the `nb` (constant) 16-channel blocks of `w` from block b0:
 * pairs = K / 2. Every iteration also prefetches a few lines of the next group (`prefetch`). */
static inline __attribute__((always_inline)) void rows_by_blocks(
        const uint16_t *x, int64_t x_stride, const uint32_t *w, int64_t pairs, int64_t m0,
        const int rb, const int nb, int64_t b0, const uint16_t *bias, uint16_t *y,
        int64_t y_stride, int64_t n, StripPrefetch *prefetch) {
    __m512 acc[ROWS][BLOCKS];
    for (int r = 0; r < rb; r++)
        for (int c = 0; c < nb; c++) acc[r][c] = _mm512_setzero_ps();
    const uint32_t *block = w + b0 * pairs * CHANNELS;
    for (int64_t k = 0; k < pairs; k++) {
        prefetch_step(prefetch);
        __m512bh wv[BLOCKS];
        for (int c = 0; c < nb; c++)
            wv[c] = (__m512bh)_mm512_loadu_si512(block + (c * pairs + k) * CHANNELS);
        for (int r = 0; r < rb; r++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(
                (int)((const uint32_t *)(x + (m0 + r) * x_stride))[k]);
            for (int c = 0; c < nb; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int c = 0; c < nb; c++) {
        const int64_t n0 = (b0 + c) * CHANNELS;
        const __mmask16 valid = n - n0 >= CHANNELS ? (__mmask16)0xffff
                                                   : (__mmask16)((1u << (n - n0)) - 1);
        const __m512 b = bias ? load16(bias, n0, FORMAT_BF16) : _mm512_setzero_ps();
        for (int r = 0; r < rb; r++)
            _mm256_mask_storeu_epi16(y + (m0 + r) * y_stride + n0, valid,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][c], b)));
    }
}

/* rows_by_blocks with its row count constant (so that the accumulators stay in registers). */
static inline __attribute__((always_inline)) void blocks_of_rows(
        const uint16_t *x, int64_t x_stride, const uint32_t *w, int64_t pairs, int64_t m0,
        int rb, const int nb, int64_t b0, const uint16_t *bias, uint16_t *y, int64_t y_stride,
        int64_t n, StripPrefetch *prefetch) {
    switch (rb) {
#define ROWS_CASE(count) case count: \
        rows_by_blocks(x, x_stride, w, pairs, m0, count, nb, b0, bias, y, y_stride, n, \
                       prefetch); break;
    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
#undef ROWS_CASE
    }
}
#endif

/* y [m][n] (row stride y_stride) = x [m][k] (row stride x_stride) W^T (+ bias [n], bfloat16, or
 * null), W packed as above ([ceil(n / 16)][k / 2][16] dwords; k even). Returns 0, or -2 where
 * the CPU lacks AVX-512 BF16. */
int bf16_linear(uint16_t *y, const uint16_t *x, const uint32_t *w, const uint16_t *bias,
                int64_t m, int64_t n, int64_t k, int64_t x_stride, int64_t y_stride) {
#if defined(__AVX512BF16__)
    if (m <= 0) return 0;  /* no rows: nothing to write (and no passes to spread prefetches over) */
    const int64_t pairs = k / 2, blocks = (n + CHANNELS - 1) / CHANNELS;
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t first = blocks * t / threads, last = blocks * (t + 1) / threads;
        const int64_t passes = (m + ROWS - 1) / ROWS;
        for (int64_t b0 = first; b0 < last; b0 += BLOCKS) {
            const int64_t nb = last - b0 < BLOCKS ? last - b0 : BLOCKS;
            /* The next group (if this thread has one), all in by this group's end. */
            const int64_t ahead = last - b0 - nb < BLOCKS ? last - b0 - nb : BLOCKS;
            StripPrefetch prefetch = strip_prefetch(w + (b0 + nb) * pairs * CHANNELS,
                                                    ahead * pairs * CHANNELS * 4, passes * pairs);
            for (int64_t m0 = 0; m0 < m; m0 += ROWS) {
                const int rb = m - m0 < ROWS ? (int)(m - m0) : ROWS;
                switch (nb) {
#define BLOCKS_CASE(count) case count: \
                    blocks_of_rows(x, x_stride, w, pairs, m0, rb, count, b0, bias, y, y_stride, \
                                   n, &prefetch); break;
                BLOCKS_CASE(1) BLOCKS_CASE(2) BLOCKS_CASE(3) BLOCKS_CASE(4)
#undef BLOCKS_CASE
                }
            }
        }
    }
    return 0;
#else
    (void)y; (void)x; (void)w; (void)bias; (void)m; (void)n; (void)k; (void)x_stride;
    (void)y_stride;
    return -2;
#endif
}
