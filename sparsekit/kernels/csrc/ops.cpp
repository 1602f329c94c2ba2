// torch.ops.sparsekit.*: the CPU kernels behind TORCH_LIBRARY schemas.
//
// Every op checks the parts it is given before a kernel reads them: dtypes, shapes and lengths, monotone
// row offsets and the padding bits in O(rows); each row's mask popcount against its length (and CSR column
// indices against in_features) inside the kernels, before that row's values are read. A malformed part
// raises ValueError naming it. Work is split over output rows on torch's intra-op thread pool
// (at::parallel_for, torch.set_num_threads), chunks handed out dynamically so that a core slowed by another
// process takes fewer. The instruction set is chosen per call: isa="auto" (or $SPARSEKIT_ISA) takes the
// best this CPU supports; "avx512", "avx2" or "scalar" force one. x_int8=True (int8/int4 values only)
// first rounds x to int8 per batch row (x ~ s_b * xq, symmetric, like torch's dynamic int8 Linear): every path
// then computes with that x, the AVX-512 one in int8 with vpdpbusd (VNNI).
//
// IEEE rule (the same on every path and in the torch fallback): a pruned weight is a stored zero, and
// 0 * NaN = 0 * Inf = NaN, so every output is what the dense product x W^T with the decompressed weight
// gives. Paths that skip pruned weights (the scalar and AVX2 bitmask kernels, CSR) would lose the NaN, so a
// batch row of x holding a NaN or an infinity is found by one O(B * K) scan of x (no allocation; nothing
// next to the O(R * K) weight stream), on every path, and that row alone is recomputed densely: at::linear(x_row, W) with W decompressed to fp32. For such a
// row every output is non-finite (each meets the NaN, or the infinity times a weight or a zero).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "sparse_cpu.h"

namespace {

using at::Tensor;

const char *ISA_NAMES[] = {"scalar", "avx2", "avx512"};

int64_t supported_isas() {
    static const int64_t isas = [] {
        sk::init();
        return (int64_t)sk::cpu_isas();
    }();
    return isas;
}

sk::Isa pick_isa(const std::string &requested) {
    std::string name = requested;
    if (name == "auto") {
        const char *env = std::getenv("SPARSEKIT_ISA");
        name = (env && *env) ? env : "auto";
    }
    const int64_t have = supported_isas();
    if (name == "auto") return (have & 4) ? sk::ISA_AVX512 : (have & 2) ? sk::ISA_AVX2 : sk::ISA_SCALAR;
    for (int i = 0; i < 3; i++) {
        if (name != ISA_NAMES[i]) continue;
        std::string supported;
        for (int j = 0; j < 3; j++)
            if (have & (1 << j)) supported += std::string(supported.empty() ? "" : ", ") + ISA_NAMES[j];
        TORCH_CHECK_VALUE(have & (1 << i), "isa='", name, "' is not supported by this CPU (supported: ", supported,
                          ")");
        return (sk::Isa)i;
    }
    TORCH_CHECK_VALUE(false, "isa must be 'auto', 'avx512', 'avx2' or 'scalar' (or $SPARSEKIT_ISA one of them), got '",
                      name, "'");
    return sk::ISA_SCALAR;
}

void check_part(const char *op, const char *name, const Tensor &t, std::initializer_list<at::ScalarType> dtypes,
                int64_t dim) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": '", name, "' must be a CPU tensor, got one on ", t.device());
    bool ok = false;
    std::string allowed;
    for (auto d : dtypes) {
        ok = ok || t.scalar_type() == d;
        allowed += std::string(allowed.empty() ? "" : ", ") + c10::toString(d);
    }
    TORCH_CHECK_VALUE(ok, op, ": '", name, "' must have dtype in [", allowed, "], got ", t.scalar_type());
    TORCH_CHECK_VALUE(dim < 0 || t.dim() == dim, op, ": '", name, "' must be ", dim, "-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": '", name, "' must be contiguous");
}

int value_type(const Tensor &values) {
    switch (values.scalar_type()) {
    case at::kFloat: return sk::VT_F32;
    case at::kBFloat16: return sk::VT_BF16;
    case at::kHalf: return sk::VT_F16;
    case at::kChar: return sk::VT_I8;
    default: return sk::VT_I4;  // uint8: two int4 per byte
    }
}

