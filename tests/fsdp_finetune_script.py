"""Sparse fine-tuning of a SparseGPT-pruned tiny MPT under FSDP2, as run by tests/test_distill_fsdp.py
(CPU, gloo) and by kernels/gpu_fsdp_check.py (CUDA, nccl).

``torchrun --nproc_per_node 2 tests/fsdp_finetune_script.py OUT`` shards the student (and the teacher) over
the ranks; ``python tests/fsdp_finetune_script.py OUT --single`` is the single-process reference on the same
data, seed and global batch; ``--bf16`` trains under bf16 mixed precision. Each rank writes
``OUT/<run>-rank{R}.json`` (its checks); rank 0 also saves the trained model through ``save_checkpoint``
to ``OUT/<run>-model``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from distill_helpers import VOCAB, stack_rows, tiny_mpt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import MptForCausalLM, TrainerCallback  # noqa: E402

from sparsekit.distill.finetune import finetune, save_checkpoint  # noqa: E402
from sparsekit.masks import layout_mask  # noqa: E402
from sparsekit.prune import prune_model  # noqa: E402

SPARSITY = 0.6
GLOBAL_BATCH = 8
STEPS = 12
LOSS = {"kd": 1.0, "squarehead": 1.0}  # both terms need the (sharded) teacher


def motif_rows(n: int, length: int = 16, seed: int = 0) -> list[dict]:
    """Unpadded sequences repeating a random 3-token motif (learnable; equal lengths, so a mean over the
    global batch equals the mean of the ranks' means and sharded and single runs see the same loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (3,), generator=g).repeat(length // 3 + 1)[:length]
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids})
    return rows


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class MaskWatch(TrainerCallback):
    """After every optimizer step, on this rank: every weight shard is exactly zero where its mask shard is
    False, and each mask shard still says what the pruning said (its own rows of the one-shot mask)."""

    def __init__(self, masks: dict[str, torch.Tensor], rank: int, world: int):
        self.masks, self.rank, self.world = masks, rank, world
        self.violations = 0
        self.masks_changed = 0
        self.steps_checked = 0
        self.mask_dtypes = set()
        self.sharded = set()
        self.checkpointed_blocks = 0
        self.sharded_at_start = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # before the first forward: each rank holds only its shard of each mask
            self.sharded_at_start = all(isinstance(m.weight_mask, DTensor) for m in model.modules()
                                        if "weight_mask" in getattr(m, "_buffers", {}))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if "weight_mask" not in getattr(module, "_buffers", {}):
                continue
            weight, mask = _local(module.weight.detach()), _local(layout_mask(module))
            one_shot = self.masks[name.replace("_checkpoint_wrapped_module.", "")].to(mask.device)
            self.masks_changed += not torch.equal(mask, one_shot.chunk(self.world)[self.rank])
            self.mask_dtypes.add(str(mask.dtype))
            self.sharded.add(type(module.weight).__name__)
            self.violations += int((weight[~mask] != 0).sum())
        self.checkpointed_blocks = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
        self.steps_checked += 1


def main(out: Path, single: bool, bf16: bool = False) -> None:
    run = ("single" if single else "fsdp") + ("-bf16" if bf16 else "")
    teacher = tiny_mpt().eval()
    student = tiny_mpt()
    calibration = [stack_rows(motif_rows(8, seed=7))]
    prune_model(student, calibration, method="sparsegpt", sparsity=SPARSITY, progress=False)
    pruned = {name: p.detach().clone() for name, p in student.named_parameters()}
    one_shot_masks = {name: m.weight.detach() != 0 for name, m in student.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.startswith("transformer.blocks")}
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}

    world = 1 if single else int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        save_file({name: t.contiguous() for name, t in pruned.items()}, out / f"{run}-pruned.safetensors")
    watch = MaskWatch(one_shot_masks, rank, world)
    result = finetune(student, teacher, motif_rows(64), stack_rows, LOSS, steps=STEPS, lr=3e-3,
                      batch_size=GLOBAL_BATCH // world, warmup=1, max_grad_norm=1.0, seed=0,
                      fsdp=not single, callbacks=[watch], bf16=bf16)
    teacher_params = list(teacher.parameters())
    teacher_unchanged = all(
        torch.equal((p.full_tensor() if hasattr(p, "full_tensor") else p).cpu(), teacher_before[name])
        for (name, _), p in zip(teacher_before.items(), teacher_params))
    report = {
        "rank": rank, "world": world, "losses": [entry["loss"] for entry in result.record],
        "steps_checked": watch.steps_checked, "violations": watch.violations,
        "masks_changed": watch.masks_changed, "masks_sharded_at_start": watch.sharded_at_start,
        "checkpointed_blocks": watch.checkpointed_blocks,
        "mask_dtypes": sorted(watch.mask_dtypes), "weight_types": sorted(watch.sharded),
        "teacher_type": type(teacher).__name__,
        "teacher_requires_grad": any(p.requires_grad for p in teacher_params),
        "teacher_grads": any(p.grad is not None for p in teacher_params),
        "teacher_unchanged": teacher_unchanged,
    }
    if result.model is not None:
        model = result.model
        report["zeros_in_memory"] = all(bool((model.get_parameter(f"{name}.weight").cpu()[~mask] == 0).all())
                                        for name, mask in one_shot_masks.items())
        report["pruned_weights"] = int(sum((~mask).sum() for mask in one_shot_masks.values()))
        report["changed_from_pruned"] = any(not torch.equal(p.cpu(), pruned[name])
                                            for name, p in model.named_parameters())
        save_checkpoint(model, out / f"{run}-model")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    loaded = MptForCausalLM.from_pretrained(out / f"{run}-model")  # every rank reads rank 0's checkpoint
    report["zeros_after_load"] = all(bool((loaded.get_parameter(f"{name}.weight")[~mask] == 0).all())
                                     for name, mask in one_shot_masks.items())
    (out / f"{run}-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    options = parser.parse_args()
    main(options.out, options.single, options.bf16)
