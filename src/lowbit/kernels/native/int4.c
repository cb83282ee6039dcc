/* Int4 kernels: bf16 decode of packed nibbles and the fused small-batch weight-only linear. */
#include "common.h"

/* Rows [row0, row0 + rows) of packed 4-bit weights (N, K/2), groups of G along K -> bfloat16 rows in out (see
 * int4_row_to_bf16). */
void lowbit_int4_rows_to_bf16(const uint8_t *packed, const float *scale, const uint8_t *zero, uint16_t *out,
                              int64_t K, int64_t G, int64_t row0, int64_t rows, int threads) {
    int64_t groups = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = row0 + r;
        for (int64_t k0 = 0; k0 < K; k0 += DECODE_SPAN)
            int4_row_to_bf16(packed + n * (K / 2), scale + n * groups, zero ? zero + n * groups : NULL, out + r * K + k0, k0,
                             K - k0 < DECODE_SPAN ? K - k0 : DECODE_SPAN, G, to_bf16);
    }
}

/* Weight-only 4-bit linear for few rows (M <= 8) in one call, with VNNI on a 16-bit split of each activation
 * row (x = x_scale * r, r = 256 * hi + lo, hi and lo signed bytes):
 *   y[m, n] = x_scale[m] * sum_g scale[n, g] * (sum_{k in g} q[n, k] * r[m, k] - zero[n, g] * R[m, g]) + bias[n]
 * with R[m, g] = sum_{k in g} r[m, k]. The weights stay in their canonical layout, (N, K/2) bytes with the low
 * nibble holding the even k: one 64-byte load covers 128 k, its low nibbles the 64 even k and its high nibbles
 * the 64 odd k, so the activation halves are stored de-interleaved the same way (per 128 k: 64 even, 64 odd).
 * Codes are unsigned with a uint8 zero per group, or signed int4 (zero == NULL: flipped by XOR 8, zero 8).
 * Lane l of a 128-k block covers k0 + 8l .. k0 + 8l + 7, so groups of 32 or 64 map to lanes by (8l) / G.
 * G is 32, 64 or a multiple of 128; K a multiple of 128. */
#define MR 4 /* activation rows sharing one unpacked weight block */
#define INT4_PREFETCH 4096 /* bytes ahead in the weight stream: more loads in flight than the hardware prefetcher keeps */
static void split_rows_deinterleaved(const float *x, int8_t *a, int32_t *R, float *x_scale, int64_t m, int64_t K,
                                     int64_t G, int8_t *tmp) {
    int8_t *hi = tmp, *lo = tmp + K;
    split_row_16(x + m * K, hi, lo, x_scale + m, K, 0);
    int8_t *ah = a + m * 2 * K, *al = ah + K;
    for (int64_t k0 = 0; k0 < K; k0 += 128)
        for (int j = 0; j < 64; j++) {
            ah[k0 + j] = hi[k0 + 2 * j], ah[k0 + 64 + j] = hi[k0 + 2 * j + 1];
            al[k0 + j] = lo[k0 + 2 * j], al[k0 + 64 + j] = lo[k0 + 2 * j + 1];
        }
    for (int64_t g = 0; g < K / G; g++) {
        int32_t sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) sum += 256 * hi[k] + lo[k];
        R[m * (K / G) + g] = sum;
    }
}

/* sum_g scale[g] * zero[g] * R[g] over one weight row's groups (zero == NULL: 8). */
static inline float zero_correction(const float *scale, const uint8_t *zero, const int32_t *R, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 live = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512 z = zero ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, zero + g))) : _mm512_set1_ps(8.0f);
        __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, scale + g), z);
        acc = _mm512_fmadd_ps(sz, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, R + g)), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Weight rows n0 .. n0 + nr - 1 times activation rows m0 .. m0 + rows - 1. rows and nr are constants after
 * inlining, so the accumulators stay in registers; each product of a 128-k block goes to its own accumulator
 * (high/low activation half x even/odd k), so no vpdpbusd waits on another of the same block. */
