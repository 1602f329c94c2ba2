/*
 * sparsekit CPU kernels: y = x W^T for a compressed sparse W.
 *
 * Shapes: W is [R, K] (R output rows, K inputs), x is [B, ldx] fp32 (zero-padded to a multiple of 8
 * columns), y is [B, R] fp32. Values of W are fp32, bf16 or fp16; accumulation is fp32.
 *
 * Formats:
 *   bitmask  bits[R, bpr] (bpr = ceil(K/8) bytes per row, bit t of byte j <-> column 8j+t, the
 *            numpy.packbits(bitorder="little") layout), values = the kept weights in row-major order,
 *            row r starting at row_offsets[r] (or at r * row_stride when row_offsets is NULL, the
 *            N:M case where every row keeps the same count).
 *   csr      indptr[R+1] (int64), column indices (int32 or uint16), values.
 *
 * The AVX2 bitmask kernel is branch free: each mask byte selects a 32-byte shuffle pattern from a
 * 256-entry table, which moves the next popcount(byte) packed values into their 8 column slots and zeroes
 * the others (one vpshufb for bf16, whose bits are the upper half of an fp32). The expanded 8 weights
 * meet 8 contiguous x values in one FMA, so x is read contiguously from L1 and nothing is gathered.
 * Each function has a portable scalar twin used when the CPU lacks AVX2/FMA/F16C or when asked.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define SK_X86 1
#include <immintrin.h>
#define SK_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#else
#define SK_X86 0
#endif

#define SK_INLINE static inline __attribute__((always_inline))

enum { VT_F32 = 0, VT_BF16 = 1, VT_F16 = 2 };
enum { IT_I32 = 0, IT_U16 = 1 };

/* ------------------------------------------------------------------ scalar helpers */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        float f = (float)mantissa * 5.9604644775390625e-8f; /* subnormal: mantissa * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static inline float value_at(const void *values, int vt, int64_t i) {
    if (vt == VT_F32) return ((const float *)values)[i];
    uint16_t h = ((const uint16_t *)values)[i];
    return vt == VT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline int64_t index_at(const void *indices, int it, int64_t i) {
    return it == IT_I32 ? (int64_t)((const int32_t *)indices)[i] : (int64_t)((const uint16_t *)indices)[i];
}

static inline int64_t value_size(int vt) { return vt == VT_F32 ? 4 : 2; }

/* ------------------------------------------------------------------ arguments and threading */

typedef struct {
    const uint8_t *bits;       /* bitmask [R, bpr] */
    int64_t bpr;
    const char *values;        /* kept values */
    int vt;                    /* value type */
    const int64_t *row_offsets; /* [R+1] or NULL (then row r starts at r*row_stride) */
    int64_t row_stride;
    int64_t nnz;               /* total number of values (bounds the over-read of the SIMD loads) */
    const int64_t *indptr;     /* csr */
    const void *indices;
    int it;
    int64_t R, K;
    const float *x;            /* [B, ldx] fp32, zero-padded */
    int64_t B, ldx;
    const float *xt;           /* csr, B > 1: x transposed to [K, nbp] */
    int64_t nbp, b0, nb;
    float *y;                  /* [B, R] */
    char *out;                 /* dense [R, K] in the values' dtype */
} sk_args;

typedef void (*rows_fn)(const sk_args *a, int64_t r0, int64_t r1);

#define SK_ROW_CHUNK 32           /* rows per work item; the batched bitmask kernel keeps state for this many */
#define SK_PARALLEL_WORK (1 << 18) /* below ~256K weight positions x batch, threads cost more than they save */

/* Output rows split in chunks handed out dynamically: a core slowed by another process takes fewer. */
static void run_rows(rows_fn fn, const sk_args *a, int64_t R, int nthreads) {
    const int64_t chunk = SK_ROW_CHUNK;
    const int64_t chunks = (R + chunk - 1) / chunk;
    const int64_t work = R * a->K * (a->B > 0 ? a->B : 1);
    if (nthreads <= 1 || chunks <= 1 || work < SK_PARALLEL_WORK) {
        for (int64_t c = 0; c < chunks; c++) fn(a, c * chunk, (c * chunk + chunk < R) ? c * chunk + chunk : R);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * chunk, r1 = (r0 + chunk < R) ? r0 + chunk : R;
        fn(a, r0, r1);
    }
}