const std::initializer_list<at::ScalarType> VALUE_DTYPES = {at::kFloat, at::kBFloat16, at::kHalf, at::kChar,
                                                            at::kByte};

// x [..., K] floating -> (B, K) view; integer or float64 x is refused (the kernels compute in fp32).
Tensor flat_x(const char *op, const Tensor &x, int64_t K) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                     op, ": 'x' must be float32, bfloat16 or float16, got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": 'x' must be a CPU tensor, got one on ", x.device());
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": 'x' must be [..., ", K, "] (in_features=", K,
                      "), got shape ", x.sizes());
    return x.reshape({-1, K});
}

// fp16 scales must be finite and > 0 (a zero, negative or NaN scale is refused, not multiplied in): O(R * groups).
void check_scale_values(const char *op, const Tensor &scales) {
    const uint16_t *h = (const uint16_t *)scales.data_ptr();
    const int64_t n = scales.numel(), groups = scales.size(1);
    for (int64_t i = 0; i < n; i++) {
        const bool nonfinite = (h[i] & 0x7c00u) == 0x7c00u, negative = h[i] & 0x8000u, zero = (h[i] & 0x7fffu) == 0;
        TORCH_CHECK_VALUE(!(nonfinite || negative || zero), op, ": 'scales' must be finite and > 0, got ",
                          scales.view(-1)[i].item<float>(), " at [", i / groups, ", ", i % groups, "]");
    }
}

// Quantization parts: scales fp16 [R, K / group_size] exactly when the values are int8/uint8.
void check_scales(const char *op, sk::Args &a, const c10::optional<Tensor> &scales, int64_t group_size) {
    const bool quant = a.vt == sk::VT_I8 || a.vt == sk::VT_I4;
    if (!quant) {
        TORCH_CHECK_VALUE(!scales.has_value(), op, ": 'scales' given but the values are floating (",
                          a.vt == sk::VT_F32 ? "float32" : "16-bit", "); scales belong to int8/int4 values");
        return;
    }
    TORCH_CHECK_VALUE(scales.has_value(), op, ": int8/int4 values need 'scales' (float16 [rows, in_features / group_size])");
    TORCH_CHECK_VALUE(group_size >= 1 && a.K % group_size == 0, op, ": group_size must be a positive divisor of in_features=",
                      a.K, ", got ", group_size);
    check_part(op, "scales", *scales, {at::kHalf}, 2);
    TORCH_CHECK_VALUE(scales->size(0) == a.R && scales->size(1) == a.K / group_size, op, ": 'scales' must have shape [",
                      a.R, ", ", a.K / group_size, "] (rows, in_features / group_size), got ", scales->sizes());
    check_scale_values(op, *scales);
    a.scales = (const uint16_t *)scales->data_ptr();
    a.group_size = group_size;
    a.groups = a.K / group_size;
}

void check_bitmask(const char *op, sk::Args &a, const Tensor &bitmask, int64_t in_features) {
    TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
    check_part(op, "bitmask", bitmask, {at::kByte}, 2);
    TORCH_CHECK_VALUE(bitmask.size(0) >= 1, op, ": 'bitmask' must have >= 1 row (out_features >= 1), got shape ",
                      bitmask.sizes());
    const int64_t bpr = (in_features + 7) / 8;
    TORCH_CHECK_VALUE(bitmask.size(1) == bpr, op, ": 'bitmask' has ", bitmask.size(1),
                      " bytes per row but in_features=", in_features, " needs ", bpr);
    a.bits = bitmask.data_ptr<uint8_t>();
    a.bpr = a.mask_stride = bpr;
    a.R = bitmask.size(0);
    a.K = in_features;
    if (in_features % 8) {  // padding bits past the last column must be zero: O(rows)
        for (int64_t r = 0; r < a.R; r++)
            TORCH_CHECK_VALUE((a.bits[r * bpr + bpr - 1] >> (in_features % 8)) == 0, op, ": row ", r,
                              " of 'bitmask' has bits set past in_features=", in_features);
    }
}

