/* Float8 e4m3fn kernels: weight-only GEMV for small batches, exact bf16 decode, per-row activation rounding. */
#include "common.h"

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

/* x (M, K) itself when it holds no inf, else a copy (for the caller to free) with every +-inf replaced by
 * +-(largest finite |x| of its row): float activations saturate as the integer kernels' activations do.
 * NaN stays: it reaches every output of its row through the products. */
static const float *saturate_inf_rows(const float *x, int64_t M, int64_t K) {
    float *copy = NULL;
    __m512 inf = _mm512_set1_ps(__builtin_inff());
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __mmask16 seen = 0;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            seen |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_maskz_loadu_ps(live, row + k)), inf, _CMP_EQ_OQ);
        }
        if (!seen) continue;
        if (!copy) {
            copy = (float *)malloc(sizeof(float) * M * K);
            __builtin_memcpy(copy, x, sizeof(float) * M * K);
        }
        float amax = row_absmax(row, K);
        for (int64_t k = 0; k < K; k++)
            if (__builtin_isinf(row[k])) copy[m * K + k] = row[k] > 0 ? amax : -amax;
    }
    return copy ? copy : x;
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]) for e4m3 weights, decoded in registers.
 * Four independent accumulators per activation row hide the FMA latency. */
void lowbit_fp8_gemv(const float *x_in, const uint8_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    const float *x = saturate_inf_rows(x_in, M, K);
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
    if (x != x_in) free((void *)x);
}

/* Rows [row0, row0 + rows) of (N, K) e4m3 codes -> bfloat16 rows in out (exact: 3 mantissa bits fit). */
void lowbit_fp8_rows_to_bf16(const uint8_t *w, uint16_t *out, int64_t K, int64_t row0, int64_t rows, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) e4m3_row_to_bf16(w + (row0 + r) * K, out + r * K, K);
}

/* Per-row dynamic float8 e4m3fn quantization of x (M, K) as lowbit.primitives.affine does it:
 * scale = max|x| / 448 (floored at FLT_MIN, non-finite values ignored), v = clamp(x / scale, -448, 448)
 * rounded half-to-even to e4m3 (3 mantissa bits; steps of 2^-9 below 2^-6), NaN -> 0 (the row's scale NaN). Writes the
 * rounded values r (exact in bfloat16: float32, or bf16 bits when bf16_out) and the scale: x ~= scale[m] * r[m, :]. */
void lowbit_float8_rows(const void *x, void *r, float *scale, int64_t M, int64_t K, float fixed_scale, int bf16_out,
                        const float *divisor, int in_bf16, int threads) {
    /* fixed_scale > 0: static quantization with a calibrated scale for every row; x float32 or bf16 (in_bf16), divided
     * by divisor (K,) first when given */
#pragma omp parallel num_threads(threads)
    {
        float *buf = row_buffer(K, in_bf16 || divisor);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *row = row_f32(x, m, K, in_bf16, divisor, buf);
            float s = fixed_scale > 0 ? fixed_scale : row_absmax(row, K) / 448.0f;
            if (s < 1.17549435e-38f) s = 1.17549435e-38f;
            __m512 vs = _mm512_set1_ps(s), lim = _mm512_set1_ps(448.0f);
            __m512 small = _mm512_set1_ps(1.0f / 64.0f); /* 2^-6: smallest e4m3 normal */
            __mmask16 nan = 0;
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
                __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs);
                __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
                nan |= (__mmask16)~ordered;
                v = _mm512_maskz_mov_ps(ordered, v); /* NaN -> 0 */
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
                __m512 rounded = _mm512_mask_blend_ps(is_sub, normal, sub);
                if (bf16_out) /* exact: the low 16 bits are zero */
                    _mm256_mask_storeu_epi16((uint16_t *)r + m * K + k, live,
                                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
                else
                    _mm512_mask_storeu_ps((float *)r + m * K + k, live, rounded);
            }
            scale[m] = nan ? __builtin_nanf("") : s;
        }
        free(buf);
    }
}

