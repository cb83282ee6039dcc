/* lowbit's AVX-512 CPU kernels: weight-only GEMV for small batches and weight dequantization.
 *
 * Plain C (no PyTorch headers) so it compiles in about a second; called through ctypes.
 * Layouts: x is (M, K) float32 row-major, weights are (N, K) row-major, y is (M, N) float32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 4 /* activation rows that share one pass over a weight row */

/* 16 e4m3fn codes -> 16 floats equal to 2^-8 times their values (callers fold 2^8 into the scale):
 * moving the 4-bit exponent and 3-bit mantissa under fp16's fields keeps subnormals exact. */
static inline __m512 decode_e4m3_scaled(__m128i bytes) {
    __m256i v = _mm256_cvtepu8_epi16(bytes);
    __m256i bits = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16(0x3F80)),
                                   _mm256_and_si256(_mm256_slli_epi16(v, 8), _mm256_set1_epi16((short)0x8000)));
    return _mm512_cvtph_ps(bits);
}

static inline float decode_e4m3_scalar(uint8_t b) {
    int mag = b & 0x7F, e = mag >> 3, m = mag & 7;
    float f = e ? (1.0f + m / 8.0f) * (float)(1 << e) / 128.0f : m / 512.0f;
    return (b & 0x80) ? -f : f;
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]) for e4m3 weights, decoded in registers.
 * Four independent accumulators per activation row hide the FMA latency. */
void lowbit_gemv(const float *x, const uint8_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            int rows = (M - m0) < ROWS ? (int)(M - m0) : ROWS;
            __m512 acc[ROWS][4];
            float tail[ROWS] = {0};
            for (int r = 0; r < ROWS; r++)
                for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                for (int u = 0; u < 4; u++) {
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(wr + k + 16 * u));
                    __m512 wv = decode_e4m3_scaled(bytes);
                    for (int r = 0; r < rows; r++)
                        acc[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (m0 + r) * K + k + 16 * u), wv, acc[r][u]);
                }
            }
            for (; k + 16 <= K; k += 16) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(wr + k));
                __m512 wv = decode_e4m3_scaled(bytes);
                for (int r = 0; r < rows; r++)
                    acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (m0 + r) * K + k), wv, acc[r][0]);
            }
            for (; k < K; k++) {
                float wk = decode_e4m3_scalar(wr[k]) / 256.0f;
                for (int r = 0; r < rows; r++) tail[r] += x[(m0 + r) * K + k] * wk;
            }
            for (int r = 0; r < rows; r++) {
                __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
                float v = (_mm512_reduce_add_ps(sum) + tail[r]) * (256.0f * scale[n]);
                y[(m0 + r) * N + n] = bias ? v + bias[n] : v;
            }
        }
    }
}

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

/* Rows [row0, row0 + rows) of (N, K) e4m3 codes -> bfloat16 rows in out (exact: 3 mantissa bits fit). */
void lowbit_fp8_rows_to_bf16(const uint8_t *w, uint16_t *out, int64_t K, int64_t row0, int64_t rows, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *src = w + (row0 + r) * K;
        uint16_t *dst = out + r * K;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32)
            _mm512_storeu_si512((void *)(dst + k), decode_e4m3_bf16(_mm256_loadu_si256((const __m256i *)(src + k))));
        for (; k < K; k++) {
            float f = decode_e4m3_scalar(src[k]);
            uint32_t b;
            __builtin_memcpy(&b, &f, 4);
            dst[k] = (uint16_t)(b >> 16);
        }
    }
}

/* Rows [row0, row0 + rows) of packed 4-bit weights (N, K/2), low nibble = even k, groups of G
 * along K -> bfloat16 rows in out: w = (q - zero) * scale, q unsigned with a uint8 zero per group,
 * or signed int4 when zero == NULL. G is a multiple of 16. */
void lowbit_int4_rows_to_bf16(const uint8_t *packed, const float *scale, const uint8_t *zero, uint16_t *out,
                              int64_t K, int64_t G, int64_t row0, int64_t rows, int threads) {
    int64_t groups = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = row0 + r;
        for (int64_t g = 0; g < groups; g++) {
            __m512 s = _mm512_set1_ps(scale[n * groups + g]);
            __m512 z = _mm512_set1_ps(zero ? (float)zero[n * groups + g] : 0.0f);
            const uint8_t *src = packed + n * (K / 2) + g * (G / 2);
            uint16_t *dst = out + r * K + g * G;
            for (int64_t j = 0; j < G / 2; j += 8) { /* 8 bytes -> 16 values */
                __m128i b = _mm_loadl_epi64((const __m128i *)(src + j));
                __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
                __m512i q = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)); /* k order: lo0 hi0 lo1 hi1 ... */
                if (!zero) /* signed int4: values >= 8 are negative */
                    q = _mm512_sub_epi32(q, _mm512_and_si512(_mm512_set1_epi32(16),
                                                             _mm512_srai_epi32(_mm512_slli_epi32(q, 28), 31)));
                __m512 f = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s);
                _mm256_storeu_si256((__m256i *)(dst + 2 * j), to_bf16(f));
            }
        }
    }
}