int64_t mask_count(const sk::Args &a, int64_t r) {
    int64_t count = 0;
    for (int64_t j = 0; j < a.bpr; j++) count += __builtin_popcount(a.bits[r * a.mask_stride + j]);
    return count;
}

void run_rows(sk::RowsFn fn, const sk::Args &a) {
    const int64_t R = a.R, chunk = 32, chunks = (R + chunk - 1) / chunk;
    const int64_t work = R * std::max<int64_t>(a.K, 1) * std::max<int64_t>(a.B, 1);
    const int nthreads = at::get_num_threads();
    if (nthreads <= 1 || chunks <= 1 || work < (1 << 18)) {
        fn(a, 0, R);
        return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
                fn(a, c * chunk, std::min(R, c * chunk + chunk));
        }
    });
}

// The batch rows of x [B, K] (fp32, row stride ldx) holding a NaN or an infinity (exponent bits all ones):
// a branch-free OR over each row (compare + or, vectorised with SSE2), so finite x pays one read of x.
std::vector<int64_t> nonfinite_rows(const float *x, int64_t B, int64_t K, int64_t ldx) {
    std::vector<int64_t> rows;
    for (int64_t b = 0; b < B; b++) {
        const uint32_t *xb = (const uint32_t *)(x + b * ldx);
        uint32_t nonfinite = 0;
        for (int64_t k = 0; k < K; k++) nonfinite |= (uint32_t)((xb[k] & 0x7f800000u) == 0x7f800000u);
        if (nonfinite) rows.push_back(b);
    }
    return rows;
}

// The IEEE rule (top of file): the listed rows of y [B, R] become the dense product of those rows of x (fp32,
// [B, >= K]) with the decompressed weight of `a`.
void dense_rows(Tensor &y, const Tensor &x, const std::vector<int64_t> &rows, const sk::Args &a) {
    if (rows.empty()) return;
    Tensor W = at::empty({a.R, a.K}, y.options());
    sk::to_dense_f32(a, W.data_ptr<float>());
    const Tensor index = at::tensor(rows, y.options().dtype(at::kLong));
    y.index_copy_(0, index, at::linear(x.narrow(1, 0, a.K).index_select(0, index), W));
}