static inline __attribute__((always_inline)) void int4_tile(
    const uint8_t *packed, const float *scale, const uint8_t *zero, const int8_t *a, const int32_t *R,
    const float *x_scale, const float *bias, float *y, int64_t n0, const int nr, int64_t m0, const int rows,
    int64_t N, int64_t K, int64_t G, int64_t groups, int64_t span, int64_t span_groups, __m512i lane_group,
    __mmask16 block_groups, __m512i flip) {
    __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 facc[MR][2];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++) facc[r][j] = _mm512_setzero_ps();
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += span, g += span_groups) { /* g: first group of the span */
        __m512i acc[MR][2][4];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < nr; j++)
                for (int p = 0; p < 4; p++) acc[r][j][p] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + span; k += 128) {
            for (int j = 0; j < nr; j++) {
                const uint8_t *wk = packed + (n0 + j) * (K / 2) + k / 2;
                _mm_prefetch((const char *)(wk + INT4_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_xor_si512(_mm512_loadu_si512((const void *)wk), flip);
                __m512i even = _mm512_and_si512(b, low4), odd = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
                for (int r = 0; r < rows; r++) {
                    const int8_t *ah = a + (m0 + r) * 2 * K + k, *al = ah + K;
                    acc[r][j][0] = _mm512_dpbusd_epi32(acc[r][j][0], even, _mm512_loadu_si512((const void *)ah));
                    acc[r][j][1] = _mm512_dpbusd_epi32(acc[r][j][1], odd, _mm512_loadu_si512((const void *)(ah + 64)));
                    acc[r][j][2] = _mm512_dpbusd_epi32(acc[r][j][2], even, _mm512_loadu_si512((const void *)al));
                    acc[r][j][3] = _mm512_dpbusd_epi32(acc[r][j][3], odd, _mm512_loadu_si512((const void *)(al + 64)));
                }
            }
        }
        for (int j = 0; j < nr; j++) {
            const float *sr = scale + (n0 + j) * groups;
            __m512 s = G < 128 ? _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(block_groups, sr + g))
                               : _mm512_set1_ps(sr[g]);
            for (int r = 0; r < rows; r++) { /* 256 * hi + lo fits int32: a lane sums G / 8 products below 2^11 */
                __m512i hi = _mm512_add_epi32(acc[r][j][0], acc[r][j][1]), lo = _mm512_add_epi32(acc[r][j][2], acc[r][j][3]);
                __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
                facc[r][j] = _mm512_fmadd_ps(v, s, facc[r][j]);
            }
        }
    }
    for (int j = 0; j < nr; j++) {
        int64_t n = n0 + j;
        const float *sr = scale + n * groups;
        const uint8_t *zr = zero ? zero + n * groups : NULL;
        for (int r = 0; r < rows; r++) {
            int64_t m = m0 + r;
            float out = x_scale[m] * (_mm512_reduce_add_ps(facc[r][j]) - zero_correction(sr, zr, R + m * groups, groups));
            y[m * N + n] = bias ? out + bias[n] : out;
        }
    }
}

void lowbit_int4_linear_small(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                              const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    if (M <= 0 || N <= 0) return; /* an empty batch */
    int64_t groups = K / G, span = G < 128 ? 128 : G, span_groups = span / G; /* k and groups per step */
    int8_t *a = (int8_t *)aligned_alloc(64, ((2 * M * K + 63) / 64) * 64);
    int32_t *R = (int32_t *)malloc(sizeof(int32_t) * M * groups);
    float x_scale[MAX_SMALL_ROWS];
    __m512i lane_group = _mm512_srli_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                              _mm512_set1_epi32(8)), G == 32 ? 5 : 6);
    __mmask16 block_groups = G < 128 ? (__mmask16)((1u << (128 / G)) - 1) : 1;
    __m512i flip = _mm512_set1_epi8(zero ? 0 : (char)0x88);
#pragma omp parallel num_threads(threads)
    {
        int8_t *tmp = (int8_t *)malloc(2 * K);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) split_rows_deinterleaved(x, a, R, x_scale, m, K, G, tmp);
        free(tmp);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < (N + 1) / 2; p++) { /* weight rows 2p and 2p + 1 (if any) */
            int64_t n0 = 2 * p, nrows = N - n0 < 2 ? 1 : 2;
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                int64_t rows = M - m0 < MR ? M - m0 : MR;
#define INT4_TILE(n, nr, rows) int4_tile(packed, scale, zero, a, R, x_scale, bias, y, n, nr, m0, rows, N, K, G, groups, span, span_groups, lane_group, block_groups, flip)
                if (rows == 1 && nrows == 2) INT4_TILE(n0, 2, 1); /* two weight rows fit the registers for <= 2 activation rows */
                else if (rows == 2 && nrows == 2) INT4_TILE(n0, 2, 2);
                else
                    for (int64_t n = n0; n < n0 + nrows; n++) switch (rows) {
                        case 1: INT4_TILE(n, 1, 1); break;
                        case 2: INT4_TILE(n, 1, 2); break;
                        case 3: INT4_TILE(n, 1, 3); break;
                        default: INT4_TILE(n, 1, 4); break;
                    }
#undef INT4_TILE
            }
        }
    }
    free(R);
    free(a);
}
