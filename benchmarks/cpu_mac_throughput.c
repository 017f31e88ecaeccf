/* How many 512-bit multiply-add instructions one core issues per second, for the instructions
 * the int8 and bf16 matmuls are built on (docs/quantization.md, docs/performance.md): 12
 * independent accumulators per instruction, so that latency does not bound the loop.
 *
 *     cc -O2 -march=native benchmarks/cpu_mac_throughput.c -o /tmp/mac && /tmp/mac
 *
 * Needs AVX-512 VNNI and BF16. vpdpbusd does 64 int8 multiply-adds, vdpbf16ps 32 bf16 ones,
 * vfmadd231ps 16 float32 ones. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define N 100000000L
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const __m512i b = _mm512_set1_epi32(0x01010101), c = _mm512_set1_epi32(0x02020202);
#define INT(i) __m512i a##i = _mm512_set1_epi32(i);
#define FLOAT(i) __m512 f##i = _mm512_set1_ps((float)i), g##i = f##i;
    EACH(INT) EACH(FLOAT)
    double t = now();
#define DPBUSD(i) a##i = _mm512_dpbusd_epi32(a##i, b, c);
    for (long n = 0; n < N; n++) { EACH(DPBUSD) __asm__ volatile("" :: "v"(b)); }
    printf("vpdpbusd    %.2f G/s\n", 12.0 * N / (now() - t) / 1e9);
    t = now();
#define DPBF16(i) f##i = _mm512_dpbf16_ps(f##i, (__m512bh)b, (__m512bh)c);
    for (long n = 0; n < N; n++) { EACH(DPBF16) __asm__ volatile("" :: "v"(b)); }
    printf("vdpbf16ps   %.2f G/s\n", 12.0 * N / (now() - t) / 1e9);
    t = now();
#define FMA(i) g##i = _mm512_fmadd_ps(g##i, (__m512)b, (__m512)c);
    for (long n = 0; n < N; n++) { EACH(FMA) __asm__ volatile("" :: "v"(b)); }
    printf("vfmadd231ps %.2f G/s\n", 12.0 * N / (now() - t) / 1e9);
    /* The results, so that nothing is optimised away. */
#define SUM(i) + _mm512_reduce_add_epi32(a##i) + (long)_mm512_reduce_add_ps(f##i) \
               + (long)_mm512_reduce_add_ps(g##i)
    printf("(checksum %ld)\n", 0L EACH(SUM));
    return 0;
}
