// sparsekit CPU kernels (see sparse_cpu.h for the layouts). Three paths, chosen at run time:
//
//   scalar   portable C++, one value at a time (any CPU; the reference the vector paths are tested against);
//   avx2     (AVX2+FMA+F16C+BMI2) each mask byte selects a shuffle pattern from a 256-entry table that moves
//            the next popcount(byte) packed values into their 8 column slots (zeros elsewhere); one FMA
//            meets 8 contiguous x values, so x is read contiguously and nothing is gathered;
//   avx512   (F/BW/VL/VBMI2/BF16) a masked load of exactly popcount(mask) packed values (nothing is read
//            past a row) and one vpexpandw/vpexpandb/vexpandps puts them in the set lanes; bf16 values meet bf16 x in vdpbf16ps, or fp32 x after a 16-bit shift (exact); int8 and
//            int4 are widened to fp32 in registers and scaled once per group; fp32 accumulation throughout.
//
// Every function carries its own target attribute, so one build runs on every x86-64 CPU.
#include "sparse_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define SK_X86 1
#include <immintrin.h>
#define SK_AVX2 __attribute__((target("avx2,fma,f16c,popcnt,bmi,bmi2")))
#define SK_AVX512                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,"       \
                          "avx512vnni,avx2,fma,f16c,popcnt,bmi,bmi2")))
#else
#define SK_X86 0
#endif

#define SK_INLINE static inline __attribute__((always_inline))

namespace sk {

// ------------------------------------------------------------------ scalar helpers

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        float f = (float)mantissa * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

int64_t value_size_bits(int vt) { return vt == VT_F32 ? 32 : vt == VT_I8 ? 8 : vt == VT_I4 ? 4 : 16; }

static inline float weight_at(const Args &a, int64_t i) {
    switch (a.vt) {
    case VT_F32: return ((const float *)a.values)[i];
    case VT_BF16: return bf16_to_f32(((const uint16_t *)a.values)[i]);
    case VT_F16: return f16_to_f32(((const uint16_t *)a.values)[i]);
    case VT_I8: return (float)((const int8_t *)a.values)[i];
    default: {
        const unsigned byte = ((const uint8_t *)a.values)[i >> 1];
        const int q = (i & 1) ? (int)(byte >> 4) : (int)(byte & 15u);
        return (float)(q >= 8 ? q - 16 : q);
    }
    }
}

static inline int64_t index_at(const void *indices, int it, int64_t i) {
    return it == IT_I32 ? (int64_t)((const int32_t *)indices)[i] : (int64_t)((const uint16_t *)indices)[i];
}

static inline int64_t row_start(const Args &a, int64_t r) {
    return a.row_offsets ? a.row_offsets[r] : r * a.row_stride;
}

static inline int64_t row_length(const Args &a, int64_t r) {
    return a.row_offsets ? a.row_offsets[r + 1] - a.row_offsets[r] : a.row_count;
}

static inline const uint8_t *row_mask(const Args &a, int64_t r) { return a.bits + r * a.mask_stride; }

static void flag_row(const Args &a, int64_t r) {
    int64_t expected = -1;
    if (a.bad_row) a.bad_row->compare_exchange_strong(expected, r);
}

// The row's mask keeps as many values as the row owns, all inside the values buffer: checked before any
// value of the row is read (O(bpr/8) popcounts, against the row's O(K) work).
static bool row_ok(const Args &a, int64_t r) {
    if (a.mask_stride == 0) return true;  // dense: the op built the all-ones row itself
    const uint8_t *mask = row_mask(a, r);
    int64_t count = 0, j = 0;
    for (; j + 8 <= a.bpr; j += 8) {
        uint64_t m;
        std::memcpy(&m, mask + j, 8);
        count += __builtin_popcountll(m);
    }
    for (; j < a.bpr; j++) count += __builtin_popcount(mask[j]);
    const int64_t start = row_start(a, r), length = row_length(a, r);
    if (count != length || start < 0 || start + length > a.nvalues) {
        flag_row(a, r);
        return false;
    }
    return true;
}

static inline float scale_at(const Args &a, int64_t r, int64_t c) {
    return f16_to_f32(a.scales[r * a.groups + c / a.group_size]);
}

// ------------------------------------------------------------------ scalar kernels

static float bitmask_row_dot_scalar(const Args &a, int64_t r, const float *x) {
    const uint8_t *mask = row_mask(a, r);
    const bool quant = a.vt >= VT_I8;
    int64_t i = row_start(a, r);
    float acc = 0.0f;
    for (int64_t j = 0; j < a.bpr; j++) {
        unsigned byte = mask[j];
        while (byte) {
            const int64_t c = 8 * j + __builtin_ctz(byte);
            float w = weight_at(a, i++);
            if (quant) w *= scale_at(a, r, c);
            acc += w * x[c];
            byte &= byte - 1;
        }
    }
    return acc;
}

static void bitmask_rows_scalar(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (!row_ok(a, r)) continue;
        for (int64_t b = 0; b < a.B; b++) a.y[b * a.R + r] = bitmask_row_dot_scalar(a, r, a.x + b * a.ldx);
    }
}