/* ---- table decode (CPUs with AVX512-VBMI) ----
 * Every e4m3 value is exact in bf16, so 64 codes decode with two byte-table lookups (vpermi2b: the high and
 * low byte of each value's bf16 pattern, indexed by the 7-bit magnitude; the sign is OR-ed into the high
 * byte) and two byte interleaves. */
#define VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
#define FP8_PREFETCH 2048 /* bytes ahead in each weight row */

/* table[0..1]: high bytes of the bf16 patterns of magnitudes 0..127, table[2..3]: low bytes (0x7F: NaN). */
VBMI_TARGET static void e4m3_bf16_tables(__m512i table[4]) {
    uint8_t bytes[2][128];
    for (int c = 0; c < 128; c++) {
        float f = c == 0x7F ? __builtin_nanf("") : decode_e4m3_scalar((uint8_t)c);
        uint32_t bits;
        __builtin_memcpy(&bits, &f, 4);
        bytes[0][c] = (uint8_t)(bits >> 24), bytes[1][c] = (uint8_t)(bits >> 16);
    }
    for (int t = 0; t < 4; t++) table[t] = _mm512_loadu_si512((const void *)(bytes[t / 2] + 64 * (t % 2)));
}

/* 64 codes -> 64 bf16 patterns: per 16-byte lane l, lo holds codes 16l..16l+7 and hi codes 16l+8..16l+15. */
VBMI_TARGET static inline __attribute__((always_inline)) void decode64_bf16(__m512i v, const __m512i table[4], __m512i *lo,
                                                                            __m512i *hi) {
    __m512i h = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(table[0], v, table[1]), v, _mm512_set1_epi8((char)0x80), 0xF8);
    __m512i l = _mm512_permutex2var_epi8(table[2], v, table[3]);
    *lo = _mm512_unpacklo_epi8(l, h), *hi = _mm512_unpackhi_epi8(l, h);
}

/* ---- float8 GEMV with table decode: one shift or mask per 16 widens the bf16 values to float32, and FMAs
 * take the float32 activations as they are (exact products, as F.linear). ---- */
#define WEIGHT_ROWS 4 /* weight rows per tile: more loads in flight for few activation rows */

/* Per 16-byte lane l of a 64-code block the interleaves yield codes 16l..16l+7 (first vector) and
 * 16l+8..16l+15 (second); widening takes a vector's even 16-bit elements, then its odd ones. Activations
 * are stored per 64-k block in that order: entry j of a block holds k = order(j). */
static inline int block_order(int j) {
    int v = j / 32, e = 2 * (j % 16) + (j % 32) / 16; /* element e of interleaved vector v */
    return 16 * (e / 8) + 8 * v + e % 8;
}