static inline int64_t args_row_start(const sk_args *a, int64_t r) {
    return a->row_offsets ? a->row_offsets[r] : r * a->row_stride;
}

static inline int64_t args_row_end(const sk_args *a, int64_t r) {
    return a->row_offsets ? a->row_offsets[r + 1] : (r + 1) * a->row_stride;
}

/* ------------------------------------------------------------------ scalar kernels */

static float bitmask_row_dot_scalar(const uint8_t *mask, int64_t bpr, const char *v, int vt, const float *x) {
    float acc = 0.0f;
    int64_t i = 0;
    for (int64_t j = 0; j < bpr; j++) {
        unsigned byte = mask[j];
        while (byte) {
            int t = __builtin_ctz(byte);
            acc += value_at(v, vt, i++) * x[8 * j + t];
            byte &= byte - 1;
        }
    }
    return acc;
}

static void bitmask_rows_scalar(const sk_args *a, int64_t r0, int64_t r1) {
    const int64_t es = value_size(a->vt);
    for (int64_t r = r0; r < r1; r++) {
        const char *v = a->values + es * args_row_start(a, r);
        for (int64_t b = 0; b < a->B; b++)
            a->y[b * a->R + r] = bitmask_row_dot_scalar(a->bits + r * a->bpr, a->bpr, v, a->vt, a->x + b * a->ldx);
    }
}

static void csr_rows_scalar(const sk_args *a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t b = 0; b < a->B; b++) {
            const float *xb = a->x + b * a->ldx;
            float acc = 0.0f;
            for (int64_t i = a->indptr[r]; i < a->indptr[r + 1]; i++)
                acc += value_at(a->values, a->vt, i) * xb[index_at(a->indices, a->it, i)];
            a->y[b * a->R + r] = acc;
        }
    }
}

static void bitmask_row_to_dense_scalar(const uint8_t *mask, const char *v, int64_t es, int64_t K, char *o) {
    memset(o, 0, (size_t)(es * K));
    for (int64_t k = 0; k < K; k++) {
        if ((mask[k >> 3] >> (k & 7)) & 1u) {
            memcpy(o + es * k, v, (size_t)es);
            v += es;
        }
    }
}

static void to_dense_rows_scalar(const sk_args *a, int64_t r0, int64_t r1) {
    const int64_t es = value_size(a->vt);
    for (int64_t r = r0; r < r1; r++)
        bitmask_row_to_dense_scalar(a->bits + r * a->bpr, a->values + es * args_row_start(a, r), es, a->K,
                                    a->out + es * r * a->K);
}

/* ------------------------------------------------------------------ AVX2 kernels */
#if SK_X86

/* Shuffle tables, indexed by a mask byte; built once by sk_init. */
static uint8_t LUT_BF16_TO_F32[256][32] __attribute__((aligned(32))); /* 16-bit values -> fp32 lanes (bf16) */
static uint8_t LUT_16[256][16] __attribute__((aligned(16)));          /* 16-bit values -> 16-bit lanes */
static int32_t LUT_F32[256][8] __attribute__((aligned(32)));          /* lane -> source, sign bit: empty */
static int sk_ready = 0;

static void build_tables(void) {
    for (int byte = 0; byte < 256; byte++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++) {
            int kept = (byte >> lane) & 1;
            uint8_t *bf = &LUT_BF16_TO_F32[byte][4 * lane];
            bf[0] = bf[1] = 0x80; /* low half of the fp32 is zero */
            bf[2] = kept ? (uint8_t)(2 * k) : 0x80;
            bf[3] = kept ? (uint8_t)(2 * k + 1) : 0x80;
            LUT_16[byte][2 * lane] = kept ? (uint8_t)(2 * k) : 0x80;
            LUT_16[byte][2 * lane + 1] = kept ? (uint8_t)(2 * k + 1) : 0x80;
            LUT_F32[byte][lane] = kept ? k : (int32_t)0x80000000u;
            k += kept;
        }
    }
}

