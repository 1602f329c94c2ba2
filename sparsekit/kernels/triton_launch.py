"""Host side of the Triton kernels: input checks, quantized-value spec, tile configurations, launch.

Configurations come in three regimes chosen by the number of rows ``M`` of x (the batch):

* decode, ``M == 1``: ``BLOCK_M = 1`` (FMA, no tensor cores), narrow ``BLOCK_N`` and split-K, so that a
  single row still spreads over every SM of an H100/H200 (132 SMs) or A100 (108);
* small, ``2 <= M <= 16``: ``BLOCK_M = 16`` with ``tl.dot`` (the smallest tensor-core tile), split-K;
* prefill, ``M > 16``: ``BLOCK_M`` 32-128, ``BLOCK_N`` 64-128, one K-split.

On a GPU ``triton.autotune`` times the configurations of the regime once per (M bucket, N, K, value
type); under Triton's CPU interpreter (``TRITON_INTERPRET=1``) the first one of the regime runs, or the
configuration given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

__all__ = ["Quant", "quant_of", "check_x", "check_quant", "X_DTYPES", "FLOAT_VALUE_DTYPES", "regime_of",
           "configs_for", "prune_by_batch", "is_interpreted", "launch", "M_DECODE", "M_SMALL"]

X_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 values: correct, twice the bytes
QUANT_VALUE_DTYPES = {8: torch.int8, 4: torch.uint8}
M_DECODE, M_SMALL = 1, 16


@dataclass(frozen=True)
class Quant:
    """Quantized values (the shared spec): kept weight ``(r, c)`` = ``q · scales[r, c // group_size]``.

    ``bits`` 8: ``values`` int8, ``q`` in [-127, 127]; ``bits`` 4: ``values`` uint8 with two ``q`` in [-8, 7]
    per byte, low nibble first. ``scales`` float16 ``[rows, cols // group_size]``.
    """

    bits: int
    group_size: int
    scales: torch.Tensor


def quant_of(weight) -> Quant | None:
    """The :class:`Quant` of a format object (``.bits``, ``.group_size``, ``.scales``), ``None`` if float."""
    bits = getattr(weight, "bits", None)
    if bits is None:
        return None
    return Quant(int(bits), int(weight.group_size), weight.scales)


def check_x(x: torch.Tensor, cols: int, device: torch.device) -> torch.Tensor:
    """``x`` must be a ``[M, cols]`` fp16/bf16 tensor on the weight's device; returned contiguous."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [batch, {cols}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"x must have shape [batch, {cols}] (in_features = {cols}), got {tuple(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x must have dtype in {[str(d) for d in X_DTYPES]}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    return x.contiguous()


def check_quant(quant: Quant | None, values: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """Check ``values``' dtype against ``quant`` (and the scales' shape); returns ``(BITS, GROUP_SIZE)``."""
    if quant is None:
        if values.dtype not in FLOAT_VALUE_DTYPES:
            raise ValueError(f"values must have dtype in {[str(d) for d in FLOAT_VALUE_DTYPES]} (or be "
                             f"quantized with bits=8/4 and scales), got {values.dtype}")
        return 16, 1
    if quant.bits not in QUANT_VALUE_DTYPES:
        raise ValueError(f"bits must be 8 or 4 (or None for float values), got {quant.bits!r}")
    if values.dtype != QUANT_VALUE_DTYPES[quant.bits]:
        raise ValueError(f"bits={quant.bits} values must be {QUANT_VALUE_DTYPES[quant.bits]}, got "
                         f"{values.dtype}")
    group = quant.group_size
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or cols % group:
        raise ValueError(f"group_size must be a positive int dividing in_features={cols}, got {group!r}")
    scales = quant.scales
    if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float16
            or tuple(scales.shape) != (rows, cols // group)):
        raise ValueError(f"scales must be float16 of shape {(rows, cols // group)}, got "
                         f"{getattr(scales, 'dtype', type(scales))} {tuple(getattr(scales, 'shape', ()))}")
    if scales.device != values.device or not scales.is_contiguous():
        raise ValueError("scales must be contiguous and on the values' device")
    return quant.bits, group


def regime_of(M: int) -> str:
    return "decode" if M <= M_DECODE else "small" if M <= M_SMALL else "prefill"


def _config(block_m, block_n, split_k, warps, stages, block_k=None) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k}
    if block_k is not None:
        meta["BLOCK_K"] = block_k
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def configs_for(with_block_k: bool) -> list[triton.Config]:
    """All tile configurations (every regime). ``with_block_k``: the N:M kernel tunes ``BLOCK_K`` too; the
    bitmask kernel's ``BLOCK_K`` is its tiling's ``tile_k``."""
    bk_decode, bk_prefill = (128, 64) if with_block_k else (None, None)
    decode = [_config(1, bn, sk, 4, 2, bk_decode) for bn, sk in
              ((16, 8), (32, 2), (32, 4), (64, 1), (64, 2), (64, 4))]
    small = [_config(16, bn, sk, 4, 3, bk_decode) for bn, sk in ((32, 1), (32, 4), (64, 2), (128, 1))]
    prefill = [_config(bm, bn, 1, w, 3, bk_prefill) for bm, bn, w in
               ((32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8))]
    return decode + small + prefill


def _fits(config: triton.Config, M: int) -> bool:
    block_m = config.kwargs["BLOCK_M"]
    regime = regime_of(M)
    if regime == "decode":
        return block_m == 1
    if regime == "small":
        return block_m == M_SMALL
    return block_m > M_SMALL and block_m <= max(32, triton.next_power_of_2(M))


def prune_by_batch(configs, named_args, **kwargs):
    """``early_config_prune`` for ``triton.autotune``: keep the configurations of M's regime."""
    return [c for c in configs if _fits(c, named_args["M"])]


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function) was defined under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def launch(kernel, tuned, args: tuple, meta: dict, M: int, N: int, configs: list[triton.Config],
           config: triton.Config | None) -> None:
    """Run ``kernel`` on the grid (M tiles, N tiles, K splits): autotuned (``tuned``) on a GPU, else with
    ``config`` or the first configuration of M's regime."""
    def grid(m):
        return triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"]

    interpreted = is_interpreted(kernel)
    meta = dict(meta, DOT_FP32=interpreted)
    if config is None and not interpreted:
        tuned[grid](*args, **meta)
        return
    if config is None:
        config = prune_by_batch(configs, {"M": M})[0]
    if not isinstance(config, triton.Config):
        raise TypeError(f"config must be a triton.Config or None, got {type(config).__name__}")
    kwargs = dict(meta, **config.kwargs)
    if not interpreted:
        kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[grid(kwargs)](*args, **kwargs)


def autotuned(kernel, configs: list[triton.Config], key: list[str]) -> Callable:
    """``kernel`` wrapped in ``triton.autotune`` over ``configs`` pruned to the batch regime."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune_by_batch},
                           reset_to_zero=["y_ptr"])(kernel)
