"""Fast inference with compressed sparse weights.

``SparseLinear`` holds a compressed weight and dispatches to the best kernel for the device, dtype and
batch (dense when the sparse kernel would be slower); ``sparsify_linears(model)`` swaps the pruned
Linear layers of a model in place. CPU kernels: C with AVX2 compiled on first use (``cpu_build``), scalar
C without AVX2, torch without a compiler; registered as ``torch.ops.sparsekit.*`` (``ops``). Kernels for
other devices (none yet) would register themselves with ``register_kernel(format, device, ...)``.
"""

from sparsekit.kernels.cpu import backend
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
           "select_kernel", "choose_format", "KernelEntry", "backend"]
