"""``QuantConfig``: how ``prune_model(..., quant=...)`` quantizes each pruned layer.

* ``method="gptq"`` with SparseGPT: **joint** — SparseGPT's column loop quantizes each column right after
  masking it, so the inverse-Hessian update compensates the pruning and the rounding error together
  (the SparseGPT paper, §3.4; :func:`sparsekit.quant.joint.sparsegpt_quantize`);
  ``joint=False`` prunes first, then runs GPTQ on the pruned weight;
* ``method="gptq"`` with Wanda or magnitude: prune, then GPTQ on the pruned weight (its zeros kept);
* ``method="rtn"``: prune, then round to nearest.

Every layer's grid is symmetric or asymmetric, ``bits`` 8 or 4, ``group_size`` inputs per scale
(``None``: per-channel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from sparsekit.quant.gptq import gptq_quantize
from sparsekit.quant.grid import QuantizedWeight, check_bits, check_group_size
from sparsekit.quant.joint import sparsegpt_quantize
from sparsekit.quant.rtn import check_symmetric, quantize_rtn

__all__ = ["QuantConfig", "QuantizedLayer", "as_quant_config", "QUANT_METHODS"]

QUANT_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantConfig:
    """``bits`` (8 | 4), ``group_size`` (None = per-channel), ``symmetric``, ``method`` ("gptq" | "rtn"),
    ``act_order`` (GPTQ after pruning only: the joint SparseGPT loop visits inputs in order), ``joint``
    (GPTQ inside SparseGPT's loop, or after it)."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    method: str = "gptq"
    act_order: bool = False
    joint: bool = True

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size is not None:
            check_group_size(self.group_size, self.group_size)  # a positive int
        check_symmetric(self.symmetric)
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quant method must be one of {QUANT_METHODS}, got {self.method!r}")
        for flag in ("act_order", "joint"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")

    @property
    def label(self) -> str:
        """E.g. ``"int4 g128 GPTQ"``, ``"int8 RTN"``."""
        group = f" g{self.group_size}" if self.group_size else ""
        return f"int{self.bits}{group} {self.method.upper()}{'' if self.symmetric else ' asym'}"

    def is_joint(self, method: str) -> bool:
        """Whether pruning with ``method`` quantizes inside its own loop (SparseGPT with GPTQ, joint)."""
        return method == "sparsegpt" and self.method == "gptq" and self.joint

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` for an option that pruning ``method`` cannot honour."""
        if self.act_order and self.is_joint(method):
            raise ValueError("quant act_order=True cannot run jointly with SparseGPT (its column loop visits "
                             "the inputs in order); use act_order=False, joint=False or method='rtn'")

    def to_dict(self) -> dict:
        return asdict(self)

    def check_layer(self, in_features: int, name: str) -> None:
        """Raise ``ValueError`` naming the layer when ``group_size`` does not divide its inputs."""
        if self.group_size is not None and in_features % self.group_size:
            raise ValueError(f"quant group_size={self.group_size} must divide in_features={in_features} of "
                             f"layer {name!r}")

    def prune_jointly(self, W: torch.Tensor, H: torch.Tensor, sparsity: float, nm, blocksize: int,
                      percdamp: float, name: str) -> tuple[torch.Tensor, torch.Tensor, QuantizedLayer]:
        """SparseGPT with this grid quantized inside its loop (:mod:`sparsekit.quant.joint`)."""
        self.check_method("sparsegpt")
        W_hat, mask, quantized = sparsegpt_quantize(W, H, sparsity, nm, self.bits, self.group_size,
                                                    self.symmetric, blocksize, percdamp, name)
        return W_hat, mask, QuantizedLayer(quantized, mask)

    @property
    def needs_statistics(self) -> bool:
        """GPTQ reads the layer's ``H``; RTN needs no data."""
        return self.method == "gptq"

    def quantize_pruned(self, W: torch.Tensor, H: torch.Tensor | None, blocksize: int = 128,
                        percdamp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, QuantizedWeight]:
        """Quantize an already pruned ``W [out, in]`` (its zeros stay zero) by ``self.method``."""
        if self.method == "rtn":
            return quantize_rtn(W, self.bits, self.group_size, self.symmetric)
        if H is None:
            raise ValueError(f"quant method 'gptq' needs calibration statistics for layer {name!r}; pass "
                             "calib_batches or use method='rtn'")
        return gptq_quantize(W, H, self.bits, self.group_size, self.symmetric, self.act_order, blocksize,
                             percdamp, name=name)

    def finish(self, W: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, H: torch.Tensor | None,
               blocksize: int = 128, percdamp: float = 0.01,
               name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, QuantizedLayer]:
        """A pruning solver's result quantized now by :meth:`quantize_pruned` (its mask kept):
        ``(Ŵ in W's dtype, mask, QuantizedLayer)``."""
        _, quantized = self.quantize_pruned(pruned * mask, H, blocksize, percdamp, name=name)
        return quantized.dequantize().to(W.dtype), mask, QuantizedLayer(quantized, mask)


@dataclass(eq=False)
class QuantizedLayer:
    """A pruned and quantized layer: its grid (``quantized``) and its keep-mask ``[out, in]`` (a kept
    weight may have code 0; the mask still keeps it)."""

    quantized: QuantizedWeight
    mask: torch.Tensor

    def compress(self, format: str = "bitmask", nm=None):
        """The layer as a quantized ``BitmaskWeight`` or (``format="nm"``, ``nm=(n, m)``) ``NMWeight``."""
        from sparsekit.formats import BitmaskWeight, NMWeight

        if format == "bitmask":
            return BitmaskWeight.from_quantized(self.quantized, self.mask)
        if format == "nm":
            return NMWeight.from_quantized(self.quantized, nm if nm is not None else (2, 4), self.mask)
        raise ValueError(f"format must be 'bitmask' or 'nm' for a quantized layer, got {format!r}")


def as_quant_config(quant) -> QuantConfig | None:
    """``None``, a :class:`QuantConfig`, or a dict of its fields (e.g. ``{"bits": 4, "group_size": 128}``)."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, dict):
        unknown = sorted(set(quant) - {f.name for f in fields(QuantConfig)})
        if unknown:
            allowed = [f.name for f in fields(QuantConfig)]
            raise ValueError(f"quant has unknown keys {unknown}; allowed: {allowed}")
        return QuantConfig(**quant)
    raise TypeError(f"quant must be None, a QuantConfig or a dict like {{'bits': 4, 'group_size': 128}}, "
                    f"got {type(quant).__name__} {quant!r}")