/* The 8 weights of one mask byte, as fp32 lanes. Reads 16 (bf16/fp16) or 32 (fp32) bytes at v. */
SK_AVX2 SK_INLINE __m256 expand8(const char *v, unsigned byte, const int vt) {
    if (vt == VT_BF16) {
        __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)v));
        __m256i pattern = _mm256_load_si256((const __m256i *)LUT_BF16_TO_F32[byte]);
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, pattern));
    } else if (vt == VT_F16) {
        __m128i src = _mm_loadu_si128((const __m128i *)v);
        return _mm256_cvtph_ps(_mm_shuffle_epi8(src, _mm_load_si128((const __m128i *)LUT_16[byte])));
    } else {
        __m256i lanes = _mm256_load_si256((const __m256i *)LUT_F32[byte]);
        __m256 moved = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)v), lanes);
        return _mm256_blendv_ps(moved, _mm256_setzero_ps(), _mm256_castsi256_ps(lanes));
    }
}

SK_AVX2 SK_INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row times one x: 8 mask bytes (64 columns) per step, value offsets from popcounts of prefixes so
 * that the only loop-carried dependency is one add per step. */
SK_AVX2 SK_INLINE float bitmask_row_dot1(const uint8_t *mask, int64_t bpr, const char *v, const float *x,
                                         const int vt) {
    const int64_t es = (vt == VT_F32) ? 4 : 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= bpr; j += 8) {
        uint64_t m;
        memcpy(&m, mask + j, 8);
        const float *xj = x + 8 * j;
        int64_t o1 = __builtin_popcountll(m & 0xffull), o2 = __builtin_popcountll(m & 0xffffull),
                o3 = __builtin_popcountll(m & 0xffffffull), o4 = __builtin_popcountll(m & 0xffffffffull),
                o5 = __builtin_popcountll(m & 0xffffffffffull), o6 = __builtin_popcountll(m & 0xffffffffffffull),
                o7 = __builtin_popcountll(m & 0xffffffffffffffull), o8 = __builtin_popcountll(m);
        a0 = _mm256_fmadd_ps(expand8(v, (unsigned)(m & 255), vt), _mm256_loadu_ps(xj), a0);
        a1 = _mm256_fmadd_ps(expand8(v + es * o1, (unsigned)((m >> 8) & 255), vt), _mm256_loadu_ps(xj + 8), a1);
        a2 = _mm256_fmadd_ps(expand8(v + es * o2, (unsigned)((m >> 16) & 255), vt), _mm256_loadu_ps(xj + 16), a2);
        a3 = _mm256_fmadd_ps(expand8(v + es * o3, (unsigned)((m >> 24) & 255), vt), _mm256_loadu_ps(xj + 24), a3);
        a0 = _mm256_fmadd_ps(expand8(v + es * o4, (unsigned)((m >> 32) & 255), vt), _mm256_loadu_ps(xj + 32), a0);
        a1 = _mm256_fmadd_ps(expand8(v + es * o5, (unsigned)((m >> 40) & 255), vt), _mm256_loadu_ps(xj + 40), a1);
        a2 = _mm256_fmadd_ps(expand8(v + es * o6, (unsigned)((m >> 48) & 255), vt), _mm256_loadu_ps(xj + 48), a2);
        a3 = _mm256_fmadd_ps(expand8(v + es * o7, (unsigned)(m >> 56), vt), _mm256_loadu_ps(xj + 56), a3);
        v += es * o8;
    }
    for (; j < bpr; j++) {
        unsigned byte = mask[j];
        a0 = _mm256_fmadd_ps(expand8(v, byte, vt), _mm256_loadu_ps(x + 8 * j), a0);
        v += es * __builtin_popcount(byte);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* One row times NB (<= 8) rows of x over nj mask bytes, x blocked as xb[j][NB][8] (the 8 columns of
 * mask byte j of every batch row side by side): each expanded byte feeds NB FMAs. Returns the value
 * pointer after the last byte. */
SK_AVX2 SK_INLINE const char *bitmask_row_dotn(const uint8_t *mask, int64_t nj, const char *v, const float *xb,
                                               const int vt, const int NB, float *out) {
    const int64_t es = (vt == VT_F32) ? 4 : 2;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps();
    int64_t j = 0;
    if (NB <= 4) { /* four bytes per step, offsets from prefix popcounts, two accumulator sets */
        __m256 acc2[4];
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) acc2[b] = _mm256_setzero_ps();
        for (; j + 4 <= nj; j += 4) {
            uint32_t m;
            memcpy(&m, mask + j, 4);
            const int64_t o1 = __builtin_popcount(m & 0xffu), o2 = __builtin_popcount(m & 0xffffu),
                          o3 = __builtin_popcount(m & 0xffffffu), o4 = __builtin_popcount(m);
            const __m256 w0 = expand8(v, m & 255u, vt), w1 = expand8(v + es * o1, (m >> 8) & 255u, vt);
            const __m256 w2 = expand8(v + es * o2, (m >> 16) & 255u, vt), w3 = expand8(v + es * o3, m >> 24, vt);
            v += es * o4;
            const float *xj = xb + j * NB * 8;
#pragma GCC unroll 4
            for (int b = 0; b < NB; b++) {
                acc[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj + 8 * b), acc[b]);
                acc2[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj + NB * 8 + 8 * b), acc2[b]);
                acc[b] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xj + 2 * NB * 8 + 8 * b), acc[b]);
                acc2[b] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xj + 3 * NB * 8 + 8 * b), acc2[b]);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) acc[b] = _mm256_add_ps(acc[b], acc2[b]);
    }
    for (; j < nj; j++) {
        unsigned byte = mask[j];
        __m256 w = expand8(v, byte, vt);
        v += es * __builtin_popcount(byte);
        const float *xj = xb + j * NB * 8;
#pragma GCC unroll 8
        for (int b = 0; b < NB; b++) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xj + 8 * b), acc[b]);
    }
