import json
from pathlib import Path

import pytest
import torch
from distill_helpers import (
    causal_rows,
    masks_of,
    pruned_copy,
    seq2seq_rows,
    stack_rows,
    tiny_mpt,
    tiny_t5,
    training_args,
)

from sparsekit.blocks import prunable_linears
from sparsekit.distill import SparseTrainer, add_lora, loss_spikes, merge_lora, parse_loss_mix


def _assert_mask_kept(model, start_masks):
    now = masks_of(model)
    assert now.keys() == start_masks.keys()
    for name, mask in start_masks.items():
        weight = dict(prunable_linears(model))[name].weight
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
        assert torch.equal(now[name], mask), name


def test_masks_survive_adamw_weight_decay_checkpoint_and_resume(tmp_path):
    teacher = tiny_mpt()
    start = pruned_copy(teacher)
    start_masks = masks_of(start)
    student = pruned_copy(start, 0.0)  # a copy of the pruned start (sparsity 0: no further pruning)
    args = training_args(tmp_path, max_steps=6, weight_decay=0.1, save_strategy="steps", save_steps=3,
                         learning_rate=1e-2)
    trainer = SparseTrainer(student, args, teacher=teacher, loss="CE+SquareHead", train_dataset=causal_rows(),
                            data_collator=stack_rows)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())  # it did train
    _assert_mask_kept(student, start_masks)

    # the checkpoint holds the zeros
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    for name, mask in start_masks.items():
        assert torch.equal(saved[name + ".weight"][~mask], torch.zeros(int((~mask).sum())))

    # resume from step 3 into a fresh copy of the pruned start
    resumed = pruned_copy(start, 0.0)
    trainer = SparseTrainer(resumed, training_args(tmp_path, max_steps=6, weight_decay=0.1,
                                                   learning_rate=1e-2),
                            teacher=teacher, loss="CE+SquareHead", train_dataset=causal_rows(),
                            data_collator=stack_rows)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert trainer.state.global_step == 6
    _assert_mask_kept(resumed, start_masks)


def test_loss_components_are_logged_and_recorded(tmp_path):
    teacher = tiny_mpt()
    student = pruned_copy(teacher, 0.7)
    trainer = SparseTrainer(student, training_args(tmp_path, max_steps=4), teacher=teacher,
                            loss={"ce": 1.0, "kd": 0.5, "squarehead": 1.0}, temperature=2.0,
                            train_dataset=causal_rows(), data_collator=stack_rows)
    trainer.train()
    assert [entry["step"] for entry in trainer.record] == [1, 2, 3, 4]
    for entry in trainer.record:
        assert entry["loss"] == pytest.approx(entry["ce"] + 0.5 * entry["kd"] + entry["squarehead"], rel=1e-5)
        assert entry["grad_norm"] > 0
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert all({"ce", "kd", "squarehead"} <= set(log) for log in logged)
    assert trainer.stability()["spikes"] >= 0


