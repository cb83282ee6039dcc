/* GEMM epilogues: scales, zero points and bias applied to an integer or bf16 GEMM result in one pass; the bf16
 * GEMM's float activations rounded to bf16 by the non-finite rule (common.h). */
#include "common.h"

/* One row of K floats -> bf16 (round half to even), clamped to [-lim, lim], NaN -> 0; which lanes held inf / NaN. */
static inline void row_to_bf16(const float *row, uint16_t *dst, int64_t K, float lim, __mmask16 *infs, __mmask16 *nans) {
    __m512 hi = _mm512_set1_ps(lim), lo = _mm512_set1_ps(-lim), inf = _mm512_set1_ps(__builtin_inff());
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, row + k);
        __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
        *nans |= (__mmask16)~ordered;
        *infs |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), inf, _CMP_EQ_OQ);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_mov_ps(ordered, v), lo), hi);
        _mm256_mask_storeu_epi16((void *)(dst + k), live, to_bf16(v));
    }
}

/* Float activations x (M, K), float32 or bf16 (in_bf16) -> bf16 rows out for a bf16 GEMM: +-inf saturate to +-(largest finite |x| of the
 * row), a row holding a NaN is written with its NaNs as 0 and gets row_scale[m] = NaN (else 1), which
 * lowbit_bf16_epilogue multiplies into the row's outputs. */
void lowbit_rows_to_bf16(const void *x, uint16_t *out, float *row_scale, int64_t M, int64_t K, int in_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *buf = row_buffer(K, in_bf16);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            __mmask16 infs = 0, nans = 0;
            const float *row = row_f32(x, m, K, in_bf16, NULL, buf);
            row_to_bf16(row, out + m * K, K, __builtin_inff(), &infs, &nans);
            if (infs) row_to_bf16(row, out + m * K, K, row_absmax(row, K), &infs, &nans);
            row_scale[m] = nans ? __builtin_nanf("") : 1.0f;
        }
        free(buf);
    }
}

static inline __m512 load_acc(const void *acc, int64_t i, __mmask16 live, int float_acc) {
    return float_acc ? _mm512_maskz_loadu_ps(live, (const float *)acc + i)
                     : _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, (const int32_t *)acc + i));
}

/* out[m, n] = (acc[m, n] (+ 256 * acc_hi[m, n]) - offset[m] * colsum[n]) * x_scale[m] * w_scale[n] + bias[n],
 * acc and acc_hi int32, or float32 holding integers when float_acc; out float32, or bf16 (rounded half to even)
 * when out_bf16. acc_hi, offset and bias may be NULL. */
void lowbit_int32_epilogue(const void *acc, const void *acc_hi, const float *x_scale, const float *offset,
                           const float *colsum, const float *w_scale, const float *bias, void *out,
                           int64_t M, int64_t N, int float_acc, int out_bf16, int threads) {
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
            if (out_bf16)
                _mm256_mask_storeu_epi16((uint16_t *)out + m * N + n, live, to_bf16_any(v));
            else
                _mm512_mask_storeu_ps((float *)out + m * N + n, live, v);
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