// Column indices strictly increasing inside [0, K): a duplicate would be summed, so it is refused.
static bool csr_row_ok(const Args &a, int64_t r) {
    int64_t previous = -1;
    for (int64_t i = a.indptr[r]; i < a.indptr[r + 1]; i++) {
        const int64_t c = index_at(a.indices, a.it, i);
        if (c <= previous || c >= a.K) {
            flag_row(a, r);
            return false;
        }
        previous = c;
    }
    return true;
}

static void csr_rows_scalar(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (!csr_row_ok(a, r)) continue;
        for (int64_t b = 0; b < a.B; b++) {
            const float *xb = a.x + b * a.ldx;
            float acc = 0.0f;
            for (int64_t i = a.indptr[r]; i < a.indptr[r + 1]; i++)
                acc += weight_at(a, i) * xb[index_at(a.indices, a.it, i)];
            a.y[b * a.R + r] = acc;
        }
    }
}

static void row_to_dense_scalar(const Args &a, int64_t r) {
    const int64_t es = value_size_bits(a.vt) / 8;
    const uint8_t *mask = row_mask(a, r);
    const char *v = a.values + es * row_start(a, r);
    char *o = a.out + es * r * a.K;
    std::memset(o, 0, (size_t)(es * a.K));
    for (int64_t k = 0; k < a.K; k++) {
        if ((mask[k >> 3] >> (k & 7)) & 1u) {
            std::memcpy(o + es * k, v, (size_t)es);
            v += es;
        }
    }
}

static void to_dense_rows_scalar(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        if (row_ok(a, r)) row_to_dense_scalar(a, r);
}

// ------------------------------------------------------------------ AVX2 kernels
#if SK_X86

// Shuffle tables indexed by a mask byte (built by init()): lane -> source element, 0x80 (or the sign bit)
// for an empty lane.
alignas(32) static uint8_t LUT_BF16_TO_F32[256][32];  // 16-bit values -> fp32 lanes (bf16)
alignas(16) static uint8_t LUT_16[256][16];           // 16-bit values -> 16-bit lanes
alignas(16) static uint8_t LUT_8[256][16];            // bytes -> byte lanes (int8, int4 after widening)
alignas(32) static int32_t LUT_F32[256][8];           // fp32 values -> fp32 lanes

void init() {
    static bool ready = false;
    if (ready) return;
    for (int byte = 0; byte < 256; byte++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++) {
            const int kept = (byte >> lane) & 1;
            uint8_t *bf = &LUT_BF16_TO_F32[byte][4 * lane];
            bf[0] = bf[1] = 0x80;  // the low half of the fp32 is zero
            bf[2] = kept ? (uint8_t)(2 * k) : 0x80;
            bf[3] = kept ? (uint8_t)(2 * k + 1) : 0x80;
            LUT_16[byte][2 * lane] = kept ? (uint8_t)(2 * k) : 0x80;
            LUT_16[byte][2 * lane + 1] = kept ? (uint8_t)(2 * k + 1) : 0x80;
            LUT_8[byte][lane] = kept ? (uint8_t)k : 0x80;
            LUT_8[byte][lane + 8] = 0x80;
            LUT_F32[byte][lane] = kept ? k : (int32_t)0x80000000u;
            k += kept;
        }
    }
    ready = true;
}

