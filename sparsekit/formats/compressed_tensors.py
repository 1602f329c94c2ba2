"""Export to the compressed-tensors format (the checkpoint format of llm-compressor and vLLM).

:func:`save_compressed` writes a Hugging Face model folder (``config.json`` + safetensors) that
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads through its compressed-tensors
integration. A pruned model keeps its zeros as exact zeros in the stored tensors; a pruned and
quantized model stores every quantized Linear as compressed-tensors codes and scales, produced by the
library's own compressors (``pack-quantized``: codes packed into int32; ``naive-quantized``: one int8 per
code) and described in ``config.json["quantization_config"]`` by the library's own config objects.

sparsekit's grid maps onto a compressed-tensors ``QuantizationArgs(type="int", num_bits=b)``:

* symmetric: codes ``q ∈ [−Q, Q]`` with ``Q = 2^(b−1) − 1`` lie inside the format's ``[−2^(b−1), Q]``;
  ``ŵ = q · s``, no zero point;
* asymmetric: sparsekit's codes ``q ∈ [0, 2^b − 1]`` and zero points ``z`` are shifted by ``2^(b−1)``
  into the format's signed range, ``q' = q − 2^(b−1)``, ``z' = z − 2^(b−1)``, so
  ``ŵ = (q' − z') · s = (q − z) · s``;
* ``group_size`` = the layer's inputs (per-channel) → ``strategy="channel"``, scales ``[out, 1]``;
  otherwise ``strategy="group"``, scales ``[out, in / group_size]``;
* scales are stored in the weights' dtype. sparsekit's scales are float16 values, exact in float32 and
  float16; a bfloat16 model is refused (its scales would be rounded, so the weights that load would
  not be the ones sparsekit computed).

Since a pruned weight's code is the grid's zero (``q = 0``, resp. ``q = z``), it dequantizes to exactly 0:
the sparsity survives quantized export. Every layer's codes are checked after compression: decompressing
them must give back the model's weight bit for bit.

What the installed libraries (compressed-tensors 0.20, transformers 5.24) cannot load, and is refused by
name rather than written:

* the sparse formats ``sparse-bitmask``, ``sparse-24-bitmask`` and ``marlin-24``: compressed-tensors
  removed sparse compression and transformers dropped it from its integration (a folder in the old
  sparse-bitmask layout loads with those layers freshly initialised, reported only as missing keys);
  a pruned model is stored with its zeros in place instead;
* asymmetric ``pack-quantized``: its packed zero points do not fit the shape that the loader allocates
  (``naive-quantized`` stores them unpacked and loads);
* quantized ``Conv1D`` layers (the format quantizes ``nn.Linear`` only) and bfloat16 quantized weights
  (above).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sparsekit.blocks import prunable_linears
from sparsekit.fileio import check_writable_parent, staged_directory, verify_manifest
from sparsekit.quant.config import QuantizedLayer, as_quant_config
from sparsekit.quant.grid import QuantizedWeight
from sparsekit.quant.rtn import quantize_rtn

__all__ = ["save_compressed", "load_compressed", "CT_FORMATS", "UNSUPPORTED_CT_FORMATS"]

QUANTIZED_FORMATS = ("pack-quantized", "naive-quantized")
CT_FORMATS = ("dense",) + QUANTIZED_FORMATS
UNSUPPORTED_CT_FORMATS = {
    "sparse-bitmask": "compressed-tensors 0.20 has no sparse compressor (sparse compression was removed from "
                      "the library, and transformers' integration no longer reads a sparsity_config)",
    "sparse-24-bitmask": "compressed-tensors 0.20 has no sparse compressor (the 2:4 bitmask format was "
                         "removed from the library, transformers and vLLM)",
    "marlin-24": "compressed-tensors 0.20 has no marlin-24 compressor (removed with sparse compression)",
}
_SCALE_DTYPES = (torch.float32, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _check_format(format, quantized: bool) -> str:
    if format is None:
        return "pack-quantized" if quantized else "dense"
    if format in UNSUPPORTED_CT_FORMATS:
        raise ValueError(f"format={format!r} cannot be written: {UNSUPPORTED_CT_FORMATS[format]}. A pruned "
                         f"model keeps its zeros in format 'dense' (or a quantized one); allowed: "
                         f"{CT_FORMATS}")
    if format not in CT_FORMATS:
        raise ValueError(f"format must be one of {CT_FORMATS}, got {format!r}")
    if quantized and format == "dense":
        raise ValueError(f"format='dense' stores no quantized weights; with quant use one of "
                         f"{QUANTIZED_FORMATS}")
    if not quantized and format != "dense":
        raise ValueError(f"format={format!r} needs quant (a QuantConfig, or the quantized layers of "
                         "prune_model's report); without it use format='dense'")
    return format


def _quantized_layers(model: nn.Module, quant, targets) -> tuple[dict[str, QuantizedWeight], bool]:
    """``({layer name: QuantizedWeight}, made_now)`` from ``quant``: a prune report or a mapping of the codes
    the model holds (``made_now=False``), or a config to quantize by RTN now (``made_now=True``)."""
    if _is_report(quant):
        if "quantized" not in quant.columns:
            raise ValueError("quant is a prune_model report without a 'quantized' column: the model was "
                             "pruned without quant=...; pass quant=QuantConfig(method='rtn', ...) to "
                             "quantize now")
        quant = dict(zip(quant["layer"], quant["quantized"]))
    if isinstance(quant, Mapping) and quant and all(
            isinstance(v, (QuantizedLayer, QuantizedWeight)) for v in quant.values()):
        return {name: v.quantized if isinstance(v, QuantizedLayer) else v for name, v in quant.items()}, False
    config = as_quant_config(quant)
    if config.method != "rtn":
        raise ValueError(f"quant method {config.method!r} needs calibration statistics; quantize with "
                         "prune_model(..., quant=...) and pass its report, or use method='rtn'")
    return {name: quantize_rtn(linear.weight.detach(), config.bits, config.group_size, config.symmetric)[1]
            for name, linear in prunable_linears(model, targets)}, True


def _is_report(value) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "columns")


def _check_layer(name: str, module, quantized: QuantizedWeight, format: str, made_now: bool) -> torch.Tensor:
    """The weight to store (the model's, or its RTN grid values when ``made_now``); ``ValueError`` naming the
    layer when the format cannot hold it exactly."""
    if module is None:
        raise ValueError(f"quant names layer {name!r}, which the model does not have")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; compressed-tensors quantizes "
                         "nn.Linear layers only (transformers' loader would not read its codes)")
    weight = module.weight.detach()
    if weight.dtype not in _SCALE_DTYPES:
        raise ValueError(f"layer {name!r} has {weight.dtype} weights; the format stores scales in the "
                         f"weights' dtype and sparsekit's float16 scales are exact only in {_SCALE_DTYPES}: "
                         "cast the model first (model.float() or model.half())")
    if tuple(weight.shape) != quantized.shape:
        raise ValueError(f"layer {name!r}: weight {tuple(weight.shape)} but codes {quantized.shape}")
    on_grid = quantized.dequantize().to(weight.device, weight.dtype)
    if made_now:
        weight = on_grid
    elif not torch.equal(weight, on_grid):
        raise ValueError(f"layer {name!r}: the model's weight is not what its codes dequantize to (was the "
                         "model changed after quantization, e.g. fine-tuned?); quantize it again, e.g. with "
                         "quant=QuantConfig(method='rtn', ...)")
    if format == "pack-quantized" and not quantized.symmetric:
        raise ValueError(f"layer {name!r} is quantized asymmetrically: compressed-tensors 0.20 packs its "
                         "zero points into a shape its transformers loader does not accept; use "
                         "format='naive-quantized' (int8 codes, unpacked zero points) or a symmetric grid")
    return weight


# ---------------------------------------------------------------------------------------------------------
# sparsekit's grid as compressed-tensors' scheme and tensors


def _args(quantized: QuantizedWeight):
    from compressed_tensors.quantization import QuantizationArgs

    per_channel = quantized.group_size == quantized.shape[1]
    return QuantizationArgs(num_bits=quantized.bits, type="int", symmetric=quantized.symmetric,
                            strategy="channel" if per_channel else "group",
                            group_size=None if per_channel else quantized.group_size)


def _qparams(quantized: QuantizedWeight, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight_scale`` (and the signed ``weight_zero_point``) of one layer, as the format stores them."""
    params = {"weight_scale": quantized.scales.to(weight.device, weight.dtype)}
    if not quantized.symmetric:
        shift = 2 ** (quantized.bits - 1)
        signed = (quantized.zeros.to(torch.int16) - shift).to(torch.int8)
        params["weight_zero_point"] = signed.to(weight.device)
    return params


def _compress_layer(name: str, weight: torch.Tensor, quantized: QuantizedWeight, scheme) -> dict:
    """The layer's compressed tensors ``{local name: tensor}``, checked to decompress to ``weight``."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    compressed = compressor.compress({"weight": weight, **_qparams(quantized, weight)}, scheme)
    restored = compressor.decompress(dict(compressed), scheme)["weight"]
    if not torch.equal(restored.to(weight.dtype), weight):
        raise RuntimeError(f"layer {name!r}: compressed-tensors' {scheme.format} codes do not give back the "
                           "weight exactly (a mapping error; nothing was written)")
    return compressed


def _schemes(layers: dict[str, QuantizedWeight], format: str) -> dict[str, object]:
    """One ``QuantizationScheme`` per distinct grid, targeting its layers by name: ``{layer: scheme}``."""
    from compressed_tensors.quantization import QuantizationScheme

    by_args: dict[str, tuple] = {}
    for name, quantized in layers.items():
        args = _args(quantized)
        key = args.model_dump_json()
        by_args.setdefault(key, (args, []))[1].append(name)
    schemes = {}
    for args, names in by_args.values():
        scheme = QuantizationScheme(targets=list(names), weights=args, format=format)
        schemes.update({name: scheme for name in names})
    return schemes


def _quantization_config(schemes: dict[str, object], format: str):
    from compressed_tensors.quantization import QuantizationConfig

    groups, seen = {}, set()
    for scheme in schemes.values():
        if id(scheme) not in seen:
            seen.add(id(scheme))
            groups[f"group_{len(groups)}"] = scheme
    return QuantizationConfig(config_groups=groups, format=format, quantization_status="compressed")


# ---------------------------------------------------------------------------------------------------------
# Public


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, quant=None, *, format: str | None = None,
                    targets=None, tokenizer=None, overwrite: bool = False,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` to ``out_dir`` in the compressed-tensors format; returns the folder.

    * ``quant=None``: the weights as they are (``format="dense"``): a pruned layer's zeros are stored as
      exact zeros, which is how the installed compressed-tensors and transformers carry sparsity.
    * ``quant`` = the report of ``prune_model(..., quant=...)`` (its ``quantized`` column), or a mapping
      ``{layer name: QuantizedLayer | QuantizedWeight}``: those codes, exactly; the model's weights must
      equal what they dequantize to.
    * ``quant`` = a :class:`~sparsekit.quant.QuantConfig` (or a dict of its fields) with ``method="rtn"``:
      every prunable Linear (``targets``, as in :func:`sparsekit.blocks.prunable_linears`) is quantized now
      by round-to-nearest on its current weight (zeros stay zero); ``model`` itself is not changed.

    ``format`` (quantized): ``"pack-quantized"`` (default; int8/int4 codes packed into int32, symmetric
    grids) or ``"naive-quantized"`` (one int8 per code; symmetric or asymmetric). The folder is built in a
    temp sibling and completed with ``manifest.json`` (:func:`sparsekit.fileio.staged_directory`);
    ``tokenizer`` is saved beside the model when given.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    out_dir = check_writable_parent(out_dir, "out_dir")
    format = _check_format(format, quant is not None)
    state_dict = dict(model.state_dict())
    qconfig = None
    if quant is not None:
        layers, made_now = _quantized_layers(model, quant, targets)
        modules = dict(model.named_modules())
        weights = {name: _check_layer(name, modules.get(name), quantized, format, made_now)
                   for name, quantized in layers.items()}
        schemes = _schemes(layers, format)
        for name, quantized in layers.items():
            compressed = _compress_layer(name, weights[name], quantized, schemes[name])
            del state_dict[f"{name}.weight"]
            state_dict.update({f"{name}.{key}": tensor for key, tensor in compressed.items()})
        qconfig = _quantization_config(schemes, format)
    with staged_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        if qconfig is not None:
            from compressed_tensors.compressors import ModelCompressor

            ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_compressed(path: str | os.PathLike, model_class=None, **kwargs):
    """The model that :func:`save_compressed` wrote to ``path``, after checking its manifest.

    ``model_class`` defaults to ``transformers.AutoModelForCausalLM``; ``kwargs`` go to its
    ``from_pretrained``. Quantized layers are decompressed by compressed-tensors (on the first forward, or
    at load with ``quantization_config=CompressedTensorsConfig(dequantize=True)``).
    """
    verify_manifest(path)
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    return model_class.from_pretrained(str(path), **kwargs)
