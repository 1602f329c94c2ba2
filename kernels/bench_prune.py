"""Benchmark: ``sparsegpt_prune`` on one large layer against a plain torch implementation of the same steps.

``python kernels/bench_prune.py [--size 4096] [--repeats 3] [--json PATH]``

Both solvers run on the same weight and the same symmetric positive definite ``H = 2/n XᵀX`` (``X`` with
correlated features: an AR(1) process along the features, unequal per-feature scales), interleaved, each
``--repeats`` times; the table shows the median seconds, the ratio sparsekit / plain, the relative
reconstruction error ``‖(W − Ŵ)X‖² / ‖WX‖²`` of each, and the fraction of mask entries on which they differ
(rounding in near-ties; the float32 arithmetic is ordered differently). The plain
implementation is the textbook form of the algorithm (the weight kept ``[out, in]``, a column of the block
cloned, a rank-1 update of the rest of the block per column, the lazy update after each block), so the
ratio measures the overhead (or gain) of sparsekit's version of the same arithmetic. Timings on a shared
CPU are noisy: only the side-by-side ratio is meaningful.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sparsekit.prune import sparsegpt_prune


def correlated_hessian(size: int, tokens: int, rho: float = 0.9, seed: int = 0) -> torch.Tensor:
    """``H = 2/n XᵀX``, ``X`` ``[tokens, size]`` with AR(1) features ``x_j = ρ x_{j-1} + √(1-ρ²) z_j``.

    Each feature is then scaled at random; the spectrum of ``H`` decays, as real layer inputs do.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, size, generator=g)
    X = torch.empty_like(z)
    X[:, 0] = z[:, 0]
    for j in range(1, size):  # cheap: one vector op per feature
        X[:, j] = rho * X[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
    X *= torch.exp(0.5 * torch.randn(size, generator=g))
    return 2.0 / tokens * X.t() @ X


def plain_sparsegpt(W, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """The same steps written plainly (rows of W are outputs), for the side-by-side timing."""
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if nm is None:
            scores = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(round(sparsity * scores.numel()))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            mask1.view(-1)[torch.sort(scores.flatten()).indices[:k]] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                scores = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(scores, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, ~mask


def relative_error(W, W_pruned, H) -> float:
    """``‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``."""
    delta = W - W_pruned
    return float(((delta @ H) * delta).sum() / ((W @ H) * W).sum())


def timed(fn, *args, **kwargs) -> tuple[float, tuple]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def run(size: int, tokens: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    W = torch.randn(size, size) / size**0.5
    H = correlated_hessian(size, tokens)
    rows = []
    for label, kwargs in (("50% unstructured", {"sparsity": 0.5}), ("2:4", {"sparsity": 0.5, "nm": (2, 4)})):
        ours, plain = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            seconds, (W_ours, keep_ours) = timed(sparsegpt_prune, W, H, **kwargs)
            ours.append(seconds)
            seconds, (W_plain, keep_plain) = timed(plain_sparsegpt, W, H, **kwargs)
            plain.append(seconds)
        rows.append({
            "pattern": label,
            "sparsekit_s": statistics.median(ours),
            "plain_s": statistics.median(plain),
            "ratio": statistics.median(ours) / statistics.median(plain),
            "sparsekit_runs_s": ours,
            "plain_runs_s": plain,
            "max_abs_diff": float((W_ours - W_plain).abs().max()),
            "mask_disagreement": float((keep_ours != keep_plain).float().mean()),
            "rel_error_sparsekit": relative_error(W, W_ours, H),
            "rel_error_plain": relative_error(W, W_plain, H),
            "zeros": float((W_ours == 0).float().mean()),
        })
    return {
        "benchmark": "sparsegpt_prune vs plain torch, same steps",
        "shape": [size, size], "calibration_tokens": tokens, "repeats": repeats, "torch_threads": threads,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "note": "CPU timings on a shared machine: compare the ratio, not the seconds",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the layer is size × size (default 4096)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind H")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.size, args.tokens, args.repeats, args.threads)
    print(f"sparsegpt_prune on a {args.size}×{args.size} layer, H from {args.tokens} correlated tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'pattern':<18} {'sparsekit s':>12} {'plain s':>10} {'ratio':>7} {'rel err sk':>11} "
          f"{'rel err plain':>14} {'mask differs':>13}")
    for row in result["rows"]:
        print(f"{row['pattern']:<18} {row['sparsekit_s']:>12.2f} {row['plain_s']:>10.2f} "
              f"{row['ratio']:>7.2f} {row['rel_error_sparsekit']:>11.6f} {row['rel_error_plain']:>14.6f} "
              f"{row['mask_disagreement']:>13.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
