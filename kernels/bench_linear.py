"""Sparse CPU kernels vs torch dense (fp32, bf16) and torch CSR int32, against the bandwidth limit.

For each shape (out x in), pattern (unstructured %, or N:M) and batch, every kernel runs interleaved with
the others and with a streaming-read probe, its weight rotated through copies larger than the cache.
Prints the table (min / median ms, limit = bytes / measured bandwidth, fraction of the limit, speedups
over dense) and writes it as JSON with ``--json PATH``.

    python kernels/bench_linear.py                 # the issue's full grid (several minutes)
    python kernels/bench_linear.py --quick         # 11008x4096, 70% / 90% / 2:4, batch 1
    python kernels/bench_linear.py --json build/bench_linear.json
    python kernels/bench_linear.py --cpu-time     # 1 thread, CPU time: robust when the machine is shared
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsekit.benchmarking import PATTERNS, bench_linear, machine_info  # noqa: E402


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(4096, 4096), (11008, 4096)],
                        help="weight shapes OUTxIN (default: 4096x4096 11008x4096)")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="e.g. 70%% 2:4")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="11008x4096, 70%% 90%% 2:4, batch 1, 8 rounds")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread timed by its CPU time: single-core costs, robust to other processes")
    parser.add_argument("--no-torch-csr", action="store_true", help="skip the (slow) torch CSR baseline")
    parser.add_argument("--json", type=Path, help="write the table and the machine description here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    if args.quick:
        args.shapes, args.patterns, args.batches = [(11008, 4096)], ["70%", "90%", "2:4"], [1]
        args.repeats = 8
    print("machine:", json.dumps(machine_info()))
    result = bench_linear(args.shapes, args.patterns, args.batches, repeats=args.repeats,
                          torch_csr=not args.no_torch_csr, timer="cpu" if args.cpu_time else "wall")
    frame = pd.DataFrame(result["rows"])
    columns = ["shape", "pattern", "batch", "kernel", "min_ms", "median_ms", "limit_ms", "frac_of_limit",
               "speedup_vs_fp32", "speedup_vs_bf16", "speedup_vs_best_dense"]
    display = ("display.width", 200, "display.max_rows", 1000, "display.float_format", "{:.2f}".format)
    with pd.option_context(*display):
        print(frame[columns].to_string(index=False))
        print(f"read bandwidth (GB/s) per configuration: min {frame.bandwidth_GBps.min():.1f}, "
              f"max {frame.bandwidth_GBps.max():.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print("wrote", args.json)
    return result


if __name__ == "__main__":
    main()
