"""The layer-by-layer pruning driver over a Hugging Face model.

For each stack of transformer blocks (the decoder-only model's blocks; or the encoder's, then the
decoder's), in execution order:

1. capture every block's own call on every calibration batch (:mod:`sparsekit.prune.capture`):
   positional and keyword arguments, so each block is later re-run with its own attention mask
   (full or sliding-window), position embeddings and the like. The decoder stack is captured by a
   forward of the model after the encoder is pruned, so it sees the pruned encoder's outputs;
2. per block: hook every targeted Linear to accumulate ``H = 2/n Σ x xᵀ`` over the real calibration
   tokens (:mod:`sparsekit.prune.statistics`), prune each Linear with the method's solver
   (:data:`sparsekit.prune.solvers.SOLVERS`), then run the block again on the same inputs: its outputs,
   produced with the pruned weights, are the hidden states of the next block's call.

Only one block's statistics are in memory at a time; the block is moved to ``device`` while it is
processed, so the model itself can stay on the CPU (the capture forward runs where the model lives).
A method that needs no calibration data (magnitude) prunes every target directly when no batches are
given: no forward pass, no statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit import _validate
from sparsekit.blocks import in_features_of, prunable_linears, transformer_blocks, weight_out_in
from sparsekit.model_inputs import check_token_batch
from sparsekit.prune.capture import BlockCall, capture_stack_calls, hidden_of, model_device, no_cache
from sparsekit.prune.solvers import SOLVERS, Solver
from sparsekit.prune.statistics import HessianStats, real_tokens, token_masks

__all__ = ["prune_model", "METHODS"]

METHODS = tuple(SOLVERS)
REPORT_COLUMNS = ["layer", "shape", "sparsity", "rel_error", "seconds"]
_MASK_OF = {"attention_mask": ("input_ids", "inputs_embeds"),
            "decoder_attention_mask": ("decoder_input_ids", "labels", "decoder_inputs_embeds")}


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _check_batches(calib_batches, solver: Solver, method: str) -> list[dict] | None:
    """The calibration batches as a list of dicts (None is allowed for a method without statistics)."""
    if calib_batches is None:
        if solver.needs_calibration:
            raise ValueError(f"calib_batches must be a list of dicts of model inputs for method {method!r} "
                             "(it prunes with statistics of the layers' inputs); got None")
        return None
    if isinstance(calib_batches, (dict, str)) or not isinstance(calib_batches, Iterable):
        raise TypeError("calib_batches must be a list of dicts of model inputs (or None for magnitude); "
                        f"got a {type(calib_batches).__name__}")
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches must hold at least one batch (or be None for magnitude); got []")
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise TypeError(f"calib_batches[{i}] must be a dict of model inputs, got {type(batch).__name__}")
        for mask_key, input_keys in _MASK_OF.items():
            mask = batch.get(mask_key)
            if mask is None:
                continue
            name = f"calib_batches[{i}][{mask_key!r}]"
            _validate.tensor(mask, name, what="a [batch, length] tensor (1 = real token, 0 = padding)")
            inputs = next((batch[k] for k in input_keys if isinstance(batch.get(k), torch.Tensor)), None)
            if inputs is not None and tuple(mask.shape) != tuple(inputs.shape[:2]):
                raise ValueError(f"{name} must have the [batch, length] shape {tuple(inputs.shape[:2])} of "
                                 f"its inputs; got shape {tuple(mask.shape)}")
    return batches


def _check_options(solver: Solver, method: str, quant, options: dict, nm) -> dict:
    if quant is not None:
        if "quant" not in solver.options:
            takers = [m for m, s in SOLVERS.items() if "quant" in s.options]
            raise ValueError(f"quant={quant!r}: method {method!r} does not support joint sparsity + "
                             f"quantization (methods that do: {takers or 'none yet'}); pass quant=None")
        options = {**options, "quant": quant}
    return solver.resolve(method, options, nm)


def _check_quant_layers(quant, chosen: dict, batches) -> None:
    """Every layer fits the quantization's group size, and GPTQ has its statistics, before any pruning.

    ``quant`` is the solver's checked option: a :class:`~sparsekit.quant.QuantConfig` for the built-in
    methods (a new method may take another form, which its own ``check`` validates).
    """
    from sparsekit.quant import QuantConfig  # late: sparsekit.quant imports sparsekit.prune.sparsegpt

    if not isinstance(quant, QuantConfig):
        return
    if quant.needs_statistics and batches is None:
        raise ValueError("quant method 'gptq' needs calib_batches (it reads each layer's H); pass them or "
                         "use quant method 'rtn'")
    for name, linear in chosen.items():
        quant.check_layer(in_features_of(linear), name)


def _group_stacks(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """``[(stack name, [(block name, block)])]`` in execution order."""
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in transformer_blocks(model):
        stacks.setdefault(name.rsplit(".", 1)[0], []).append((name, block))
    return list(stacks.items())


def _chosen_linears(model, targets, stacks, nm) -> dict[str, nn.Module]:
    chosen = dict(prunable_linears(model, targets))
    inside = {name for _, blocks in stacks for block_name, _ in blocks for name in chosen
              if name.startswith(block_name + ".")}
    if set(chosen) - inside:
        raise ValueError(f"targets {sorted(set(chosen) - inside)} lie outside the transformer blocks; "
                         "prune_model only prunes Linear layers inside the blocks")
    if nm is not None:
        for name, linear in chosen.items():
            _validate.nm_pair(nm, f"nm (layer {name!r})", in_features=in_features_of(linear))
    return chosen


# ---------------------------------------------------------------------------------------------------------
# One layer, one block


def _prune_linear(linear: nn.Module, name: str, stats: HessianStats | None, solver: Solver, sparsity: float,
                  nm, options: dict) -> dict:
    """Prune ``linear`` in place; its report row (``rel_error`` NaN without statistics)."""
    if stats is not None and stats.tokens == 0 and solver.needs_calibration:
        raise ValueError(f"layer {name!r} received no calibration inputs; cannot prune it with statistics")
    W = weight_out_in(linear)  # [out, in], a view: Conv1D (GPT-2) stores the transpose
    start = time.perf_counter()
    try:
        pruned, mask, *quantized = solver.prune(W, stats, sparsity, nm, name, **options)
    except ValueError as error:
        if type(error) is not ValueError or name in str(error):  # HessianError & co. name the layer already
            raise
        raise ValueError(f"layer {name!r}: {error}") from error  # e.g. a NaN weight: which layer has it
    seconds = time.perf_counter() - start
    rel_error = float("nan")
    if stats is not None:
        delta = W.float() - pruned.float()
        H = stats.H.to(W.device)
        reference = float(((W.float() @ H) * W.float()).sum())
        rel_error = float(((delta @ H) * delta).sum()) / reference if reference > 0 else float("nan")
    W.copy_(pruned)
    row = {"layer": name, "shape": tuple(W.shape), "sparsity": float((pruned == 0).float().mean()),
           "rel_error": rel_error, "seconds": seconds}
    if quantized:  # quantization: the mask's sparsity (a kept weight may round to 0), and the codes
        row.update(sparsity=float((~mask).float().mean()), quantized=quantized[0])
    return row


def _process_block(block, linears, calls: list[BlockCall], masks, solver, sparsity, nm, options, device,
                   need_outputs) -> tuple[list[dict], list[torch.Tensor] | None]:
    """Accumulate the statistics of ``linears`` over ``calls``, prune them; the block's new outputs."""
    stats = {name: HessianStats(in_features_of(linear), device) for name, linear in linears}
    current: dict = {}

    def accumulate(name):
        def hook(_module, inputs, _output):
            stats[name].add(real_tokens(inputs[0].detach(), current, name))
        return hook

    handles = [linear.register_forward_hook(accumulate(name)) for name, linear in linears]
    try:
        for call, call_masks in zip(calls, masks):
            current.clear()
            current.update(call_masks)
            call(block)
    finally:
        for handle in handles:
            handle.remove()
    rows = [_prune_linear(linear, name, stats[name], solver, sparsity, nm, options)
            for name, linear in linears]
    stats.clear()  # free this block's statistics before the next block accumulates its own
    outputs = [hidden_of(call(block)) for call in calls] if need_outputs else None
    return rows, outputs


