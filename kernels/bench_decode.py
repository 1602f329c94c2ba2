"""End-to-end greedy decoding on CPU: dense fp32 vs dense bf16 vs sparse (SparseLinear) MPT models.

An MPT-shaped model at MPT-7B width (d_model 4096, 32 heads, 4x FFN, a few blocks, random weights; the
vocabulary is reduced so that the dense LM head keeps about the share of the weights it has in the 32-block
MPT-7B), pruned by magnitude to each pattern (default 70% and 2:4), decodes ``--new-tokens`` tokens greedily
for batch 1 and 8; the models run interleaved. Reports tokens/s (best and median round) and ratios.
``--teachers`` also times the task teachers when ``sparsekit.tasks`` provides them.

    python kernels/bench_decode.py --json build/bench_decode.json
    python kernels/bench_decode.py --quick        # 1 block, batch 1, 32 tokens
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsekit.benchmarking import bench_decode, machine_info  # noqa: E402


def teacher_rows(new_tokens: int, repeats: int) -> list[dict]:
    """Tokens/s of each task teacher dense vs 70%-pruned + sparsified, when the tasks exist."""
    try:
        from sparsekit import tasks
    except ImportError:
        print("sparsekit.tasks is not available: teacher rows skipped")
        return []
    from sparsekit.benchmarking import teacher_decode

    rows = []
    for name in ("translation", "speech", "math"):
        try:
            rows.extend(teacher_decode(tasks.get(name), new_tokens=new_tokens, repeats=repeats))
        except Exception as error:  # a teacher that is not trained yet is reported, not fatal
            print(f"teacher {name!r} skipped: {type(error).__name__}: {error}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--patterns", nargs="+", default=["70%", "2:4"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread timed by its CPU time: single-core costs, robust to other processes")
    parser.add_argument("--quick", action="store_true", help="1 block, batch 1, 32 new tokens, 2 rounds")
    parser.add_argument("--teachers", action="store_true", help="also time the task teachers if available")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    if args.quick:
        args.layers, args.batches, args.new_tokens, args.repeats = 1, [1], 32, 2
    print("machine:", json.dumps(machine_info()))
    result = bench_decode(args.d_model, args.layers, args.vocab, args.patterns, args.batches, args.new_tokens,
                          repeats=args.repeats, timer="cpu" if args.cpu_time else "wall")
    if args.teachers:
        result["teachers"] = teacher_rows(args.new_tokens, args.repeats)
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(pd.DataFrame(result["rows"]).to_string(index=False))
        if result.get("teachers"):
            print(pd.DataFrame(result["teachers"]).to_string(index=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print("wrote", args.json)
    return result


if __name__ == "__main__":
    main()