// y [B, R] fp32 of the bitmask kernels; x padded to whole 64-column steps (zeros never meet a kept weight).
Tensor bitmask_matmul(const char *op, sk::Args &a, const Tensor &x, const std::string &isa_name,
                      const char *length_part, bool x_int8) {
    const sk::Isa isa = pick_isa(isa_name);
    const Tensor x2 = flat_x(op, x, a.K);
    a.B = x2.size(0);
    a.ldx = 64 * ((a.bpr + 7) / 8);
    Tensor y = at::empty({a.B, a.R}, x.options().dtype(at::kFloat));
    if (a.B == 0 || a.R == 0) return y;
    Tensor xp = at::zeros({a.B, a.ldx}, x.options().dtype(at::kFloat));
    xp.narrow(1, 0, a.K).copy_(x2);
    const std::vector<int64_t> nonfinite = nonfinite_rows(xp.data_ptr<float>(), a.B, a.K, a.ldx);
    Tensor xq, xscale, xsum;
    if (x_int8) {  // x ~ xscale * xq per batch row, symmetric; every path computes with this x
        TORCH_CHECK_VALUE(a.vt == sk::VT_I8 || a.vt == sk::VT_I4, op,
                          ": x_int8=True quantizes x for int8/int4 values; these values are floating");
        xscale = std::get<0>(xp.abs().max(1)).div_(127.0).clamp_min_(1e-30);
        Tensor q = at::round(xp / xscale.unsqueeze(1)).clamp_(-127, 127);
        xp = q * xscale.unsqueeze(1);
        xq = q.to(at::kChar);
        xsum = q.narrow(1, 0, a.K).reshape({a.B, a.groups, a.K / a.groups}).sum(2).to(at::kInt).contiguous();
        a.xq = xq.data_ptr<int8_t>();
        a.xscale = xscale.data_ptr<float>();
        a.xsum = xsum.data_ptr<int32_t>();
    }
    a.x = xp.data_ptr<float>();
    a.y = y.data_ptr<float>();
    Tensor xbf, blocked;
    if (isa == sk::ISA_AVX512 && a.vt == sk::VT_BF16 && x.scalar_type() == at::kBFloat16) {
        xbf = xp.to(at::kBFloat16);  // exact: x is bf16 already
        a.xbf = (const uint16_t *)xbf.data_ptr();
    }
    if (isa == sk::ISA_AVX2 && a.B > 1 && a.vt <= sk::VT_F16) {  // the batched AVX2 kernel's x layout
        blocked = at::empty({sk::blocked_x_floats(a)}, x.options().dtype(at::kFloat));
        sk::block_x(a, blocked.data_ptr<float>());
        a.xt = blocked.data_ptr<float>();
        a.nbp = 64 * a.bpr;
    }
    std::atomic<int64_t> bad{-1};
    a.bad_row = &bad;
    const int64_t B = a.B;
    for (int64_t b0 = 0; b0 < B; b0 += 16) {  // at most 16 batch rows per pass
        sk::Args pass = a;
        pass.B = std::min<int64_t>(16, B - b0);
        pass.x = a.x + b0 * a.ldx;
        pass.xbf = a.xbf ? a.xbf + b0 * a.ldx : nullptr;
        pass.xt = a.xt ? a.xt + (b0 / 8) * 64 * a.bpr : nullptr;
        pass.y = a.y + b0 * a.R;
        pass.xq = a.xq ? a.xq + b0 * a.ldx : nullptr;
        pass.xscale = a.xscale ? a.xscale + b0 : nullptr;
        pass.xsum = a.xsum ? a.xsum + b0 * a.groups : nullptr;
        sk::RowsFn fn = x_int8 ? sk::vnni_rows(isa, pass) : nullptr;
        run_rows(fn ? fn : sk::bitmask_rows(isa, pass), pass);
        if (bad.load() >= 0) break;
    }
    const int64_t r = bad.load();
    TORCH_CHECK_VALUE(r < 0, op, ": row ", r, " of 'bitmask' keeps ", mask_count(a, r), " values but '", length_part,
                      "' give", " it ", a.row_offsets ? a.row_offsets[r + 1] - a.row_offsets[r] : a.row_count,
                      " (the parts disagree)");
    dense_rows(y, xp, nonfinite, a);  // x_int8: xp is the rounded x, as the reference rounds it
    return y;
}

Tensor shaped(const Tensor &y, const Tensor &x, int64_t R) {
    auto sizes = x.sizes().vec();
    sizes.back() = R;
    return y.to(x.scalar_type()).reshape(sizes);
}

Tensor bitmask_linear(const Tensor &x, const Tensor &bitmask, const Tensor &values, const Tensor &row_offsets,
                      int64_t in_features, const c10::optional<Tensor> &scales, int64_t group_size,
                      c10::string_view isa, bool x_int8) {
    const char *op = "sparsekit.bitmask_linear";
    sk::Args a;
    check_bitmask(op, a, bitmask, in_features);
    check_part(op, "values", values, VALUE_DTYPES, 1);
    check_part(op, "row_offsets", row_offsets, {at::kLong}, 1);
    TORCH_CHECK_VALUE(row_offsets.numel() == a.R + 1, op, ": 'row_offsets' must have rows + 1 = ", a.R + 1,
                      " entries, got ", row_offsets.numel());
    const int64_t *off = row_offsets.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(off[0] == 0, op, ": 'row_offsets' must start at 0, got ", off[0]);
    for (int64_t r = 0; r < a.R; r++)
        TORCH_CHECK_VALUE(off[r + 1] >= off[r] && off[r + 1] - off[r] <= in_features, op,
                          ": 'row_offsets' must be non-decreasing with steps <= in_features=", in_features,
                          ", got row_offsets[", r, "]=", off[r], ", row_offsets[", r + 1, "]=", off[r + 1]);
    a.vt = value_type(values);
    const int64_t kept = off[a.R];
    const int64_t expected = a.vt == sk::VT_I4 ? (kept + 1) / 2 : kept;
    TORCH_CHECK_VALUE(values.numel() == expected, op, ": 'values' has ", values.numel(), " entries but 'row_offsets' end at ",
                      kept, a.vt == sk::VT_I4 ? " int4 values (ceil(n/2) bytes expected: " : " (expected ", expected, ")");
    a.values = (const char *)values.data_ptr();
    a.row_offsets = off;
    a.nvalues = kept;
    a.value_bytes = values.numel() * values.element_size();
    check_scales(op, a, scales, group_size);
    return shaped(bitmask_matmul(op, a, x, std::string(isa), "row_offsets", x_int8), x, a.R);
}

