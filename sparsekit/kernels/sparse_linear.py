"""``SparseLinear``: an ``nn.Linear`` whose weight is stored compressed, and the kernel dispatch.

``y = x Wᵀ + b`` with ``x [..., in]``. The rows of x flattened over the leading dimensions form the
batch ``B``. For each call, :func:`select_kernel` picks a kernel registered for the weight's format and
x's device and dtype whose ``max_batch(sparsity)`` admits ``B``; if none does, the weight is decompressed
and dense ``F.linear`` runs (a prefill of many tokens is compute-bound, where the sparse kernels lose).

The CPU rules are :func:`sparsekit.kernels.dispatch.max_batch`: per kernel kind and sparsity, the
largest batch at which the kernel beat the best torch dense path when ``sparsekit bench --calibrate`` timed
them on this machine (defaults measured on the machine this project was built on). ``format="auto"`` picks
CSR from 85% sparsity, where it overtakes the bitmask kernel at batch 1. Quantized weights (int8/int4
values with fp16 scales, the formats' ``bits`` and ``group_size``) go to the same ops; their dense path
dequantizes. A GPU kernel joins with ``register_kernel("bitmask", "cuda", KernelEntry(...))``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit import _validate
from sparsekit.blocks import is_linear, layer_types, prunable_linears, weight_out_in
from sparsekit.formats import FORMATS, BitmaskWeight, CSRWeight, NMWeight, SparseWeight
from sparsekit.kernels import dispatch, ops, reference  # noqa: F401 (ops registers torch.ops.sparsekit)

__all__ = ["SparseLinear", "sparsify_linears", "densify_linears", "register_kernel", "select_kernel",
           "choose_format", "sparse_weights", "KernelEntry", "NM_PATTERNS", "CSR_MIN_SPARSITY"]

# N:M patterns recognised by format="auto", most common first.
NM_PATTERNS = ((2, 4), (4, 8), (8, 16), (16, 32), (16, 64), (1, 4), (2, 8))
# Unstructured masks at least this sparse use CSR (its work follows the non-zeros); below, the bitmask.
CSR_MIN_SPARSITY = 0.85


@dataclass(frozen=True)
class KernelEntry:
    """A kernel for one (format, device type): ``run(x2d, weight) -> y2d`` in x's dtype (no bias)."""

    name: str
    run: Callable[[torch.Tensor, SparseWeight], torch.Tensor]
    max_batch: Callable[..., int]  # (sparsity[, weight]) -> largest batch sent to this kernel
    x_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    bits: tuple[int | None, ...] = (None,)  # the values it reads: None = float, 8/4 = quantized codes


_KERNELS: dict[tuple[str, str], list[KernelEntry]] = {}


