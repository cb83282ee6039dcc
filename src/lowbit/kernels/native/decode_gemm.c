/* Weight-only GEMM for more than a few activation rows: the quantized weight is decoded to bf16 one small panel
 * at a time (weight rows x a block of k, in cache) and multiplied with vdpbf16ps, so no call decodes the whole weight.
 *
 * out[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] * row_scale[m] + bias[n], x bf16 (M, K) row-major (float
 * activations already rounded by the non-finite rule: a NaN row has row_scale NaN), out float32 or bf16 (M, N).
 * Decoded weights are what the bf16 decode always gave: int8 and e4m3 exact, int4 (q - zero) * group scale rounded
 * half to even. vdpbf16ps multiplies exactly and accumulates in float32 (it flushes subnormals).
 *
 * Tiles are transposed: a register tile is 32 activation rows (two vectors of 16 rows, each lane a pair of k from
 * the activation packed as [M / 16][K / 2][16][2]) times NR weight rows (a broadcast k pair each from the panel,
 * which keeps the decoders' natural k-contiguous rows), so the float32 sums land as [n][m] in a per-thread buffer
 * that the epilogue transposes 16 x 16 into out. Threads split N into blocks of nb weight rows; per block the k
 * loop decodes one panel and runs every activation row through it. Each scheme brings its row decoder
 * (decode_rows, common.h): int8, e4m3 and int4 here, intx in intx.c. */
#include "common.h"

#include <string.h>

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define NR 12  /* weight rows of a register tile: 24 accumulators for 32 activation rows */
#define NB 48  /* weight rows a thread takes at a time: an NB x kc panel and an NB x M float32 buffer */
#define NB_WIDE 192 /* ... where the packed activation, streamed once per block, exceeds ACT_WIDE bytes (measured) */
#define ACT_WIDE (8 << 20)
#define KC_LARGE (4 * DECODE_SPAN) /* k per panel from 64 activation rows: fewer passes over the float32 buffer */
#define PREFETCH_ROWS 8 /* a panel's decode prefetches this many weight rows ahead */

typedef struct {
    const uint8_t *codes; /* int8 / e4m3 codes (N, K); int4: packed (N, K / 2), low nibble = even k */
    const float *scale;   /* int4: group scales (N, K / G) */
    const uint8_t *zero;  /* int4: uint8 zero points (N, K / G), or NULL for signed codes */
    int64_t K, G, groups; /* groups per weight row (int4) */
} coded_rows;

/* 16 rows of 16 32-bit lanes -> r[i] = lane i of every row (row j in lane j). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

/* Rows 16b .. 16b + 15 of x (M, K) bf16 -> a (pairs, 16) k pairs, rows past M and k past K zero. */
static void pack_rows(const uint16_t *x, uint32_t *a, int64_t M, int64_t K, int64_t b, int64_t pairs) {
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
        int64_t left = K - 2 * p0;
        __mmask32 live = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        __m512 r[16];
        for (int j = 0; j < 16; j++) {
            int64_t m = 16 * b + j;
            r[j] = m < M ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(live, (const void *)(x + m * K + 2 * p0)))
                         : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int i = 0; i < 16 && p0 + i < pairs; i++) _mm512_storeu_ps((float *)(a + 16 * (p0 + i)), r[i]);
    }
}