int cpu_isas() {
    __builtin_cpu_init();
    int isas = 1 << ISA_SCALAR;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2"))
        isas |= 1 << ISA_AVX2;
    if ((isas & (1 << ISA_AVX2)) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
        __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"))
        isas |= 1 << ISA_AVX512;
    return isas;
}

// The 8 weights of one mask byte as fp32 lanes. Reads 16 (bf16/fp16) or 32 (fp32) bytes at v.
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

// One row times one x: 8 mask bytes (64 columns) per step, value offsets from popcounts of prefixes so
// that the only loop-carried dependency is one add per step.
SK_AVX2 SK_INLINE float bitmask_row_dot1(const uint8_t *mask, int64_t bpr, const char *v, const float *x,
                                         const int vt) {
    const int64_t es = (vt == VT_F32) ? 4 : 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= bpr; j += 8) {
        uint64_t m;
        std::memcpy(&m, mask + j, 8);
        const float *xj = x + 8 * j;
        const int64_t o1 = __builtin_popcountll(m & 0xffull), o2 = __builtin_popcountll(m & 0xffffull),
                      o3 = __builtin_popcountll(m & 0xffffffull), o4 = __builtin_popcountll(m & 0xffffffffull),
                      o5 = __builtin_popcountll(m & 0xffffffffffull),
                      o6 = __builtin_popcountll(m & 0xffffffffffffull),
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
        const unsigned byte = mask[j];
        a0 = _mm256_fmadd_ps(expand8(v, byte, vt), _mm256_loadu_ps(x + 8 * j), a0);
        v += es * __builtin_popcount(byte);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// One row times NB (<= 8) rows of x over nj mask bytes, x blocked as xb[j][NB][8] (the 8 columns of mask
// byte j of every batch row side by side): each expanded byte feeds NB FMAs. Returns the value pointer
// after the last byte.
SK_AVX2 SK_INLINE const char *bitmask_row_dotn(const uint8_t *mask, int64_t nj, const char *v, const float *xb,
                                               const int vt, const int NB, float *out) {
    const int64_t es = (vt == VT_F32) ? 4 : 2;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps();
    int64_t j = 0;
    if (NB <= 4) {  // four bytes per step, offsets from prefix popcounts, two accumulator sets
        __m256 acc2[4];
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) acc2[b] = _mm256_setzero_ps();
        for (; j + 4 <= nj; j += 4) {
            uint32_t m;
            std::memcpy(&m, mask + j, 4);
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
        const unsigned byte = mask[j];
        const __m256 w = expand8(v, byte, vt);
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

// Rows whose last 16/32-byte load could pass the end of the values buffer take the scalar path.
static inline bool near_end(const Args &a, int64_t r) {
    const int64_t end_bytes = (row_start(a, r) + row_length(a, r)) * value_size_bits(a.vt) / 8;
    return end_bytes + 32 > a.value_bytes;
}

#define SK_TILE 64  /* mask bytes (512 columns) per K tile: a tile of 8 batch rows of x = 16 KiB, in L1 */
#define SK_GROUP 8  /* rows sharing the x tiles */

int64_t blocked_x_floats(const Args &a) { return ((a.B + 7) / 8) * 64 * a.bpr; }

// x blocked per chunk of 8 batch rows: [chunk][j][rows of the chunk][8].
void block_x(const Args &a, float *blocked) {
    for (int64_t b0 = 0; b0 < a.B; b0 += 8) {
        const int64_t nb = std::min<int64_t>(8, a.B - b0);
        float *chunk = blocked + (b0 / 8) * 64 * a.bpr;
        for (int64_t j = 0; j < a.bpr; j++)
            for (int64_t b = 0; b < nb; b++)
                std::memcpy(chunk + (j * nb + b) * 8, a.x + (b0 + b) * a.ldx + 8 * j, 8 * sizeof(float));
    }
}

SK_AVX2 SK_INLINE void bitmask_rows_avx2(const Args &a, int64_t r0, int64_t r1, const int vt) {
    const int64_t es = (vt == VT_F32) ? 4 : 2, B = a.B, R = a.R, bpr = a.bpr;
    if (B == 1) {
        for (int64_t r = r0; r < r1; r++) {
            if (!row_ok(a, r)) continue;
            a.y[r] = near_end(a, r) ? bitmask_row_dot_scalar(a, r, a.x)
                                    : bitmask_row_dot1(row_mask(a, r), bpr, a.values + es * row_start(a, r), a.x, vt);
        }
        return;
    }
    // Batch > 1: rows in groups of SK_GROUP; within a group, K tiles outermost, so a tile of x (per 8 batch
    // rows) stays in L1 while the group's rows consume it, and each row keeps its value pointer and partial
    // sums between tiles.
    const int64_t tile = B > 8 ? SK_TILE : bpr;
    for (int64_t g0 = r0; g0 < r1; g0 += SK_GROUP) {
        const int64_t n = std::min<int64_t>(r1 - g0, SK_GROUP);
        const char *v[SK_GROUP];
        float sums[SK_GROUP][16];
        int scalar[SK_GROUP], skip[SK_GROUP];
        for (int64_t i = 0; i < n; i++) {
            skip[i] = !row_ok(a, g0 + i);
            v[i] = a.values + es * row_start(a, g0 + i);
            scalar[i] = skip[i] || near_end(a, g0 + i);
            for (int64_t b = 0; b < B; b++) sums[i][b] = 0.0f;
        }
        for (int64_t j0 = 0; j0 < bpr; j0 += tile) {
            const int64_t nj = std::min<int64_t>(bpr - j0, tile);
            const char *next[SK_GROUP];
            for (int64_t b0 = 0; b0 < B; b0 += 8) {
                const int64_t nb = std::min<int64_t>(B - b0, 8);
                const float *xb = a.xt + (b0 / 8) * a.nbp + j0 * nb * 8;
                for (int64_t i = 0; i < n; i++) {
                    if (scalar[i]) continue;
                    float out[8];
                    next[i] = bitmask_row_dotn_any(row_mask(a, g0 + i) + j0, nj, v[i], xb, vt, nb, out);
                    for (int64_t b = 0; b < nb; b++) sums[i][b0 + b] += out[b];
                }
            }
            for (int64_t i = 0; i < n; i++)
                if (!scalar[i]) v[i] = next[i];
        }
        for (int64_t i = 0; i < n; i++) {
            if (skip[i]) continue;
            const int64_t r = g0 + i;
            for (int64_t b = 0; b < B; b++)
                a.y[b * R + r] = scalar[i] ? bitmask_row_dot_scalar(a, r, a.x + b * a.ldx) : sums[i][b];
        }
    }
}

SK_AVX2 static void bitmask_rows_avx2_bf16(const Args &a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_BF16); }
SK_AVX2 static void bitmask_rows_avx2_f16(const Args &a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_F16); }
SK_AVX2 static void bitmask_rows_avx2_f32(const Args &a, int64_t r0, int64_t r1) { bitmask_rows_avx2(a, r0, r1, VT_F32); }

// Quantized values (AVX2): the 8 int8 weights of one mask byte as fp32 lanes. int4: 8 nibbles from the
// nibble stream at p are spread to bytes by pdep and sign-extended, then placed like int8.
template <int VT>
SK_AVX2 SK_INLINE __m256 expand8_q(const uint8_t *vb, int64_t p, unsigned byte) {
    __m128i q;
    if (VT == VT_I8) {
        q = _mm_loadl_epi64((const __m128i *)(vb + p));
    } else {
        uint64_t raw;
        std::memcpy(&raw, vb + (p >> 1), 8);
        raw >>= 4 * (p & 1);
        const __m128i eight = _mm_set1_epi8(8);
        q = _mm_cvtsi64_si128((long long)_pdep_u64(raw, 0x0F0F0F0F0F0F0F0Full));
        q = _mm_sub_epi8(_mm_xor_si128(q, eight), eight);
    }
    const __m128i placed = _mm_shuffle_epi8(q, _mm_load_si128((const __m128i *)LUT_8[byte]));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(placed));
}

// y[b] = sum over groups g of scale[r, g] * sum_{c in g} q[r, c] x[b, c], for NB batch rows.
template <int VT, int NB>
SK_AVX2 SK_INLINE void quant_row_avx2(const Args &a, int64_t r, int64_t b0, float *out) {
    const uint8_t *mask = row_mask(a, r), *vb = (const uint8_t *)a.values;
    const uint16_t *scales = a.scales + r * a.groups;
    const int64_t gs = a.group_size;
    const bool per_channel = gs == a.K;
    int64_t p = row_start(a, r), next_flush = gs;
    __m256 acc[NB], total[NB];
    for (int b = 0; b < NB; b++) acc[b] = total[b] = _mm256_setzero_ps();
    for (int64_t j = 0; j < a.bpr; j++) {
        const unsigned byte = mask[j];
        const __m256 w = expand8_q<VT>(vb, p, byte);
        p += __builtin_popcount(byte);
        for (int b = 0; b < NB; b++)
            acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.x + (b0 + b) * a.ldx + 8 * j), acc[b]);
        if (!per_channel && 8 * (j + 1) == next_flush) {
            const __m256 s = _mm256_set1_ps(f16_to_f32(scales[(8 * j) / gs]));
            for (int b = 0; b < NB; b++) {
                total[b] = _mm256_fmadd_ps(acc[b], s, total[b]);
                acc[b] = _mm256_setzero_ps();
            }
            next_flush += gs;
        }
    }
    if (per_channel) {
        const __m256 s = _mm256_set1_ps(f16_to_f32(scales[0]));
        for (int b = 0; b < NB; b++) total[b] = _mm256_mul_ps(acc[b], s);
    }
    for (int b = 0; b < NB; b++) out[b] = hsum8(total[b]);
}

