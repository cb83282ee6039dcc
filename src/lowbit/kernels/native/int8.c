/* Int8 kernels: dynamic activation quantization, int32 epilogues and the fused small-batch linear. */
#include "common.h"

#include <sys/syscall.h>
#include <unistd.h>

/* Dynamic int8 quantization of one row of K floats, the same formulas as lowbit.primitives.affine:
 * symmetric: scale = max|x| / 127; asymmetric: scale = (max(x,0) - min(x,0)) / 255,
 * zero = clamp(-128 - round(min(x,0) / scale)); q = clamp(round(x / scale) + zero, -128, 127).
 * fixed_scale > 0: static quantization with a calibrated scale and zero point instead.
 * Scales are floored at FLT_MIN; NaN maps to the zero point (and makes *scale NaN), +-inf saturate.
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
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, row + k), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 ordered = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
        nan |= (__mmask16)~ordered;
        r = _mm512_maskz_mov_ps(ordered, r); /* NaN -> 0 */
        r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), qmin), qmax);
        __m512i qi = _mm512_cvtps_epi32(r);
        if (offset128)
            _mm_mask_storeu_epi8(q + k, live, _mm512_cvtusepi32_epi8(qi));
        else
            _mm_mask_storeu_epi8(q + k, live, _mm512_cvtsepi32_epi8(qi));
    }
    if (nan) *scale = __builtin_nanf("");
}

/* quantize_row_int8 for every row of x (M, K), float32 or bf16 (in_bf16), divided by divisor (K,) first when given;
 * scale and zero get one entry per row. */
void lowbit_quantize_rows_int8(const void *x, int8_t *q, float *scale, float *zero, int64_t M, int64_t K,
                               int symmetric, int offset128, float fixed_scale, float fixed_zero, const float *divisor,
                               int in_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *buf = row_buffer(K, in_bf16 || divisor);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row_int8(row_f32(x, m, K, in_bf16, divisor, buf), q + m * K, scale + m, zero + m, K, symmetric,
                              offset128, fixed_scale, fixed_zero);
        free(buf);
    }
}

/* split_row_16 for every row of x (M, K), float32 or bf16 (in_bf16): signed halves (torch._int_mm), or uint8 + 128
 * with offset128 (oneDNN's u8s8 GEMM). */
void lowbit_split_rows_16(const void *x, int8_t *hi, int8_t *lo, float *scale, int64_t M, int64_t K, int offset128,
                          int in_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *buf = row_buffer(K, in_bf16);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) split_row_16(row_f32(x, m, K, in_bf16, NULL, buf), hi + m * K, lo + m * K, scale + m, K, offset128);
        free(buf);
    }
}

/* y[m, n0 + j] for j < nrows from acc[j * ldc + c] (c: activation row; hi rows, then lo rows when split). */
static inline void small_epilogue(const int32_t *acc, int ldc, int64_t n0, int nrows, int64_t M, int split,
                                  const float *offset, const float *x_scale, const float *colsum, const float *w_scale,
                                  const float *bias, float *y, int64_t N) {
    for (int64_t m = 0; m < M; m++)
        for (int j = 0; j < nrows; j++) {
            int64_t n = n0 + j;
            const int32_t *c = acc + j * ldc;
            double sum = split ? 256.0 * c[m] + c[M + m] : (double)c[m];
            float out = (float)(sum - (double)offset[m] * colsum[n]) * (x_scale[m] * w_scale[n]);
            y[m * N + n] = bias ? out + bias[n] : out;
        }
}

/* ---- AMX (Sapphire Rapids and later): 16 weight rows x all activation rows per tile product ----
 * A tile: 16 weight rows x 64 k, loaded straight from the canonical (N, K) weight (row stride K); B tile:
 * the activations for those 64 k in the VNNI layout (row r holds k 4r..4r+3 of every activation row),
 * built once per call; tdpbsud (signed weights x unsigned activations) accumulates into two C tiles,
 * alternating k blocks. Linux hands out the tile state only on request (lowbit_amx_enable). */
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")))
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* 0 when this process may use AMX tiles (asks Linux for the XTILEDATA state), else the syscall's -1. */
int lowbit_amx_enable(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

AMX_TARGET static void amx_configure(int R) {
    tile_config cfg;
    __builtin_memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = (uint16_t)(t == 2 || t == 4 ? 64 : 4 * R); /* 0, 1: C; 2, 4: A; 3, 5: B */
    }
    _tile_loadconfig(&cfg);
}

