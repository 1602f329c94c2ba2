"""Finding the transformer blocks and the prunable Linear layers of a Hugging Face model.

The blocks of a model are the entries of its outermost ``nn.ModuleList``s whose entries hold Linear
layers: ``transformer.blocks`` (MPT), ``transformer.h`` (GPT-2), ``model.layers`` (Llama),
``encoder.block`` then ``decoder.block`` (T5), ``encoder.layers`` then ``decoder.layers`` (Whisper).
Embeddings and the LM head live outside the blocks and are never pruned by default.

A "linear layer" is an ``nn.Linear`` (weight ``[out, in]``) or transformers' ``Conv1D`` (GPT-2; the same
map with the weight stored as ``[in, out]``); :func:`weight_out_in` gives either as an ``[out, in]`` view.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from sparsekit import _validate

__all__ = ["transformer_blocks", "prunable_linears", "capture_linear_inputs", "is_linear", "weight_out_in",
           "in_features_of", "layer_types"]


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for transformers' ``Conv1D`` (a Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_out_in(module: nn.Module):
    """The layer's weight as ``[out, in]``: the parameter itself, or a transposed view of a ``Conv1D``'s.

    Writing into the returned tensor writes into the layer.
    """
    weight = module.weight.data
    return weight.t() if _is_conv1d(module) else weight


def in_features_of(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


def layer_types(model: nn.Module) -> list[str]:
    """The class names of the leaf modules that hold a weight (what an error about "no layer" shows)."""
    names = {type(m).__name__ for m in model.modules()
             if not list(m.children()) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    return sorted(names)


def _holds_linear(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, block)]`` in execution order (encoder before decoder).

    Raises ``ValueError`` when the model has no ``nn.ModuleList`` of blocks holding Linear layers.
    """
    blocks: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # a ModuleList nested inside a block (T5's `layer`) is part of that block
        if all(_holds_linear(child) for child in module):
            taken.append(name)
            blocks.extend((f"{name}.{i}", child) for i, child in enumerate(module))
    if not blocks:
        raise ValueError(
            f"model of type {type(model).__name__} has no nn.ModuleList of transformer blocks with "
            f"Linear layers (nn.Linear or Conv1D; its layer types: {layer_types(model)}); pass `targets` "
            "(names of the Linear layers to prune) explicitly"
        )
    return blocks


def prunable_linears(model: nn.Module, targets: Iterable[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """``[(qualified name, linear)]`` of the layers to prune, in execution order.

    ``targets=None`` selects every linear layer (``nn.Linear`` or ``Conv1D``) inside the transformer
    blocks. Otherwise ``targets`` are qualified names (or name suffixes such as ``"attn.Wqkv"``) of such
    layers; a target that matches nothing raises ``ValueError``, a plain string (not a list) ``TypeError``.
    """
    targets = _validate.names(targets, "targets")
    linears = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    if targets is None:
        prefixes = [name + "." for name, _ in transformer_blocks(model)]
        return [(n, m) for n, m in linears if any(n.startswith(p) for p in prefixes)]
    chosen = []
    for target in targets:
        hits = [(n, m) for n, m in linears if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"targets entry {target!r} matches no nn.Linear of the model")
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, (n, _) in enumerate(linears)}
    return sorted(chosen, key=lambda item: order[item[0]])


def capture_linear_inputs(model: nn.Module, linear: nn.Linear, batches, max_tokens: int = 8192):
    """The inputs that ``linear`` sees when ``model`` runs on ``batches``, as ``[tokens, in]`` float32.

    Runs ``model(**batch)`` for each batch under ``torch.no_grad`` with a forward hook on ``linear``;
    leading dimensions are flattened into tokens, and at most ``max_tokens`` tokens are kept.
    """
    import torch

    max_tokens = _validate.integer(max_tokens, "max_tokens", low=1)
    seen: list = []

    def record(_module, inputs):
        seen.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float())

    handle = linear.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                if sum(x.shape[0] for x in seen) >= max_tokens:
                    break
    finally:
        handle.remove()
    if not seen:
        raise ValueError("batches is empty or never reached the layer: no inputs captured")
    return torch.cat(seen)[:max_tokens]