template <int VT>
SK_AVX2 static void quant_rows_avx2(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (!row_ok(a, r)) continue;
        const int64_t end = row_start(a, r) + row_length(a, r);
        const bool near = (VT == VT_I8 ? end : (end >> 1)) + 16 > a.value_bytes;
        for (int64_t b0 = 0; b0 < a.B; b0 += 4) {
            const int64_t nb = std::min<int64_t>(4, a.B - b0);
            float out[4];
            if (near) {
                for (int64_t b = 0; b < nb; b++) out[b] = bitmask_row_dot_scalar(a, r, a.x + (b0 + b) * a.ldx);
            } else {
                switch (nb) {
                case 1: quant_row_avx2<VT, 1>(a, r, b0, out); break;
                case 2: quant_row_avx2<VT, 2>(a, r, b0, out); break;
                case 3: quant_row_avx2<VT, 3>(a, r, b0, out); break;
                default: quant_row_avx2<VT, 4>(a, r, b0, out); break;
                }
            }
            for (int64_t b = 0; b < nb; b++) a.y[(b0 + b) * a.R + r] = out[b];
        }
    }
}

// ---- CSR (AVX2)

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

// Batch 1: x gathered 8 columns at a time (x stays in L1).
SK_AVX2 SK_INLINE float csr_row_dot1(const Args &a, const int it, const int vt, int64_t s, int64_t e) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = s;
    for (; i + 16 <= e; i += 16) {
        a0 = _mm256_fmadd_ps(load_values8(a.values, i, vt),
                             _mm256_i32gather_ps(a.x, load_indices8(a.indices, i, it), 4), a0);
        a1 = _mm256_fmadd_ps(load_values8(a.values, i + 8, vt),
                             _mm256_i32gather_ps(a.x, load_indices8(a.indices, i + 8, it), 4), a1);
    }
    for (; i + 8 <= e; i += 8)
        a0 = _mm256_fmadd_ps(load_values8(a.values, i, vt),
                             _mm256_i32gather_ps(a.x, load_indices8(a.indices, i, it), 4), a0);
    float acc = hsum8(_mm256_add_ps(a0, a1));
    for (; i < e; i++) acc += weight_at(a, i) * a.x[index_at(a.indices, it, i)];
    return acc;
}

