// sparsekit CPU kernels: y = x W^T for a compressed W [R, K]; shared declarations (no torch headers).
//
// Formats (the layouts of sparsekit.formats):
//   bitmask  bits[R, bpr] (bpr = ceil(K/8); bit t of byte j <-> column 8j+t), the kept values of row r
//            starting at value index row_offsets[r], or r*row_stride when row_offsets is null (N:M).
//   csr      indptr[R+1] int64, column indices int32 or uint16, values.
// Values: fp32, bf16, fp16, int8 (q, dense value q*scale) or int4 (two's complement nibbles, low nibble
// first, value index i = nibble i of the byte stream). Quantized values carry fp16 scales [R, K/gs].
// A "value index" counts values (nibbles for int4). x is fp32 [B, ldx], zero-padded to ldx >= 64*ceil(bpr/8).
// Accumulation is fp32 everywhere.
#pragma once
#include <atomic>
#include <cstdint>

namespace sk {

enum ValueType { VT_F32 = 0, VT_BF16 = 1, VT_F16 = 2, VT_I8 = 3, VT_I4 = 4 };
enum IndexType { IT_I32 = 0, IT_U16 = 1 };
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

struct Args {
    const uint8_t *bits = nullptr;  // bitmask rows
    int64_t bpr = 0;                // bytes per mask row
    int64_t mask_stride = 0;        // bytes between consecutive rows' masks (0: one all-ones row for all: dense)
    const char *values = nullptr;
    int vt = VT_F32;
    const int64_t *row_offsets = nullptr;  // [R+1] value indices, or null: row r starts at r*row_stride
    int64_t row_stride = 0;         // (N:M) value indices between rows' starts
    int64_t row_count = 0;          // (N:M, dense) values per row when row_offsets is null
    int64_t nvalues = 0;            // value indices available (bounds every read)
    int64_t value_bytes = 0;        // bytes of the values buffer
    const uint16_t *scales = nullptr;  // fp16 [R, groups] for int8/int4
    int64_t group_size = 0, groups = 0;
    const int64_t *indptr = nullptr;   // csr
    const void *indices = nullptr;
    int it = IT_I32;
    int64_t R = 0, K = 0;
    const float *x = nullptr;       // [B, ldx] fp32, zero-padded
    const uint16_t *xbf = nullptr;  // the same as bf16 (the AVX-512 bf16 dot-product path)
    const int8_t *xq = nullptr;     // x quantized to int8 per batch row (x_int8: the VNNI path) [B, ldx]
    const float *xscale = nullptr;  // [B]: x ~ xscale[b] * xq[b]
    const int32_t *xsum = nullptr;  // [B, groups]: sum of xq over each group of columns
    int64_t B = 0, ldx = 0;
    const float *xt = nullptr;      // AVX2 batched layouts (see the kernels)
    int64_t nbp = 0, b0 = 0, nb = 0;
    float *y = nullptr;             // [B, R]
    char *out = nullptr;            // to_dense output [R, K] in the values' dtype
    std::atomic<int64_t> *bad_row = nullptr;  // first malformed row found (-1: none)
};

typedef void (*RowsFn)(const Args &a, int64_t r0, int64_t r1);

int cpu_isas();  // bit i set when Isa i can run on this CPU
void init();     // build the lookup tables (call once before any kernel)
int64_t value_size_bits(int vt);
bool quant_vector_ok(const Args &a, int lanes);

// Row kernels for a range of output rows [r0, r1). Each validates its rows (mask popcount against the row
// length, CSR indices strictly increasing in [0, K)) before reading values and records a bad row instead of
// reading past them.
RowsFn bitmask_rows(Isa isa, const Args &a);
// int8 x (a.xq) against int8/int4 values with vpdpbusd (AVX-512 VNNI); null when not available for a.
RowsFn vnni_rows(Isa isa, const Args &a);
RowsFn csr_rows(Isa isa, const Args &a);
RowsFn to_dense_rows(Isa isa, const Args &a);
// The dense fp32 weight [R, K] of a validated bitmask/N:M/dense (scales applied) or CSR (a.indptr) weight.
void to_dense_f32(const Args &a, float *out);
double read_sum(const float *p, int64_t n, Isa isa);
// The AVX2 batched bitmask kernel reads x blocked per 8 batch rows: [chunk][byte j][row][8] (see there).
int64_t blocked_x_floats(const Args &a);
void block_x(const Args &a, float *buffer);

}  // namespace sk
