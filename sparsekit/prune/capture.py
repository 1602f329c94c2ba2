"""Capturing the calls of a stack of transformer blocks.

The sequential protocol re-runs every block on its own calibration inputs. A block's call is more than
its hidden states: an attention mask (causal, sliding-window, padding), rotary position embeddings,
T5's relative position bias, a decoder's encoder hidden states, cache positions... and these differ
from block to block in modern decoders (Qwen2/3, Gemma 2/3, gpt-oss, Cohere2 alternate full and
sliding-window layers, and Gemma 3 gives them different rotary embeddings). So every block's own call
is captured, once, by running the model on each calibration batch with a forward pre-hook on every
block of the stack (the forward stops at the stack's last block). Of each call, only block 0's hidden
states are kept: the driver supplies later blocks' hidden states from the already pruned earlier
blocks. The other arguments do not depend on the weights being pruned (masks, positions; T5's position
bias comes from an embedding, not a Linear; a decoder stack is captured after its encoder is pruned).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockCall", "capture_stack_calls", "no_cache", "move", "hidden_of", "model_device"]


class _StopForward(Exception):
    """Raised by the last block's capture hook: nothing after the stack is needed."""


@dataclass
class BlockCall:
    """The arguments of one call of a block.

    The hidden states are ``args[0]``, or ``kwargs["hidden_states"]`` without positional arguments.
    """

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor | None:
        return self.args[0] if self.args else self.kwargs.get("hidden_states")

    def with_hidden(self, hidden: torch.Tensor | None) -> BlockCall:
        """The same call with other hidden states (None: a placeholder that frees the captured ones)."""
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
        return BlockCall(move(self.args, device), move(self.kwargs, device))

    def __call__(self, block: nn.Module):
        """Run ``block`` with these arguments."""
        return block(*self.args, **self.kwargs)


def move(obj, device):
    """``obj`` (a tensor, or tuples/lists/dicts of them) on ``device``; other leaves unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def hidden_of(output) -> torch.Tensor:
    """Blocks return a tensor (transformers 5: Llama, Whisper) or a tuple led by it (MPT, T5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def no_cache(model: nn.Module):
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


def capture_stack_calls(model: nn.Module, blocks: Sequence[nn.Module], calib_batches: Sequence[dict],
                        stack_name: str) -> list[list[BlockCall]]:
    """Every block's own call on every batch: ``calls[block][batch]``.

    ``calls[0]`` keeps its hidden states; later blocks' calls hold None in their place (the driver fills
    in the outputs of the pruned block before). The model runs where it lives, up to the last block.
    """
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def record(index):
        def hook(_module, args, kwargs):
            call = BlockCall(tuple(args), dict(kwargs))
            calls[index].append(call if index == 0 else call.with_hidden(None))
            if index == last:
                raise _StopForward
        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    forward_kwargs = {"use_cache": False} if accepts_use_cache else {}
    device = model_device(model)
    try:
        for i, batch in enumerate(calib_batches):
            try:
                model(**move(dict(batch), device), **forward_kwargs)
            except _StopForward:
                pass
            if any(len(block_calls) != i + 1 for block_calls in calls):
                counts = [len(block_calls) for block_calls in calls]
                raise RuntimeError(f"calibration batch {i}: the blocks of {stack_name!r} were not each "
                                   f"called once (calls so far per block: {counts}); prune_model needs a "
                                   "model that runs its blocks once, in order")
    finally:
        for handle in handles:
            handle.remove()
    return calls