def register_kernel(format: str, device_type: str, entry: KernelEntry, first: bool = True) -> None:
    """Make ``entry`` available for weights of ``format`` on ``device_type``; earlier entries win."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    entries = _KERNELS.setdefault((format, device_type), [])
    entries[:] = [e for e in entries if e.name != entry.name]
    entries.insert(0 if first else len(entries), entry)


def _takes_weight(rule) -> bool:
    """Whether a ``max_batch`` rule takes ``(sparsity, weight)`` rather than ``(sparsity)`` alone."""
    params = inspect.signature(rule).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _max_batch(entry: KernelEntry, weight: SparseWeight) -> int:
    if _takes_weight(entry.max_batch):
        return entry.max_batch(weight.sparsity, weight)
    return entry.max_batch(weight.sparsity)


def select_kernel(weight: SparseWeight, device_type: str, x_dtype: torch.dtype,
                  batch: int) -> KernelEntry | None:
    """The first registered kernel that takes this weight, device, dtype and batch; ``None`` = dense."""
    for entry in _KERNELS.get((weight.format, device_type), []):
        if (x_dtype in entry.x_dtypes and getattr(weight, "bits", None) in entry.bits
                and batch <= _max_batch(entry, weight)):
            return entry
    return None


def quant_parts(weight: SparseWeight) -> tuple[torch.Tensor | None, int]:
    """``(scales, group_size)`` of a quantized weight (int8/int4 values), ``(None, 0)`` for float values."""
    if getattr(weight, "bits", None) is None:
        return None, 0
    return weight.scales, int(weight.group_size)


def _expand_kind(weight: SparseWeight) -> str:
    bits = getattr(weight, "bits", None)
    return "expand" if bits is None else f"expand-int{bits}"


# ---- CPU kernels (the C++ ops); a CUDA branch registers its own entries.

def _cpu_bitmask(x, w):
    scales, group_size = quant_parts(w)
    return torch.ops.sparsekit.bitmask_linear(x, w.bitmask, w.values, w.row_offsets, w.shape[1], scales,
                                              group_size)


def _cpu_nm(x, w):
    scales, group_size = quant_parts(w)
    return torch.ops.sparsekit.nm_linear(x, w.bitmask, w.values, w.shape[1], scales, group_size)


def _cpu_csr(x, w):
    return torch.ops.sparsekit.csr_linear(x, w.indptr, w.indices, w.values, w.shape[1])


register_kernel("bitmask", "cpu", KernelEntry(
    "cpu-bitmask", _cpu_bitmask, lambda s, w=None: dispatch.max_batch(_expand_kind(w), s), bits=(None, 8, 4)))
register_kernel("nm", "cpu", KernelEntry(
    "cpu-nm", _cpu_nm, lambda s, w=None: dispatch.max_batch(_expand_kind(w), s), bits=(None, 8, 4)))
register_kernel("csr", "cpu", KernelEntry(
    "cpu-csr", _cpu_csr, lambda s, w=None: dispatch.max_batch("csr", s)))


def dense_weight(weight: SparseWeight) -> torch.Tensor:
    """Decompressed ``[out, in]`` weight: the values' dtype, fp32 for quantized values (dequantized)."""
    scales, group_size = quant_parts(weight)
    if isinstance(weight, (BitmaskWeight, NMWeight)):
        offsets = weight.row_offsets if isinstance(weight, BitmaskWeight) else None
        if scales is not None:
            return reference.bitmask_dense(weight.bitmask, weight.values, offsets, weight.shape[1], scales,
                                           group_size)
        if weight.device.type == "cpu":
            return torch.ops.sparsekit.bitmask_to_dense(weight.bitmask, weight.values, offsets,
                                                        weight.shape[1])
    return weight.to_dense()


