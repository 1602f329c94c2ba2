"""What fine-tuning refuses: data it cannot learn from, a mismatched teacher, and a non-finite step.

Before training (:func:`check_rows`, :func:`check_teacher`) and on every batch (:func:`check_batch`):

* a row whose labels are all ``-100`` has no target: cross-entropy and KD average over no position,
  ``0 / 0 = NaN``; a row whose ``attention_mask`` is all 0 is all padding: attention over no key is NaN;
* token ids must fit the model (:func:`sparsekit.model_inputs.check_token_batch`);
* the teacher's vocabulary must be the student's for every loss (KD compares the distributions, and the
  teacher runs on the student's token ids, so even a SquareHead-only run reads the teacher's embedding
  at the student's ids); SquareHead also needs the same hidden width and number of blocks.

During training, the first non-finite loss (total or any component) or gradient norm stops the run with
:class:`NonFiniteLossError`, naming the optimizer step, the loss components and the likely causes; a
caller that saves only after training therefore never writes a model broken by the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from sparsekit.model_inputs import IGNORE_INDEX, check_token_batch

__all__ = ["NonFiniteLossError", "check_batch", "check_rows", "check_teacher", "raise_if_nonfinite"]


class NonFiniteLossError(FloatingPointError):
    """Fine-tuning produced a NaN or infinite loss or gradient norm; nothing after that step is trusted.

    Attributes: ``step`` (the 1-based optimizer step), ``values`` (``{name: value}`` of the loss, its
    components and, when it was the gradient norm that failed, ``grad_norm``) and ``causes``.
    """

    def __init__(self, step: int, what: str, values: Mapping[str, float], causes: Sequence[str]):
        self.step, self.what, self.values, self.causes = step, what, dict(values), list(causes)
        shown = ", ".join(f"{name}={value:.6g}" for name, value in self.values.items())
        super().__init__(f"fine-tuning stopped at optimizer step {step}: the {what} is not finite ({shown}); "
                         f"likely cause: {'; or '.join(self.causes)}. Nothing was saved.")


# ---- data ------------------------------------------------------------------------------------------------
def _labels_used(loss_weights: Mapping[str, float], encoder_decoder: bool) -> bool:
    """CE and KD read the labels; SquareHead reads them as the decoder's token mask of an encoder-decoder."""
    return bool({"ce", "kd"} & set(loss_weights)) or encoder_decoder


def check_batch(batch: Mapping, aligned_labels: torch.Tensor | None, loss_weights: Mapping[str, float],
                encoder_decoder: bool, name: str = "batch") -> None:
    """``ValueError`` when a row of ``batch`` is all padding, or (losses that read labels) has no target.

    ``aligned_labels`` are the labels as the losses see them (shifted for a causal LM), ``[rows, T]``.
    """
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{name}['attention_mask'] rows {empty} are all padding (every entry 0): "
                             "attention over no token is NaN; drop empty rows from the data")
    if aligned_labels is None or not _labels_used(loss_weights, encoder_decoder):
        return
    no_target = (aligned_labels == IGNORE_INDEX).all(dim=-1).nonzero().flatten().tolist()
    if no_target:
        shifted = "" if encoder_decoder else " after the causal shift (a row's first token is never a target)"
        raise ValueError(f"{name}['labels'] rows {no_target} have no target: every label is -100{shifted}, "
                         f"so the loss {sorted(loss_weights)} averages over no position (NaN); drop those "
                         "rows or give them targets")


def _check_collated(batch, config, loss_weights, aligned, name: str) -> None:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"collate({name}) must return a dict of model inputs with 'labels' (-100 = no "
                         f"target); got {got}")
    check_token_batch(config, dict(batch), name)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    check_batch(batch, aligned(batch["labels"]), loss_weights, encoder_decoder, name)


def check_rows(rows: Sequence, collate: Callable[[list], dict], config, loss_weights: Mapping[str, float],
               aligned: Callable[[torch.Tensor], torch.Tensor], chunk: int = 64) -> None:
    """Every training row passes :func:`check_batch` and the token checks; errors name the row (``rows[i]``).

    ``aligned(labels)`` gives the labels as the losses see them. Rows are collated ``chunk`` at a time
    (padding cannot hide a fault: a padded row of padding only is still all padding, a padded row without
    targets still has none); a chunk that fails is checked row by row to name the row.
    """
    for start in range(0, len(rows), chunk):
        part = list(rows[start:start + chunk])
        name = f"rows[{start}:{start + len(part)}]"
        try:
            _check_collated(collate(part), config, loss_weights, aligned, name)
        except (TypeError, ValueError):
            for i, row in enumerate(part, start):
                try:
                    batch = collate([row])
                except (TypeError, ValueError) as error:
                    raise type(error)(f"rows[{i}] cannot be collated: {error}") from error
                _check_collated(batch, config, loss_weights, aligned, f"rows[{i}]")
            raise