/* Weight rows n0 .. n0 + nr - 1 times all rows of x (nr and rows are constants after inlining). */
VBMI_TARGET static inline __attribute__((always_inline)) void fp8_table_tile(
    const float *x, const uint8_t *w, const float *scale, const float *bias, const float *a, float *y,
    int64_t n0, const int nr, const int rows, int64_t N, int64_t K, const __m512i table[4]) {
    int64_t blocks = K / 64;
    __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000);
    const int P = rows * nr > 4 ? 2 : 4; /* accumulators per output: enough independent FMA chains, in registers */
    __m512 acc[MAX_SMALL_ROWS][WEIGHT_ROWS][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++)
            for (int p = 0; p < 4; p++) acc[r][j][p] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++)
        for (int j = 0; j < nr; j++) {
            const uint8_t *wb = w + (n0 + j) * K + 64 * b;
            _mm_prefetch((const char *)(wb + FP8_PREFETCH), _MM_HINT_T0);
            __m512i lo, hi;
            decode64_bf16(_mm512_loadu_si512((const void *)wb), table, &lo, &hi);
            __m512 wf[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_castsi512_ps(_mm512_and_si512(lo, high16)),
                            _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)), _mm512_castsi512_ps(_mm512_and_si512(hi, high16))};
            for (int r = 0; r < rows; r++) {
                const float *ab = a + r * K + 64 * b;
                for (int p = 0; p < 4; p++) acc[r][j][p % P] = _mm512_fmadd_ps(wf[p], _mm512_loadu_ps(ab + 16 * p), acc[r][j][p % P]);
            }
        }
    for (int j = 0; j < nr; j++) {
        int64_t n = n0 + j;
        for (int r = 0; r < rows; r++) {
            __m512 *c = acc[r][j];
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])));
            for (int64_t k = blocks * 64; k < K; k++) sum += x[r * K + k] * decode_e4m3_scalar(w[n * K + k]);
            float out = sum * scale[n];
            y[r * N + n] = bias ? out + bias[n] : out;
        }
    }
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows (M <= 8 per pass) and e4m3 weights (as uint8). */
VBMI_TARGET void lowbit_fp8_gemv_table(const float *x_in, const uint8_t *w, const float *scale, const float *bias, float *y,
                                         int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0 || N <= 0) return; /* an empty batch */
    const float *x = saturate_inf_rows(x_in, M, K);
    __m512i table[4];
    e4m3_bf16_tables(table);
    int order[64];
    for (int j = 0; j < 64; j++) order[j] = block_order(j);
    float *a = (float *)aligned_alloc(64, ((M * K * sizeof(float) + 63) / 64) * 64 + 64);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k + 64 <= K; k += 64)
                for (int j = 0; j < 64; j++) a[m * K + k + j] = x[m * K + k + order[j]];
#pragma omp for schedule(static)
        for (int64_t p = 0; p < (N + WEIGHT_ROWS - 1) / WEIGHT_ROWS; p++) { /* weight rows 4p .. 4p + 3 */
            int64_t n0 = WEIGHT_ROWS * p, nrows = N - n0 < WEIGHT_ROWS ? N - n0 : WEIGHT_ROWS;
            for (int64_t m0 = 0; m0 < M; m0 += MAX_SMALL_ROWS) { /* callers pass M <= 8: one pass */
                int64_t rows = M - m0 < MAX_SMALL_ROWS ? M - m0 : MAX_SMALL_ROWS;
#define FP8_TILE(n, nr, rows) fp8_table_tile(x + m0 * K, w, scale, bias, a + m0 * K, y + m0 * N, n, nr, rows, N, K, table)
                if (nrows == WEIGHT_ROWS && rows == 1) FP8_TILE(n0, 4, 1); /* more weight rows in flight for few activation rows */
                else if (nrows == WEIGHT_ROWS && rows == 2) { FP8_TILE(n0, 2, 2); FP8_TILE(n0 + 2, 2, 2); }
                else if (nrows == WEIGHT_ROWS && rows == 3) { FP8_TILE(n0, 2, 3); FP8_TILE(n0 + 2, 2, 3); }
                else if (nrows == WEIGHT_ROWS && rows == 4) { FP8_TILE(n0, 2, 4); FP8_TILE(n0 + 2, 2, 4); }
                else /* each weight block decoded once for all rows */
                    for (int64_t n = n0; n < n0 + nrows; n++) switch (rows) {
                        case 1: FP8_TILE(n, 1, 1); break;
                        case 2: FP8_TILE(n, 1, 2); break;
                        case 3: FP8_TILE(n, 1, 3); break;
                        case 4: FP8_TILE(n, 1, 4); break;
                        case 5: FP8_TILE(n, 1, 5); break;
                        case 6: FP8_TILE(n, 1, 6); break;
                        case 7: FP8_TILE(n, 1, 7); break;
                        default: FP8_TILE(n, 1, 8); break;
                    }
#undef FP8_TILE
            }
        }
    }
    free(a);
    if (x != x_in) free((void *)x);
}
