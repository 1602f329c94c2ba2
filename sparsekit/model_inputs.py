"""What a batch of token inputs must be for a given model, checked before the model sees it.

A Hugging Face model given a token id outside its vocabulary, float ``input_ids`` or a sequence longer
than its learned positions fails deep inside (an ``IndexError`` from an embedding lookup, an
``AssertionError`` from a kernel), naming nothing the user gave. :func:`check_token_batch` names the
batch entry, the value and the model's limit instead. The limits are the model config's:

* ``vocab_size``: every id of ``input_ids``/``decoder_input_ids`` is in ``[0, vocab_size)``, every
  label too, or ``-100`` (no target);
* the positions, where the config has a limit (``max_position_embeddings``, which GPT-2's ``n_positions``
  is an alias of, or MPT's ``max_seq_len``; ``max_target_positions`` for a decoder's inputs): a sequence
  is at most that long. T5 (relative positions) has no limit.

Used by the pruning driver on calibration batches and by the fine-tuning loop on training batches.
"""

from __future__ import annotations

import torch

from sparsekit import _validate

__all__ = ["check_token_batch", "vocab_size_of", "max_positions_of", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the label of positions without a target (Hugging Face's convention)
_POSITION_KEYS = ("max_position_embeddings", "max_seq_len")
_TOKEN_KEYS = ("input_ids", "decoder_input_ids", "labels")


def vocab_size_of(config) -> int | None:
    """The vocabulary size that token ids index (None when the config does not say)."""
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def max_positions_of(config, key: str = "input_ids") -> int | None:
    """The longest sequence the model's positions cover for the inputs ``key`` (None: no limit)."""
    keys = _POSITION_KEYS
    if key != "input_ids" and getattr(config, "is_encoder_decoder", False):
        keys = ("max_target_positions", *keys)
    for name in keys:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_ids(ids, entry: str, vocab: int | None, model_name: str, labels: bool) -> None:
    what = "an integer tensor [batch, length] of token ids" + (" (-100 = no target)" if labels else "")
    _validate.tensor(ids, entry, what=what)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{entry} must be {what}; got dtype {ids.dtype} (token ids are integers: "
                        "convert with .long(), not by passing embeddings as ids)")
    if vocab is None or ids.numel() == 0:
        return
    real = ids[ids != IGNORE_INDEX] if labels else ids
    if real.numel() == 0:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        allowed = f"[0, {vocab})" + (" or -100" if labels else "")
        raise ValueError(f"{entry} must hold token ids in {allowed} (the vocabulary of {model_name}, "
                         f"vocab_size={vocab}); got the id {bad} (ids range from {low} to {high}): a "
                         "tokenizer that does not belong to this model?")


def check_token_batch(config, batch, name: str = "batch") -> None:
    """Check the token entries of ``batch`` (a dict of model inputs) against the model ``config``.

    ``input_ids``, ``decoder_input_ids`` and ``labels`` (each when present) must be integer tensors with
    ids in the vocabulary (labels may be ``-100``); ``input_ids`` and ``decoder_input_ids`` no longer than
    the model's positions. ``TypeError`` for a wrong dtype, ``ValueError`` for an id or a length out of
    range; each names ``name[key]``, the value and the limit.
    """
    model_name = type(config).__name__.removesuffix("Config") or "the model"
    vocab = vocab_size_of(config)
    for key in _TOKEN_KEYS:
        ids = batch.get(key) if isinstance(batch, dict) else None
        if ids is None:
            continue
        entry = f"{name}[{key!r}]"
        _check_ids(ids, entry, vocab, model_name, labels=key == "labels")
        limit = max_positions_of(config, key)
        if key != "labels" and limit is not None and ids.dim() >= 1 and ids.shape[-1] > limit:
            raise ValueError(f"{entry} must be at most {limit} tokens long (the positions of {model_name}, "
                             f"max positions {limit}); got sequences of {ids.shape[-1]} tokens: truncate "
                             "them or use a shorter --seq-len")