#pragma GCC unroll 8
    for (int b = 0; b < NB; b++) out[b] = hsum8(acc[b]);
    return v;
}

SK_AVX2 SK_INLINE const char *bitmask_row_dotn_any(const uint8_t *mask, int64_t nj, const char *v,
                                                   const float *xb, const int vt, int64_t nb, float *out) {
    switch (nb) {
    case 1: return bitmask_row_dotn(mask, nj, v, xb, vt, 1, out);
    case 2: return bitmask_row_dotn(mask, nj, v, xb, vt, 2, out);
    case 3: return bitmask_row_dotn(mask, nj, v, xb, vt, 3, out);
    case 4: return bitmask_row_dotn(mask, nj, v, xb, vt, 4, out);
    case 5: return bitmask_row_dotn(mask, nj, v, xb, vt, 5, out);
    case 6: return bitmask_row_dotn(mask, nj, v, xb, vt, 6, out);
    case 7: return bitmask_row_dotn(mask, nj, v, xb, vt, 7, out);
    default: return bitmask_row_dotn(mask, nj, v, xb, vt, 8, out);
    }
}

/* Rows whose last SIMD load would pass the end of the value buffer take the scalar path. */
SK_AVX2 SK_INLINE int near_end(const sk_args *a, int64_t r) { return args_row_end(a, r) + 8 > a->nnz; }

#define SK_MAX_BATCH 16   /* batch rows per pass (sk_bitmask_matmul splits larger batches) */
#ifndef SK_TILE
#define SK_TILE 64 /* mask bytes (512 columns) per K tile: a tile of 8 batch rows of x = 16 KiB, in L1 */
#endif
#ifndef SK_GROUP
#define SK_GROUP 8 /* rows sharing the x tiles */
#endif