def _prune_sequentially(model, stacks, chosen, batches, solver, sparsity, nm, options, device, bar):
    home = model_device(model)
    rows: list[dict] = []
    for stack_name, blocks in stacks:
        captured = capture_stack_calls(model, [block for _, block in blocks], batches, stack_name)
        hidden = None
        for index, (block_name, block) in enumerate(blocks):
            calls = [c.to(device) for c in captured[index]]
            if index > 0:
                calls = [c.with_hidden(h) for c, h in zip(calls, hidden)]
            captured[index] = None  # drop this block's captured call once it is in use
            linears = [(n, m) for n, m in chosen.items() if n.startswith(block_name + ".")]
            masks = [token_masks(model, stack_name, batch, call, block)
                     for batch, call in zip(batches, calls)]
            block.to(device)
            need_outputs = index + 1 < len(blocks)
            block_rows, hidden = _process_block(block, linears, calls, masks, solver, sparsity, nm, options,
                                                device, need_outputs)
            block.to(home)
            rows.extend(block_rows)
            bar.update(1)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The driver


def prune_model(model: nn.Module, calib_batches: Sequence[dict] | None, method: str = "sparsegpt",
                sparsity: float = 0.5, nm=None, targets: Iterable[str] | None = None, quant=None, *,
                device=None, progress: bool = True, **options):
    """Prune the targeted Linear layers of ``model`` in place, block by block; return a report.

    Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family, weight stored ``[in, out]``):
    a Conv1D is pruned as its ``[out, in]`` transpose ``Wᵀ`` (rows are outputs, as for ``nn.Linear``) and
    its zeros land in its own ``[in, out]`` weight; the report's ``shape`` is ``[out, in]`` for both.
    A model without blocks of linear layers raises ``ValueError`` naming its class and layer types.

    * ``calib_batches``: a list of dicts of model inputs, e.g. ``{"input_ids", "attention_mask"}`` for a
      causal LM, ``{"input_ids", "attention_mask", "labels"}`` (or ``"decoder_input_ids"``) for T5,
      ``{"input_features", "decoder_input_ids"}`` for Whisper. ``attention_mask`` (and
      ``decoder_attention_mask``, or else ``labels == -100`` for a decoder) exclude padding tokens from
      the statistics. ``None`` for ``"magnitude"``, which needs no data: then no forward pass runs, no
      statistics are built and ``rel_error`` is NaN (with batches, magnitude's error is measured).
    * ``method``: a key of :data:`sparsekit.prune.solvers.SOLVERS`: ``"sparsegpt"``, ``"wanda"`` or
      ``"magnitude"``. ``options`` are the method's own: ``blocksize`` (128) and ``percdamp`` (0.01)
      for SparseGPT (and its per-column ``quantizer`` hook), ``scope`` (``"row"`` or ``"layer"``, the
      papers' baseline) for magnitude; any other option raises ``TypeError``.
    * ``sparsity``: the fraction of zeros, ``round(sparsity · n)`` pruned per row (magnitude ``"row"``,
      Wanda), per layer (magnitude ``"layer"``) or per block of ``blocksize`` columns (SparseGPT); the
      reference implementations prune ``int(sparsity · n)`` (+1 for SparseGPT and the papers' magnitude).
      ``nm=(n, m)`` overrides it and *keeps* ``n`` of every ``m`` consecutive inputs (2:4 = 50 %, 1:4 =
      75 %); the references' ``prunen:prunem`` *prunes* ``prunen``.
    * ``targets``: a list of Linear names (or suffixes such as ``"mlp.up_proj"``) inside the transformer
      blocks; default all of them. A plain string is refused (``TypeError``): pass ``["mlp.up_proj"]``.
    * ``quant``: ``None``, or a :class:`sparsekit.quant.QuantConfig` (or a dict of its fields, e.g.
      ``{"bits": 4, "group_size": 128}``), passed to the method's solver as option ``quant``: every pruned
      layer is also quantized, jointly inside SparseGPT's column loop for SparseGPT with GPTQ, else
      after pruning (:mod:`sparsekit.quant.config`). The model keeps the dequantized weights (on the grid).
    * ``device``: where each block is processed (default: where the model is).

    Every argument is checked before the model is touched. Returns a ``pandas.DataFrame`` with one row
    per pruned layer: ``layer``, ``shape``, ``sparsity`` (zeros reached), ``rel_error`` =
    ``‖W X − Ŵ X‖² / ‖W X‖²`` over the calibration inputs of the layer, ``seconds`` (time of the solver).
    With ``quant``: ``rel_error`` covers pruning and quantization, ``sparsity`` is the mask's, and a
    column ``quantized`` holds each layer's :class:`~sparsekit.quant.QuantizedLayer` (codes, scales, mask;
    ``.compress()`` gives its int8/int4 ``BitmaskWeight`` or ``NMWeight``).
    """
    import pandas as pd

    solver = SOLVERS[_validate.choice(method, "method", SOLVERS)]
    sparsity = _validate.sparsity(sparsity)
    nm = _validate.nm_pair(nm, "nm") if nm is not None else None
    targets = _validate.names(targets, "targets")
    batches = _check_batches(calib_batches, solver, method)
    for i, batch in enumerate(batches or []):
        if hasattr(model, "config"):
            check_token_batch(model.config, batch, f"calib_batches[{i}]")
    stacks = _group_stacks(model)
    chosen = _chosen_linears(model, targets, stacks, nm)
    options = _check_options(solver, method, quant, options, nm)
    _check_quant_layers(options.get("quant"), chosen, batches)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(chosen) if batches is None else sum(len(blocks) for _, blocks in stacks),
               desc=f"{method} pruning", disable=not progress)
    try:
        with torch.no_grad(), no_cache(model), bar:
            if batches is None:
                rows = []
                for name, linear in chosen.items():
                    rows.append(_prune_linear(linear, name, None, solver, sparsity, nm, options))
                    bar.update(1)
            else:
                rows = _prune_sequentially(model, stacks, chosen, batches, solver, sparsity, nm, options,
                                           device, bar)
    finally:
        model.train(was_training)
    quantized = any("quantized" in row for row in rows)
    return pd.DataFrame(rows, columns=REPORT_COLUMNS + (["quantized"] if quantized else []))
