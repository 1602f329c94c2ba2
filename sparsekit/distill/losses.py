"""The three fine-tuning losses of the paper: cross-entropy, logit distillation and SquareHead.

Notation: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``D`` hidden width, ``L`` transformer blocks.
Labels use ``-100`` for positions without a target (Hugging Face's convention) and are *aligned* with
the logits: ``labels[b, t]`` is the target of ``logits[b, t]``. A causal LM predicts the next token, so
its labels are shifted first (:func:`shift_labels`); an encoder-decoder's are aligned already.

SquareHead (Kurtic et al. 2023) compares the student's and the teacher's hidden states block by block:

    L_sh = Σ_i  mean_{valid tokens}((h_s,i − h_t,i)²) / (mean_{valid tokens}(h_t,i²) + ε)

summed (not averaged) over every block output ``i`` (the embedding output excluded), each normalised
by the teacher's mean square so that every layer counts alike whatever its scale. ``ε`` is bfloat16's
machine epsilon (2⁻⁷), as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekit import _validate

__all__ = ["ce_loss", "kd_loss", "squarehead_loss", "shift_labels", "block_outputs", "SQUAREHEAD_EPS",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100
SQUAREHEAD_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7, the authors' ε


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels of a causal LM aligned with its logits: position ``t`` predicts token ``t+1``.

    The last position has no target (``-100``).
    """
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"{name} must be labels' shape plus a vocabulary axis: {name} "
                         f"{tuple(logits.shape)}, labels {tuple(labels.shape)}")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``−log p(y_t)`` over the positions whose label is not ``-100``.

    ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` (aligned with the logits). Returns a scalar.
    """
    _check_logits(logits, labels)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation: ``T² · mean_t KL(p_t ‖ p_s)`` with ``p = softmax(logits / T)``.

    The mean is over the positions whose label is not ``-100`` (the positions CE trains), as in the
    authors' code; ``KL(p_t ‖ p_s) = Σ_v p_t,v (log p_t,v − log p_s,v)``. The ``T²`` factor keeps the
    gradient's scale independent of the temperature (Hinton et al. 2015).

    ``student_logits``, ``teacher_logits`` ``[B, T, V]``; ``labels`` ``[B, T]``. Returns a scalar.
    """
    temperature = _validate.real(temperature, "temperature", low=0.0, low_open=True)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    _check_logits(student_logits, labels, "student_logits")
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / valid.sum()
    return kl * temperature**2


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                    mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                    eps: float = SQUAREHEAD_EPS) -> torch.Tensor:
    """``Σ_i mean((h_s,i − h_t,i)²) / (mean(h_t,i²) + ε)`` over the layers ``i``.

    ``student_hidden`` and ``teacher_hidden``: sequences of ``[B, T, D]`` tensors, one per block output,
    in the same order (the embedding output excluded, see :func:`block_outputs`). ``mask``: ``[B, T]``
    (True/1 = a real token) shared by every layer, or one mask per layer (``None`` entries: every
    position counts), or ``None``. The means run over every element of the valid tokens. Returns a
    scalar; its gradient flows into the student's states only (the teacher's are detached).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student_hidden has {len(student_hidden)} layers, teacher_hidden "
                         f"{len(teacher_hidden)}: they must match")
    if len(student_hidden) == 0:
        raise ValueError("student_hidden must hold at least one layer's hidden states")
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(student_hidden)
    if len(masks) != len(student_hidden):
        raise ValueError(f"mask holds {len(masks)} per-layer masks for {len(student_hidden)} layers")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for i, (h_s, h_t, m) in enumerate(zip(student_hidden, teacher_hidden, masks)):
        if h_s.shape != h_t.shape:
            raise ValueError(f"layer {i}: student {tuple(h_s.shape)} and teacher {tuple(h_t.shape)} "
                             "hidden states differ in shape")
        h_s, h_t = h_s.float(), h_t.detach().float()
        if m is not None:
            if m.shape != h_s.shape[:-1]:
                raise ValueError(f"layer {i}: mask {tuple(m.shape)} must be the hidden states' shape "
                                 f"without the last axis, {tuple(h_s.shape[:-1])}")
            h_s, h_t = h_s[m.bool()], h_t[m.bool()]
        total = total + (h_s - h_t).pow(2).mean() / (h_t.pow(2).mean() + eps)
    return total


def block_outputs(outputs) -> tuple[list[torch.Tensor], list[str]]:
    """The block outputs in a Hugging Face model output called with ``output_hidden_states=True``.

    Returns ``(states, stacks)``: every ``hidden_states`` entry but the first (the embedding output),
    encoder blocks first then decoder blocks for an encoder-decoder; ``stacks[i]`` is ``"encoder"``,
    ``"decoder"`` or ``"decoder-only"``, saying which token mask applies to ``states[i]``.

    As in Hugging Face's T5, Whisper and MPT (and in the authors' MPT code), the last entry of each
    stack is that stack's final layer norm applied to its last block's output; the others are raw
    block outputs.
    """
    encoder = getattr(outputs, "encoder_hidden_states", None)
    decoder = getattr(outputs, "decoder_hidden_states", None)
    if encoder is not None or decoder is not None:
        if encoder is None or decoder is None:
            raise ValueError("an encoder-decoder output must hold both encoder_hidden_states and "
                             "decoder_hidden_states (call the model with output_hidden_states=True)")
        enc, dec = list(encoder[1:]), list(decoder[1:])
        return enc + dec, ["encoder"] * len(enc) + ["decoder"] * len(dec)
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is None:
        raise ValueError("the model output holds no hidden states: call it with output_hidden_states=True")
    return list(hidden[1:]), ["decoder-only"] * (len(hidden) - 1)