SK_AVX2 SK_INLINE void bitmask_rows_avx2(const sk_args *a, int64_t r0, int64_t r1, const int vt) {
    const int64_t es = (vt == VT_F32) ? 4 : 2, B = a->B, R = a->R, bpr = a->bpr;
    if (B == 1) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *mask = a->bits + r * bpr;
            const char *v = a->values + es * args_row_start(a, r);
            a->y[r] = near_end(a, r) ? bitmask_row_dot_scalar(mask, bpr, v, vt, a->x)
                                     : bitmask_row_dot1(mask, bpr, v, a->x, vt);
        }
        return;
    }
    /* Batch > 1: rows in groups of SK_GROUP; within a group, K tiles outermost, so a tile of x (per 8
     * batch rows) stays in L1 while the group's rows consume it, and each row keeps its value pointer and
     * partial sums between tiles. Small groups keep the number of concurrent memory streams (2 per row)
     * within what the hardware prefetchers follow. */
    const int64_t tile = B > 8 ? SK_TILE : bpr; /* up to 8 rows of x are read from L2 at full speed */
    for (int64_t g0 = r0; g0 < r1; g0 += SK_GROUP) {
        const int64_t n = (r1 - g0) < SK_GROUP ? (r1 - g0) : SK_GROUP;
        const char *v[SK_GROUP];
        float sums[SK_GROUP][SK_MAX_BATCH];
        int scalar[SK_GROUP];
        for (int64_t i = 0; i < n; i++) {
            v[i] = a->values + es * args_row_start(a, g0 + i);
            scalar[i] = near_end(a, g0 + i);
            for (int64_t b = 0; b < B; b++) sums[i][b] = 0.0f;
        }
        for (int64_t j0 = 0; j0 < bpr; j0 += tile) {
            const int64_t nj = (bpr - j0) < tile ? (bpr - j0) : tile;
            const char *next[SK_GROUP];
            for (int64_t b0 = 0; b0 < B; b0 += 8) {
                const int64_t nb = (B - b0) < 8 ? (B - b0) : 8;
                const float *xb = a->xt + (b0 / 8) * a->nbp + j0 * nb * 8;
                for (int64_t i = 0; i < n; i++) {
                    if (scalar[i]) continue;
                    float out[8];
                    next[i] = bitmask_row_dotn_any(a->bits + (g0 + i) * bpr + j0, nj, v[i], xb, vt, nb, out);
                    for (int64_t b = 0; b < nb; b++) sums[i][b0 + b] += out[b];
                }
            }
            for (int64_t i = 0; i < n; i++) v[i] = next[i];
        }
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = g0 + i;
            for (int64_t b = 0; b < B; b++)
                a->y[b * R + r] = scalar[i] ? bitmask_row_dot_scalar(a->bits + r * bpr, bpr,
                                                                     a->values + es * args_row_start(a, r), vt,
                                                                     a->x + b * a->ldx)
                                            : sums[i][b];
        }
    }
}

SK_AVX2 static void bitmask_rows_avx2_bf16(const sk_args *a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_BF16); }
SK_AVX2 static void bitmask_rows_avx2_f16(const sk_args *a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_F16); }
SK_AVX2 static void bitmask_rows_avx2_f32(const sk_args *a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_F32); }

/* 8 consecutive values / indices of a CSR row as fp32 / int32 lanes. */
SK_AVX2 SK_INLINE __m256 load_values8(const void *values, int64_t i, const int vt) {
    if (vt == VT_F32) return _mm256_loadu_ps((const float *)values + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)values + i));
    if (vt == VT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

SK_AVX2 SK_INLINE __m256i load_indices8(const void *indices, int64_t i, const int it) {
    if (it == IT_I32) return _mm256_loadu_si256((const __m256i *)((const int32_t *)indices + i));
    return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)indices + i)));
}