Tensor nm_linear(const Tensor &x, const Tensor &bitmask, const Tensor &values, int64_t in_features,
                 const c10::optional<Tensor> &scales, int64_t group_size, c10::string_view isa, bool x_int8) {
    const char *op = "sparsekit.nm_linear";
    sk::Args a;
    check_bitmask(op, a, bitmask, in_features);
    check_part(op, "values", values, VALUE_DTYPES, 2);
    TORCH_CHECK_VALUE(values.size(0) == a.R, op, ": 'values' must have ", a.R, " rows (one per bitmask row), got ",
                      values.size(0));
    a.vt = value_type(values);
    const int64_t per_row = values.size(1);
    if (a.vt == sk::VT_I4) {  // every row keeps the same count n: row 0's, stored in ceil(n/2) bytes
        a.row_count = a.R ? mask_count(a, 0) : 0;
        a.row_stride = 2 * per_row;
        TORCH_CHECK_VALUE((a.row_count + 1) / 2 == per_row, op, ": 'values' has ", per_row,
                          " bytes per row but the bitmask keeps ", a.row_count, " int4 values in row 0");
    } else {
        a.row_count = a.row_stride = per_row;
    }
    TORCH_CHECK_VALUE(a.row_count <= in_features, op, ": 'values' has ", a.row_count,
                      " values per row, more than in_features=", in_features);
    a.values = (const char *)values.data_ptr();
    a.nvalues = a.R * a.row_stride;
    a.value_bytes = values.numel() * values.element_size();
    check_scales(op, a, scales, group_size);
    return shaped(bitmask_matmul(op, a, x, std::string(isa), "values", x_int8), x, a.R);
}

Tensor dense_linear(const Tensor &x, const Tensor &weight, const c10::optional<Tensor> &scales, int64_t group_size,
                    c10::string_view isa, bool x_int8) {
    const char *op = "sparsekit.dense_linear";
    check_part(op, "weight", weight, {at::kFloat, at::kBFloat16, at::kHalf, at::kChar}, 2);
    TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, op,
                      ": 'weight' must be [out_features >= 1, in_features >= 1], got shape ", weight.sizes());
    sk::Args a;
    a.R = weight.size(0);
    a.K = weight.size(1);
    a.bpr = (a.K + 7) / 8;
    std::vector<uint8_t> ones(a.bpr, 0xFF);  // one all-ones mask row shared by every row: the same kernels
    if (a.K % 8) ones.back() = (uint8_t)((1u << (a.K % 8)) - 1);
    a.bits = ones.data();
    a.mask_stride = 0;
    a.vt = value_type(weight);
    a.row_count = a.row_stride = a.K;
    a.values = (const char *)weight.data_ptr();
    a.nvalues = a.R * a.K;
    a.value_bytes = weight.numel() * weight.element_size();
    check_scales(op, a, scales, group_size);
    return shaped(bitmask_matmul(op, a, x, std::string(isa), "weight", x_int8), x, a.R);
}

