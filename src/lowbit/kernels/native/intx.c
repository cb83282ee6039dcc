/* Intx kernels: weights of 1..8-bit codes in bit planes -> the fused small-batch weight-only linear and a bf16
 * decode for the GEMM path.
 *
 * Planes (made once at quantize/load time by lowbit_intx_pack_planes): per weight row, ceil(K / 256) chunks of 256
 * codes (codes past K are 0), each four blocks of 64 codes. Block u holds the 4-code words 4i + u of its chunk, so
 * its byte p is the code of k = 256c + 16 * (p / 4) + 4u + p % 4: a VNNI lane (4 bytes) of the four blocks covers
 * 16 consecutive k and stays in one group of 32 to 256, so one accumulator serves a chunk whatever the group size.
 * A block is `bits` little-endian uint64 planes, bit j of plane p being bit p of the block's code j: 8 * bits
 * bytes, as many as the canonical bit stream. Signed codes are stored offset by 2^(bits-1), which the kernels
 * subtract as an implied zero point. A block decodes to its 64 codes in two instructions whatever the width
 * (decode64), so time follows the bytes read. Decoding needs AVX512-VBMI and GFNI (compiled for them here, called
 * only where the CPU has them). */
#include "common.h"
#include <string.h>

#define GFNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")))
#define INTX_MR 4         /* activation rows sharing one decoded weight block */
#define INTX_NR 4         /* weight rows of a tile for one or two activation rows */
#define INTX_PREFETCH_ROWS 8 /* prefetch distance in weight rows: a tile's rows are adjacent, so this reads ahead of all */
#define CHUNK 256            /* codes per chunk: 4 blocks */
_Static_assert(CHUNK == DECODE_SPAN, "intx_rows decodes one chunk per decode_rows call");

/* Chunk order -> k order: entry 64u + p of a chunk holds k = 16 * (p / 4) + 4u + p % 4, i.e. 4-byte word 16u + i of
 * the chunk is word 4i + u in k order (see the top). */
static inline int64_t chunk_word(int64_t word) { return 4 * (word % 16) + word / 16; }

/* Canonical bit streams (N, ceil(K * bits / 8)), value j of a row in stream bits [j * bits, (j + 1) * bits) ->
 * planes (N, ceil(K / 256) * 32 * bits); flip (2^(bits-1) for signed codes, else 0) is XOR-ed into every code,
 * turning two's complement into offset binary. */
void lowbit_intx_pack_planes(const uint8_t *stream, uint8_t *planes, int64_t N, int64_t K, int64_t bits, int flip,
                             int threads) {
    int64_t chunks = (K + CHUNK - 1) / CHUNK, stream_bytes = (K * bits + 7) / 8, mask = (1 << bits) - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *src = stream + n * stream_bytes;
        uint64_t *dst = (uint64_t *)(planes + n * chunks * 32 * bits);
        for (int64_t c = 0; c < chunks; c++) {
            uint8_t codes[CHUNK];
            for (int64_t e = 0; e < CHUNK; e++) {
                int64_t k = CHUNK * c + 4 * chunk_word(e / 4) + e % 4, bit = k * bits, byte = bit / 8;
                unsigned word = k < K ? src[byte] | (byte + 1 < stream_bytes ? (unsigned)src[byte + 1] << 8 : 0u) : 0u;
                codes[e] = k < K ? (uint8_t)(((word >> (bit % 8)) & mask) ^ flip) : 0;
            }
            for (int u = 0; u < 4; u++) {
                __m512i v = _mm512_loadu_si512((const void *)(codes + 64 * u));
                for (int64_t p = 0; p < bits; p++)
                    dst[(4 * c + u) * bits + p] = _mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1 << p)));
            }
        }
    }
}

/* A block's planes -> its 64 codes as bytes: a byte permute gathers byte i of every plane into qword i (plane p
 * at byte 7 - p, planes >= bits zeroed), then one GF(2) affine transform per qword transposes that 8x8 bit
 * matrix (output bit p of byte j = bit j of byte 7 - p), so byte j of qword i becomes the block's code 8i + j. */
