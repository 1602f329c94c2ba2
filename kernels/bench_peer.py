"""sparsekit against DeepSparse (the paper's CPU runtime) on the same pruned MLP, side by side.

    make peer                                        # installs DeepSparse in .venv-peer, then runs this
    python kernels/bench_peer.py --peer-python .venv-peer/bin/python --json build/bench_peer.json
    python kernels/bench_peer.py --quick ...         # 50% / 90%, batch 1, few rounds

The model is a 4096 -> 11008 -> 4096 MLP, ``y = relu(x W1ᵀ) W2ᵀ``, each weight magnitude-pruned per row to
the sparsity. DeepSparse (in its own virtualenv, because it needs numpy < 2; ``kernels/peer_deepsparse.py``)
runs the fp32 weights as an ONNX graph; sparsekit runs the same weights as ``SparseLinear`` layers with bf16
values (format chosen by ``sparsify_linears``) and with int8 values (RTN per channel, the bitmask kernel),
and torch dense fp32 / bf16 run for reference. Every round times each candidate once, in a rotating order,
the DeepSparse process included, so that load from other processes hits all alike. The JSON holds the
machine label, the bytes of each candidate's weights and, per sparsity and batch, min / median times and the
ratio of each candidate's time to DeepSparse's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsekit import benchmarking as bench  # noqa: E402
from sparsekit.kernels import sparsify_linears  # noqa: E402

OPS = torch.ops.sparsekit
PEER_SCRIPT = Path(__file__).with_name("peer_deepsparse.py")


class Peer:
    """The DeepSparse process: one JSON request / reply per line."""

    def __init__(self, python: str):
        self.process = subprocess.Popen([python, str(PEER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        while line and not line.startswith("{"):  # DeepSparse prints a banner when it compiles
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the DeepSparse process ended (exit code {self.process.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def mlp(w1: torch.Tensor, w2: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0], bias=False), nn.ReLU(),
                          nn.Linear(w2.shape[1], w2.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
    return model.eval()


def int8_runner(w1: torch.Tensor, w2: torch.Tensor):
    parts = [bench.quantize_rtn_parts(w, 8) for w in (w1, w2)]

    def run(x):
        h = x
        for i, p in enumerate(parts):
            h = OPS.bitmask_linear(h, p["bitmask"], p["values"], p["row_offsets"], h.shape[-1], p["scales"],
                                   p["group_size"])
            if i == 0:
                h = torch.relu(h)
        return h

    tensors = [t for p in parts for t in p.values() if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return run, nbytes


def compare(peer: Peer, sparsity: float, batches, repeats: int, threads: int, d: int, hidden: int,
            seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    pattern = f"{round(100 * sparsity)}%"
    w1 = bench.prune_weight(torch.randn(hidden, d, generator=generator) / d**0.5, pattern)
    w2 = bench.prune_weight(torch.randn(d, hidden, generator=generator) / hidden**0.5, pattern)
    dense, dense_bf16, sparse = mlp(w1, w2), mlp(w1, w2).to(torch.bfloat16), mlp(w1, w2)
    table = sparsify_linears(sparse, targets=["0", "2"], dtype=torch.bfloat16, min_sparsity=0.0)
    int8_run, int8_bytes = int8_runner(w1, w2)
    candidates = {
        "torch dense fp32": (lambda x: dense(x), 4 * (w1.numel() + w2.numel()), torch.float32),
        "torch dense bf16": (lambda x: dense_bf16(x), 2 * (w1.numel() + w2.numel()), torch.bfloat16),
        "sparsekit bf16": (lambda x: sparse(x), int(table["nbytes"].sum()), torch.float32),
        "sparsekit int8": (int8_run, int8_bytes, torch.float32),
    }
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "mlp.npz"
        np.savez(npz, w1=w1.numpy(), w2=w2.numpy())
        rows = []
        for batch in batches:
            info = peer.ask(cmd="load", npz=str(npz), batch=batch, threads=threads)
            xs = {dtype: torch.randn(batch, d, generator=generator).to(dtype)
                  for dtype in (torch.float32, torch.bfloat16)}
            timed = {name: (lambda i, run=run, x=xs[dtype]: run(x))
                     for name, (run, _, dtype) in candidates.items()}
            peer_times: list[float] = []

            def run_peer(i, peer_times=peer_times):
                peer_times.append(peer.ask(cmd="run", seed=i)["seconds"])

            timed["deepsparse fp32"] = run_peer
            with torch.no_grad():
                times = bench.interleaved_times(timed, repeats, warmup=2)
            times["deepsparse fp32"] = peer_times[-repeats:]  # its own clock, not the pipe's round trip
            peer_best = min(times["deepsparse fp32"])
            nbytes = {name: c[1] for name, c in candidates.items()}
            nbytes["deepsparse fp32"] = 4 * int((w1 != 0).sum() + (w2 != 0).sum())  # kept values, fp32
            for name, t in times.items():
                rows.append({"sparsity": sparsity, "batch": batch, "candidate": name, "min_ms": 1e3 * min(t),
                             "median_ms": 1e3 * float(np.median(t)), "weight_bytes": nbytes[name],
                             "time_vs_deepsparse": min(t) / peer_best, "deepsparse": info.get("version")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", default=".venv-peer/bin/python",
                        help="the Python of the virtualenv holding DeepSparse (make peer)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("build/bench_peer.json"))
    parser.add_argument("--quick", action="store_true", help="50%% and 90%%, batch 1, 4 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sparsities, args.batches, args.repeats = [0.5, 0.9], [1], 4
    if not Path(args.peer_python).exists():
        sys.exit(f"{args.peer_python} not found: run `make peer` (DeepSparse in its own virtualenv)")
    torch.set_num_threads(args.threads)
    peer = Peer(args.peer_python)
    try:
        rows = []
        for sparsity in args.sparsities:
            rows.extend(compare(peer, sparsity, args.batches, args.repeats, args.threads, d=4096,
                                hidden=11008, seed=0))
            print(json.dumps([r for r in rows if r["sparsity"] == sparsity], indent=None)[:2000])
    finally:
        peer.close()
    result = {"machine": bench.machine_info(), "threads": args.threads, "repeats": args.repeats,
              "model": "4096 -> 11008 -> 4096 MLP, relu, magnitude-pruned per row", "rows": rows}
    print(f"written to {bench.write_json(result, args.json)}")


if __name__ == "__main__":
    main()