Tensor csr_linear(const Tensor &x, const Tensor &indptr, const Tensor &indices, const Tensor &values,
                  int64_t in_features, c10::string_view isa_name) {
    const char *op = "sparsekit.csr_linear";
    check_part(op, "indptr", indptr, {at::kLong}, 1);
    check_part(op, "indices", indices, {at::kInt, at::kUInt16}, 1);
    check_part(op, "values", values, {at::kFloat, at::kBFloat16, at::kHalf}, 1);
    TORCH_CHECK_VALUE(indptr.numel() >= 2, op, ": 'indptr' must have rows + 1 >= 2 entries (out_features >= 1), got ",
                      indptr.numel());
    TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
    sk::Args a;
    a.R = indptr.numel() - 1;
    a.K = in_features;
    const int64_t *ptr = indptr.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(ptr[0] == 0, op, ": 'indptr' must start at 0, got ", ptr[0]);
    for (int64_t r = 0; r < a.R; r++)
        TORCH_CHECK_VALUE(ptr[r + 1] >= ptr[r] && ptr[r + 1] - ptr[r] <= in_features, op,
                          ": 'indptr' must be non-decreasing with steps <= in_features=", in_features, ", got indptr[",
                          r, "]=", ptr[r], ", indptr[", r + 1, "]=", ptr[r + 1]);
    TORCH_CHECK_VALUE(indices.numel() == ptr[a.R] && values.numel() == ptr[a.R], op, ": 'indptr' ends at ", ptr[a.R],
                      " but 'indices' has ", indices.numel(), " and 'values' ", values.numel(), " entries");
    const sk::Isa isa = pick_isa(std::string(isa_name));
    const Tensor x2 = flat_x(op, x, a.K);
    a.B = x2.size(0);
    Tensor y = at::empty({a.B, a.R}, x.options().dtype(at::kFloat));
    if (a.B == 0 || a.R == 0) return shaped(y, x, a.R);
    const Tensor xf = x2.to(at::kFloat).contiguous();
    const std::vector<int64_t> nonfinite = nonfinite_rows(xf.data_ptr<float>(), a.B, a.K, a.K);
    a.indptr = ptr;
    a.indices = indices.data_ptr();
    a.it = indices.scalar_type() == at::kInt ? sk::IT_I32 : sk::IT_U16;
    a.values = (const char *)values.data_ptr();
    a.vt = value_type(values);
    a.nvalues = values.numel();
    a.value_bytes = values.numel() * values.element_size();
    a.x = xf.data_ptr<float>();
    a.ldx = a.K;
    a.y = y.data_ptr<float>();
    std::atomic<int64_t> bad{-1};
    a.bad_row = &bad;
    sk::RowsFn fn = sk::csr_rows(isa, a);
    if (isa == sk::ISA_SCALAR || a.B == 1) {
        run_rows(fn, a);
    } else {  // 16 batch rows per pass, x transposed to [K, 8 or 16] for each pass
        for (int64_t b0 = 0; b0 < a.B && bad.load() < 0; b0 += 16) {
            const int64_t nb = std::min<int64_t>(16, a.B - b0), nbp = nb > 8 ? 16 : 8;
            Tensor xt = at::zeros({a.K + 1, nbp}, xf.options());
            xt.narrow(0, 0, a.K).narrow(1, 0, nb).copy_(xf.narrow(0, b0, nb).t());
            sk::Args pass = a;
            pass.xt = xt.data_ptr<float>();
            pass.nbp = nbp;
            pass.b0 = b0;
            pass.nb = nb;
            run_rows(fn, pass);
        }
    }
    const int64_t r = bad.load();
    if (r >= 0) {  // name the first bad index of the row the kernel flagged
        int64_t previous = -1;
        for (int64_t i = ptr[r]; i < ptr[r + 1]; i++) {
            const int64_t c = a.it == sk::IT_I32 ? ((const int32_t *)a.indices)[i] : ((const uint16_t *)a.indices)[i];
            TORCH_CHECK_VALUE(c >= 0 && c < in_features, op, ": row ", r,
                              " of 'indices' has a column index outside [0, in_features=", in_features, "): ", c);
            TORCH_CHECK_VALUE(c > previous, op, ": row ", r, " of 'indices' must be strictly increasing (no duplicate "
                              "or unsorted columns; a duplicate would be summed), got column ", c, " after ", previous);
            previous = c;
        }
    }
    dense_rows(y, xf, nonfinite, a);
    return shaped(y, x, a.R);
}