/* decode_rows of int8 weights: exact in bf16 (|q| <= 128). */
BF16_TARGET static void int8_rows(const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const coded_rows *w = (const coded_rows *)weights;
    const int8_t *src = (const int8_t *)w->codes + n * w->K + k0;
    if (!dst) {
        prefetch_lines(src, kc);
        return;
    }
    for (int64_t k = 0; k < kc; k += 32) {
        __mmask32 live = kc - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (kc - k)) - 1);
        __m256i q = _mm256_maskz_loadu_epi8(live, (const void *)(src + k));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        _mm512_mask_storeu_epi16((void *)(dst + k), live, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* decode_rows of e4m3fn codes (exact in bf16). */
static void e4m3_rows(const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const coded_rows *w = (const coded_rows *)weights;
    if (!dst) {
        prefetch_lines(w->codes + n * w->K + k0, kc);
        return;
    }
    e4m3_row_to_bf16(w->codes + n * w->K + k0, dst, kc);
}

/* float32 -> bf16 by vcvtneps2bf16: round half to even as to_bf16, one instruction. It flushes subnormals, which
 * int4 tables never hold: (q - zero) * scale is 0 or at least the scale, a normal number (the scale floor). */
BF16_TARGET static inline __m256i round_bf16(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }

/* decode_rows of packed int4 codes with group scales (and zero points): rounded to bf16 half to even. */
BF16_TARGET static void int4_rows(const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const coded_rows *w = (const coded_rows *)weights;
    int64_t groups = w->groups;
    const uint8_t *row = w->codes + n * (w->K / 2);
    if (!dst) {
        prefetch_lines(row + k0 / 2, kc / 2);
        return;
    }
    int4_row_to_bf16(row, w->scale + n * groups, w->zero ? w->zero + n * groups : NULL, dst, k0, kc, w->G, round_bf16);
}

/* c[j][m] (+)= sum over `pairs` k pairs of panel row j times activation rows m of a, for j < nr and 16 * mb rows
 * (nr and mb are constants after inlining: the accumulators stay in registers). a: [mb][pairs of the whole K][16]. */
BF16_TARGET static inline __attribute__((always_inline)) void tile(const uint32_t *a, int64_t a_stride, const uint16_t *panel,
                                                                   int64_t ldp, float *c, int64_t ldc, int64_t pairs, const int mb,
                                                                   const int nr, int accumulate) {
    __m512 acc[2][NR];
    for (int j = 0; j < nr; j++)
        for (int b = 0; b < mb; b++) acc[b][j] = accumulate ? _mm512_loadu_ps(c + j * ldc + 16 * b) : _mm512_setzero_ps();
    const int32_t *w = (const int32_t *)panel;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(a + 16 * p));
        __m512bh x1 = mb > 1 ? (__m512bh)_mm512_loadu_si512((const void *)(a + a_stride + 16 * p)) : x0;
        for (int j = 0; j < nr; j++) {
            __m512bh wj = (__m512bh)_mm512_set1_epi32(w[j * (ldp / 2) + p]);
            acc[0][j] = _mm512_dpbf16_ps(acc[0][j], x0, wj);
            if (mb > 1) acc[1][j] = _mm512_dpbf16_ps(acc[1][j], x1, wj);
        }
    }
    for (int j = 0; j < nr; j++)
        for (int b = 0; b < mb; b++) _mm512_storeu_ps(c + j * ldc + 16 * b, acc[b][j]);
}

/* One register tile: nr (<= NR) panel rows times 16 * mb activation rows. */
BF16_TARGET static void tile_any(const uint32_t *a, int64_t a_stride, const uint16_t *panel, int64_t ldp, float *c,
                                 int64_t ldc, int64_t pairs, int mb, int nr, int accumulate) {
#define TILE(MB, N) tile(a, a_stride, panel, ldp, c, ldc, pairs, MB, N, accumulate)
#define TILES(MB)                                                                                                        \
    switch (nr) {                                                                                                        \
        case 1: TILE(MB, 1); break;                                                                                      \
        case 2: TILE(MB, 2); break;                                                                                      \
        case 3: TILE(MB, 3); break;                                                                                      \
        case 4: TILE(MB, 4); break;                                                                                      \
        case 5: TILE(MB, 5); break;                                                                                      \
        case 6: TILE(MB, 6); break;                                                                                      \
        case 7: TILE(MB, 7); break;                                                                                      \
        case 8: TILE(MB, 8); break;                                                                                      \
        case 9: TILE(MB, 9); break;                                                                                      \
        case 10: TILE(MB, 10); break;                                                                                    \
        case 11: TILE(MB, 11); break;                                                                                    \
        default: TILE(MB, 12); break;                                                                                    \
    }
    if (mb == 2) TILES(2) else TILES(1)
#undef TILES
#undef TILE
}

