"""The one shared, seeded training loop for every teacher.

AdamW with decoupled weight decay, learning rate warmed up linearly over ``warmup`` steps and then
decayed linearly to ``lr · final_lr_ratio`` at ``steps``; gradients clipped to global norm
``clip_norm``; loss = ``model(**batch).loss`` (the task's collate puts ``-100`` on ignored label
positions). The curve is a list of ``{"step", "loss", "lr", "elapsed_s"}`` entries, one every
``log_every`` steps (``loss`` averaged over those steps).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

__all__ = ["train", "lr_at", "seed_everything", "BAR_LABEL"]

BAR_LABEL = contextvars.ContextVar("BAR_LABEL", default="train")
"""The label of the training bar (``make teachers`` sets it to ``"train <task>"``)."""


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, lr: float, warmup: int, steps: int, final_lr_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``lr``, then linear decay to ``lr·final``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return lr * (1.0 - frac * (1.0 - final_lr_ratio))


def train(
    model: torch.nn.Module,
    batches: Iterator[dict],
    config,
    progress: bool = True,
    callback: Callable[[int, torch.nn.Module], dict | None] | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``config.steps`` steps on ``batches``; return the curve.

    ``config`` is a :class:`~sparsekit.tasks.base.TrainConfig`. ``callback(step, model)`` runs every
    ``config.eval_every`` steps (if > 0); a dict it returns is merged into that curve entry.
    """
    seed_everything(config.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    curve: list[dict] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=BAR_LABEL.get(), disable=not progress, mininterval=1.0)
    for step in bar:
        lr = lr_at(step, config.lr, config.warmup, config.steps, config.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        running, count = running + loss.item(), count + 1
        last = step + 1 == config.steps
        if (step + 1) % config.log_every == 0 or last:
            entry = {
                "step": step + 1,
                "loss": running / count,
                "lr": lr,
                "elapsed_s": time.perf_counter() - start,
            }
            if callback is not None and config.eval_every and ((step + 1) % config.eval_every == 0 or last):
                model.eval()
                entry.update(callback(step + 1, model) or {})
                model.train()
            curve.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
            running, count = 0.0, 0
    model.eval()
    return curve
