"""GPU check of sharded sparse fine-tuning (issue 18): the CPU acceptance test's path on CUDA (nccl, bf16).

Run by ``kernels/gpu_fsdp_check.sh`` on a machine with CUDA GPUs. It runs ``tests/fsdp_finetune_script.py``
(a tiny MPT pruned 60 % by SparseGPT, fine-tuned with KD + SquareHead through ``finetune(fsdp=True)``:
accelerate's FSDP2 plugin, activation checkpointing, the teacher sharded with ``fully_shard``) three times:

1. sharded over ``--processes`` GPUs (default: up to 2; with one GPU FSDP runs on one rank, whose shard is
   the whole tensor), fp32;
2. the same under bf16 mixed precision;
3. one process, fp32, the same data, seed and global batch (the reference).

Checks, per rank and run: weights are FSDP shards (``DTensor``), masks bool and unchanged, no pruned
weight nonzero after any optimizer step, both blocks checkpointed, the teacher frozen and unchanged, every
rank reloads rank 0's checkpoint with every zero in place, the loss falls; and the largest weight difference
between run 1 and the reference. Writes ``kernels/results/gpu-fsdp-<gpu name>.json`` (GPU, versions, date,
every check) and exits 1 if a check fails, 3 if this machine has no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_finetune_script.py"
WEIGHT_TOLERANCE = 5e-4  # as in tests/test_distill_fsdp.py (reduction order; Adam's normalised step)
EXIT_NO_CUDA = 3


def require_cuda():
    """The CUDA devices' count; ``SystemExit(3)`` with a message when there is none."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        print(f"gpu_fsdp_check: no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda}); "
              "this check runs on a GPU machine only", file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA)
    return torch.cuda.device_count()


def _run(command: list[str], timeout_s: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, text=True, capture_output=True, timeout=timeout_s)
    if done.returncode != 0:
        print(done.stdout[-4000:] + done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"gpu_fsdp_check: {' '.join(command[-3:])} failed with exit code {done.returncode}")


def _sharded(out: Path, processes: int, bf16: bool, timeout_s: int) -> list[str]:
    port = "29511" if bf16 else "29512"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", port, str(SCRIPT), str(out)]
    _run(command + (["--bf16"] if bf16 else []), timeout_s)
    return [f"fsdp{'-bf16' if bf16 else ''}-rank{rank}" for rank in range(processes)]


def rank_checks(report: dict) -> dict[str, bool]:
    """The per-rank checks of one sharded run's report (see tests/test_distill_fsdp.py)."""
    teacher_ok = (report["teacher_type"].startswith("FSDP") and not report["teacher_requires_grad"]
                  and not report["teacher_grads"] and report["teacher_unchanged"])
    return {"weights are DTensor shards": report["weight_types"] == ["DTensor"],
            "masks are bool": report["mask_dtypes"] == ["torch.bool"],
            "no pruned weight regrew after any step": report["violations"] == 0,
            "mask shards unchanged": report["masks_changed"] == 0,
            "masks sharded before the first forward": report["masks_sharded_at_start"] is True,
            "both blocks checkpointed": report["checkpointed_blocks"] == 2,
            "teacher sharded, frozen, unchanged": teacher_ok,
            "zeros kept after save and load": report["zeros_after_load"]}


def weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=None, help="ranks (default: min(2, GPUs))")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default kernels/results/gpu-fsdp-<gpu>.json)")
    parser.add_argument("--timeout-s", type=int, default=240, help="limit for each of the three runs")
    args = parser.parse_args(argv)
    gpus = require_cuda()
    import torch

    processes = args.processes or min(2, gpus)
    if not 1 <= processes <= gpus:
        raise SystemExit(f"gpu_fsdp_check: --processes must be between 1 and the {gpus} GPUs, "
                         f"got {processes}")
    name = torch.cuda.get_device_name(0)
    result = {"check": "gpu_fsdp", "gpu": name, "gpus": gpus, "processes": processes,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        names = [*_sharded(work, processes, False, args.timeout_s),
                 *_sharded(work, processes, True, args.timeout_s)]
        _run([sys.executable, str(SCRIPT), str(work), "--single"], args.timeout_s)
        failed = []
        for run in names:
            report = json.loads((work / f"{run}.json").read_text())
            checks = rank_checks(report)
            failed += [f"{run}: {check}" for check, ok in checks.items() if not ok]
            result["runs"][run] = {"checks": checks, "losses": report["losses"]}
        for run in ("fsdp", "fsdp-bf16"):
            losses = [sum(step) / processes for step in zip(*(result["runs"][f"{run}-rank{r}"]["losses"]
                                                               for r in range(processes)))]
            falls = sum(losses[-2:]) < 0.7 * sum(losses[:2])
            result["runs"][run] = {"loss falls": falls, "first": losses[0], "last": losses[-1]}
            failed += [] if falls else [f"{run}: the loss does not fall"]
        difference = weight_difference(work / "fsdp-model", work / "single-model")
        result["max weight difference, fp32 sharded vs single"] = difference
        result["tolerance"] = WEIGHT_TOLERANCE
        if not difference < WEIGHT_TOLERANCE:
            failed.append(f"fp32 sharded and single-process weights differ by {difference:.3g}")
    result["failed"] = failed
    from sparsekit.fileio import atomic_write_json

    out = args.out or ROOT / "kernels" / "results" / f"gpu-fsdp-{re.sub(r'[^A-Za-z0-9]+', '-', name)}.json"
    atomic_write_json(out, result, indent=1)
    summary = ("gpu", "processes", "max weight difference, fp32 sharded vs single", "failed")
    print(json.dumps({k: result[k] for k in summary}, indent=1))
    print(f"gpu_fsdp_check: {'FAILED' if failed else 'passed'}; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
