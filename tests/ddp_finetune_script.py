"""Run by tests/test_distill_distributed.py under ``accelerate launch --num_processes 2 --cpu``.

Each rank fine-tunes the same pruned tiny MPT with SquareHead (DDP over gloo) and writes its final
weights and its loss record to ``OUT/rank{R}.safetensors`` / ``OUT/rank{R}.json``.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from distill_helpers import causal_rows, masks_of, pruned_copy, stack_rows, tiny_mpt, training_args  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sparsekit.distill import SparseTrainer  # noqa: E402


def _probe_loss(trainer, model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
    model.train()
    return loss


def main(out: Path) -> None:
    teacher = tiny_mpt()
    student = pruned_copy(teacher, 0.5)
    start_masks = masks_of(student)
    args = training_args(out / "trainer", max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3,
                         warmup_steps=2, ddp_backend="gloo")
    trainer = SparseTrainer(student, args, teacher=teacher, loss="SquareHead", train_dataset=causal_rows(64),
                            data_collator=stack_rows)
    probe = stack_rows(causal_rows(16, seed=1))  # a fixed held-out batch, the same on both ranks
    loss_before = _probe_loss(trainer, student, probe)
    trainer.train()
    loss_after = _probe_loss(trainer, student, probe)
    rank = trainer.args.process_index
    state = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    masks_now = masks_of(student)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": trainer.args.world_size,
        "losses": [entry["loss"] for entry in trainer.record],
        "probe_before": loss_before,
        "probe_after": loss_after,
        "masks_intact": all(torch.equal(masks_now[n], m) for n, m in start_masks.items()),
        "teacher_wrapped": type(trainer.teacher).__name__,
        "student_wrapped": type(trainer.model_wrapped).__name__,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