/* decode (or with dst NULL prefetch) row n's k in [k0, k0 + kc) in calls of at most DECODE_SPAN. */
static void decode_span(decode_rows decode, const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    for (int64_t s = 0; s < kc; s += DECODE_SPAN)
        decode(weights, n, k0 + s, kc - s < DECODE_SPAN ? kc - s : DECODE_SPAN, dst ? dst + s : NULL);
}

/* Weight rows n0 .. n0 + rows - 1, k in [k0, k0 + kc) -> panel rows of ldp bf16, a zero after an odd kc (the last
 * pair's second half). Rows PREFETCH_ROWS ahead are prefetched, so memory latency overlaps the decode, and with
 * next_kc > 0 each row's next next_kc k too: for few activation rows a panel's products take too short a time to
 * hide the memory latency of the next panel's first rows (measured). */
static void decode_panel(decode_rows decode, const void *weights, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                         int64_t next_kc, uint16_t *panel, int64_t ldp) {
    for (int64_t r = 0; r < rows && r < PREFETCH_ROWS; r++) decode_span(decode, weights, n0 + r, k0, kc, NULL);
    for (int64_t r = 0; r < rows; r++) {
        if (r + PREFETCH_ROWS < rows) decode_span(decode, weights, n0 + r + PREFETCH_ROWS, k0, kc, NULL);
        decode_span(decode, weights, n0 + r, k0, kc, panel + r * ldp);
        if (kc & 1) panel[r * ldp + kc] = 0;
        if (next_kc > 0) decode_span(decode, weights, n0 + r, k0 + kc, next_kc, NULL);
    }
}

/* c [rows][ldc] float32 sums of weight rows n0.. -> out rows m < M, columns n0 .. n0 + rows - 1, with the scales
 * and bias, float32 or bf16 (round half to even). */
static void epilogue(const float *c, int64_t ldc, int64_t n0, int64_t rows, const float *w_scale, const float *row_scale,
                     const float *bias, void *out, int out_bf16, int64_t M, int64_t N) {
    for (int64_t j0 = 0; j0 < rows; j0 += 16) {
        int64_t cols = rows - j0 < 16 ? rows - j0 : 16;
        __mmask16 live = (__mmask16)((1u << cols) - 1);
        __m512 ws = w_scale ? _mm512_maskz_loadu_ps(live, w_scale + n0 + j0) : _mm512_set1_ps(1.0f);
        __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + n0 + j0) : _mm512_setzero_ps();
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            __m512 r[16];
            for (int j = 0; j < 16; j++) r[j] = j < cols ? _mm512_loadu_ps(c + (j0 + j) * ldc + m0) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16 && m0 + i < M; i++) {
                int64_t m = m0 + i;
                __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(r[i], ws), _mm512_set1_ps(row_scale ? row_scale[m] : 1.0f), b);
                if (out_bf16)
                    _mm256_mask_storeu_epi16((void *)((uint16_t *)out + m * N + n0 + j0), live, to_bf16_any(v));
                else
                    _mm512_mask_storeu_ps((float *)out + m * N + n0 + j0, live, v);
            }
        }
    }
}