/* Batch 1: x gathered 8 columns at a time (x stays in L1). */
SK_AVX2 SK_INLINE float csr_row_dot1(const void *indices, const int it, const void *values, const int vt,
                                     int64_t s, int64_t e, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = s;
    for (; i + 16 <= e; i += 16) {
        a0 = _mm256_fmadd_ps(load_values8(values, i, vt), _mm256_i32gather_ps(x, load_indices8(indices, i, it), 4), a0);
        a1 = _mm256_fmadd_ps(load_values8(values, i + 8, vt),
                             _mm256_i32gather_ps(x, load_indices8(indices, i + 8, it), 4), a1);
    }
    for (; i + 8 <= e; i += 8)
        a0 = _mm256_fmadd_ps(load_values8(values, i, vt), _mm256_i32gather_ps(x, load_indices8(indices, i, it), 4), a0);
    float acc = hsum8(_mm256_add_ps(a0, a1));
    for (; i < e; i++) acc += value_at(values, vt, i) * x[index_at(indices, it, i)];
    return acc;
}

/* Batch > 1: x transposed to xt[K][nbp] (nbp = 8 or 16 lanes); each kept weight is broadcast against the
 * batch, so the work is nnz * batch and x is read one short contiguous line per kept weight. */
SK_AVX2 SK_INLINE void csr_row_dotn(const void *indices, const int it, const void *values, const int vt, int64_t s,
                                    int64_t e, const float *xt, const int NV, float *out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = s; i < e; i++) {
        __m256 w = _mm256_set1_ps(value_at(values, vt, i));
        const float *xc = xt + index_at(indices, it, i) * (8 * NV);
        acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc), acc0);
        if (NV == 2) acc1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + 8), acc1);
    }
    _mm256_storeu_ps(out, acc0);
    if (NV == 2) _mm256_storeu_ps(out + 8, acc1);
}

SK_AVX2 SK_INLINE void csr_rows_avx2(const sk_args *a, int64_t r0, int64_t r1, const int it, const int vt) {
    if (a->xt == NULL) {
        for (int64_t r = r0; r < r1; r++)
            a->y[r] = csr_row_dot1(a->indices, it, a->values, vt, a->indptr[r], a->indptr[r + 1], a->x);
        return;
    }
    float out[16];
    for (int64_t r = r0; r < r1; r++) {
        if (a->nbp == 16) csr_row_dotn(a->indices, it, a->values, vt, a->indptr[r], a->indptr[r + 1], a->xt, 2, out);
        else csr_row_dotn(a->indices, it, a->values, vt, a->indptr[r], a->indptr[r + 1], a->xt, 1, out);
        for (int64_t b = 0; b < a->nb; b++) a->y[(a->b0 + b) * a->R + r] = out[b];
    }
}

#define SK_CSR_ROWS(NAME, IT, VT) \
    SK_AVX2 static void NAME(const sk_args *a, int64_t r0, int64_t r1) { csr_rows_avx2(a, r0, r1, IT, VT); }
SK_CSR_ROWS(csr_rows_u16_bf16, IT_U16, VT_BF16)
SK_CSR_ROWS(csr_rows_u16_f16, IT_U16, VT_F16)
SK_CSR_ROWS(csr_rows_u16_f32, IT_U16, VT_F32)
SK_CSR_ROWS(csr_rows_i32_bf16, IT_I32, VT_BF16)
SK_CSR_ROWS(csr_rows_i32_f16, IT_I32, VT_F16)
SK_CSR_ROWS(csr_rows_i32_f32, IT_I32, VT_F32)
#undef SK_CSR_ROWS

static rows_fn csr_rows_avx2_for(int it, int vt) {
    if (it == IT_U16) return vt == VT_BF16 ? csr_rows_u16_bf16 : vt == VT_F16 ? csr_rows_u16_f16 : csr_rows_u16_f32;
    return vt == VT_BF16 ? csr_rows_i32_bf16 : vt == VT_F16 ? csr_rows_i32_f16 : csr_rows_i32_f32;
}

