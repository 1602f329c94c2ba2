"""Sparse fine-tuning under FSDP2 in two CPU processes (gloo) against the same run in one process.

tests/fsdp_finetune_script.py prunes a tiny MPT with SparseGPT (60 %) and fine-tunes it with KD + SquareHead
through ``finetune(fsdp=True)``: accelerate's FSDP2 plugin shards the student (activation checkpointing of
each block), ``shard_teacher`` the teacher. The single-process run uses the same data, seed and global batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from distill_helpers import stack_rows, tiny_mpt  # noqa: E402
from fsdp_finetune_script import LOSS, motif_rows  # noqa: E402

from sparsekit.distill import SparseTrainer  # noqa: E402
from sparsekit.distill.losses import block_outputs, kd_loss, shift_labels, squarehead_loss  # noqa: E402
from sparsekit.fileio import verify_manifest  # noqa: E402

SCRIPT = Path(__file__).parent / "fsdp_finetune_script.py"
ROOT = Path(__file__).resolve().parents[1]
# FSDP reduces the two ranks' gradients in another order than one process sums them: fp32 rounding, which
# Adam's normalised step carries into the weights. Measured here: 1.2e-4 (weights), 4.7e-5 (step losses).
WEIGHT_TOLERANCE = 5e-4
LOSS_TOLERANCE = 2e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_together(*commands: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    started = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT) for command in commands]
    for process in started:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _run_together([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), str(out)],
                  [sys.executable, str(SCRIPT), str(out), "--single"])
    reports = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("fsdp-rank0", "fsdp-rank1", "single-rank0")}
    return out, reports


def _masks(out: Path) -> dict[str, torch.Tensor]:
    pruned = load_file(str(out / "fsdp-pruned.safetensors"))
    return {name: weight != 0 for name, weight in pruned.items()
            if name.startswith("transformer.blocks") and name.endswith(".weight") and weight.dim() == 2}


def test_every_rank_trains_sharded_with_bool_masks_kept_after_every_step(runs):
    _, reports = runs
    for rank in (0, 1):
        report = reports[f"fsdp-rank{rank}"]
        assert report["world"] == 2
        assert report["weight_types"] == ["DTensor"]  # the student's weights are FSDP shards
        assert report["mask_dtypes"] == ["torch.bool"]
        assert report["checkpointed_blocks"] == 2  # activation checkpointing of both MptBlocks
        assert report["steps_checked"] == 12
        assert report["violations"] == 0  # no pruned weight regrew on this rank's shard, after any step
        assert report["masks_changed"] == 0  # each mask shard is this rank's rows of the one-shot mask
        assert report["masks_sharded_at_start"] is True
        assert report["zeros_after_load"]  # every rank reloads rank 0's checkpoint with the zeros in place
    assert reports["fsdp-rank0"]["zeros_in_memory"] and reports["fsdp-rank0"]["changed_from_pruned"]
    assert "zeros_in_memory" not in reports["fsdp-rank1"]  # the gathered model lives on rank 0 only
    assert reports["fsdp-rank0"]["losses"] != reports["fsdp-rank1"]["losses"]  # the ranks saw different rows


def test_teacher_is_sharded_frozen_and_unchanged(runs):
    _, reports = runs
    for rank in (0, 1):
        report = reports[f"fsdp-rank{rank}"]
        assert report["teacher_type"].startswith("FSDP")
        assert not report["teacher_requires_grad"] and not report["teacher_grads"]
        assert report["teacher_unchanged"]
    single = reports["single-rank0"]
    assert single["teacher_unchanged"] and not single["teacher_requires_grad"]
    assert single["masks_sharded_at_start"] is False  # one process: plain masks


def test_loss_falls_and_matches_the_single_process_run(runs):
    _, reports = runs
    sharded = [(a + b) / 2 for a, b in zip(reports["fsdp-rank0"]["losses"], reports["fsdp-rank1"]["losses"])]
    single = reports["single-rank0"]["losses"]
    assert len(sharded) == len(single) == 12
    assert sum(sharded[-2:]) < 0.7 * sum(sharded[:2])
    assert max(abs(a - b) for a, b in zip(sharded, single)) < LOSS_TOLERANCE


def test_checkpoint_equals_single_process_and_keeps_every_zero(runs):
    out, _ = runs
    verify_manifest(out / "fsdp-model")  # written through staged_directory: complete, sha256 checked
    sharded = load_file(str(out / "fsdp-model" / "model.safetensors"))
    single = load_file(str(out / "single-model" / "model.safetensors"))
    pruned = load_file(str(out / "fsdp-pruned.safetensors"))
    assert sharded.keys() == single.keys()
    difference = max(float((sharded[k] - single[k]).abs().max()) for k in sharded)
    moved = max(float((single[k] - pruned[k]).abs().max()) for k in single)
    assert difference < WEIGHT_TOLERANCE < moved / 10  # the tolerance is far below what training changed
    masks = _masks(out)
    assert len(masks) == 8  # 4 Linears in each of 2 blocks
    for name, mask in masks.items():
        assert torch.equal(sharded[name] != 0, mask), name  # pruned exactly zero, kept ones nonzero
        assert 0.55 < 1 - mask.float().mean() < 0.65


def test_sharded_fine_tuning_brings_the_student_closer_to_the_teacher(runs):
    """Held-out rows: the loss that was trained (KD + SquareHead against the teacher) falls."""
    from transformers import MptForCausalLM

    out, _ = runs
    teacher = tiny_mpt().eval()
    pruned = tiny_mpt().eval()
    missing, _ = pruned.load_state_dict(load_file(str(out / "fsdp-pruned.safetensors")), strict=False)
    assert missing == ["lm_head.weight"]  # tied to the embedding, which was loaded
    trained = MptForCausalLM.from_pretrained(out / "fsdp-model").eval()
    batch = stack_rows(motif_rows(16, seed=1))
    labels = shift_labels(batch["labels"])

    def loss(model) -> float:
        with torch.no_grad():
            s, t = (m(**batch, output_hidden_states=True) for m in (model, teacher))
            states, stacks = block_outputs(s)
            hidden = squarehead_loss(states, block_outputs(t)[0], SparseTrainer._token_masks(batch, stacks))
            return float(LOSS["kd"] * kd_loss(s.logits, t.logits, labels) + LOSS["squarehead"] * hidden)

    assert loss(trained) < 0.8 * loss(pruned)


def test_cli_under_the_shipped_accelerate_config_shards_and_keeps_the_zeros(tmp_path):
    """``accelerate launch --config_file configs/accelerate_fsdp.yaml -m sparsekit.cli finetune``: the path
    the README gives, in two CPU processes, under the config's bf16 mixed precision."""
    import json as json_module

    from transformers import MptForCausalLM

    teacher = tiny_mpt()
    teacher.save_pretrained(tmp_path / "teacher")
    student = tiny_mpt()
    with torch.no_grad():
        for name, module in student.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("transformer.blocks"):
                module.weight.mul_(torch.rand_like(module.weight) > 0.6)
    masks = {name: p != 0 for name, p in student.state_dict().items() if name.startswith("transformer.blocks")
             and p.dim() == 2}
    student.save_pretrained(tmp_path / "student")
    rows = [{k: v.tolist() for k, v in row.items()} for row in motif_rows(32)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json_module.dumps(row) for row in rows))
    accelerate = Path(sys.executable).parent / "accelerate"
    config = ROOT / "configs" / "accelerate_fsdp.yaml"
    _run_together([str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2",
                   "--main_process_port", str(_free_port()),
                   "-m", "sparsekit.cli", "finetune", str(tmp_path / "student"), "--teacher",
                   str(tmp_path / "teacher"), "--data", str(tmp_path / "rows.jsonl"),
                   "--out", str(tmp_path / "out"), "--steps", "4", "--batch-size", "4", "--lr", "3e-3",
                   "--loss", "SquareHead", "--quiet"])
    metrics = json_module.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["fsdp"] is True and metrics["steps"] == 4
    trained = MptForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for name, mask in masks.items():
        assert torch.equal(trained[name] != 0, mask), name
    assert any(not torch.equal(trained[name], student.state_dict()[name]) for name in masks)


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_fsdp_check", ROOT / "kernels" / "gpu_fsdp_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_without_cuda_and_its_shell_script_parses(monkeypatch, capsys):
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main([])
    assert stopped.value.code == gpu_check.EXIT_NO_CUDA == 3
    assert "no CUDA device" in capsys.readouterr().err
    assert subprocess.run(["bash", "-n", str(ROOT / "kernels" / "gpu_fsdp_check.sh")]).returncode == 0
    assert gpu_check.SCRIPT == SCRIPT