BF16_TARGET void decode_gemm(decode_rows decode, const void *weights, const uint16_t *x, const float *row_scale,
                             const float *w_scale, const float *bias, void *out, int out_bf16, int64_t M, int64_t N, int64_t K,
                             int threads) {
    if (M <= 0 || N <= 0) return;
    int64_t blocks = (M + 15) / 16, pairs = (K + 1) / 2, ldc = 16 * blocks, ldp = M >= 64 ? KC_LARGE : DECODE_SPAN;
    uint32_t *a = (uint32_t *)aligned_alloc(64, 64 * blocks * pairs + 64);
    /* N in nblocks equal runs of register tiles (at most nb rows), a multiple of the thread count: threads finish
     * together, and take over a preempted thread's blocks */
    int64_t nb = 64 * blocks * pairs > ACT_WIDE ? NB_WIDE : NB;
    int64_t units = (N + NR - 1) / NR, per = threads * (nb / NR), nblocks = threads * ((units + per - 1) / per);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) pack_rows(x, a + b * 16 * pairs, M, K, b, pairs);
        uint16_t *panel = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * nb * ldp);
        float *c = (float *)aligned_alloc(64, sizeof(float) * nb * ldc);
#pragma omp for schedule(dynamic, 1)
        for (int64_t block = 0; block < nblocks; block++) {
            int64_t n0 = block * units / nblocks * NR, end = (block + 1) * units / nblocks * NR;
            int64_t rows = (end < N ? end : N) - n0;
            for (int64_t k0 = 0; k0 < K; k0 += ldp) {
                int64_t kc = K - k0 < ldp ? K - k0 : ldp;
                int64_t next_kc = ldp == KC_LARGE || k0 + kc >= K ? 0 : K - k0 - kc < ldp ? K - k0 - kc : ldp;
                decode_panel(decode, weights, n0, rows, k0, kc, next_kc, panel, ldp);
                for (int64_t b = 0; b < blocks; b += 2)
                    for (int64_t j0 = 0; j0 < rows; j0 += NR)
                        tile_any(a + b * 16 * pairs + 16 * (k0 / 2), 16 * pairs, panel + j0 * ldp, ldp, c + j0 * ldc + 16 * b, ldc,
                                 (kc + 1) / 2, blocks - b >= 2 ? 2 : 1, rows - j0 < NR ? (int)(rows - j0) : NR, k0 > 0);
            }
            if (K == 0) memset(c, 0, sizeof(float) * rows * ldc); /* no products: out is the bias */
            epilogue(c, ldc, n0, rows, w_scale, row_scale, bias, out, out_bf16, M, N);
        }
        free(c);
        free(panel);
    }
    free(a);
}

/* int8 weights (N, K) with per-row scales w_scale (N,). */
void lowbit_int8_decode_gemm(const uint16_t *x, const float *row_scale, const int8_t *weight, const float *w_scale,
                             const float *bias, void *out, int out_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    coded_rows w = {(const uint8_t *)weight, NULL, NULL, K, 0, 0};
    decode_gemm(int8_rows, &w, x, row_scale, w_scale, bias, out, out_bf16, M, N, K, threads);
}

/* e4m3fn codes (N, K) as uint8 with scales w_scale (N,). */
void lowbit_fp8_decode_gemm(const uint16_t *x, const float *row_scale, const uint8_t *codes, const float *w_scale,
                            const float *bias, void *out, int out_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    coded_rows w = {codes, NULL, NULL, K, 0, 0};
    decode_gemm(e4m3_rows, &w, x, row_scale, w_scale, bias, out, out_bf16, M, N, K, threads);
}

/* Packed 4-bit weights (N, K / 2) with group scales (N, K / G) and uint8 zero points (N, K / G), or signed codes
 * when zero is NULL; G a multiple of 32 dividing K. */
void lowbit_int4_decode_gemm(const uint16_t *x, const float *row_scale, const uint8_t *packed, const float *scale,
                             const uint8_t *zero, const float *bias, void *out, int out_bf16, int64_t M, int64_t N,
                             int64_t K, int64_t G, int threads) {
    coded_rows w = {packed, scale, zero, K, G, K / G};
    decode_gemm(int4_rows, &w, x, row_scale, NULL, bias, out, out_bf16, M, N, K, threads);
}
