/* Int8 kernels: dynamic activation quantization, int32 epilogues and the fused small-batch linear. */
#include "common.h"

/* Dynamic int8 quantization of one row of K floats, the same formulas as lowbit.primitives.affine:
 * symmetric: scale = max|x| / 127; asymmetric: scale = (max(x,0) - min(x,0)) / 255,
 * zero = clamp(-128 - round(min(x,0) / scale)); q = clamp(round(x / scale) + zero, -128, 127).
 * fixed_scale > 0: static quantization with a calibrated scale and zero point instead.
 * Scales are floored at FLT_MIN; NaN maps to the zero point, +-inf saturate.
 * Writes q (as uint8 q + 128 when offset128), *scale and *zero (0 when symmetric). */
static void quantize_row_int8(const float *row, int8_t *q, float *scale, float *zero, int64_t K, int symmetric,
                              int offset128, float fixed_scale, float fixed_zero) {
    float lo = fixed_scale > 0 ? 0.0f : row_reduce(row, K, 0), hi = fixed_scale > 0 ? 0.0f : row_reduce(row, K, 1), s, z;
    if (fixed_scale > 0) {
        s = fixed_scale;
        z = fixed_zero;
    } else if (symmetric) {
        float amax = hi > -lo ? hi : -lo;
        s = amax / 127.0f;
        z = 0.0f;
    } else {
        s = (hi - lo) / 255.0f;
        z = 0.0f;
    }
    if (s < 1.17549435e-38f) s = 1.17549435e-38f;
    if (!symmetric && fixed_scale <= 0) {
        z = -128.0f - __builtin_nearbyintf(lo / s);
        z = z < -128.0f ? -128.0f : (z > 127.0f ? 127.0f : z);
    }
    *scale = s;
    *zero = z;
    __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z + (offset128 ? 128.0f : 0.0f));
    __m512 qmin = _mm512_set1_ps(offset128 ? 0.0f : -128.0f), qmax = _mm512_set1_ps(offset128 ? 255.0f : 127.0f);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r); /* NaN -> 0 */
        r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), qmin), qmax);
        __m512i qi = _mm512_cvtps_epi32(r);
        if (offset128)
            _mm_mask_storeu_epi8(q + k, live, _mm512_cvtusepi32_epi8(qi));
        else
            _mm_mask_storeu_epi8(q + k, live, _mm512_cvtsepi32_epi8(qi));
    }
}

/* quantize_row_int8 for every row of x (M, K); scale and zero get one entry per row. */
void lowbit_quantize_rows_int8(const float *x, int8_t *q, float *scale, float *zero, int64_t M, int64_t K,
                               int symmetric, int offset128, float fixed_scale, float fixed_zero, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++)
        quantize_row_int8(x + m * K, q + m * K, scale + m, zero + m, K, symmetric, offset128, fixed_scale, fixed_zero);
}

/* split_row_16 for every row of x (M, K): signed halves (torch._int_mm), or uint8 + 128 with offset128
 * (oneDNN's u8s8 GEMM). */
void lowbit_split_rows_16(const float *x, int8_t *hi, int8_t *lo, float *scale, int64_t M, int64_t K, int offset128,
                          int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) split_row_16(x + m * K, hi + m * K, lo + m * K, scale + m, K, offset128);
}

/* Small-batch int8 linear in one call (M <= 8): y[m, n] = (acc - offset[m] * colsum[n]) * x_scale[m] *
 * w_scale[n] + bias[n], where acc = sum_k a[m, k] * w[n, k] is taken with VNNI (vpdpbusd: four u8 x s8
 * products per 32-bit lane) on activations quantized here, stored as uint8 q + 128:
 *   mode 0 (weight-only): each row split into 16 bits, two halves, acc = 256 * acc_hi + acc_lo;
 *   mode 1 / 2: int8 per row, symmetric / asymmetric (fixed_scale > 0: the static scale and zero).
 * Four weight rows are streamed together (more memory-level parallelism than one row at a time). */
#define WROWS 4
void lowbit_int8_linear_small(const float *x, const int8_t *w, const float *w_scale, const float *colsum,
                              const float *bias, float *y, int64_t M, int64_t N, int64_t K, int mode,
                              float fixed_scale, float fixed_zero, int threads) {
    int split = mode == 0, R = split ? 2 * (int)M : (int)M; /* activation rows: hi rows, then lo rows */
    uint8_t *a = (uint8_t *)aligned_alloc(64, ((R * K + 63) / 64) * 64);
    float x_scale[MAX_SMALL_ROWS], offset[MAX_SMALL_ROWS];
    int64_t tail = K % 64, blocks = (N + WROWS - 1) / WROWS;
    __mmask64 tail_mask = tail ? (((__mmask64)1 << tail) - 1) : 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            if (split) {
                split_row_16(x + m * K, (int8_t *)a + m * K, (int8_t *)a + (M + m) * K, x_scale + m, K, 1);
                offset[m] = 32896.0f; /* 256 * 128 + 128 */
            } else {
                float zero;
                quantize_row_int8(x + m * K, (int8_t *)a + m * K, x_scale + m, &zero, K, mode == 1, 1, fixed_scale, fixed_zero);
                offset[m] = zero + 128.0f;
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t n0 = b * WROWS;
            int nrows = (N - n0) < WROWS ? (int)(N - n0) : WROWS;
            const int8_t *wr[WROWS];
            for (int j = 0; j < WROWS; j++) wr[j] = w + (n0 + (j < nrows ? j : 0)) * K;
            int32_t acc[2 * MAX_SMALL_ROWS][WROWS];
            for (int r0 = 0; r0 < R; r0 += 4) {
                int rows = R - r0 < 4 ? R - r0 : 4;
                __m512i v[4][WROWS];
                for (int r = 0; r < 4; r++)
                    for (int j = 0; j < WROWS; j++) v[r][j] = _mm512_setzero_si512();
                for (int64_t k = 0; k < K; k += 64) {
                    __mmask64 live = K - k >= 64 ? ~(__mmask64)0 : tail_mask;
                    __m512i wv[WROWS];
                    for (int j = 0; j < WROWS; j++) wv[j] = _mm512_maskz_loadu_epi8(live, (const void *)(wr[j] + k));
                    for (int r = 0; r < rows; r++) {
                        __m512i av = _mm512_maskz_loadu_epi8(live, (const void *)(a + (r0 + r) * K + k));
                        for (int j = 0; j < WROWS; j++) v[r][j] = _mm512_dpbusd_epi32(v[r][j], av, wv[j]);
                    }
                }
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < WROWS; j++) acc[r0 + r][j] = _mm512_reduce_add_epi32(v[r][j]);
            }
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < nrows; j++) {
                    int64_t n = n0 + j;
                    double sum = split ? 256.0 * acc[m][j] + acc[M + m][j] : (double)acc[m][j];
                    float out = (float)(sum - (double)offset[m] * colsum[n]) * (x_scale[m] * w_scale[n]);
                    y[m * N + n] = bias ? out + bias[n] : out;
                }
        }
    }
    free(a);
}