GFNI_TARGET static inline __attribute__((always_inline)) __m512i decode64(const uint8_t *block, __mmask64 bytes, __m512i gather,
                                                                          __mmask64 planes) {
    __m512i raw = _mm512_maskz_loadu_epi8(bytes, (const void *)block);
    __m512i rows = _mm512_maskz_permutexvar_epi8(planes, gather, raw);
    return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64((long long)0x8040201008040201ULL), rows, 0);
}

/* The permute indices and masks of decode64 for `bits`-bit codes. */
static void decode_tables(int64_t bits, __mmask64 *bytes, __m512i *gather, __mmask64 *planes) {
    uint8_t index[64];
    *planes = 0;
    for (int o = 0; o < 64; o++) {
        int qword = o / 8, plane = 7 - o % 8;
        index[o] = (uint8_t)(plane < bits ? 8 * plane + qword : 0);
        if (plane < bits) *planes |= 1ULL << o;
    }
    *gather = _mm512_loadu_si512((const void *)index);
    *bytes = bits == 8 ? ~0ULL : (1ULL << (8 * bits)) - 1;
}

/* acc + scale[g] * zero[g] * R[g] for the 16 groups g0 .. g0 + 15 selected by live (zero == NULL: the implied zero). */
static inline __m512 zero_terms(__m512 acc, const float *scale, const uint8_t *zero, float implied, const float *R, int64_t g0,
                                __mmask16 live) {
    __m512 z = zero ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, zero + g0))) : _mm512_set1_ps(implied);
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, scale + g0), z), _mm512_maskz_loadu_ps(live, R + g0), acc);
}

/* sum_g scale[g] * zero[g] * R[g] over one weight row's groups. */
static inline float intx_zero_correction(const float *scale, const uint8_t *zero, float implied, const float *R, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16) acc = zero_terms(acc, scale, zero, implied, R, g, 0xFFFF);
    if (g < groups) acc = zero_terms(acc, scale, zero, implied, R, g, (__mmask16)((1u << (groups - g)) - 1));
    return _mm512_reduce_add_ps(acc);
}

/* Activation row m -> its 16-bit split (common.h) as int8 halves a[m] = (hi, lo) of Kc entries each, in chunk
 * order (the weights' order, see the top), and R[m, g] = sum over group g of 256 * hi + lo (an integer below 2^24:
 * exact in float). nat: 2 * Kc bytes of scratch for the halves in k order (zero past K, where the codes are 0 too). */
static void split_row(const float *x, int8_t *a, float *R, float *x_scale, int64_t m, int64_t K, int64_t Kc, int64_t G,
                      int8_t *nat) {
    int8_t *hi = nat, *lo = nat + Kc;
    memset(nat, 0, 2 * Kc);
    split_row_16(x + m * K, hi, lo, x_scale + m, K, 0);
    for (int half = 0; half < 2; half++) { /* 4-byte words, CHUNK / 4 per chunk */
        const int32_t *from = (const int32_t *)(nat + half * Kc);
        int32_t *to = (int32_t *)(a + (2 * m + half) * Kc);
        for (int64_t w = 0; w < Kc / 4; w++) to[w] = from[CHUNK / 4 * (w / (CHUNK / 4)) + chunk_word(w % (CHUNK / 4))];
    }
    for (int64_t g = 0; g < K / G; g++) {
        int32_t sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) sum += 256 * hi[k] + lo[k];
        R[m * (K / G) + g] = (float)sum;
    }
}

/* The scales of a chunk's CHUNK / G groups (G = 32, 64 or 128) in the low lanes; left: groups left in the row (fewer
 * in the last chunk when K is not a multiple of CHUNK). */
static inline __m256 chunk_scales(const float *scale, int64_t G, int64_t left) {
    if (left < CHUNK / G) return _mm256_maskz_loadu_ps((__mmask8)((1u << left) - 1), scale);
    if (G == 32) return _mm256_loadu_ps(scale);
    return _mm256_castps128_ps256(G == 64 ? _mm_loadu_ps(scale) : _mm_castpd_ps(_mm_load_sd((const double *)scale)));
}

/* What every tile of one call shares. */
struct intx_call {
    const uint8_t *planes;
    const float *scale;
    const uint8_t *zero; /* NULL: the implied zero point */
    const int8_t *a;     /* (M, 2, Kc): hi and lo halves of each activation row, in chunk order */
    const float *R;      /* (M, groups) */
    const float *x_scale, *bias;
    float *y;
    int64_t N, K, Kc, G, groups, row_bytes, chunk_bytes, prefetch; /* Kc: K rounded up to chunks; prefetch: bytes ahead */
    float implied;
    __mmask64 bytes, plane_mask;
    __m512i gather;
};

