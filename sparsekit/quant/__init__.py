"""Quantization of (sparse) weights to int8/int4: round-to-nearest, GPTQ, and joint with SparseGPT.

``quantize_rtn(W, bits, group_size, symmetric)`` and ``gptq_quantize(W, H, bits, group_size, symmetric,
act_order, blocksize, percdamp)`` return ``(Ŵ, QuantizedWeight)``: the dequantized weight and its integer
codes, per-row group scales and (asymmetric) zero points. Zeros stay exactly zero, so a pruned mask
survives. ``sparsegpt_quantize`` prunes and quantizes jointly (GPTQ inside SparseGPT's loop);
``GroupQuantizer`` is the column-wise quantizer that GPTQ and ``sparsegpt_prune(..., quantizer=...)``
share; ``QuantConfig`` is the recipe of ``prune_model(..., quant=...)``; ``pack_int4``/``unpack_int4``
hold two int4 codes per byte.
"""

from sparsekit.quant.config import QuantConfig, QuantizedLayer, as_quant_config
from sparsekit.quant.gptq import gptq_quantize
from sparsekit.quant.grid import BITS, QuantizedWeight, code_range
from sparsekit.quant.joint import sparsegpt_quantize
from sparsekit.quant.packing import pack_int4, unpack_int4
from sparsekit.quant.quantizer import GroupQuantizer
from sparsekit.quant.rtn import quantize_rtn

__all__ = ["quantize_rtn", "gptq_quantize", "sparsegpt_quantize", "QuantConfig", "QuantizedLayer",
           "as_quant_config", "QuantizedWeight", "GroupQuantizer", "BITS", "code_range", "pack_int4",
           "unpack_int4"]