// Batch > 1: x transposed to xt[K][nbp] (nbp = 8 or 16 lanes); each kept weight is broadcast against the
// batch, so the work is nnz * batch and x is read one short contiguous line per kept weight.
SK_AVX2 SK_INLINE void csr_row_dotn(const Args &a, const int it, int64_t s, int64_t e, const int NV, float *out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = s; i < e; i++) {
        const __m256 w = _mm256_set1_ps(weight_at(a, i));
        const float *xc = a.xt + index_at(a.indices, it, i) * (8 * NV);
        acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc), acc0);
        if (NV == 2) acc1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + 8), acc1);
    }
    _mm256_storeu_ps(out, acc0);
    if (NV == 2) _mm256_storeu_ps(out + 8, acc1);
}

template <int IT, int VT>
SK_AVX2 static void csr_rows_avx2(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (!csr_row_ok(a, r)) continue;
        const int64_t s = a.indptr[r], e = a.indptr[r + 1];
        if (a.xt == nullptr) {  // the vector loads stop at the row's end
            a.y[r] = csr_row_dot1(a, IT, VT, s, e);
            continue;
        }
        float out[16];
        csr_row_dotn(a, IT, s, e, a.nbp == 16 ? 2 : 1, out);
        for (int64_t b = 0; b < a.nb; b++) a.y[(a.b0 + b) * a.R + r] = out[b];
    }
}

// ---- to dense (AVX2): the same expansion, stored instead of multiplied.
SK_AVX2 SK_INLINE void expand_store(char *o, const char *v, unsigned byte, const int vt) {
    if (vt == VT_F32)
        _mm256_storeu_ps((float *)o, expand8(v, byte, VT_F32));
    else
        _mm_storeu_si128((__m128i *)o, _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v),
                                                        _mm_load_si128((const __m128i *)LUT_16[byte])));
}

template <int VT>
SK_AVX2 static void to_dense_rows_avx2(const Args &a, int64_t r0, int64_t r1) {
    const int64_t es = (VT == VT_F32) ? 4 : 2, K = a.K, full = a.K / 8;
    for (int64_t r = r0; r < r1; r++) {
        if (!row_ok(a, r)) continue;
        if (near_end(a, r)) {
            row_to_dense_scalar(a, r);
            continue;
        }
        const uint8_t *mask = row_mask(a, r);
        const char *v = a.values + es * row_start(a, r);
        char *o = a.out + es * r * K;
        for (int64_t j = 0; j < full; j++) {
            const unsigned byte = mask[j];
            expand_store(o + es * 8 * j, v, byte, VT);
            v += es * __builtin_popcount(byte);
        }
        if (full < a.bpr) {  // a last, partial byte
            alignas(32) char tail[32];
            expand_store(tail, v, mask[full], VT);
            std::memcpy(o + es * 8 * full, tail, (size_t)(es * (K - 8 * full)));
        }
    }
}

// ------------------------------------------------------------------ AVX-512 kernels

// vpexpand* with a memory operand is slow on some cores (microcoded on AMD Zen 4): load the popcount(m)
// packed elements with a masked (fault-suppressing) load, then expand register to register.
SK_AVX512 SK_INLINE __m512i expand16(const uint16_t *v, __mmask32 m) {
    const __mmask32 first = (__mmask32)_bzhi_u32(~0u, (unsigned)__builtin_popcount((uint32_t)m));
    return _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(first, v));
}

SK_AVX512 SK_INLINE __mmask16 low_bits16(__mmask16 m) {
    return (__mmask16)_bzhi_u32(0xffffu, (unsigned)__builtin_popcount((uint32_t)m));
}

SK_AVX512 SK_INLINE __m512 bf16x16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SK_AVX512 SK_INLINE __m512 cvt_i8x16(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

// The first pc <= 64 nibbles of the stream starting at nibble p, as 64 sign-extended int8 lanes (lanes
// past pc undefined); reads only the bytes that hold them.
SK_AVX512 SK_INLINE __m512i load_i4(const uint8_t *base, int64_t p, int pc) {
    const int odd = (int)(p & 1);
    const int nbytes = (odd + pc + 1) >> 1;  // <= 33
    const __mmask64 lm = nbytes >= 64 ? ~0ull : ((1ull << nbytes) - 1);
    __m512i z = _mm512_maskz_loadu_epi8(lm, base + (p >> 1));
    const __m512i next = _mm512_alignr_epi64(_mm512_setzero_si512(), z, 1);
    z = _mm512_shrdv_epi64(z, next, _mm512_set1_epi64(4 * odd));  // drop the first nibble when p is odd
    const __m512i w = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(z));
    const __m512i spread = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)),
                                           _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x00F0)), 4));
    const __m512i eight = _mm512_set1_epi8(8);
    return _mm512_sub_epi8(_mm512_xor_si512(spread, eight), eight);
}

