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

/* 32 e4m3fn codes -> 32 bfloat16 bit patterns, exactly (16-bit lanes; subnormals from a table). */
static inline __m512i decode_e4m3_bf16(__m256i bytes) {
    __m512i v = _mm512_cvtepu8_epi16(bytes);
    __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    __m512i sign = _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8);
    __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    /* bf16 of m * 2^-9 for m = 0..7 (entries 8..31 unused) */
    __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                     0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0x0000);
    __mmask32 is_sub = _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8));
    __m512i bits = _mm512_mask_blend_epi16(is_sub, normal, _mm512_permutexvar_epi16(mag, table));
    return _mm512_or_si512(bits, sign);
}

/* kc e4m3fn codes -> bf16 at dst, exactly. */
static inline void e4m3_row_to_bf16(const uint8_t *src, uint16_t *dst, int64_t kc) {
    for (int64_t k = 0; k < kc; k += 32) {
        __mmask32 live = kc - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (kc - k)) - 1);
        _mm512_mask_storeu_epi16((void *)(dst + k), live, decode_e4m3_bf16(_mm256_maskz_loadu_epi8(live, (const void *)(src + k))));
    }
}

#define DECODE_SPAN 256 /* k a decode_rows call (and int4_row_to_bf16) takes at most */

/* Packed 4-bit codes of one weight row (K / 2 bytes, low nibble = even k), k in [k0, k0 + kc) with k0 a multiple of
 * 64 and kc of 32, at most DECODE_SPAN -> bf16 at dst: w = (q - zero) * scale rounded half to even by `round`, q
 * unsigned with a uint8 zero per group, or signed int4 when zero == NULL; groups of G (a multiple of 32) along k,
 * scale and zero the row's. A group has only 16 values: they are computed once (a 16-entry bf16 table), and each 64
 * codes decode by table lookup (vpermw indexed by the nibble, plus 16 for the second group when a group is 32 codes),
 * two word interleaves restoring k order. round is to_bf16, or a CPU's own conversion (inlined: always_inline). */
static inline __attribute__((always_inline)) void int4_row_to_bf16(const uint8_t *packed, const float *scale,
                                                                   const uint8_t *zero, uint16_t *dst, int64_t k0,
                                                                   int64_t kc, int64_t G, __m256i (*round)(__m512)) {
    /* word w of a step holds byte order[w]: unpacklo then yields k 0..31 and unpackhi k 32..63 */
    static const short order[32] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23,
                                    8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
    static const short half[32] = {0, 0, 0, 0, 16, 16, 16, 16, 0, 0, 0, 0, 16, 16, 16, 16,
                                   0, 0, 0, 0, 16, 16, 16, 16, 0, 0, 0, 0, 16, 16, 16, 16}; /* codes 32..63: 2nd table */
    __m512i reorder = _mm512_loadu_si512((const void *)order), second = _mm512_loadu_si512((const void *)half);
    __m512 codes = zero ? _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
                        : _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0); /* signed nibbles */
    __m256i table[DECODE_SPAN / 32 + 1]; /* the groups of [k0, k0 + kc) */
    int64_t g0 = k0 / G;
    for (int64_t g = g0; g * G < k0 + kc; g++) {
        __m512 z = _mm512_set1_ps(zero ? (float)zero[g] : 0.0f);
        table[g - g0] = round(_mm512_mul_ps(_mm512_sub_ps(codes, z), _mm512_set1_ps(scale[g])));
    }
    int64_t t = 0, into = k0 - g0 * G; /* the table of the next 32 codes, and their offset in its group (no divisions) */
    for (int64_t k = 0; k < kc; k += 64) {
        int full = kc - k >= 64; /* else the last 32 codes */
        int64_t first = t;
        if ((into += 32) == G) into = 0, t++;
        int64_t next = full ? t : first;
        if (full && (into += 32) == G) into = 0, t++;
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(table[first]), table[next], 1);
        __m256i bytes = _mm256_maskz_loadu_epi8(full ? 0xFFFFFFFFu : 0xFFFFu, (const void *)(packed + (k0 + k) / 2));
        __m512i w = _mm512_permutexvar_epi16(reorder, _mm512_cvtepu8_epi16(bytes));
        __m512i lo = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(w, _mm512_set1_epi16(0x0F), second, 0xEA), both);
        __m512i hi = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(w, 4), second), both);
        _mm512_storeu_si512((void *)(dst + k), _mm512_unpacklo_epi16(lo, hi));
        if (full) _mm512_storeu_si512((void *)(dst + k + 32), _mm512_unpackhi_epi16(lo, hi));
    }
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

/* Prefetch `bytes` from p (weights a decoder will read; into L1: measured faster than into L2 here). */
static inline void prefetch_lines(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* The weight-only decode GEMM (decode_gemm.c): out (M, N) = x (M, K) bf16 @ W^T * w_scale (N,) * row_scale (M,) +
 * bias, float32 or bf16 (out_bf16), W's rows decoded to bf16 by `decode`: decode(weights, n, k0, kc, dst) writes
 * row n's k in [k0, k0 + kc) to dst, k0 a multiple of DECODE_SPAN and kc = min(DECODE_SPAN, K - k0); with dst NULL
 * it only prefetches what it would read. Needs AVX512-BF16; w_scale and bias may be NULL. */
typedef void (*decode_rows)(const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst);
void decode_gemm(decode_rows decode, const void *weights, const uint16_t *x, const float *row_scale, const float *w_scale,
                 const float *bias, void *out, int out_bf16, int64_t M, int64_t N, int64_t K, int threads);

/* Activations arrive as float32 or bfloat16 rows (in_bf16): row-wise kernels read row m as float32 through
 * row_f32, which widens a bf16 row (exactly) into buf, a per-thread scratch of K floats from row_buffer, and
 * divides it elementwise by divisor (K floats; static quantization's smoothing) when one is given, in float32 as
 * lowbit.kernels.reference does for a float32 model. */
static inline float *row_buffer(int64_t K, int needed) { return needed ? (float *)malloc((size_t)K * sizeof(float)) : NULL; }

static inline const float *row_f32(const void *x, int64_t m, int64_t K, int in_bf16, const float *divisor, float *buf) {
    if (!in_bf16 && !divisor) return (const float *)x + m * K;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 v;
        if (in_bf16) {
            __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, (const void *)((const uint16_t *)x + m * K + k)));
            v = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
        } else {
            v = _mm512_maskz_loadu_ps(live, (const float *)x + m * K + k);
        }
        if (divisor) v = _mm512_div_ps(v, _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), live, divisor + k));
        _mm512_mask_storeu_ps(buf + k, live, v);
    }
    return buf;
}

/* float -> bfloat16 bits, round half to even, NaN kept NaN (to_bf16's rounding carry could turn a NaN payload
 * into an infinity or a zero). */
static inline __m256i to_bf16_any(__m512 f) {
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    return _mm256_mask_mov_epi16(to_bf16(f), nan, _mm256_set1_epi16(0x7FC0));
}