/* Weight rows n0 .. n0 + nr - 1 times activation rows m0 .. m0 + rows - 1 (nr, rows constant after inlining, so the
 * loops unroll and the accumulators stay in registers):
 *   y[m, n] = x_scale[m] * (sum_g scale[n, g] * sum_{k in g} q[n, k] * (256 * hi[m, k] + lo[m, k])
 *                           - sum_g scale[n, g] * zero[n, g] * R[m, g]) + bias[n]
 * Per chunk, lane l of the int32 sums (hi and lo halves apart) lies in group (16l) / G of the chunk and becomes float
 * with its scale. 256 * hi + lo fits int32: a lane sums 16 products below 2^14 (codes < 2^7 times halves of
 * magnitude <= 128), times 256 < 2^31. */
GFNI_TARGET static inline __attribute__((always_inline)) void intx_tile(const struct intx_call *c, int64_t n0, const int nr,
                                                                        int64_t m0, const int rows) {
    const int64_t G = c->G, groups = c->groups, Kc = c->Kc, block_bytes = c->chunk_bytes / 4;
    const int64_t chunk_groups = G < CHUNK ? CHUNK / G : 1;
    __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0),
                                           G == 32 ? 5 : G == 64 ? 6 : 7); /* (16l) / G for G < CHUNK */
    const uint8_t *wrow[INTX_NR];
    const float *srow[INTX_NR];
    for (int j = 0; j < nr; j++) wrow[j] = c->planes + (n0 + j) * c->row_bytes, srow[j] = c->scale + (n0 + j) * groups;
    const int8_t *arow = c->a + m0 * 2 * Kc;
    __m512 facc[INTX_MR][INTX_NR];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++) facc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += chunk_groups, arow += CHUNK) {
        __m512i acc[INTX_MR][INTX_NR][2];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < nr; j++) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_si512();
        for (int j = 0; j < nr; j++) /* the rows of a later tile: the tile's rows are adjacent in memory */
            for (int64_t off = 0; off < c->chunk_bytes; off += 64) _mm_prefetch((const char *)(wrow[j] + c->prefetch + off), _MM_HINT_T0);
        for (int u = 0; u < 4; u++) {
            __m512i w[INTX_NR];
            for (int j = 0; j < nr; j++) w[j] = decode64(wrow[j] + u * block_bytes, c->bytes, c->gather, c->plane_mask);
            for (int r = 0; r < rows; r++) {
                const int8_t *ah = arow + r * 2 * Kc + 64 * u;
                __m512i vh = _mm512_loadu_si512((const void *)ah), vl = _mm512_loadu_si512((const void *)(ah + Kc));
                for (int j = 0; j < nr; j++) {
                    acc[r][j][0] = _mm512_dpbusd_epi32(acc[r][j][0], w[j], vh);
                    acc[r][j][1] = _mm512_dpbusd_epi32(acc[r][j][1], w[j], vl);
                }
            }
        }
        for (int j = 0; j < nr; j++) {
            __m512 s = G < CHUNK ? _mm512_permutexvar_ps(lane_group, _mm512_castps256_ps512(chunk_scales(srow[j] + g, G, groups - g)))
                                 : _mm512_set1_ps(srow[j][g]);
            for (int r = 0; r < rows; r++) {
                __m512i v = _mm512_add_epi32(_mm512_slli_epi32(acc[r][j][0], 8), acc[r][j][1]);
                facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, facc[r][j]);
            }
            wrow[j] += c->chunk_bytes;
        }
    }
    for (int j = 0; j < nr; j++) {
        int64_t n = n0 + j;
        const uint8_t *zr = c->zero ? c->zero + n * groups : NULL;
        for (int r = 0; r < rows; r++) {
            int64_t m = m0 + r;
            float out = c->x_scale[m] * (_mm512_reduce_add_ps(facc[r][j]) -
                                         intx_zero_correction(c->scale + n * groups, zr, c->implied, c->R + m * groups, groups));
            c->y[m * c->N + n] = c->bias ? out + c->bias[n] : out;
        }
    }
}