/* acc[j * R + c] = sum_k w[n0 + j, k] * a[c, k] for j < 16, from B tiles b (one per 64-k block). */
AMX_TARGET static void amx_products(const int8_t *w, const uint8_t *b, int64_t n0, int64_t K, int R, int32_t *acc) {
    int64_t blocks = K / 64, bstride = 64 * R, blk = 0;
    const int8_t *wr = w + n0 * K;
    _tile_zero(0);
    _tile_zero(1);
    for (; blk + 1 < blocks; blk += 2) {
        _tile_loadd(2, wr + 64 * blk, K);
        _tile_loadd(3, b + blk * bstride, 4 * R);
        _tile_dpbsud(0, 2, 3);
        _tile_loadd(4, wr + 64 * (blk + 1), K);
        _tile_loadd(5, b + (blk + 1) * bstride, 4 * R);
        _tile_dpbsud(1, 4, 5);
    }
    if (blk < blocks) {
        _tile_loadd(2, wr + 64 * blk, K);
        _tile_loadd(3, b + blk * bstride, 4 * R);
        _tile_dpbsud(0, 2, 3);
    }
    int32_t other[16 * 2 * MAX_SMALL_ROWS];
    _tile_stored(0, acc, 4 * R);
    _tile_stored(1, other, 4 * R);
    for (int i = 0; i < 16 * R; i++) acc[i] += other[i];
}

/* The AMX pass over the full 16-row weight tiles, inside the caller's parallel region. */
AMX_TARGET static void amx_rows(const int8_t *w, const uint8_t *a, uint8_t *b, int64_t N, int64_t K, int64_t M, int R,
                                int split, const float *offset, const float *x_scale, const float *colsum,
                                const float *w_scale, const float *bias, float *y) {
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < K / 64; blk++) /* B tiles: activation k-quads side by side */
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < R; c++) __builtin_memcpy(b + blk * 64 * R + r * 4 * R + 4 * c, a + c * K + 64 * blk + 4 * r, 4);
    amx_configure(R);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N / 16; t++) {
        int32_t acc[16 * 2 * MAX_SMALL_ROWS];
        amx_products(w, b, 16 * t, K, R, acc);
        small_epilogue(acc, R, 16 * t, 16, M, split, offset, x_scale, colsum, w_scale, bias, y, N);
    }
    _tile_release();
}

/* Small-batch int8 linear in one call (M <= 8): y[m, n] = (acc - offset[m] * colsum[n]) * x_scale[m] *
 * w_scale[n] + bias[n], where acc = sum_k a[m, k] * w[n, k] on activations quantized here, stored as uint8 q + 128:
 *   mode 0 (weight-only): each row split into 16 bits, two halves, acc = 256 * acc_hi + acc_lo;
 *   mode 1 / 2: int8 per row, symmetric / asymmetric (fixed_scale > 0: the static scale and zero).
 * Products: AMX tiles when use_amx (K a multiple of 64; the last N % 16 rows as below), else VNNI (vpdpbusd:
 * four u8 x s8 products per 32-bit lane) streaming four weight rows together (more memory-level parallelism). */
#define WROWS 4
void lowbit_int8_linear_small(const float *x, const int8_t *w, const float *w_scale, const float *colsum,
                              const float *bias, float *y, int64_t M, int64_t N, int64_t K, int mode,
                              float fixed_scale, float fixed_zero, int use_amx, int threads) {
    if (M <= 0 || N <= 0) return; /* an empty batch: no buffers, no AMX tile configured with zero columns */
    int split = mode == 0, R = split ? 2 * (int)M : (int)M; /* activation rows: hi rows, then lo rows */
    uint8_t *a = (uint8_t *)aligned_alloc(64, ((R * K + 63) / 64) * 64);
    float x_scale[MAX_SMALL_ROWS], offset[MAX_SMALL_ROWS];
    use_amx = use_amx && K % 64 == 0 && N >= 16;
    uint8_t *b = use_amx ? (uint8_t *)aligned_alloc(64, ((R * K + 63) / 64) * 64) : NULL;
    int64_t vnni_from = use_amx ? N / 16 * 16 : 0, tail = K % 64, blocks = (N - vnni_from + WROWS - 1) / WROWS;
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
        if (use_amx) amx_rows(w, a, b, N, K, M, R, split, offset, x_scale, colsum, w_scale, bias, y);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t n0 = vnni_from + blk * WROWS;
            int nrows = (N - n0) < WROWS ? (int)(N - n0) : WROWS;
            const int8_t *wr[WROWS];
            for (int j = 0; j < WROWS; j++) wr[j] = w + (n0 + (j < nrows ? j : 0)) * K;
            int32_t acc[WROWS][2 * MAX_SMALL_ROWS];
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
                    for (int j = 0; j < WROWS; j++) acc[j][r0 + r] = _mm512_reduce_add_epi32(v[r][j]);
            }
            small_epilogue(acc[0], 2 * MAX_SMALL_ROWS, n0, nrows, M, split, offset, x_scale, colsum, w_scale, bias, y, N);
        }
    }
    free(b);
    free(a);
}