def check_input(x, in_features: int) -> None:
    """``x`` must be a floating tensor ``[..., in_features]`` (``nn.Linear`` refuses integer inputs too)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (float32, bfloat16, float16 or float64), got dtype "
                        f"{x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., in_features={in_features}], got {tuple(x.shape)}")


class SparseLinear(nn.Module):
    """A Linear layer holding a compressed weight (bitmask, N:M or CSR) and an optional dense bias.

    The format's parts are buffers named ``weight_<part>`` (so ``state_dict`` keeps the mask, and
    ``.to(device)`` moves them); ``bias`` is a frozen parameter as in ``nn.Linear``.
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, SparseWeight):
            raise TypeError(f"weight must be a SparseWeight (BitmaskWeight, NMWeight, CSRWeight), got "
                            f"{type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        self._extra = weight.extra()
        for part, tensor in weight.tensors().items():
            self.register_buffer(f"weight_{part}", tensor)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got "
                                 f"{tuple(getattr(bias, 'shape', ()))}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "auto", dtype: torch.dtype | None = None,
                    nm=None) -> SparseLinear:
        """Compress ``linear.weight`` (its zeros are the mask); ``dtype`` casts the values (default: kept).

        ``linear``: an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2; ``y = x W + b`` with ``W``
        stored ``[in, out]``), compressed as its ``[out, in]`` transpose so that the output is the same.
        """
        if not is_linear(linear):
            raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got "
                            f"{type(linear).__name__}")
        W = weight_out_in(linear).detach().contiguous()
        mask = W != 0
        if format == "auto":
            format, nm = choose_format(mask)
        if format == "bitmask":
            weight = BitmaskWeight.from_dense(W, dtype=dtype)
        elif format == "nm":
            weight = NMWeight.from_dense(W, nm=nm if nm is not None else (2, 4), dtype=dtype)
        elif format == "csr":
            weight = CSRWeight.from_dense(W, dtype=dtype)
        else:
            raise ValueError(f"format must be 'auto', 'bitmask', 'nm' or 'csr', got {format!r}")
        return cls(weight, linear.bias)

    @property
    def weight_sparse(self) -> SparseWeight:
        """The compressed weight viewing this module's buffers (rebuilt when a buffer is replaced)."""
        tensors = {part: self._buffers[f"weight_{part}"]
                   for part in FORMATS[self.format].part_names(self._extra)}
        key = tuple(id(t) for t in tensors.values())
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            shape = (self.out_features, self.in_features)
            weight = FORMATS[self.format].from_parts(shape, tensors, self._extra, validate=False)
            cached = self.__dict__["_weight_cache"] = (key, weight)
        return cached[1]

    @property
    def sparsity(self) -> float:
        return self.weight_sparse.sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        weight = self.weight_sparse
        x2 = x.reshape(-1, self.in_features).contiguous()
        kernel = select_kernel(weight, x2.device.type, x2.dtype, x2.shape[0])
        if kernel is not None and x2.requires_grad and torch.is_grad_enabled():
            kernel = None  # the kernels have no backward: the dense path keeps gradients flowing to x
        if kernel is not None:
            y = kernel.run(x2, weight)
        else:
            y = F.linear(x2, dense_weight(weight).to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (zeros where the mask is False)."""
        weight = self.weight_sparse
        dense = weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dense.dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The non-zero count may differ from this module's: adopt the incoming parts, then validate.
        for part in FORMATS[self.format].part_names(self._extra):
            key = f"{prefix}weight_{part}"
            if key in state_dict:
                self._buffers[f"weight_{part}"] = state_dict[key].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            self.weight_sparse.validate()
        except ValueError as error:
            error_msgs.append(f"{prefix}: the loaded {self.format} weight is malformed: {error}")

    def extra_repr(self) -> str:
        weight = self.weight_sparse
        nm = f", nm={self._extra['n']}:{self._extra['m']}" if self.format == "nm" else ""
        if weight.bits is not None:
            nm += f", bits={weight.bits}, group_size={weight.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}{nm}, dtype={weight.dtype}, "
                f"sparsity={weight.sparsity:.3f}")


def choose_format(mask: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """``("nm", (n, m))`` when the mask is a (full) N:M pattern of :data:`NM_PATTERNS`, else ``("csr", None)``
    at sparsity >= :data:`CSR_MIN_SPARSITY`, else ``("bitmask", None)``."""
    rows, cols = mask.shape
    kept = int(mask.sum())
    for n, m in NM_PATTERNS:
        if cols % m or kept < 0.99 * rows * cols * n / m:
            continue  # an N:M layout would store many explicit zeros
        if bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all()):
            return "nm", (n, m)
    sparsity = 1.0 - kept / mask.numel() if mask.numel() else 0.0
    return ("csr", None) if sparsity >= CSR_MIN_SPARSITY else ("bitmask", None)


def sparsify_linears(model: nn.Module, format: str = "auto", min_sparsity: float = 0.3,
                     targets: Iterable[str] | None = None, dtype: torch.dtype | None = None, nm=None):
    """Replace, in place, every prunable linear layer at least ``min_sparsity`` sparse by a SparseLinear.

    Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family): a Conv1D becomes a
    SparseLinear of its transposed ``[out, in]`` weight, with the same output. A model without linear
    layers in transformer blocks raises ``ValueError`` (naming its class and layer types); when layers are
    found but none is sparse enough to replace, a ``UserWarning`` names the model, the layers and their
    largest sparsity (a dense model is valid input, but "0 layers replaced" is never silent).

    ``format``: ``"auto"`` (:func:`choose_format` per layer), ``"bitmask"``, ``"nm"`` (``nm=(n, m)``,
    default: detected) or ``"csr"``; ``dtype`` casts the stored values (e.g. ``torch.bfloat16``).
    ``targets`` as in :func:`sparsekit.blocks.prunable_linears` (one name may be a plain string). Every
    layer is compressed before any is swapped, so an error (which names the layer) leaves the model as it
    was. Returns a ``pandas.DataFrame`` with one
    row per layer: ``layer``, ``sparsity``, ``format``, ``nbytes``, ``dense_nbytes`` (at the dense
    layer's dtype), ``replaced``.
    """
    import pandas as pd

    if format not in ("auto", "bitmask", "nm", "csr"):
        raise ValueError(f"format must be 'auto', 'bitmask', 'nm' or 'csr', got {format!r}")
    min_sparsity = _validate.real(min_sparsity, "min_sparsity", low=0.0, high=1.0)
    if isinstance(targets, str):
        targets = [targets]  # one layer name, not its letters
    rows, swaps = [], []
    for name, linear in prunable_linears(model, targets):
        W = weight_out_in(linear).detach()
        sparsity = float((W == 0).sum()) / W.numel() if W.numel() else 0.0
        row = {"layer": name, "sparsity": sparsity, "format": "dense",
               "nbytes": W.numel() * W.element_size(), "dense_nbytes": W.numel() * W.element_size(),
               "replaced": False}
        if sparsity >= min_sparsity and sparsity > 0:
            try:  # every layer is compressed before any is swapped: a failure leaves the model unchanged
                sparse, label = _compress(linear, format, nm, dtype)
            except (ValueError, TypeError) as error:
                raise type(error)(f"sparsify_linears: layer {name!r} cannot be stored as format={format!r}"
                                  f"{f', nm={nm!r}' if nm is not None else ''}: {error}") from error
            swaps.append((name, sparse))
            row.update(format=label, nbytes=sparse.weight_sparse.nbytes, replaced=True)
        rows.append(row)
    if not swaps:
        _warn_nothing_replaced(model, rows, min_sparsity)
    modules = dict(model.named_modules())
    for name, sparse in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, sparse)
    return pd.DataFrame(rows, columns=["layer", "sparsity", "format", "nbytes", "dense_nbytes", "replaced"])


def _warn_nothing_replaced(model: nn.Module, rows: list[dict], min_sparsity: float) -> None:
    import warnings

    densest = max((row["sparsity"] for row in rows), default=0.0)
    warnings.warn(f"sparsify_linears replaced no layer of {type(model).__name__}: none of its {len(rows)} "
                  f"linear layers is at least min_sparsity={min_sparsity:g} sparse (the sparsest is "
                  f"{densest:.3f}; layer types: {layer_types(model)}); prune the model first, or lower "
                  "min_sparsity", UserWarning, stacklevel=3)


def _compress(linear: nn.Module, format: str, nm, dtype) -> tuple[SparseLinear, str]:
    W = weight_out_in(linear).detach()
    layer_format, layer_nm = choose_format(W != 0) if format == "auto" else (format, nm)
    if layer_format == "nm" and layer_nm is None:
        layer_format, layer_nm = choose_format(W != 0)
        if layer_format != "nm":
            raise ValueError("its mask is not N:M sparse for any of the patterns "
                             f"{[f'{n}:{m}' for n, m in NM_PATTERNS]}; pass nm=(n, m) or another format")
    sparse = SparseLinear.from_linear(linear, format=layer_format, dtype=dtype, nm=layer_nm)
    return sparse, sparse.format if sparse.format != "nm" else f"nm {layer_nm[0]}:{layer_nm[1]}"


def densify_linears(model: nn.Module) -> int:
    """Replace every SparseLinear of ``model`` by its dense ``nn.Linear``; returns how many."""
    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    modules = dict(model.named_modules())
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, module.to_linear())
    return len(swaps)


def sparse_weights(model: nn.Module) -> dict:
    """``{"<layer>.weight": SparseWeight, "<layer>.bias": Tensor}`` of each SparseLinear (for save_sparse)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            out[f"{name}.weight"] = module.weight_sparse
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach()
    return out


# --- CUDA: the Triton kernels (sparsekit.kernels.triton_*), imported on first use so that CPU-only use
# never imports Triton.
def cuda_max_batch(sparsity: float) -> int:
    """Bitmask / N:M on CUDA: decoding batches (the memory-bound regime the kernels are written for).

    Not yet measured here (``kernels/gpu_check.sh`` records the kernels against cuBLAS per batch): at
    batch > 16 the dense fp16/bf16 ``F.linear`` (cuBLAS) runs instead.
    """
    return 16 if sparsity >= 0.5 else 0


def _triton_linear(x: torch.Tensor, weight: SparseWeight) -> torch.Tensor:
    from sparsekit.kernels.triton_dispatch import triton_linear

    return triton_linear(x, weight)


for _format in ("bitmask", "nm"):
    register_kernel(_format, "cuda", KernelEntry(f"triton-{_format}", _triton_linear, cuda_max_batch,
                                                 (torch.float16, torch.bfloat16), bits=(None, 8, 4)))