/* ---- dynamic activation quantization and int32 epilogues (one pass each, replacing many small ops) ---- */

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

/* out[m, n] = (acc[m, n] (+ 256 * acc_hi[m, n]) - offset[m] * colsum[n]) * x_scale[m] * w_scale[n] + bias[n].
 * acc_hi, offset and bias may be NULL. */
void lowbit_int32_epilogue(const int32_t *acc, const int32_t *acc_hi, const float *x_scale, const float *offset,
                           const float *colsum, const float *w_scale, const float *bias, float *out,
                           int64_t M, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        __m512 xs = _mm512_set1_ps(x_scale[m]);
        __m512 off = _mm512_set1_ps(offset ? offset[m] : 0.0f);
        for (int64_t n = 0; n < N; n += 16) {
            __mmask16 live = N - n >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, acc + m * N + n));
            if (acc_hi)
                v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, acc_hi + m * N + n)),
                                    _mm512_set1_ps(256.0f), v);
            if (offset)
                v = _mm512_fnmadd_ps(off, _mm512_maskz_loadu_ps(live, colsum + n), v);
            v = _mm512_mul_ps(v, _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(live, w_scale + n)));
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias + n));
            _mm512_mask_storeu_ps(out + m * N + n, live, v);
        }
    }
}

/* 16-bit split of one row of K floats into int8 halves, x = scale * (256 * hi + lo) (as
 * lowbit.kernels.cpu.split_activation_16bit): scale = max|x| / 32639, hi in [-127, 127], lo in [-128, 127].
 * With offset128 the halves are stored as uint8 hi + 128 and lo + 128 (for vpdpbusd). */
static void split_row_16(const float *row, int8_t *hi, int8_t *lo, float *scale, int64_t K, int offset128) {
    float a = row_reduce(row, K, 1), b = -row_reduce(row, K, 0);
    float s = (a > b ? a : b) / 32639.0f;
    if (s < 1.17549435e-38f) s = 1.17549435e-38f;
    *scale = s;
    __m512 vs = _mm512_set1_ps(s), lim = _mm512_set1_ps(32639.0f);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
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
}

/* split_row_16 for every row of x (M, K), signed halves (for oneDNN's int8 GEMM). */
void lowbit_split_rows_16(const float *x, int8_t *hi, int8_t *lo, float *scale, int64_t M, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) split_row_16(x + m * K, hi + m * K, lo + m * K, scale + m, K, 0);
}

/* Small-batch int8 linear in one call (M <= 8): y[m, n] = (acc - offset[m] * colsum[n]) * x_scale[m] *
 * w_scale[n] + bias[n], where acc = sum_k a[m, k] * w[n, k] is taken with VNNI (vpdpbusd: four u8 x s8
 * products per 32-bit lane) on activations quantized here, stored as uint8 q + 128:
 *   mode 0 (weight-only): each row split into 16 bits, two halves, acc = 256 * acc_hi + acc_lo;
 *   mode 1 / 2: int8 per row, symmetric / asymmetric (fixed_scale > 0: the static scale and zero).
 * Four weight rows are streamed together (more memory-level parallelism than one row at a time). */
#define WROWS 4
#define MAX_SMALL_ROWS 8
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

/* Per-row dynamic float8 e4m3fn quantization of x (M, K) as lowbit.primitives.affine does it:
 * scale = max|x| / 448 (floored at FLT_MIN, non-finite values ignored), v = clamp(x / scale, -448, 448)
 * rounded half-to-even to e4m3 (3 mantissa bits; steps of 2^-9 below 2^-6), NaN -> 0. Writes the
 * rounded values r (exact in bfloat16) and the scale: x ~= scale[m] * r[m, :]. */
void lowbit_float8_rows(const float *x, float *r, float *scale, int64_t M, int64_t K, float fixed_scale, int threads) {
    /* fixed_scale > 0: static quantization with a calibrated scale for every row */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float a = fixed_scale > 0 ? 0.0f : row_reduce(row, K, 1), b = fixed_scale > 0 ? 0.0f : -row_reduce(row, K, 0);
        float s = fixed_scale > 0 ? fixed_scale : (a > b ? a : b) / 448.0f;
        if (s < 1.17549435e-38f) s = 1.17549435e-38f;
        scale[m] = s;
        __m512 vs = _mm512_set1_ps(s), lim = _mm512_set1_ps(448.0f);
        __m512 small = _mm512_set1_ps(1.0f / 64.0f); /* 2^-6: smallest e4m3 normal */
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs);
            v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v); /* NaN -> 0 */
            v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
            /* normal range: round the fp32 mantissa to 3 bits, half to even */
            __m512i bits = _mm512_castps_si512(v);
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
            bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFFF)));
            __m512 normal = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFF00000)));
            /* subnormal range: multiples of 2^-9 */
            __m512 sub = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(512.0f)),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                       _mm512_set1_ps(1.0f / 512.0f));
            __mmask16 is_sub = _mm512_cmp_ps_mask(_mm512_abs_ps(v), small, _CMP_LT_OQ);
            _mm512_mask_storeu_ps(r + m * K + k, live, _mm512_mask_blend_ps(is_sub, normal, sub));
        }
    }
}
