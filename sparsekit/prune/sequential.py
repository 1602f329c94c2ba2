"""The layer-by-layer pruning driver over a Hugging Face model.

For each stack of transformer blocks (the decoder-only model's blocks; or the encoder's, then the
decoder's), in execution order:

1. capture the inputs of the stack's first two blocks (positional *and* keyword arguments: attention
   masks, position bias, rotary embeddings, encoder hidden states...) by running the model on every
   calibration batch with forward pre-hooks that stop the forward once they have what they need.
   Block 0's inputs start the stack; block 1's non-hidden arguments serve every later block (they do
   not depend on the weights being pruned: masks, positions, and for T5 the relative position bias
   that block 0 computes). The decoder stack is captured by a full forward of the model, so it sees the
   already pruned encoder's outputs;
2. per block: hook every targeted Linear to accumulate ``H = 2/n Σ x xᵀ`` over the calibration tokens
   (padding excluded where an attention mask tells which tokens are real), prune each Linear, then run
   the block again on the same inputs: its outputs, produced with the pruned weights, are the inputs of
   the next block.

Only one block's statistics are in memory at a time; the block is moved to ``device`` while it is
processed, so the model itself can stay on the CPU (the capture forward runs where the model lives).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.blocks import in_features_of, prunable_linears, transformer_blocks, weight_out_in
from sparsekit.masks import validate_nm, validate_sparsity
from sparsekit.prune.magnitude import magnitude_prune
from sparsekit.prune.sparsegpt import sparsegpt_prune
from sparsekit.prune.wanda import wanda_prune

__all__ = ["prune_model", "METHODS"]

METHODS = ("sparsegpt", "wanda", "magnitude")
IGNORE_INDEX = -100  # the label of padding positions in Hugging Face models


class _StopForward(Exception):
    """Raised by a capture hook once the inputs it waits for are recorded."""


# ---------------------------------------------------------------------------------------------------------
# Inputs of a block


@dataclass
class BlockCall:
    """The arguments of one call of a block.

    The hidden states are ``args[0]``, or ``kwargs["hidden_states"]`` without positional arguments.
    """

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def argument(self, block: nn.Module, name: str):
        """The value bound to parameter ``name`` of ``block.forward`` (None when absent)."""
        try:
            bound = inspect.signature(block.forward).bind_partial(*self.args, **self.kwargs)
        except TypeError:
            return self.kwargs.get(name)
        return bound.arguments.get(name, self.kwargs.get(name))

    def to(self, device) -> BlockCall:
        return BlockCall(_move(self.args, device), _move(self.kwargs, device))


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _hidden_of(output) -> torch.Tensor:
    """Blocks return a tensor (transformers 5: Llama, Whisper) or a tuple led by it (MPT, T5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


@contextmanager
def _no_cache(model: nn.Module):
    """Turn the KV cache off: a cache object captured once would otherwise grow at every re-run of a block."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    saved = [c.use_cache for c in configs]
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c, value in zip(configs, saved):
            c.use_cache = value


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_stack_inputs(model: nn.Module, blocks: Sequence[nn.Module], calib_batches: Sequence[dict],
                         stack_name: str) -> tuple[list[BlockCall], list[BlockCall] | None]:
    """Run ``model`` on each batch up to ``blocks[1]``; return the calls of ``blocks[0]`` and ``blocks[1]``.

    The second list is None for a one-block stack.
    """
    firsts: list[BlockCall] = []
    seconds: list[BlockCall] | None = [] if len(blocks) > 1 else None

    def record(into, stop):
        def hook(_module, args, kwargs):
            into.append(BlockCall(tuple(args), dict(kwargs)))
            if stop:
                raise _StopForward
        return hook

    handles = [blocks[0].register_forward_pre_hook(record(firsts, seconds is None), with_kwargs=True)]
    if seconds is not None:
        handles.append(blocks[1].register_forward_pre_hook(record(seconds, True), with_kwargs=True))
    accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    forward_kwargs = {"use_cache": False} if accepts_use_cache else {}
    device = _model_device(model)
    try:
        for i, batch in enumerate(calib_batches):
            try:
                model(**_move(dict(batch), device), **forward_kwargs)
            except _StopForward:
                continue
            raise RuntimeError(f"the forward of calibration batch {i} never reached the blocks of "
                               f"{stack_name!r}")
    finally:
        for handle in handles:
            handle.remove()
    return firsts, seconds


# ---------------------------------------------------------------------------------------------------------
# Statistics of a Linear's inputs


class HessianStats:
    """Running ``H = 2/n Σ x xᵀ`` over the ``n`` tokens seen so far (float32), and ``n``."""

    def __init__(self, features: int, device):
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the tokens ``x`` ``[tokens, features]``."""
        t = x.shape[0]
        if t == 0:
            return
        self.H.mul_(self.tokens / (self.tokens + t))
        self.tokens += t
        x = x.float() * (2.0 / self.tokens) ** 0.5
        self.H.addmm_(x.t(), x)

    @property
    def act_sq_norm(self) -> torch.Tensor:
        """``Σ x²`` per input feature."""
        return torch.diagonal(self.H) * (self.tokens / 2.0)


def _tokens(x: torch.Tensor, call_masks: dict) -> torch.Tensor:
    """The real (non-padding) tokens of a Linear's input ``x`` ``[..., features]`` as ``[tokens, features]``.

    ``call_masks`` holds ``"self"``: the mask of the stack's own tokens, and for a decoder stack
    ``"encoder_states"``/``"encoder"``: the encoder hidden states and their mask, used when ``x`` is them
    (the keys and values of cross-attention). A mask applies only when its shape matches ``x``'s tokens.
    """
    mask = call_masks.get("self")
    states = call_masks.get("encoder_states")
    if states is not None and x.shape == states.shape and x.data_ptr() == states.data_ptr():
        mask = call_masks.get("encoder")
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# The driver


def _validate_batches(calib_batches) -> list[dict]:
    if isinstance(calib_batches, dict) or not isinstance(calib_batches, Iterable):
        raise TypeError("calib_batches must be a list of dicts of model inputs, got "
                        f"{type(calib_batches).__name__}")
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches is empty; pruning needs at least one calibration batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise TypeError(f"calib_batches[{i}] must be a dict of model inputs, got {type(batch).__name__}")
    return batches


def _validate_solver_options(blocksize, percdamp, nm) -> None:
    """Check SparseGPT's options before any layer is touched (a late failure leaves a half-pruned model)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize must be a multiple of m={nm[1]} for nm={nm[0]}:{nm[1]}, got {blocksize}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < math.inf:
        raise ValueError(f"percdamp must be a finite float >= 0, got {percdamp!r}")


def _group_stacks(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """``[(stack name, [(block name, block)])]`` in execution order."""
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in transformer_blocks(model):
        stacks.setdefault(name.rsplit(".", 1)[0], []).append((name, block))
    return list(stacks.items())


def _stack_masks(model: nn.Module, stack_name: str, batch: dict, call: BlockCall, block: nn.Module) -> dict:
    is_decoder_stack = bool(getattr(model.config, "is_encoder_decoder", False)) and "decoder" in stack_name
    if not is_decoder_stack:
        return {"self": batch.get("attention_mask")}
    decoder_mask = batch.get("decoder_attention_mask")
    if decoder_mask is None and isinstance(batch.get("labels"), torch.Tensor):
        decoder_mask = batch["labels"] != IGNORE_INDEX  # positions without a target are padding
    return {"self": decoder_mask, "encoder": batch.get("attention_mask"),
            "encoder_states": call.argument(block, "encoder_hidden_states")}


def _prune_linear(linear: nn.Linear, name: str, stats: HessianStats, method: str, sparsity: float, nm,
                  blocksize: int, percdamp: float, quant=None) -> dict:
    start = time.perf_counter()
    if stats.tokens == 0 and method != "magnitude":
        raise ValueError(f"layer {name!r} received no calibration inputs; cannot prune it with {method}")
    W = weight_out_in(linear)  # [out, in], a view: Conv1D (GPT-2) stores the transpose
    quantizer = quant.joint_quantizer(method, W.shape, W.device) if quant is not None else None
    if method == "sparsegpt":
        pruned, mask = sparsegpt_prune(W, stats.H, sparsity, nm, blocksize, percdamp, quantizer, name=name)
    elif method == "wanda":
        pruned, mask = wanda_prune(W, stats.act_sq_norm, sparsity, nm)
    else:
        pruned, mask = magnitude_prune(W, sparsity, nm)
    quantized = _quantize_pruned(pruned, mask, stats.H, quant, quantizer, blocksize, percdamp, name)
    if quantized is not None:
        pruned = quantized.quantized.dequantize().to(W.dtype)
    seconds = time.perf_counter() - start
    delta = W.float() - pruned.float()
    H = stats.H.to(W.device)
    reference = float(((W.float() @ H) * W.float()).sum())
    error = float(((delta @ H) * delta).sum())
    W.copy_(pruned)
    return {
        "layer": name,
        "shape": tuple(W.shape),
        "sparsity": float(((pruned == 0) if quantized is None else ~mask).float().mean()),
        "rel_error": error / reference if reference > 0 else float("nan"),
        "seconds": seconds,
        "quantized": quantized,
    }


def _quantize_pruned(pruned, mask, H, quant, quantizer, blocksize, percdamp, name):
    """The layer's ``QuantizedLayer``: joint (``quantizer`` ran inside SparseGPT) or quantized after
    pruning; ``None`` without ``quant``."""
    from sparsekit.quant import QuantizedLayer

    if quant is None:
        return None
    if quantizer is not None:
        return QuantizedLayer(quantizer.result(), mask)
    _, quantized = quant.quantize_pruned(pruned * mask, H, blocksize, percdamp, name=name)
    return QuantizedLayer(quantized, mask)


def _process_block(block, linears, calls, masks, method, sparsity, nm, blocksize, percdamp, device,
                   need_outputs, quant=None) -> tuple[list[dict], list[torch.Tensor] | None]:
    stats = {name: HessianStats(in_features_of(linear), device) for name, linear in linears}
    current = {}

    def accumulate(name):
        def hook(_module, inputs, _output):
            stats[name].add(_tokens(inputs[0].detach(), current))
        return hook

    handles = [linear.register_forward_hook(accumulate(name)) for name, linear in linears]
    try:
        for call, call_masks in zip(calls, masks):
            current.clear()
            current.update(call_masks)
            block(*call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    rows = [_prune_linear(linear, name, stats[name], method, sparsity, nm, blocksize, percdamp, quant)
            for name, linear in linears]
    stats.clear()  # free this block's statistics before the next block accumulates its own
    outputs = [_hidden_of(block(*call.args, **call.kwargs)) for call in calls] if need_outputs else None
    return rows, outputs


def prune_model(model: nn.Module, calib_batches: Sequence[dict], method: str = "sparsegpt",
                sparsity: float = 0.5, nm=None, targets: Iterable[str] | None = None, quant=None,
                blocksize: int = 128, percdamp: float = 0.01, device=None, progress: bool = True):
    """Prune the targeted Linear layers of ``model`` in place, block by block; return a report.

    * ``calib_batches``: a list of dicts of model inputs, e.g. ``{"input_ids", "attention_mask"}`` for a
      causal LM, ``{"input_ids", "attention_mask", "labels"}`` (or ``"decoder_input_ids"``) for T5,
      ``{"input_features", "decoder_input_ids"}`` for Whisper. ``attention_mask`` (and
      ``decoder_attention_mask``, or else ``labels == -100`` for a decoder) exclude padding tokens from
      the statistics.
    * ``method``: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``; ``sparsity`` or ``nm=(n, m)`` as in
      :func:`sparsegpt_prune`; ``blocksize`` and ``percdamp`` are SparseGPT's.
    * ``targets``: Linear names (or suffixes) inside the transformer blocks; default all of them.
    * ``quant``: ``None``, or a :class:`sparsekit.quant.QuantConfig` (or a dict of its fields, e.g.
      ``{"bits": 4, "group_size": 128}``): every pruned layer is also quantized, jointly inside SparseGPT
      for ``method="sparsegpt"`` with GPTQ (see :mod:`sparsekit.quant.config`). The weights are left
      dequantized (on the grid) in the model; the integer codes and masks are in the report.
    * ``device``: where each block is processed (default: where the model is).

    Returns a ``pandas.DataFrame`` with one row per pruned layer: ``layer``, ``shape``, ``sparsity``
    (zeros reached), ``rel_error`` = ``‖W X − Ŵ X‖² / ‖W X‖²`` over the calibration inputs of the layer,
    ``seconds`` (time of the pruning solver). With ``quant``: ``rel_error`` covers pruning and
    quantization, ``sparsity`` is the mask's (a kept weight may round to 0), and a column ``quantized``
    holds each layer's :class:`~sparsekit.quant.QuantizedLayer` (codes, scales, mask; ``.compress()``).
    """
    import pandas as pd

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sparsity = validate_sparsity(sparsity)
    if nm is not None:
        validate_nm(nm)
    quant = _check_quant(quant, method)
    batches = _validate_batches(calib_batches)
    chosen = dict(prunable_linears(model, targets))
    stacks = _group_stacks(model)
    inside = {name for _, blocks in stacks for block_name, _ in blocks for name in chosen
              if name.startswith(block_name + ".")}
    if set(chosen) - inside:
        raise ValueError(f"targets {sorted(set(chosen) - inside)} lie outside the transformer blocks; "
                         "prune_model only prunes Linear layers inside the blocks")
    if nm is not None:
        for name, linear in chosen.items():
            validate_nm(nm, in_features_of(linear), name=f"nm (layer {name!r})")
    if method == "sparsegpt" or (quant is not None and quant.method == "gptq"):
        _validate_solver_options(blocksize, percdamp, nm)
    if quant is not None:
        for name, linear in chosen.items():
            quant.check_layer(in_features_of(linear), name)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    total = sum(len(blocks) for _, blocks in stacks)
    try:
        with torch.no_grad(), _no_cache(model), tqdm(total=total, desc=f"{method} pruning",
                                                     disable=not progress) as bar:
            for stack_name, blocks in stacks:
                modules = [block for _, block in blocks]
                firsts, seconds = capture_stack_inputs(model, modules, batches, stack_name)
                calls = [c.to(device) for c in firsts]
                later = [c.to(device) for c in seconds] if seconds is not None else None
                for index, (block_name, block) in enumerate(blocks):
                    linears = [(n, m) for n, m in chosen.items() if n.startswith(block_name + ".")]
                    masks = [_stack_masks(model, stack_name, batch, call, block)
                             for batch, call in zip(batches, calls)]
                    block.to(device)
                    need_outputs = index + 1 < len(blocks)
                    block_rows, outputs = _process_block(
                        block, linears, calls, masks, method, sparsity, nm, blocksize, percdamp, device,
                        need_outputs, quant)
                    block.to(home)
                    rows.extend(block_rows)
                    if need_outputs:
                        calls = [c.with_hidden(h) for c, h in zip(later, outputs)]
                    bar.update(1)
    finally:
        model.train(was_training)
    columns = ["layer", "shape", "sparsity", "rel_error", "seconds"] + (["quantized"] if quant else [])
    return pd.DataFrame(rows, columns=columns)


def _check_quant(quant, method):
    """``quant`` as a QuantConfig (or None), checked against ``method`` before any layer is touched."""
    from sparsekit.quant import as_quant_config  # late: sparsekit.quant imports sparsekit.prune.sparsegpt

    quant = as_quant_config(quant)
    if quant is not None:
        quant.check_method(method)
    return quant
