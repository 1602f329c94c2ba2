"""Train (or load from the cache) every task's teacher and print its metric beside the baseline.

``python -m sparsekit.tasks.train_all [--scale smoke|book] [--only NAME ...]`` (``make teachers``).
"""

from __future__ import annotations

import argparse
import sys
import time

from sparsekit import tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit.tasks.train_all",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="book", choices=("smoke", "book"))
    parser.add_argument("--only", nargs="+", choices=tasks.names(), metavar="NAME")
    args = parser.parse_args(argv)
    print(f"{'task':<12} {'metric':<9} {'teacher':>8} {'baseline':>9} {'minutes':>8}")
    for name in args.only or tasks.names():
        task = tasks.get(name)
        start = time.perf_counter()
        teacher = task.teacher(args.scale)
        score = task.evaluate(teacher, split="test", scale=args.scale)[task.metric]
        base = task.baseline(split="test", scale=args.scale)[task.metric]
        minutes = (time.perf_counter() - start) / 60
        print(f"{name:<12} {task.metric:<9} {score:>8.3f} {base:>9.3f} {minutes:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