// One row times NB (<= 8) rows of x, 64 columns (8 mask bytes) per step. NA independent accumulators per
// batch row (4 at batch 1) keep the FMA / dot-product latency chains from setting the pace.
template <int VT, int NB>
SK_AVX512 SK_INLINE void row_avx512(const Args &a, int64_t r, int64_t b0, float *out) {
    constexpr int NA = NB == 1 ? 4 : NB == 2 ? 2 : 1;
    const uint8_t *mask = row_mask(a, r);
    const int64_t bpr = a.bpr, gs = a.group_size;
    constexpr bool quant = VT == VT_I8 || VT == VT_I4;
    const uint16_t *scales = quant ? a.scales + r * a.groups : nullptr;
    const bool per_channel = quant && gs == a.K;
    int64_t p = row_start(a, r), next_flush = gs;
    __m512 acc[NB][NA], total[NB];
    for (int b = 0; b < NB; b++) {
        total[b] = _mm512_setzero_ps();
        for (int k = 0; k < NA; k++) acc[b][k] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < bpr; j += 8) {
        uint64_t m = 0;
        if (j + 8 <= bpr)
            std::memcpy(&m, mask + j, 8);  // a fixed size: one load, not a call
        else
            for (int64_t t = j; t < bpr; t++) m |= (uint64_t)mask[t] << (8 * (t - j));
        const int64_t c = 8 * j;
        if (VT == VT_BF16) {
            const uint16_t *v = (const uint16_t *)a.values;
            const __m512i w0 = expand16(v + p, (__mmask32)m);
            p += __builtin_popcount((uint32_t)m);
            const __m512i w1 = expand16(v + p, (__mmask32)(m >> 32));
            p += __builtin_popcount((uint32_t)(m >> 32));
            if (a.xbf) {  // bf16 x: pairs of products in one vdpbf16ps
                for (int b = 0; b < NB; b++) {
                    const uint16_t *xb = a.xbf + (b0 + b) * a.ldx + c;
                    acc[b][0] = _mm512_dpbf16_ps(acc[b][0], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xb));
                    acc[b][1 % NA] = _mm512_dpbf16_ps(acc[b][1 % NA], (__m512bh)w1,
                                                      (__m512bh)_mm512_loadu_si512(xb + 32));
                }
            } else {  // fp32 x stays exact: bf16 -> fp32 is a 16-bit shift
                const __m512 f[4] = {bf16x16_to_f32(_mm512_castsi512_si256(w0)),
                                     bf16x16_to_f32(_mm512_extracti64x4_epi64(w0, 1)),
                                     bf16x16_to_f32(_mm512_castsi512_si256(w1)),
                                     bf16x16_to_f32(_mm512_extracti64x4_epi64(w1, 1))};
                for (int b = 0; b < NB; b++) {
                    const float *xb = a.x + (b0 + b) * a.ldx + c;
                    for (int q = 0; q < 4; q++)
                        acc[b][q % NA] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xb + 16 * q), acc[b][q % NA]);
                }
            }
        } else if (VT == VT_F16) {
            const uint16_t *v = (const uint16_t *)a.values;
            for (int h = 0; h < 2; h++) {
                const __mmask32 mh = (__mmask32)(m >> (32 * h));
                const __m512i w = expand16(v + p, mh);
                p += __builtin_popcount((uint32_t)mh);
                const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
                const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
                for (int b = 0; b < NB; b++) {
                    const float *xb = a.x + (b0 + b) * a.ldx + c + 32 * h;
                    acc[b][(2 * h) % NA] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[b][(2 * h) % NA]);
                    acc[b][(2 * h + 1) % NA] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc[b][(2 * h + 1) % NA]);
                }
            }
        } else if (VT == VT_F32) {
            const float *v = (const float *)a.values;
            for (int q = 0; q < 4; q++) {
                const __mmask16 mq = (__mmask16)(m >> (16 * q));
                const __m512 w = _mm512_maskz_expand_ps(mq, _mm512_maskz_loadu_ps(low_bits16(mq), v + p));
                p += __builtin_popcount((uint32_t)mq);
                for (int b = 0; b < NB; b++)
                    acc[b][q % NA] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.x + (b0 + b) * a.ldx + c + 16 * q),
                                                     acc[b][q % NA]);
            }
        } else {
            const int pc = __builtin_popcountll(m);
            const __m512i q = VT == VT_I8
                                  ? _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, pc),
                                                                                         (const int8_t *)a.values + p))
                                  : _mm512_maskz_expand_epi8(m, load_i4((const uint8_t *)a.values, p, pc));
            p += pc;
            const __m512 w[4] = {cvt_i8x16(_mm512_castsi512_si128(q)), cvt_i8x16(_mm512_extracti32x4_epi32(q, 1)),
                                 cvt_i8x16(_mm512_extracti32x4_epi32(q, 2)), cvt_i8x16(_mm512_extracti32x4_epi32(q, 3))};
            for (int b = 0; b < NB; b++) {
                const float *xb = a.x + (b0 + b) * a.ldx + c;
                for (int k = 0; k < 4; k++)
                    acc[b][k % NA] = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(xb + 16 * k), acc[b][k % NA]);
            }
            if (!per_channel && c + 64 == next_flush) {
                const __m512 s = _mm512_set1_ps(f16_to_f32(scales[c / gs]));
                for (int b = 0; b < NB; b++) {
                    for (int k = 1; k < NA; k++) acc[b][0] = _mm512_add_ps(acc[b][0], acc[b][k]);
                    total[b] = _mm512_fmadd_ps(acc[b][0], s, total[b]);
                    for (int k = 0; k < NA; k++) acc[b][k] = _mm512_setzero_ps();
                }
                next_flush += gs;
            }
        }
    }
    for (int b = 0; b < NB; b++)
        for (int k = 1; k < NA; k++) acc[b][0] = _mm512_add_ps(acc[b][0], acc[b][k]);
    if (!quant) {
        for (int b = 0; b < NB; b++) out[b] = _mm512_reduce_add_ps(acc[b][0]);
    } else if (per_channel) {
        const float s = f16_to_f32(scales[0]);
        for (int b = 0; b < NB; b++) out[b] = s * _mm512_reduce_add_ps(acc[b][0]);
    } else {
        for (int b = 0; b < NB; b++) out[b] = _mm512_reduce_add_ps(total[b]);
    }
}