/* The tiles of weight rows n0 .. n0 + nrows - 1 (nrows <= INTX_NR) and activation rows m0 .. m0 + rows - 1 (rows <=
 * INTX_MR): four weight rows in flight for one activation row, else pairs of weight rows sharing each activation load. */
GFNI_TARGET static inline __attribute__((always_inline)) void intx_tiles(const struct intx_call *c, int64_t n0, int64_t nrows,
                                                                         int64_t m0, int64_t rows) {
    if (nrows == INTX_NR && rows == 1) {
        intx_tile(c, n0, INTX_NR, m0, 1);
        return;
    }
    for (int64_t n = n0; n < n0 + nrows; n += 2) {
        int pair = n + 1 < n0 + nrows;
#define INTX_ROWS(nr) switch (rows) { \
            case 1: intx_tile(c, n, nr, m0, 1); break; \
            case 2: intx_tile(c, n, nr, m0, 2); break; \
            case 3: intx_tile(c, n, nr, m0, 3); break; \
            default: intx_tile(c, n, nr, m0, 4); break; \
        }
        if (pair) INTX_ROWS(2) else INTX_ROWS(1)
#undef INTX_ROWS
    }
}

/* Weight-only linear y (M, N) = x (M, K) @ dequantized(W)^T + bias for few rows in one call (the weights are read once
 * per INTX_MR activation rows):
 * planes of `bits`-bit codes (see the top), float32 scale (N, K / G), uint8 zero (N, K / G) or NULL for signed
 * codes (implied zero 2^(bits-1)). G is 32, 64, 128 or 256, K a multiple of G. */
GFNI_TARGET void lowbit_intx_linear_small(const float *x, const uint8_t *planes, const float *scale, const uint8_t *zero,
                                          const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t bits,
                                          int threads) {
    if (M <= 0 || N <= 0) return; /* an empty batch */
    int64_t chunks = (K + CHUNK - 1) / CHUNK, Kc = CHUNK * chunks, row_bytes = chunks * 32 * bits;
    int8_t *a = (int8_t *)aligned_alloc(64, 2 * M * Kc);
    float *R = (float *)malloc(sizeof(float) * M * (K / G));
    float *x_scale = (float *)malloc(sizeof(float) * M);
    struct intx_call c = {.planes = planes, .scale = scale, .zero = zero, .a = a, .R = R, .x_scale = x_scale, .bias = bias,
                          .y = y, .N = N, .K = K, .Kc = Kc, .G = G, .groups = K / G, .row_bytes = row_bytes,
                          .chunk_bytes = 32 * bits, .prefetch = INTX_PREFETCH_ROWS * row_bytes, .implied = (float)(1 << (bits - 1))};
    decode_tables(bits, &c.bytes, &c.gather, &c.plane_mask);
#pragma omp parallel num_threads(threads)
    {
        int8_t *nat = (int8_t *)malloc(2 * Kc);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) split_row(x, a, R, x_scale, m, K, Kc, G, nat);
        free(nat);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < (N + INTX_NR - 1) / INTX_NR; p++) { /* weight rows INTX_NR * p ... */
            int64_t n0 = INTX_NR * p, nrows = N - n0 < INTX_NR ? N - n0 : INTX_NR;
            for (int64_t m0 = 0; m0 < M; m0 += INTX_MR) {
                int64_t rows = M - m0 < INTX_MR ? M - m0 : INTX_MR;
                intx_tiles(&c, n0, nrows, m0, rows);
            }
        }
    }
    free(x_scale);
    free(R);
    free(a);
}

/* A weight's planes, scales and zero points with decode64's tables, for intx_rows. */
typedef struct {
    const uint8_t *planes;
    const float *scale;
    const uint8_t *zero;
    int64_t K, G, bits;
    float implied;
    __mmask64 bytes, plane_mask;
    __m512i gather;
} intx_weights;

static void intx_weights_init(intx_weights *w, const uint8_t *planes, const float *scale, const uint8_t *zero, int64_t K,
                              int64_t G, int64_t bits) {
    w->planes = planes, w->scale = scale, w->zero = zero, w->K = K, w->G = G, w->bits = bits;
    w->implied = (float)(1 << (bits - 1));
    decode_tables(bits, &w->bytes, &w->gather, &w->plane_mask);
}

