"""What every compressed weight format shares: named parts, validation, dense round trip, bytes.

A format stores a 2-D weight ``W [rows, cols]`` (``rows`` = out features, ``cols`` = in features) as a
few tensors ("parts"). ``to_dense()`` is exact: ``from_dense(W).to_dense() == W`` when the values dtype
is W's dtype, and the kept positions (the mask) survive every conversion. Value dtypes are fp32, bf16 and
fp16. The bitmask and N:M formats can also hold int8/int4 codes with group scales (``bits`` set, one more
part ``scales``: :mod:`sparsekit.formats.quantized`); ``part_names(extra)`` lists an instance's parts.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsekit import _validate

__all__ = ["SparseWeight", "FORMATS", "register_format", "VALUE_DTYPES", "check_values_dtype", "pack_bits",
           "unpack_bits", "dense_mask"]

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMATS: dict[str, type[SparseWeight]] = {}


def register_format(cls: type[SparseWeight]) -> type[SparseWeight]:
    """Class decorator: make ``cls`` loadable by its ``format`` tag."""
    FORMATS[cls.format] = cls
    return cls


def check_values_dtype(dtype: torch.dtype, allowed=VALUE_DTYPES, name: str = "dtype") -> torch.dtype:
    if dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {dtype}")
    return dtype


def check_weight(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    """``W`` must be a 2-D floating tensor (any layout) with at least one row and one column; detached."""
    W = _validate.tensor(W, name, dim=2, floating=True, what="a 2-D tensor [rows, cols]").detach()
    if 0 in W.shape:
        raise ValueError(f"{name} must have rows >= 1 (out_features) and cols >= 1 (in_features), got shape "
                         f"{tuple(W.shape)}")
    return W


def dense_mask(W: torch.Tensor, mask: torch.Tensor | None, name: str = "mask") -> torch.Tensor:
    """The kept positions: ``mask`` if given (bool, W's shape, no non-zero outside it), else ``W != 0``."""
    if mask is None:
        return W != 0
    _validate.tensor(mask, name, what=f"a bool tensor of shape {tuple(W.shape)} (True = kept) or None")
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(W.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    mask = mask.to(W.device)
    outside = int(((W != 0) & ~mask).sum())
    if outside:
        raise ValueError(f"{name} drops {outside} non-zero weight(s): every non-zero of W must be kept")
    return mask


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` bool -> ``[rows, ceil(cols/8)]`` uint8, bit ``t`` of byte ``j`` = column ``8j+t``.

    The layout of ``numpy.packbits(mask, axis=-1, bitorder="little")``.
    """
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[rows, ceil(cols/8)]`` uint8 -> ``[rows, cols]`` bool."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :cols].bool()


class SparseWeight:
    """Base class of compressed weights. Subclasses define ``format``, ``parts`` and the methods below."""

    format: ClassVar[str] = ""
    version: ClassVar[int] = 1
    parts: ClassVar[tuple[str, ...]] = ()

    shape: tuple[int, int]
    bits: int | None = None  # 8 or 4 when the values are quantized codes (bitmask, N:M)
    group_size: int | None = None

    # --- to be defined by every format
    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        """The kept positions, ``[rows, cols]`` bool."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` unless the parts describe a well-formed weight of ``self.shape``."""
        raise NotImplementedError

    @classmethod
    def from_parts(cls, shape, tensors: dict[str, torch.Tensor], extra: dict | None = None,
                   validate: bool = True) -> SparseWeight:
        raise NotImplementedError

    def extra(self) -> dict:
        """Scalars beyond the shape that ``from_parts`` needs (e.g. ``n``, ``m``)."""
        return {}

    @classmethod
    def part_names(cls, extra: dict | None = None) -> tuple[str, ...]:
        """The parts of a weight with these ``extra`` scalars (a quantized weight adds ``scales``)."""
        return cls.parts

    # --- shared
    def tensors(self) -> dict[str, torch.Tensor]:
        return {part: getattr(self, part) for part in self.part_names(self.extra())}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored non-zero values."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of all parts (what a kernel streams from memory and what the file holds)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same weight stored dense in the values dtype (quantized: ``bits/8`` per weight)."""
        if self.bits is not None:
            return -(-self.shape[0] * self.shape[1] * self.bits // 8)
        return self.shape[0] * self.shape[1] * self.values.element_size()

    @property
    def nnz(self) -> int:
        """Number of stored values (kept positions)."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / numel if numel else 0.0

    def to(self, device=None, dtype: torch.dtype | None = None) -> SparseWeight:
        """A copy on ``device`` and/or with values cast to ``dtype`` (indices and masks unchanged)."""
        tensors = {k: t.to(device) if device is not None else t for k, t in self.tensors().items()}
        if dtype is not None and self.bits is not None:
            raise ValueError(f"dtype={dtype}: a quantized weight (bits={self.bits}) stores integer codes; "
                             "to_dense() dequantizes it")
        if dtype is not None:
            tensors["values"] = tensors["values"].to(check_values_dtype(dtype))
        return type(self).from_parts(self.shape, tensors, self.extra(), validate=False)

    def __repr__(self) -> str:
        quantized = "" if self.bits is None else f", bits={self.bits}, group_size={self.group_size}"
        return (f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}{quantized}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes})")

    # --- helpers for validation in subclasses
    def _check_part(self, part: str, dtypes, shape=None, dim=None) -> torch.Tensor:
        tensor = getattr(self, part)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.format} part {part!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in dtypes:
            raise ValueError(f"{self.format} part {part!r} must have dtype in {[str(d) for d in dtypes]}, "
                             f"got {tensor.dtype}")
        if dim is not None and tensor.dim() != dim:
            raise ValueError(f"{self.format} part {part!r} must be {dim}-D, got shape {tuple(tensor.shape)}")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.format} part {part!r} must have shape {tuple(shape)} for a weight of "
                             f"shape {self.shape}, got {tuple(tensor.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"{self.format} part {part!r} must be contiguous (call .contiguous())")
        return tensor


def check_shape(shape) -> tuple[int, int]:
    """``(rows, cols)``, both >= 1: an empty weight has nothing to compress (and no kernel takes it)."""
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a pair (rows, cols) of positive ints, got {shape!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be a pair (rows, cols) of positive ints, got {shape!r}")
    rows, cols = (_validate.integer(s, f"shape[{i}]", low=1) for i, s in enumerate(shape))
    return rows, cols
