"""One fast, batched, KV-cached greedy decoder for causal and encoder-decoder models.

Greedy decoding picks ``y_t = argmax_v p(v | y_<t, x)`` and feeds only ``y_t`` back with the cached
keys and values of earlier positions, so each step costs one token's forward pass. A sequence that
emits EOS is finished: it receives ``pad_token_id`` afterwards (as ``model.generate`` does), and the
loop stops once every sequence is finished or after ``max_new_tokens``.

Causal models take left-padded ``input_ids`` ``[B, S]`` + ``attention_mask``; encoder-decoders take any
encoder inputs (``input_ids`` + ``attention_mask`` for T5, ``input_features`` for Whisper) and start the
decoder from ``decoder_start_ids`` ``[B, P]`` (default: ``config.decoder_start_token_id``).
Returns the new tokens ``[B, T]`` (``T <= max_new_tokens``), EOS included, pad after it.

The model's generation config is honoured as ``generate`` does: ``suppress_tokens`` are never chosen, and
``begin_suppress_tokens`` not as the first new token (Whisper: no blank, no EOS at the start).
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["greedy_decode", "trim_at_eos"]


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _token_ids(model, eos_token_id, pad_token_id) -> tuple[set[int], int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    if eos is None:
        raise ValueError("eos_token_id is None and the model's generation config has none")
    eos_set = set(eos) if isinstance(eos, list | tuple) else {int(eos)}
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:
        pad = min(eos_set)
    return eos_set, int(pad)


def _step_logits(model, past, **inputs) -> tuple[torch.Tensor, object]:
    if _accepts(model, "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    # transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`
    inputs["cache" if _accepts(model, "cache") else "past_key_values"] = past
    out = model(use_cache=True, **inputs)
    new_past = getattr(out, "cache", None)
    return out.logits[:, -1, :], new_past if new_past is not None else out.past_key_values


@torch.no_grad()
def greedy_decode(
    model,
    max_new_tokens: int,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_ids: torch.Tensor | None = None,
    **encoder_inputs,
) -> torch.Tensor:
    """Greedy continuation of a batch; see the module docstring for the inputs. ``[B, T]`` long."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos, pad = _token_ids(model, eos_token_id, pad_token_id)
    was_training = model.training
    model.eval()
    try:
        if model.config.is_encoder_decoder:
            return _decode_seq2seq(
                model, max_new_tokens, eos, pad, input_ids, attention_mask, decoder_start_ids, encoder_inputs
            )
        if input_ids is None:
            raise ValueError("a causal model needs input_ids (left-padded prompts)")
        return _decode_causal(model, max_new_tokens, eos, pad, input_ids, attention_mask)
    finally:
        model.train(was_training)


def _suppressed(model) -> tuple[list[int], list[int]]:
    """``(suppress_tokens, begin_suppress_tokens)`` of the model's generation config (empty when unset)."""
    config = getattr(model, "generation_config", None)
    return (list(getattr(config, "suppress_tokens", None) or []),
            list(getattr(config, "begin_suppress_tokens", None) or []))


def _decode_loop(step, first_inputs: dict, batch: int, device, max_new_tokens: int, eos: set[int], pad: int,
                 suppress: tuple[list[int], list[int]] = ([], [])):
    """Shared greedy loop; ``step(inputs, past, new_token)`` -> ``(logits [B, V], past)``."""
    eos_ids = torch.tensor(sorted(eos), device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    always, at_start = suppress
    tokens = []
    logits, past = step(first_inputs, None, None)
    for t in range(max_new_tokens):
        banned = always + at_start if t == 0 else always
        if banned:
            logits = logits.clone()
            logits[:, [i for i in banned if i < logits.shape[-1]]] = float("-inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        finished |= torch.isin(nxt, eos_ids)
        if bool(finished.all()) or t + 1 == max_new_tokens:
            break
        logits, past = step(None, past, nxt)
    return torch.stack(tokens, dim=1)


def _decode_causal(model, max_new_tokens, eos, pad, input_ids, attention_mask):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    use_positions = _accepts(model, "position_ids")
    state = {"mask": attention_mask}

    def step(first, past, new_token):
        if first is not None:
            inputs = {"input_ids": input_ids}
        else:
            inputs = {"input_ids": new_token[:, None]}
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(new_token), 1)], dim=1)
        mask = state["mask"]
        if use_positions:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = positions if first is not None else positions[:, -1:]
        return _step_logits(model, past, attention_mask=mask, **inputs)

    return _decode_loop(step, {}, len(input_ids), input_ids.device, max_new_tokens, eos, pad,
                        _suppressed(model))


def _decode_seq2seq(model, max_new_tokens, eos, pad, input_ids, attention_mask, decoder_start_ids, enc_in):
    enc_inputs = dict(enc_in)
    if input_ids is not None:
        enc_inputs["input_ids"] = input_ids
    if attention_mask is not None:
        enc_inputs["attention_mask"] = attention_mask
    if not enc_inputs:
        raise ValueError("an encoder-decoder model needs encoder inputs (input_ids or input_features)")
    encoder_outputs = model.get_encoder()(**enc_inputs)
    batch = encoder_outputs.last_hidden_state.shape[0]
    device = encoder_outputs.last_hidden_state.device
    if decoder_start_ids is None:
        start = model.config.decoder_start_token_id
        if start is None:
            raise ValueError("decoder_start_ids is None and config.decoder_start_token_id is None")
        decoder_start_ids = torch.full((batch, 1), int(start), dtype=torch.long, device=device)

    def step(first, past, new_token):
        decoder_ids = decoder_start_ids if first is not None else new_token[:, None]
        return _step_logits(
            model,
            past,
            encoder_outputs=encoder_outputs,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_ids,
        )

    return _decode_loop(step, {}, batch, device, max_new_tokens, eos, pad, _suppressed(model))


def trim_at_eos(tokens: torch.Tensor, eos_token_id: int | list[int]) -> list[list[int]]:
    """Per row, the token ids before the first EOS (EOS and padding dropped)."""
    eos = set(eos_token_id) if isinstance(eos_token_id, list | tuple) else {int(eos_token_id)}
    out = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out