def _blocks(model: nn.Module) -> list[int]:
    from sparsekit.blocks import transformer_blocks

    stacks: dict[str, int] = {}
    for name, _ in transformer_blocks(model):
        stack = name.rsplit(".", 1)[0]
        stacks[stack] = stacks.get(stack, 0) + 1
    return list(stacks.values())


def check_teacher(student: nn.Module, teacher: nn.Module, loss_weights: Mapping[str, float]) -> None:
    """``ValueError`` when ``teacher`` cannot teach ``student`` with this loss (see the module docstring)."""
    s_config, t_config = getattr(student, "config", None), getattr(teacher, "config", None)
    s_vocab, t_vocab = getattr(s_config, "vocab_size", None), getattr(t_config, "vocab_size", None)
    if s_vocab != t_vocab:
        raise ValueError(f"teacher's vocabulary (vocab_size={t_vocab}, {type(teacher).__name__}) differs "
                         f"from the student's (vocab_size={s_vocab}, {type(student).__name__}); the teacher "
                         f"reads the student's token ids for every loss ({sorted(loss_weights)}): use the "
                         "teacher the student was pruned from")
    if "squarehead" not in loss_weights:
        return
    s_width, t_width = getattr(s_config, "hidden_size", None), getattr(t_config, "hidden_size", None)
    if s_width != t_width:
        raise ValueError(f"teacher's hidden size {t_width} differs from the student's {s_width}: SquareHead "
                         "compares their hidden states block by block")
    s_blocks, t_blocks = _blocks(student), _blocks(teacher)
    if s_blocks != t_blocks:
        raise ValueError(f"teacher's blocks per stack {t_blocks} differ from the student's {s_blocks}: "
                         "SquareHead compares their hidden states block by block")


# ---- the non-finite stop -----------------------------------------------------------------------------
def _nonfinite_weights(model: nn.Module) -> int:
    return sum(int((~torch.isfinite(p.detach())).sum()) for p in model.parameters() if p.is_floating_point())


def _causes(step: int, values: Mapping[str, float], *, lr: float, temperature: float, student: nn.Module,
            history: Sequence[Mapping]) -> list[str]:
    """The likely causes, those the evidence points to first."""
    causes = []
    broken = _nonfinite_weights(student)
    if broken and step == 1:
        causes.append(f"the student holds {broken} NaN/Inf weights before any update")
    if step > 1 or broken:
        trend = ", ".join(f"step {entry['step']}: {entry['loss']:.4g}" for entry in history[-3:])
        now = f"; {broken} weights are NaN/Inf now" if broken else ""
        causes.append(f"the learning rate {lr:g} is too large (the updates before this step diverged"
                      f"{'; losses ' + trend if trend else ''}{now})")
    kd = values.get("kd")
    if kd is not None and not math.isfinite(kd):
        causes.append(f"the KD temperature {temperature:g} (the logits are divided by it)")
    loss = values.get("loss", math.nan)
    if "grad_norm" in values and math.isfinite(loss) and abs(loss) > 1e6:
        causes.append(f"the loss {loss:.4g} is too large for its gradients (check the loss mix weights)")
    if not causes:
        causes.append(f"the learning rate {lr:g}, the KD temperature {temperature:g} or this batch's data "
                      "(batches without targets or with all-padding rows are refused before their step)")
    return causes


def raise_if_nonfinite(step: int, what: str, values: Mapping[str, float], *, lr: float, temperature: float,
                       student: nn.Module, history: Sequence[Mapping]) -> None:
    """Raise :class:`NonFiniteLossError` when any of ``values`` is NaN or infinite."""
    if all(math.isfinite(value) for value in values.values()):
        return
    causes = _causes(step, values, lr=lr, temperature=temperature, student=student, history=history)
    raise NonFiniteLossError(step, what, values, causes)
