/* GEMM epilogues: scales, zero points and bias applied to an integer or bf16 GEMM result in one pass. */
#include "common.h"

static inline __m512 load_acc(const void *acc, int64_t i, __mmask16 live, int float_acc) {
    return float_acc ? _mm512_maskz_loadu_ps(live, (const float *)acc + i)
                     : _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, (const int32_t *)acc + i));
}

/* out[m, n] = (acc[m, n] (+ 256 * acc_hi[m, n]) - offset[m] * colsum[n]) * x_scale[m] * w_scale[n] + bias[n],
 * acc and acc_hi int32, or float32 holding integers when float_acc. acc_hi, offset and bias may be NULL. */
void lowbit_int32_epilogue(const void *acc, const void *acc_hi, const float *x_scale, const float *offset,
                           const float *colsum, const float *w_scale, const float *bias, float *out,
                           int64_t M, int64_t N, int float_acc, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        __m512 xs = _mm512_set1_ps(x_scale[m]);
        __m512 off = _mm512_set1_ps(offset ? offset[m] : 0.0f);
        for (int64_t n = 0; n < N; n += 16) {
            __mmask16 live = N - n >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            __m512 v = load_acc(acc, m * N + n, live, float_acc);
            if (acc_hi) v = _mm512_fmadd_ps(load_acc(acc_hi, m * N + n, live, float_acc), _mm512_set1_ps(256.0f), v);
            if (offset)
                v = _mm512_fnmadd_ps(off, _mm512_maskz_loadu_ps(live, colsum + n), v);
            v = _mm512_mul_ps(v, _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(live, w_scale + n)));
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias + n));
            _mm512_mask_storeu_ps(out + m * N + n, live, v);
        }
    }
}

/* out[m, j] = acc[m, j] * w_scale[j] * row_scale[m] + bias[j] for an (M, cols) bf16 GEMM result, out with row
 * stride ldo (a column block of a wider output); w_scale, row_scale and bias may be NULL. */
void lowbit_bf16_epilogue(const uint16_t *acc, const float *w_scale, const float *row_scale, const float *bias,
                          float *out, int64_t M, int64_t cols, int64_t ldo, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        __m512 rs = _mm512_set1_ps(row_scale ? row_scale[m] : 1.0f);
        for (int64_t j = 0; j < cols; j += 16) {
            __mmask16 live = cols - j >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - j)) - 1);
            __m256i h = _mm256_maskz_loadu_epi16(live, (const void *)(acc + m * cols + j));
            __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), rs);
            if (w_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, w_scale + j));
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias + j));
            _mm512_mask_storeu_ps(out + m * ldo + j, live, v);
        }
    }
}
