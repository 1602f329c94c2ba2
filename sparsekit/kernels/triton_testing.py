"""Reference inputs and checks for the Triton kernels (tests, ``kernels/gpu_check.py``, notebook 07).

:func:`check_kernels` runs every kernel variant (:func:`correctness_variants`) on random pruned weights
against ``F.linear`` on the dense weight. :func:`quantize_sparse` packs a pruned weight into the shared
quantized-value spec by round to nearest (symmetric, one float16 scale per group of ``group_size`` inputs
of a row) and returns the raw parts with their exact dense meaning, so that the kernels can be checked
without any other quantizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparsekit.formats import BitmaskWeight, NMWeight
from sparsekit.kernels.triton_bitmask import BitmaskTiles, bitmask_matmul
from sparsekit.kernels.triton_nm import nm_linear
from sparsekit.prune import magnitude_prune

__all__ = ["QuantizedSparse", "quantize_sparse", "pack_nibbles", "random_sparse", "QMAX", "Variant",
           "correctness_variants", "KernelCase", "check_kernels", "rel_err", "tolerance", "make_x",
           "compile_for_gpu"]

QMAX = {8: 127, 4: 7}  # int4 q is in [-8, 7]; symmetric scaling uses [-7, 7]


@dataclass
class QuantizedSparse:
    """Raw parts of a quantized bitmask or N:M weight; the attribute names of the shared spec."""

    format: str                # "bitmask" or "nm"
    shape: tuple[int, int]
    bitmask: torch.Tensor
    values: torch.Tensor       # int8, or uint8 nibble pairs (low nibble first)
    bits: int
    group_size: int
    scales: torch.Tensor       # float16 [rows, cols // group_size]
    row_offsets: torch.Tensor | None = None  # bitmask only
    n: int | None = None       # N:M only
    m: int | None = None

    def to_dense(self) -> torch.Tensor:
        """``W[r, c] = q · scales[r, c // group_size]`` at kept positions, 0 elsewhere (fp32)."""
        rows, cols = self.shape
        mask = _unpack_mask(self.bitmask, cols)
        q = self.values
        if self.bits == 4:
            q = _unpack_nibbles(q.reshape(-1) if self.format == "bitmask" else q)
        if self.format == "bitmask":
            kept = q.reshape(-1)[: int(mask.sum())]
        else:
            kept = q.reshape(rows, -1)[:, : cols * self.n // self.m].reshape(-1)
        dense = torch.zeros(rows, cols, device=self.values.device)
        dense[mask] = kept.float()
        return dense * self.scales.float().repeat_interleave(self.group_size, dim=1)


def _unpack_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :cols].bool()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Int ``q [..., L]`` in [-8, 7] -> uint8 ``[..., ceil(L/2)]``, ``q[2i]`` in byte i's low nibble."""
    if q.shape[-1] % 2:
        q = torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1)
    u = (q.to(torch.int16) & 15).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 15).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(q >= 8, q - 16, q)


def quantize_sparse(W: torch.Tensor, format: str, bits: int, group_size: int, nm=None) -> QuantizedSparse:
    """Round ``W``'s non-zeros to ``bits``-bit integers with a per-group float16 scale ``max|w| / QMAX``."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    rows, cols = W.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"group_size must divide in_features={cols}, got {group_size!r}")
    groups = W.float().reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(-1) / QMAX[bits]).clamp_min(1e-8).to(torch.float16)
    q = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-QMAX[bits], QMAX[bits]).reshape(rows, cols)
    if format == "bitmask":
        w = BitmaskWeight.from_dense(W)
        kept = q[w.mask()].to(torch.int8)
        values = pack_nibbles(kept) if bits == 4 else kept.contiguous()
        return QuantizedSparse("bitmask", (rows, cols), w.bitmask, values, bits, group_size,
                               scales.contiguous(), row_offsets=w.row_offsets)
    if format == "nm":
        w = NMWeight.from_dense(W, nm=nm)
        kept = q[w.mask()].to(torch.int8).reshape(rows, -1)
        values = pack_nibbles(kept) if bits == 4 else kept.contiguous()
        return QuantizedSparse("nm", (rows, cols), w.bitmask, values, bits, group_size, scales.contiguous(),
                               n=w.n, m=w.m)
    raise ValueError(f"format must be 'bitmask' or 'nm', got {format!r}")


def random_sparse(rows: int, cols: int, sparsity: float = 0.0, nm=None, dtype=torch.float16, device="cpu",
                  seed: int = 0) -> torch.Tensor:
    """A Gaussian ``[rows, cols]`` weight (std ``cols**-0.5``) magnitude-pruned to ``sparsity`` or ``nm``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator, device=device) / cols ** 0.5
    if nm is not None or sparsity > 0:
        W, _ = magnitude_prune(W, 1 - nm[0] / nm[1] if nm is not None else sparsity, nm=nm)
    return W.to(dtype)


@dataclass
class Variant:
    """One kernel variant to check: format, pattern, x dtype and value bits."""

    name: str
    format: str                    # "bitmask" | "nm"
    sparsity: float = 0.0          # unstructured (bitmask)
    nm: tuple[int, int] | None = None
    dtype: str = "float16"         # x (and float values) dtype
    bits: int | None = None        # None (fp16/bf16 values), 8 or 4

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"