Tensor bitmask_to_dense(const Tensor &bitmask, const Tensor &values, const c10::optional<Tensor> &row_offsets,
                        int64_t in_features) {
    const char *op = "sparsekit.bitmask_to_dense";
    sk::Args a;
    check_bitmask(op, a, bitmask, in_features);
    check_part(op, "values", values, {at::kFloat, at::kBFloat16, at::kHalf}, row_offsets.has_value() ? 1 : 2);
    a.vt = value_type(values);
    if (row_offsets.has_value()) {
        check_part(op, "row_offsets", *row_offsets, {at::kLong}, 1);
        TORCH_CHECK_VALUE(row_offsets->numel() == a.R + 1, op, ": 'row_offsets' must have rows + 1 = ", a.R + 1,
                          " entries, got ", row_offsets->numel());
        const int64_t *off = row_offsets->data_ptr<int64_t>();
        TORCH_CHECK_VALUE(off[0] == 0, op, ": 'row_offsets' must start at 0, got ", off[0]);
        for (int64_t r = 0; r < a.R; r++)
            TORCH_CHECK_VALUE(off[r + 1] >= off[r] && off[r + 1] - off[r] <= in_features, op,
                              ": 'row_offsets' must be non-decreasing with steps <= in_features, got row_offsets[", r,
                              "]=", off[r], ", row_offsets[", r + 1, "]=", off[r + 1]);
        TORCH_CHECK_VALUE(values.numel() == off[a.R], op, ": 'values' has ", values.numel(),
                          " entries but 'row_offsets' end at ", off[a.R]);
        a.row_offsets = off;
    } else {
        TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == a.R, op, ": without row_offsets (N:M), 'values' must be [",
                          a.R, ", kept per row], got shape ", values.sizes());
        a.row_count = a.row_stride = values.size(1);
    }
    a.values = (const char *)values.data_ptr();
    a.nvalues = values.numel();
    a.value_bytes = values.numel() * values.element_size();
    Tensor out = at::empty({a.R, a.K}, values.options());
    a.out = (char *)out.data_ptr();
    std::atomic<int64_t> bad{-1};
    a.bad_row = &bad;
    run_rows(sk::to_dense_rows(pick_isa("auto"), a), a);
    const int64_t r = bad.load();
    TORCH_CHECK_VALUE(r < 0, op, ": row ", r, " of 'bitmask' keeps ", mask_count(a, r), " values but '",
                      row_offsets.has_value() ? "row_offsets" : "values", "' give it ",
                      a.row_offsets ? a.row_offsets[r + 1] - a.row_offsets[r] : a.row_count);
    return out;
}

// Sum of a float32 buffer streamed once with the kernels' threads: a read-bandwidth probe.
Tensor read_sum(const Tensor &buffer) {
    check_part("sparsekit.read_sum", "buffer", buffer, {at::kFloat}, -1);
    const float *p = buffer.data_ptr<float>();
    const sk::Isa isa = pick_isa("auto");
    const double total = at::parallel_reduce(
        0, buffer.numel(), 1 << 16, 0.0,
        [&](int64_t i0, int64_t i1, double acc) { return acc + sk::read_sum(p + i0, i1 - i0, isa); },
        [](double u, double v) { return u + v; });
    return at::scalar_tensor(total, buffer.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY(sparsekit, m) {
    m.def("bitmask_linear(Tensor x, Tensor bitmask, Tensor values, Tensor row_offsets, int in_features, "
          "Tensor? scales=None, int group_size=0, str isa=\"auto\", bool x_int8=False) -> Tensor");
    m.def("nm_linear(Tensor x, Tensor bitmask, Tensor values, int in_features, Tensor? scales=None, "
          "int group_size=0, str isa=\"auto\", bool x_int8=False) -> Tensor");
    m.def("csr_linear(Tensor x, Tensor indptr, Tensor indices, Tensor values, int in_features, "
          "str isa=\"auto\") -> Tensor");
    m.def("dense_linear(Tensor x, Tensor weight, Tensor? scales=None, int group_size=0, str isa=\"auto\", "
          "bool x_int8=False) -> Tensor");
    m.def("bitmask_to_dense(Tensor bitmask, Tensor values, Tensor? row_offsets, int in_features) -> Tensor");
    m.def("read_sum(Tensor buffer) -> Tensor");
    m.def("supported_isas() -> int", &supported_isas);
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
    m.impl("bitmask_linear", &bitmask_linear);
    m.impl("nm_linear", &nm_linear);
    m.impl("csr_linear", &csr_linear);
    m.impl("dense_linear", &dense_linear);
    m.impl("bitmask_to_dense", &bitmask_to_dense);
    m.impl("read_sum", &read_sum);
}
