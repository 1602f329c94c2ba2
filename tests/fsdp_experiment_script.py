"""A smoke-scale translation (T5) RecoveryExperiment with ``fsdp=True``, run by tests/test_distill_fsdp.py
under ``torchrun --nproc_per_node 2`` (CPU, gloo): writes ``OUT/rank{R}.json`` (rank 0: its run rows)."""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from sparsekit.distill import experiment  # noqa: E402
from sparsekit.distill.experiment import RecoveryExperiment, recovery_config, with_overrides  # noqa: E402


def broadcast_reaches_every_rank() -> bool:
    """Rank-dependent weights become rank 0's (what the experiment does to each pruned model)."""
    experiment._join_process_group()
    probe = torch.nn.Linear(3, 2)
    with torch.no_grad():
        probe.weight.fill_(float(os.environ["RANK"]) + 1)
    experiment._broadcast_weights(probe)
    return bool((probe.weight == 1).all())


def main(out: Path) -> None:
    config = with_overrides(recovery_config("translation", "smoke"), patterns=("80%",), headline=("80%",),
                            losses=("CE+SquareHead",), seeds=(0,), train_size=8, steps=2, fsdp=True)
    results = RecoveryExperiment("translation", "smoke", config, progress=False, save_dir=out / "runs").run()
    report = {"results": None, "broadcast": broadcast_reaches_every_rank()}
    if results is not None:
        columns = ["pattern", "loss", "split", "value", "final_loss"]
        report["results"] = results.runs[columns].to_dict("records")
        report["one_shot"] = results.one_shot["value"].tolist()
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