def correctness_variants() -> list[Variant]:
    """Every kernel: bitmask and N:M (2:4, 4:8, 16:32) with fp16, bf16, int8 and int4 values."""
    return [Variant("bitmask-fp16", "bitmask", 0.7),
            Variant("bitmask-bf16", "bitmask", 0.7, dtype="bfloat16"),
            Variant("bitmask-int8", "bitmask", 0.7, bits=8), Variant("bitmask-int4", "bitmask", 0.7, bits=4),
            Variant("nm2:4-fp16", "nm", nm=(2, 4)), Variant("nm2:4-bf16", "nm", nm=(2, 4), dtype="bfloat16"),
            Variant("nm4:8-fp16", "nm", nm=(4, 8)), Variant("nm16:32-fp16", "nm", nm=(16, 32)),
            Variant("nm2:4-int8", "nm", nm=(2, 4), bits=8), Variant("nm2:4-int4", "nm", nm=(2, 4), bits=4)]


class KernelCase:
    """One variant on a random pruned weight: ``case(x)`` runs the kernel; ``reference`` is the dense
    (dequantized) fp32 weight; ``nbytes`` what the kernel streams; ``copies(n)`` fresh weight copies.
    Quantized values use ``group_size`` inputs per scale where it divides ``cols``, else one scale per row."""

    def __init__(self, variant: Variant, rows: int, cols: int, device="cpu", seed: int = 0,
                 group_size: int = 128):
        self.variant, self.shape = variant, (rows, cols)
        self.dtype = getattr(torch, variant.dtype)
        W = random_sparse(rows, cols, variant.sparsity, nm=variant.nm, dtype=torch.float32, device=device,
                          seed=seed)
        if variant.bits is not None:
            group_size = group_size if cols % group_size == 0 else cols  # else one scale per row
            weight = quantize_sparse(W, variant.format, variant.bits, group_size, nm=variant.nm)
            self.reference = weight.to_dense()
        else:
            W = W.to(self.dtype)
            weight = BitmaskWeight.from_dense(W) if variant.format == "bitmask" else NMWeight.from_dense(
                W, variant.nm)
            self.reference = W.float()
        self.weight = BitmaskTiles.from_weight(weight) if variant.format == "bitmask" else weight
        self.nbytes = sum(t.numel() * t.element_size() for t in _tensors(self.weight))

    def __call__(self, x: torch.Tensor, weight=None, config=None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if self.variant.format == "bitmask":
            return bitmask_matmul(x, weight, config=config)
        return nm_linear(x, weight, config=config)

    def copies(self, count: int) -> list:
        return [self.weight] + [_clone(self.weight) for _ in range(count - 1)]


def check_kernels(shapes, batches, device="cpu", variants=None) -> list[dict]:
    """Each variant on each ``(rows, cols)`` shape and batch against ``F.linear`` on the dense weight (fp32).

    Rows: ``kernel``, ``shape``, ``batch``, ``max_rel_err`` (max |y - y_ref| / max |y_ref|), ``tol``, ``ok``.
    """
    rows_out = []
    for rows, cols in shapes:
        for variant in variants or correctness_variants():
            case = KernelCase(variant, rows, cols, device)
            for batch in batches:
                x = make_x(batch, cols, case.dtype, device)
                err = rel_err(case(x), torch.nn.functional.linear(x.float(), case.reference))
                tol = tolerance(case.dtype)
                rows_out.append({"kernel": variant.name, "shape": f"{rows}x{cols}", "batch": batch,
                                 "max_rel_err": err, "tol": tol, "ok": err <= tol})
    return rows_out


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors of a weight object (dataclass fields or attributes; nested dataclasses too)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = ([getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj)
              else list(vars(obj).values()))
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif dataclasses.is_dataclass(value):
            found += _tensors(value)
    return found


def _clone(obj):
    """A copy of a weight object with every tensor cloned (new memory, same values)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj):
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        changed = {name: _clone(value) for name, value in values.items()
                   if isinstance(value, torch.Tensor) or dataclasses.is_dataclass(value)}
        return dataclasses.replace(obj, **changed)
    copy = object.__new__(type(obj))
    copy.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()
                          if not k.startswith("_")})  # not the cached tiling
    return copy


def rel_err(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |y - reference| / max |reference|``."""
    return float((y.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a kernel's output in ``dtype`` (fp32 accumulation, output rounded once)."""
    return 1e-2 if dtype == torch.float16 else 2e-2


def make_x(batch: int, cols: int, dtype: torch.dtype, device="cpu", seed: int = 1) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, cols, generator=generator, device=device).to(dtype)


def compile_for_gpu(kernel: str, capability: int, config, x_dtype: str = "fp16", bits: int = 16,
                    nm: tuple[int, int] = (2, 4), group_size: int = 128):
    """Compile a kernel ahead of time for an NVIDIA GPU of compute ``capability`` (80 Ampere, 90 Hopper) on a
    machine without one: Triton's front end, LLVM and ptxas, as on the GPU (not under the interpreter).

    ``kernel``: ``"bitmask"`` or ``"nm"``; ``config``: a ``triton.Config`` of that kernel's ``CONFIGS`` (the
    bitmask kernel compiles with ``BLOCK_K`` = 128, its default tile). Returns the compiled kernel.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsekit.kernels import triton_bitmask, triton_nm

    fn = {"bitmask": triton_bitmask._bitmask_kernel, "nm": triton_nm._nm_kernel}[kernel]
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): compile in another process")
    constants = dict(config.kwargs, BITS=bits, GROUP_SIZE=group_size if bits < 16 else 1, DOT_FP32=False)
    constants.update({"BLOCK_K": 128} if kernel == "bitmask" else {"N_KEEP": nm[0], "M_GROUP": nm[1]})
    values = {16: x_dtype, 8: "i8", 4: "u8"}[bits]
    pointers = {"x_ptr": f"*{x_dtype}", "bits_ptr": "*u8", "values_ptr": f"*{values}", "offsets_ptr": "*i32",
                "scales_ptr": "*fp16" if bits < 16 else f"*{values}", "y_ptr": "*fp32"}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