def test_encoder_decoder_squarehead_counts_encoder_and_decoder_blocks(tmp_path):
    teacher = tiny_t5()
    student = pruned_copy(teacher, 0.5)
    rows = seq2seq_rows()
    batch = stack_rows(rows[:4])
    trainer = SparseTrainer(student, training_args(tmp_path, max_steps=3), teacher=teacher, loss="SquareHead",
                            train_dataset=rows, data_collator=stack_rows)
    from sparsekit.distill import block_outputs, squarehead_loss

    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(**batch, output_hidden_states=True)
    states_s, stacks = block_outputs(s)
    states_t, _ = block_outputs(t)
    assert stacks == ["encoder"] * 2 + ["decoder"] * 2
    masks = [batch["attention_mask"]] * 2 + [batch["labels"] != -100] * 2
    expected = squarehead_loss(states_s, states_t, masks)
    student.eval()
    assert trainer.compute_loss(student, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    student.train()
    trainer.train()
    _assert_mask_kept(student, masks_of(pruned_copy(teacher, 0.5)))


def test_lora_merge_keeps_the_mask(tmp_path):
    teacher = tiny_mpt()
    student = pruned_copy(teacher, 0.6)
    start_masks = masks_of(student)
    before = {n: linear.weight.detach().clone() for n, linear in prunable_linears(student)}
    peft_model = add_lora(student, r=4)
    trainer = SparseTrainer(peft_model, training_args(tmp_path, max_steps=3, learning_rate=1e-2),
                            teacher=teacher, loss="CE+SquareHead", train_dataset=causal_rows(),
                            data_collator=stack_rows)
    trainer.train()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters learned a non-zero update
    merged = merge_lora(peft_model)
    _assert_mask_kept(merged, start_masks)
    changed = [n for n in start_masks if not torch.equal(dict(prunable_linears(merged))[n].weight, before[n])]
    assert changed  # the update was merged into the kept weights


def test_parse_loss_mix_and_bad_input():
    assert parse_loss_mix("CE+SquareHead") == {"ce": 1.0, "squarehead": 1.0}
    assert parse_loss_mix("ce=1,kd=0.5") == {"ce": 1.0, "kd": 0.5}
    for bad in ("mse=1", "ce=x", "ce=0", {"ce": -1.0}):
        with pytest.raises(ValueError):
            parse_loss_mix(bad)
    with pytest.raises(ValueError, match="teacher"):
        SparseTrainer(tiny_mpt(), training_args("unused"), loss="SquareHead")


def test_loss_spikes_against_the_running_median():
    losses = [1.0] * 10 + [2.0] + [1.0] * 5 + [1.4]
    assert loss_spikes(losses, k=1.5, window=5) == [10]
    assert loss_spikes(losses, k=1.3, window=5) == [10, 16]


def test_finetune_cli_writes_a_sparse_model_and_metrics(tmp_path):
    from sparsekit.cli import main

    teacher = tiny_mpt()
    teacher.save_pretrained(tmp_path / "teacher")
    student = pruned_copy(teacher, 0.5)
    start_masks = masks_of(student)
    student.save_pretrained(tmp_path / "student")
    data = tmp_path / "data.jsonl"
    rows = causal_rows(16)
    data.write_text("\n".join(json.dumps({"input_ids": r["input_ids"].tolist(),
                                          "attention_mask": r["attention_mask"].tolist()}) for r in rows))
    out = tmp_path / "out"
    code = main(["finetune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--data", str(data), "--loss", "CE+SquareHead", "--steps", "3", "--batch-size", "4",
                 "--lr", "1e-3", "--out", str(out), "--quiet", "--bf16"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["record"]) == 3 and metrics["bf16"] is True
    from transformers import MptForCausalLM

    _assert_mask_kept(MptForCausalLM.from_pretrained(out), start_masks)
    assert Path(out / "model.safetensors").exists()


@pytest.mark.parametrize("make, rows", [(tiny_mpt, causal_rows), (tiny_t5, seq2seq_rows)])
def test_ce_component_equals_the_models_own_loss(tmp_path, make, rows):
    model = make()
    batch = stack_rows(rows()[:4])
    trainer = SparseTrainer(model, training_args(tmp_path), loss="CE", train_dataset=rows(),
                            data_collator=stack_rows)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
        assert trainer.compute_loss(model, batch).item() == pytest.approx(expected, rel=1e-5)


def test_lengths_group_batches_and_cut_padding():
    from sparsekit.distill.finetune import finetune, pad_collate

    g = torch.Generator().manual_seed(0)
    # enough rows that transformers' megabatches (up to 50 batches, sorted by length) hold many batches
    lengths = [4 + (7 * i) % 28 for i in range(400)]
    rows = [{"input_ids": torch.randint(2, 60, (n,), generator=g)} for n in lengths]

    def padding_of(**kwargs) -> float:
        real = padded = 0

        def collate(batch):
            nonlocal real, padded
            out = pad_collate(batch)
            if len(batch) == 4:  # training batches (finetune first checks the rows, 64 at a time)
                real, padded = real + int(out["attention_mask"].sum()), padded + out["attention_mask"].numel()
            return out

        teacher = tiny_mpt()
        finetune(pruned_copy(teacher), teacher, rows, collate, "CE", steps=8, batch_size=4, lr=1e-3, warmup=1,
                 **kwargs)
        return 1 - real / padded

    random, grouped = padding_of(), padding_of(lengths=lengths)
    assert random > 0.2 and grouped < random / 4, (random, grouped)
    with pytest.raises(ValueError, match="lengths must give one length per training row"):
        finetune(pruned_copy(tiny_mpt()), tiny_mpt(), rows, pad_collate, "CE", steps=1, batch_size=8,
                 lengths=lengths[:-1])


def test_bf16_runs_student_and_teacher_in_bf16_and_keeps_fp32_weights_and_the_mask():
    from sparsekit.distill.finetune import finetune

    teacher = tiny_mpt()
    start = pruned_copy(teacher, 0.7)
    start_masks = masks_of(start)
    seen: dict[str, set] = {"student": set(), "teacher": set()}

    def run(bf16: bool):
        student = pruned_copy(start, 0.0)
        handles = [next(iter(prunable_linears(model)))[1].register_forward_hook(
                       lambda module, inputs, out, tag=tag: seen[tag].add(out.dtype))
                   for tag, model in (("student", student), ("teacher", teacher))]
        try:
            return finetune(student, teacher, causal_rows(), stack_rows, "CE+SquareHead", steps=4,
                            batch_size=8, lr=1e-2, warmup=1, bf16=bf16)
        finally:
            for handle in handles:
                handle.remove()

    mixed = run(bf16=True)
    assert seen == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    _assert_mask_kept(mixed.model, start_masks)
    seen["student"].clear(), seen["teacher"].clear()
    _, first = next(iter(prunable_linears(mixed.model)))
    handle = first.register_forward_hook(lambda module, inputs, out: seen["student"].add(out.dtype))
    with torch.no_grad():
        mixed.model(**stack_rows(causal_rows()[:2]))  # the returned model: fp32 again, no autocast left
    handle.remove()
    assert seen["student"] == {torch.float32}
    seen["student"].clear()
    full = run(bf16=False)
    assert seen == {"student": {torch.float32}, "teacher": {torch.float32}}
    # the same first batch: the bf16 loss is the fp32 loss to bf16's precision, not another computation
    assert mixed.record[0]["loss"] == pytest.approx(full.record[0]["loss"], rel=3e-2)
    assert mixed.record[0]["loss"] != full.record[0]["loss"]
    with pytest.raises(ValueError, match="bf16 must be True or False"):
        finetune(pruned_copy(start, 0.0), teacher, causal_rows(), stack_rows, "CE", steps=1, batch_size=8,
                 bf16="yes")


def test_grouped_batches_follow_the_run_seed(tmp_path):
    rows = causal_rows(64)
    lengths = [int(row["attention_mask"].sum()) + i % 5 for i, row in enumerate(rows)]

    def order(seed: int) -> list[int]:
        trainer = SparseTrainer(tiny_mpt(), training_args(tmp_path, seed=seed), loss="CE", train_dataset=rows,
                                data_collator=stack_rows, lengths=lengths)
        return list(trainer._get_train_sampler())

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(1)) == list(range(len(rows)))
