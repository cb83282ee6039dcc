/* Helpers shared by lowbit's AVX-512 CPU kernels (one C file per weight scheme).
 *
 * Plain C (no PyTorch headers) so the library compiles in about a second; called through ctypes.
 * Layouts: x is (M, K) float32 row-major, weights are (N, K) row-major, y is (M, N) float32.
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_SMALL_ROWS 8 /* the fused small-batch kernels take at most this many activation rows */

/* float -> bfloat16 bits, round half to even (inputs are finite). */
static inline __m256i to_bf16(__m512 f) {
    __m512i b = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

static inline float row_reduce(const float *x, int64_t K, int want_max) {
    /* min or max over the finite values of a row, seeded with 0 (the range always holds 0) */
    __m512 best = _mm512_setzero_ps();
    __m512 inf = _mm512_set1_ps(__builtin_inff());
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, x + k);
        __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(v), inf, _CMP_LT_OQ) & live;
        v = _mm512_maskz_mov_ps(finite, v);
        best = want_max ? _mm512_max_ps(best, v) : _mm512_min_ps(best, v);
    }
    return want_max ? _mm512_reduce_max_ps(best) : _mm512_reduce_min_ps(best);
}

/* max |x| over the finite values of a row of K floats, 0 when there are none (one pass: as the larger of
 * row_reduce's max and -min) */
static inline float row_absmax(const float *x, int64_t K) {
    __m512 best = _mm512_setzero_ps(), inf = _mm512_set1_ps(__builtin_inff());
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(live, x + k));
        best = _mm512_max_ps(best, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ), a));
    }
    return _mm512_reduce_max_ps(best);
}

/* Non-finite activations (one rule in every kernel): a NaN anywhere in a row makes every output of that row
 * NaN, +-inf saturate at the row's range. The row quantizers below map NaN to 0 (or the zero point), +-inf to
 * the range's ends, and report a row holding a NaN by a NaN scale, which the epilogues multiply in. */

/* 16-bit split of one row of K floats into int8 halves, x = scale * (256 * hi + lo) (as
 * lowbit.kernels.cpu.split_activation_16bit): scale = max|x| / 32639, hi in [-127, 127], lo in [-128, 127].
 * With offset128 the halves are stored as uint8 hi + 128 and lo + 128 (for vpdpbusd). NaN -> 0 (scale NaN),
 * +-inf -> +-32639. */
static inline void split_row_16(const float *row, int8_t *hi, int8_t *lo, float *scale, int64_t K, int offset128) {
    float s = row_absmax(row, K) / 32639.0f;
    if (s < 1.17549435e-38f) s = 1.17549435e-38f;
    *scale = s;
    __m512 vs = _mm512_set1_ps(s), lim = _mm512_set1_ps(32639.0f);
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 ordered = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
        nan |= (__mmask16)~ordered;
        r = _mm512_maskz_mov_ps(ordered, r);
        r = _mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
        __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_add_ps(r, _mm512_set1_ps(128.0f)), _mm512_set1_ps(1.0f / 256.0f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_fnmadd_ps(h, _mm512_set1_ps(256.0f), r);
        __m512i hq = _mm512_cvtps_epi32(h), lq = _mm512_cvtps_epi32(l);
        if (offset128) {
            __m512i bias = _mm512_set1_epi32(128);
            _mm_mask_storeu_epi8(hi + k, live, _mm512_cvtusepi32_epi8(_mm512_add_epi32(hq, bias)));
            _mm_mask_storeu_epi8(lo + k, live, _mm512_cvtusepi32_epi8(_mm512_add_epi32(lq, bias)));
        } else {
            _mm_mask_storeu_epi8(hi + k, live, _mm512_cvtsepi32_epi8(hq));
            _mm_mask_storeu_epi8(lo + k, live, _mm512_cvtsepi32_epi8(lq));
        }
    }
    if (nan) *scale = __builtin_nanf("");
}