/* Dense rows in the values' own dtype: the same expansion, stored instead of multiplied. */
SK_AVX2 SK_INLINE void expand_store(char *o, const char *v, unsigned byte, const int vt) {
    if (vt == VT_F32) _mm256_storeu_ps((float *)o, expand8(v, byte, VT_F32));
    else _mm_storeu_si128((__m128i *)o,
                          _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v), _mm_load_si128((const __m128i *)LUT_16[byte])));
}

SK_AVX2 SK_INLINE void to_dense_rows_avx2(const sk_args *a, int64_t r0, int64_t r1, const int vt) {
    const int64_t es = (vt == VT_F32) ? 4 : 2, K = a->K, full = a->K / 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *mask = a->bits + r * a->bpr;
        const char *v = a->values + es * args_row_start(a, r);
        char *o = a->out + es * r * K;
        if (near_end(a, r)) {
            bitmask_row_to_dense_scalar(mask, v, es, K, o);
            continue;
        }
        for (int64_t j = 0; j < full; j++) {
            unsigned byte = mask[j];
            expand_store(o + es * 8 * j, v, byte, vt);
            v += es * __builtin_popcount(byte);
        }
        if (full < a->bpr) { /* a last, partial byte */
            char tail[32] __attribute__((aligned(32)));
            expand_store(tail, v, mask[full], vt);
            memcpy(o + es * 8 * full, tail, (size_t)(es * (K - 8 * full)));
        }
    }
}

SK_AVX2 static void to_dense_rows_avx2_16(const sk_args *a, int64_t r0, int64_t r1) { to_dense_rows_avx2(a, r0, r1, VT_BF16); }
SK_AVX2 static void to_dense_rows_avx2_f32(const sk_args *a, int64_t r0, int64_t r1) { to_dense_rows_avx2(a, r0, r1, VT_F32); }

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("popcnt");
}
#endif /* SK_X86 */

/* ------------------------------------------------------------------ exported API */

/* 1 when the AVX2 kernels can run on this CPU. Also builds the tables (call once before anything). */
int sk_init(void) {
#if SK_X86
    if (!sk_ready) {
        build_tables();
        sk_ready = 1;
    }
    return cpu_has_avx2();
#else
    return 0;
#endif
}

int sk_bitmask_matmul(const uint8_t *bits, int64_t bpr, const void *values, int vt, const int64_t *row_offsets,
                      int64_t row_stride, int64_t nnz, int64_t R, const float *x, int64_t B, int64_t ldx, float *y,
                      int nthreads, int simd) {
    if (B > SK_MAX_BATCH) { /* passes of at most SK_MAX_BATCH rows of x; y rows are contiguous per batch row */
        for (int64_t b0 = 0; b0 < B; b0 += SK_MAX_BATCH) {
            const int64_t nb = (B - b0) < SK_MAX_BATCH ? (B - b0) : SK_MAX_BATCH;
            int status = sk_bitmask_matmul(bits, bpr, values, vt, row_offsets, row_stride, nnz, R, x + b0 * ldx,
                                           nb, ldx, y + b0 * R, nthreads, simd);
            if (status) return status;
        }
        return 0;
    }
    sk_args a = {0};
    a.bits = bits, a.bpr = bpr, a.values = (const char *)values, a.vt = vt, a.row_offsets = row_offsets;
    a.row_stride = row_stride, a.nnz = nnz, a.R = R, a.K = 8 * bpr, a.x = x, a.B = B, a.ldx = ldx, a.y = y;
    rows_fn fn = bitmask_rows_scalar;
    float *blocked = NULL;
#if SK_X86
    if (simd) {
        fn = vt == VT_BF16 ? bitmask_rows_avx2_bf16 : vt == VT_F16 ? bitmask_rows_avx2_f16 : bitmask_rows_avx2_f32;
        if (B > 1) { /* x blocked per chunk of 8 batch rows: [chunk][j][rows of the chunk][8] */
            blocked = (float *)malloc((size_t)(((B + 7) / 8) * 64 * bpr) * sizeof(float));
            if (!blocked) return 1;
            for (int64_t b0 = 0; b0 < B; b0 += 8) {
                const int64_t nb = (B - b0) < 8 ? (B - b0) : 8;
                float *chunk = blocked + (b0 / 8) * 64 * bpr;
                for (int64_t j = 0; j < bpr; j++)
                    for (int64_t b = 0; b < nb; b++)
                        memcpy(chunk + (j * nb + b) * 8, x + (b0 + b) * ldx + 8 * j, 8 * sizeof(float));
            }
            a.xt = blocked, a.nbp = 64 * bpr;
        }
    }
#endif
    run_rows(fn, &a, R, nthreads);
    free(blocked);
    return 0;
}