// Quantized values times int8 x (VNNI): per group g, sum_c q_c xq_c = sum_c (q_c + 128) xq_c - 128 sum_c xq_c,
// the first by vpdpbusd (unsigned q + 128 times signed xq, exact int32), the second from a.xsum; then
// y = xscale * sum_g scale_g * (that). Pruned positions (q = 0) cancel in the two terms.
template <int VT, int NB>
SK_AVX512 SK_INLINE void row_vnni(const Args &a, int64_t r, int64_t b0, float *out) {
    const uint8_t *mask = row_mask(a, r);
    const int64_t bpr = a.bpr, gs = a.group_size;
    const uint16_t *scales = a.scales + r * a.groups;
    int64_t p = row_start(a, r), next_flush = gs, g = 0;
    __m512i acc[NB];
    __m512 total[NB];
    float correction[NB];
    for (int b = 0; b < NB; b++) {
        acc[b] = _mm512_setzero_si512();
        total[b] = _mm512_setzero_ps();
        correction[b] = 0.0f;
    }
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    for (int64_t j = 0; j < bpr; j += 8) {
        uint64_t m = 0;
        if (j + 8 <= bpr)
            std::memcpy(&m, mask + j, 8);
        else
            for (int64_t t = j; t < bpr; t++) m |= (uint64_t)mask[t] << (8 * (t - j));
        const int64_t c = 8 * j;
        const int pc = __builtin_popcountll(m);
        const __m512i q = VT == VT_I8
                              ? _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, pc),
                                                                                     (const int8_t *)a.values + p))
                              : _mm512_maskz_expand_epi8(m, load_i4((const uint8_t *)a.values, p, pc));
        p += pc;
        const __m512i qu = _mm512_xor_si512(q, offset);  // q + 128 as unsigned bytes
        for (int b = 0; b < NB; b++)
            acc[b] = _mm512_dpbusd_epi32(acc[b], qu, _mm512_loadu_si512(a.xq + (b0 + b) * a.ldx + c));
        if (c + 64 == next_flush || j + 8 >= bpr) {  // a group ends (per channel: the row ends)
            const float s = f16_to_f32(scales[g]);
            for (int b = 0; b < NB; b++) {
                total[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b]), _mm512_set1_ps(s), total[b]);
                correction[b] += s * 128.0f * (float)a.xsum[(b0 + b) * a.groups + g];
                acc[b] = _mm512_setzero_si512();
            }
            next_flush += gs;
            g++;
        }
    }
    for (int b = 0; b < NB; b++) out[b] = a.xscale[b0 + b] * (_mm512_reduce_add_ps(total[b]) - correction[b]);
}

// The two AVX-512 row kernels as types, so that one driver (rows_avx512) serves both.
template <int VT> struct ExpandRow {
    template <int NB>
    SK_AVX512 __attribute__((always_inline)) static inline void run(const Args &a, int64_t r, int64_t b0,
                                                                    float *out) {
        row_avx512<VT, NB>(a, r, b0, out);
    }
};
template <int VT> struct VnniRow {
    template <int NB>
    SK_AVX512 __attribute__((always_inline)) static inline void run(const Args &a, int64_t r, int64_t b0,
                                                                    float *out) {
        row_vnni<VT, NB>(a, r, b0, out);
    }
};

// Rows [r0, r1) in tiles of up to 8 batch rows; the tile's width is a template argument of Row::run
// (its accumulators are unrolled).
template <typename Row>
SK_AVX512 static void rows_avx512(const Args &a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (!row_ok(a, r)) continue;
        for (int64_t b0 = 0; b0 < a.B; b0 += 8) {
            const int64_t nb = std::min<int64_t>(8, a.B - b0);
            float out[8];
            switch (nb) {
            case 1: Row::template run<1>(a, r, b0, out); break;
            case 2: Row::template run<2>(a, r, b0, out); break;
            case 3: Row::template run<3>(a, r, b0, out); break;
            case 4: Row::template run<4>(a, r, b0, out); break;
            case 5: Row::template run<5>(a, r, b0, out); break;
            case 6: Row::template run<6>(a, r, b0, out); break;
            case 7: Row::template run<7>(a, r, b0, out); break;
            default: Row::template run<8>(a, r, b0, out); break;
            }
            for (int64_t b = 0; b < nb; b++) a.y[(b0 + b) * a.R + r] = out[b];
        }
    }
}

