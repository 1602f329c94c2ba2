"""Train (or load from the cache) every task's teacher and print its metric beside the baseline.

``python -m sparsekit.tasks.train_all [--scale smoke|book] [--only NAME ...]`` (``make teachers``).
:func:`ready_teachers` is the part without evaluation, which ``make book`` runs before the notebooks.
"""

from __future__ import annotations

import argparse
import sys
import time

from sparsekit import fileio, tasks
from sparsekit.tasks import training


def ready_teacher(name: str, scale: str, progress: bool = True, log=print) -> dict:
    """Train or load the teacher of task ``name``, saying which and how long it took.

    Prints (through ``log``) a line before a training run and one after: ``"trained in N s"`` or
    ``"loaded from cache"``; ``progress`` shows the training loop's bar (steps, loss, ETA).
    Returns ``{"task", "status": "trained" | "loaded" | "unavailable", "seconds", "model", "reason"}``;
    a task whose system package is missing (e.g. ``espeak-ng``) is ``"unavailable"``, as in chapter 01.
    transformers' "Loading weights" bars are switched off: a cached teacher gets its one line instead.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        task = tasks.get(name)
        cached = fileio.is_complete(task.teacher_path(scale))
        if not cached:
            steps = task.train_config(scale).steps
            log(f"teacher {name} ({scale}): not in the cache, training {steps} steps")
        label = training.BAR_LABEL.set(f"train {name}")
        try:
            model = task.teacher(scale, progress=progress)
        finally:
            training.BAR_LABEL.reset(label)
    except (ImportError, FileNotFoundError) as err:
        log(f"teacher {name} ({scale}): unavailable ({err})")
        return {"task": name, "status": "unavailable", "seconds": time.perf_counter() - start,
                "model": None, "reason": str(err)}
    seconds = time.perf_counter() - start
    status = "loaded" if cached else "trained"
    said = "loaded from cache" if cached else f"trained in {seconds:.0f} s"
    log(f"teacher {name} ({scale}): {said}  [{task.teacher_path(scale)}]")
    return {"task": name, "status": status, "seconds": seconds, "model": model, "reason": ""}


def ready_teachers(scale: str, names: list[str] | None = None, progress: bool = True,
                   log=print) -> list[dict]:
    """:func:`ready_teacher` for every task (or ``names``), in the order of :func:`sparsekit.tasks.names`."""
    return [ready_teacher(name, scale, progress, log) for name in names or tasks.names()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit.tasks.train_all",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="book", choices=("smoke", "book"))
    parser.add_argument("--only", nargs="+", choices=tasks.names(), metavar="NAME")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or tasks.names():
        ready = ready_teacher(name, args.scale)
        if ready["model"] is None:
            continue
        task = tasks.get(name)
        score = task.evaluate(ready["model"], split="test", scale=args.scale)[task.metric]
        base = task.baseline(split="test", scale=args.scale)[task.metric]
        rows.append((name, task.metric, score, base, ready["seconds"] / 60))
    print(f"\n{'task':<12} {'metric':<9} {'teacher':>8} {'baseline':>9} {'minutes':>8}")
    for name, metric, score, base, minutes in rows:
        print(f"{name:<12} {metric:<9} {score:>8.3f} {base:>9.3f} {minutes:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