/* decode_rows (common.h) of planes: chunk k0 / CHUNK of row n -> bf16 w = (q - zero) * scale rounded half to even (zero
 * NULL: the implied 2^(bits-1)). A chunk's four blocks interleave back into k order 4-byte word by word; G is a
 * multiple of 32, so 16 consecutive codes share a group. */
GFNI_TARGET static void intx_rows(const void *weights, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const intx_weights *w = (const intx_weights *)weights;
    int64_t block_bytes = 8 * w->bits, row_bytes = (w->K + CHUNK - 1) / CHUNK * 4 * block_bytes, groups = w->K / w->G;
    const float *sr = w->scale + n * groups;
    const uint8_t *zr = w->zero ? w->zero + n * groups : NULL, *chunk = w->planes + n * row_bytes + k0 / CHUNK * 4 * block_bytes;
    /* k-order word i of quarter h is word 4h + i / 4 of block i % 4: from blocks (0, 1), then (2, 3), then blended */
    static const int order[4][16] = {{0, 16, 0, 16, 1, 17, 1, 17, 2, 18, 2, 18, 3, 19, 3, 19},
                                     {4, 20, 4, 20, 5, 21, 5, 21, 6, 22, 6, 22, 7, 23, 7, 23},
                                     {8, 24, 8, 24, 9, 25, 9, 25, 10, 26, 10, 26, 11, 27, 11, 27},
                                     {12, 28, 12, 28, 13, 29, 13, 29, 14, 30, 14, 30, 15, 31, 15, 31}};
    if (!dst) {
        prefetch_lines(chunk, 4 * block_bytes);
        return;
    }
    __m512i b[4];
    for (int u = 0; u < 4; u++) b[u] = decode64(chunk + u * block_bytes, w->bytes, w->gather, w->plane_mask);
    for (int h = 0; h < 4 && 64 * h < kc; h++) {
        __m512i index = _mm512_loadu_si512((const void *)order[h]);
        __m512i codes = _mm512_mask_blend_epi32((__mmask16)0xCCCC, _mm512_permutex2var_epi32(b[0], index, b[1]),
                                                _mm512_permutex2var_epi32(b[2], index, b[3])); /* k k0 + 64h .. + 63 */
        __m128i part[4] = {_mm512_extracti32x4_epi32(codes, 0), _mm512_extracti32x4_epi32(codes, 1),
                           _mm512_extracti32x4_epi32(codes, 2), _mm512_extracti32x4_epi32(codes, 3)};
        for (int q = 0; q < 4 && 64 * h + 16 * q < kc; q++) {
            int64_t k = 64 * h + 16 * q, g = (k0 + k) / w->G;
            __m512 z = _mm512_set1_ps(zr ? (float)zr[g] : w->implied);
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part[q])), z), _mm512_set1_ps(sr[g]));
            _mm256_storeu_si256((__m256i *)(dst + k), to_bf16(v));
        }
    }
}

/* Rows [row0, row0 + rows) of planes -> bfloat16 rows of K in out (intx_rows), for a bf16 GEMM where the CPU has no
 * AVX512-BF16. */
GFNI_TARGET void lowbit_intx_rows_to_bf16(const uint8_t *planes, const float *scale, const uint8_t *zero, uint16_t *out,
                                          int64_t K, int64_t G, int64_t bits, int64_t row0, int64_t rows, int threads) {
    intx_weights w;
    intx_weights_init(&w, planes, scale, zero, K, G, bits);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k0 = 0; k0 < K; k0 += CHUNK) intx_rows(&w, row0 + r, k0, K - k0 < CHUNK ? K - k0 : CHUNK, out + r * K + k0);
}

/* The decode GEMM (common.h) on planes: out = x (M, K) bf16 @ W^T * row_scale (M,) + bias, float32 or bf16. */
GFNI_TARGET void lowbit_intx_decode_gemm(const uint16_t *x, const float *row_scale, const uint8_t *planes, const float *scale,
                                         const uint8_t *zero, const float *bias, void *out, int out_bf16, int64_t M, int64_t N,
                                         int64_t K, int64_t G, int64_t bits, int threads) {
    intx_weights w;
    intx_weights_init(&w, planes, scale, zero, K, G, bits);
    decode_gemm(intx_rows, &w, x, row_scale, NULL, bias, out, out_bf16, M, N, K, threads);
}
