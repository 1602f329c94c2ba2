"""Fast inference with compressed sparse weights.

``SparseLinear`` holds a compressed weight and dispatches to the best kernel for the device, dtype and
batch (dense when the sparse kernel would be slower); ``sparsify_linears(model)`` swaps the pruned
Linear layers of a model in place. CPU kernels: C++ compiled on first use as a torch extension
(:mod:`~sparsekit.kernels.extension`) with AVX-512, AVX2 and scalar paths chosen at run time, registered
as ``torch.ops.sparsekit.*`` (:mod:`~sparsekit.kernels.ops`); torch reference ops without a compiler.
Triton GPU kernels (:mod:`~sparsekit.kernels.triton_bitmask`, :mod:`~sparsekit.kernels.triton_nm`) are
registered for CUDA tensors with ``register_kernel(format, "cuda", ...)``.

Every kernel returns what the dense product ``F.linear(x, W)`` with the decompressed weight returns, NaN and
Inf included: a pruned weight is a stored zero and ``0 · NaN = 0 · Inf = NaN`` (IEEE), on every instruction
set, format and value type (:mod:`~sparsekit.kernels.ops` says how). The compiled library is loaded only
after its manifest verifies; a damaged or unwritable cache falls back with one warning
(:mod:`~sparsekit.kernels.extension`).
"""

from sparsekit.kernels.ops import active_isa, backend, isa_paths
from sparsekit.kernels.sparse_linear import (
    KernelEntry,
    SparseLinear,
    choose_format,
    densify_linears,
    register_kernel,
    select_kernel,
    sparse_weights,
    sparsify_linears,
)

__all__ = ["SparseLinear", "sparsify_linears", "densify_linears", "sparse_weights", "register_kernel",
           "select_kernel", "choose_format", "KernelEntry", "backend", "isa_paths", "active_isa"]