def test_gpu_check_judges_the_cpu_runs_reports_as_passing(runs):
    """The GPU driver's checks pass on this machine's sharded run (and would catch a regrown weight)."""
    out, reports = runs
    gpu_check = _gpu_check_module()
    for rank in (0, 1):
        assert all(gpu_check.rank_checks(reports[f"fsdp-rank{rank}"]).values())
    broken = {**reports["fsdp-rank0"], "violations": 3}
    assert not gpu_check.rank_checks(broken)["no pruned weight regrew after any step"]
    assert gpu_check.weight_difference(out / "fsdp-model", out / "single-model") < gpu_check.WEIGHT_TOLERANCE


def test_bad_fsdp_options_are_refused_by_name(monkeypatch):
    from sparsekit.distill.experiment import RecoveryExperiment, recovery_config, with_overrides
    from sparsekit.distill.finetune import finetune, fsdp_config

    teacher = tiny_mpt()
    rows = motif_rows(8)
    with pytest.raises(ValueError, match="fsdp must be"):
        finetune(tiny_mpt(), teacher, rows, stack_rows, "CE", steps=1, batch_size=4, fsdp="yes")
    with pytest.raises(ValueError, match="distributed launch"):
        finetune(tiny_mpt(), teacher, rows, stack_rows, "CE", steps=1, batch_size=4, fsdp=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="lora_rank"):
        finetune(tiny_mpt(), teacher, rows, stack_rows, "CE", steps=1, batch_size=4, fsdp=True, lora_rank=2)
    with pytest.raises(ValueError, match="_no_split_modules"):
        fsdp_config(torch.nn.Linear(2, 2))
    config = fsdp_config(teacher, activation_checkpointing=False)
    assert config["transformer_layer_cls_to_wrap"] == ["MptBlock"] and not config["activation_checkpointing"]
    with pytest.raises(ValueError, match="fsdp must be True or False"):
        with_overrides(recovery_config("math", "smoke"), fsdp="no")
    with pytest.raises(ValueError, match="stream"):
        RecoveryExperiment("math", "smoke", stream="yes")


def test_recovery_experiment_shards_t5_runs_and_rank0_evaluates_and_saves(tmp_path):
    """T5 (embeddings shared by three modules, a decoder with a KV cache) through the experiment's sharded
    path: every rank fine-tunes, rank 0 evaluates, saves and returns the results."""
    from transformers import AutoModelForSeq2SeqLM

    from sparsekit.masks import sparsity_report

    _run_together([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()),
                   str(Path(__file__).parent / "fsdp_experiment_script.py"), str(tmp_path)])
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert other["results"] is None
    assert main["broadcast"] and other["broadcast"]  # rank 1 holds rank 0's weights after the broadcast
    [row] = main["results"]
    assert row["split"] == "test" and row["pattern"] == "80%" and 0 <= row["value"] <= 1
    [folder] = list((tmp_path / "runs").iterdir())
    verify_manifest(folder)
    saved = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert sparsity_report(saved)["sparsity"].iloc[-1] > 0.79