template <int VT>
SK_AVX512 static void vnni_rows_avx512(const Args &a, int64_t r0, int64_t r1) { rows_avx512<VnniRow<VT>>(a, r0, r1); }

template <int VT>
SK_AVX512 static void bitmask_rows_avx512(const Args &a, int64_t r0, int64_t r1) {
    rows_avx512<ExpandRow<VT>>(a, r0, r1);
}

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

#else  // not x86: the scalar path only
void init() {}
int cpu_isas() { return 1 << ISA_SCALAR; }
#endif

// ------------------------------------------------------------------ selection

// The vector paths of quantized values scale once per group of `lanes` columns (or once per row).
bool quant_vector_ok(const Args &a, int lanes) {
    return a.group_size == a.K || (a.group_size > 0 && a.group_size % lanes == 0);
}

RowsFn bitmask_rows(Isa isa, const Args &a) {
#if SK_X86
    if (isa == ISA_AVX512) {
        switch (a.vt) {
        case VT_F32: return bitmask_rows_avx512<VT_F32>;
        case VT_BF16: return bitmask_rows_avx512<VT_BF16>;
        case VT_F16: return bitmask_rows_avx512<VT_F16>;
        case VT_I8: return quant_vector_ok(a, 64) ? bitmask_rows_avx512<VT_I8> : bitmask_rows_scalar;
        default: return quant_vector_ok(a, 64) ? bitmask_rows_avx512<VT_I4> : bitmask_rows_scalar;
        }
    }
    if (isa == ISA_AVX2) {
        switch (a.vt) {
        case VT_F32: return bitmask_rows_avx2_f32;
        case VT_BF16: return bitmask_rows_avx2_bf16;
        case VT_F16: return bitmask_rows_avx2_f16;
        case VT_I8: return quant_vector_ok(a, 8) ? quant_rows_avx2<VT_I8> : bitmask_rows_scalar;
        default: return quant_vector_ok(a, 8) ? quant_rows_avx2<VT_I4> : bitmask_rows_scalar;
        }
    }
#endif
    (void)isa;
    (void)a;
    return bitmask_rows_scalar;
}

RowsFn vnni_rows(Isa isa, const Args &a) {
#if SK_X86
    if (isa == ISA_AVX512 && quant_vector_ok(a, 64)) {
        if (a.vt == VT_I8) return vnni_rows_avx512<VT_I8>;
        if (a.vt == VT_I4) return vnni_rows_avx512<VT_I4>;
    }
#endif
    (void)isa;
    (void)a;
    return nullptr;
}

RowsFn csr_rows(Isa isa, const Args &a) {
#if SK_X86
    if (isa != ISA_SCALAR) {  // no AVX-512 CSR kernel: the AVX2 one
        if (a.it == IT_U16)
            return a.vt == VT_BF16 ? csr_rows_avx2<IT_U16, VT_BF16>
                 : a.vt == VT_F16  ? csr_rows_avx2<IT_U16, VT_F16>
                                   : csr_rows_avx2<IT_U16, VT_F32>;
        return a.vt == VT_BF16 ? csr_rows_avx2<IT_I32, VT_BF16>
             : a.vt == VT_F16  ? csr_rows_avx2<IT_I32, VT_F16>
                               : csr_rows_avx2<IT_I32, VT_F32>;
    }
#endif
    (void)isa;
    (void)a;
    return csr_rows_scalar;
}

RowsFn to_dense_rows(Isa isa, const Args &a) {
#if SK_X86
    if (isa != ISA_SCALAR) return a.vt == VT_F32 ? to_dense_rows_avx2<VT_F32> : to_dense_rows_avx2<VT_BF16>;
#endif
    (void)isa;
    (void)a;
    return to_dense_rows_scalar;
}

// The dense fp32 weight [R, K] (int8/int4 values times their scales): the same numbers the kernels read.
void to_dense_f32(const Args &a, float *out) {
    std::memset(out, 0, sizeof(float) * (size_t)(a.R * a.K));
    for (int64_t r = 0; r < a.R; r++) {
        float *o = out + r * a.K;
        if (a.indptr) {
            for (int64_t i = a.indptr[r]; i < a.indptr[r + 1]; i++) o[index_at(a.indices, a.it, i)] = weight_at(a, i);
            continue;
        }
        const uint8_t *mask = row_mask(a, r);
        int64_t i = row_start(a, r);
        for (int64_t j = 0; j < a.bpr; j++) {
            for (unsigned byte = mask[j]; byte; byte &= byte - 1) {
                const int64_t c = 8 * j + __builtin_ctz(byte);
                const float w = weight_at(a, i++);
                o[c] = a.vt >= VT_I8 ? w * scale_at(a, r, c) : w;
            }
        }
    }
}

double read_sum(const float *p, int64_t n, Isa isa) {
#if SK_X86
    if (isa != ISA_SCALAR) return read_sum_avx2(p, n);
#endif
    (void)isa;
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) acc += p[i];
    return acc;
}

}  // namespace sk