int sk_csr_matmul(const int64_t *indptr, const void *indices, int it, const void *values, int vt, int64_t R,
                  int64_t K, const float *x, int64_t B, int64_t ldx, float *y, int nthreads, int simd) {
    sk_args a = {0};
    a.indptr = indptr, a.indices = indices, a.it = it, a.values = (const char *)values, a.vt = vt, a.R = R, a.K = K;
    a.x = x, a.B = B, a.ldx = ldx, a.y = y;
#if SK_X86
    if (simd) {
        rows_fn fn = csr_rows_avx2_for(it, vt);
        if (B == 1) {
            run_rows(fn, &a, R, nthreads);
            return 0;
        }
        for (int64_t b0 = 0; b0 < B; b0 += 16) { /* 16 batch rows per pass, x transposed for each pass */
            const int64_t nb = (B - b0) < 16 ? (B - b0) : 16, nbp = nb > 8 ? 16 : 8;
            float *xt = (float *)malloc((size_t)(K * nbp) * sizeof(float) + 32);
            if (!xt) return 1;
            for (int64_t k = 0; k < K; k++)
                for (int64_t b = 0; b < nbp; b++) xt[k * nbp + b] = b < nb ? x[(b0 + b) * ldx + k] : 0.0f;
            a.xt = xt, a.nbp = nbp, a.b0 = b0, a.nb = nb;
            run_rows(fn, &a, R, nthreads);
            free(xt);
        }
        return 0;
    }
#endif
    (void)simd;
    run_rows(csr_rows_scalar, &a, R, nthreads);
    return 0;
}

int sk_bitmask_to_dense(const uint8_t *bits, int64_t bpr, const void *values, int vt, const int64_t *row_offsets,
                        int64_t row_stride, int64_t nnz, int64_t R, int64_t K, void *out, int nthreads, int simd) {
    sk_args a = {0};
    a.bits = bits, a.bpr = bpr, a.values = (const char *)values, a.vt = vt, a.row_offsets = row_offsets;
    a.row_stride = row_stride, a.nnz = nnz, a.R = R, a.K = K, a.out = (char *)out;
    rows_fn fn = to_dense_rows_scalar;
#if SK_X86
    if (simd) fn = vt == VT_F32 ? to_dense_rows_avx2_f32 : to_dense_rows_avx2_16;
#endif
    (void)simd;
    run_rows(fn, &a, R, nthreads);
    return 0;
}

/* Sum of n floats, streamed once: a read-bandwidth probe that shares the kernels' threading. */
#if SK_X86
SK_AVX2 static double read_sum_avx2(const float *p, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    double acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) acc += p[i];
    return acc;
}
#endif

double sk_read_sum(const float *p, int64_t n, int nthreads, int simd) {
    double total = 0.0;
    const int64_t chunk = 1 << 16;
    const int64_t chunks = (n + chunk - 1) / chunk;
    (void)simd;
#pragma omp parallel for schedule(dynamic, 8) reduction(+ : total) num_threads(nthreads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * chunk, len = (i0 + chunk < n) ? chunk : n - i0;
#if SK_X86
        if (simd) {
            total += read_sum_avx2(p + i0, len);
            continue;
        }
#endif
        double acc = 0.0;
        for (int64_t i = 0; i < len; i++) acc += p[i0 + i];
        total += acc;
    }
    return total;
}
