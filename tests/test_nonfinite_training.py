"""Fine-tuning stops at the first non-finite loss or gradient norm, refuses data it cannot learn from and a
teacher that does not match, and never saves a broken model (issue 19, items 1 and 6)."""

import copy
import json
import math

import pytest
import torch
from distill_helpers import VOCAB, causal_rows, pruned_copy, seq2seq_rows, tiny_mpt, tiny_t5, training_args
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparsekit.cli import main
from sparsekit.distill import SparseTrainer
from sparsekit.distill.finetune import finetune, pad_collate
from sparsekit.distill.guards import NonFiniteLossError
from sparsekit.distill.trainer import loss_spikes, stability_summary


def tiny_llama(seed: int = 0, **change):
    torch.manual_seed(seed)
    options = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**{**options, **change}))


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16))


def run(student, teacher, loss="CE", rows=None, **options):
    options = {"steps": 6, "batch_size": 4, "warmup": 1, **options}
    rows = rows if rows is not None else causal_rows(16)
    return finetune(student, teacher, rows, pad_collate, loss, **options)


def test_an_explosive_learning_rate_stops_at_the_first_nonfinite_step_and_names_it(tmp_path):
    """lr 1e30 is finite, so it passes the argument checks; the run must stop at its first NaN step."""
    teacher = tiny_llama()
    student = pruned_copy(teacher)
    args = training_args(tmp_path, learning_rate=1e30, per_device_train_batch_size=4, max_steps=6)
    trainer = SparseTrainer(student, args, teacher=teacher, loss="CE", train_dataset=causal_rows(16),
                            data_collator=pad_collate)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    error = info.value
    # every step before the stop was finite and recorded; the stop is the very next one
    assert trainer.record and all(math.isfinite(entry["loss"]) for entry in trainer.record)
    assert error.step == len(trainer.record) + 1 >= 2
    assert not math.isfinite(error.values["loss"]) and "ce" in error.values
    message = str(error)
    assert f"optimizer step {error.step}" in message and "ce=" in message and "loss=" in message
    assert "learning rate 1e+30 is too large" in message and "Nothing was saved" in message
    assert isinstance(error, FloatingPointError)


def test_finetune_returns_nothing_when_a_step_is_not_finite():
    teacher = tiny_mpt()
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        run(pruned_copy(teacher), teacher, lr=1e30)


def test_an_infinite_gradient_norm_stops_before_the_optimizer_changes_a_weight():
    """A finite loss whose gradient overflows: the step is refused before AdamW applies it."""
    teacher = tiny_llama()
    student = pruned_copy(teacher)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(NonFiniteLossError) as info:
        run(student, teacher, loss={"ce": 1e37}, warmup=0)
    error = info.value
    assert error.what == "gradient norm" and error.step == 1
    assert math.isinf(error.values["grad_norm"]) and math.isfinite(error.values["loss"])
    assert "grad_norm=inf" in str(error) and "loss mix weights" in str(error)
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_temperature_that_overflows_kd_is_named_as_the_cause():
    teacher = tiny_llama()
    with pytest.raises(NonFiniteLossError) as info:
        run(pruned_copy(teacher), teacher, "CE+KD", temperature=1e-45)
    assert info.value.step == 1 and not math.isfinite(info.value.values["kd"])
    assert math.isfinite(info.value.values["ce"])  # each component is shown with its own value
    assert "KD temperature 1e-45" in str(info.value)


def test_a_student_that_already_holds_nan_is_named_at_step_one():
    teacher = tiny_mpt()
    student = pruned_copy(teacher)
    with torch.no_grad():
        student.transformer.blocks[0].ffn.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="holds 1 NaN/Inf weights before any update") as info:
        run(student, teacher)
    assert info.value.step == 1


# ---- data refused before training --------------------------------------------------------------------------
def _without_targets(rows, which):
    rows = [dict(row) for row in rows]
    for i in which:
        rows[i]["labels"] = torch.full_like(rows[i]["labels"], -100)
    return rows


@pytest.mark.parametrize("loss", ["CE", "CE+KD"])
def test_rows_without_targets_are_refused_before_training(loss):
    teacher = tiny_mpt()
    rows = _without_targets(causal_rows(8), [0, 1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match=r"rows\[0\]\['labels'\] rows \[0\] have no target"):
        run(pruned_copy(teacher), teacher, loss, rows=rows, steps=2)


def test_one_row_whose_only_target_is_its_first_token_has_none_after_the_shift():
    teacher = tiny_mpt()
    rows = causal_rows(8)
    rows[5] = dict(rows[5], labels=torch.tensor([7] + [-100] * 11))
    with pytest.raises(ValueError, match=r"rows\[5\].*after the causal shift"):
        run(pruned_copy(teacher), teacher, rows=rows, steps=2)


def test_a_row_of_padding_only_is_refused_before_training():
    teacher = tiny_mpt()
    rows = causal_rows(8)
    rows[3] = dict(rows[3], attention_mask=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows\[3\]\['attention_mask'\] rows \[0\] are all padding"):
        run(pruned_copy(teacher), teacher, rows=rows, steps=2)


def test_squarehead_on_a_decoder_only_model_needs_no_labels_but_an_encoder_decoder_does():
    teacher = tiny_mpt()
    rows = _without_targets(causal_rows(8), range(8))
    result = run(pruned_copy(teacher), teacher, "SquareHead", rows=rows, steps=2)
    assert all(math.isfinite(entry["loss"]) for entry in result.record)
    t5 = tiny_t5()
    t5_rows = _without_targets(seq2seq_rows(8), [2])
    with pytest.raises(ValueError, match=r"rows\[2\]\['labels'\]"):
        finetune(pruned_copy(t5), t5, t5_rows, pad_collate, "SquareHead", steps=2, batch_size=4)


def test_a_batch_without_targets_is_refused_by_the_trainer_itself(tmp_path):
    teacher = tiny_mpt()
    args = training_args(tmp_path, per_device_train_batch_size=8, max_steps=1)
    rows = _without_targets(causal_rows(8), range(8))
    trainer = SparseTrainer(pruned_copy(teacher), args, teacher=teacher, loss="CE", train_dataset=rows,
                            data_collator=pad_collate)
    expected = r"batch of optimizer step 1\['labels'\] rows \[0, 1, 2, 3, 4, 5, 6, 7\] have no target"
    with pytest.raises(ValueError, match=expected):
        trainer.train()


@pytest.mark.parametrize("make", [tiny_mpt, tiny_gpt2])
def test_token_ids_the_student_cannot_read_are_refused_by_name(make):
    teacher = make()
    rows = causal_rows(8)
    rows[2] = dict(rows[2], input_ids=rows[2]["input_ids"].clone())
    rows[2]["input_ids"][4] = VOCAB + 3
    expected = rf"rows\[2\]\['input_ids'\].*vocab_size={VOCAB}.*the id {VOCAB + 3}"
    with pytest.raises(ValueError, match=expected):
        run(pruned_copy(teacher), teacher, rows=rows, steps=2)
    rows = causal_rows(8)
    rows[0] = dict(rows[0], input_ids=rows[0]["input_ids"].float())
    with pytest.raises(TypeError, match=r"rows\[0\] cannot be collated: input_ids .* dtype torch.float32"):
        run(pruned_copy(teacher), teacher, rows=rows, steps=2)


def test_sequences_longer_than_the_positions_are_refused_by_name():
    teacher = tiny_gpt2()  # n_positions 16
    rows = causal_rows(8, length=20)
    with pytest.raises(ValueError, match=r"rows\[0\]\['input_ids'\] must be at most 16 tokens.*20 tokens"):
        run(pruned_copy(teacher), teacher, rows=rows, steps=2)


# ---- the teacher -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["CE+KD", "SquareHead", "CE+SquareHead"])
def test_a_teacher_with_another_vocabulary_is_refused_for_every_loss(loss):
    student = pruned_copy(tiny_llama())
    teacher = tiny_llama(vocab_size=VOCAB + 16)
    expected = rf"teacher's vocabulary \(vocab_size={VOCAB + 16}.*vocab_size={VOCAB}\b"
    with pytest.raises(ValueError, match=expected):
        run(student, teacher, loss, steps=1)


def test_squarehead_refuses_a_teacher_of_another_width_or_depth():
    student = pruned_copy(tiny_llama())
    with pytest.raises(ValueError, match="hidden size 32 differs from the student's 16"):
        run(student, tiny_llama(hidden_size=32, intermediate_size=64), "SquareHead", steps=1)
    with pytest.raises(ValueError, match=r"blocks per stack \[3\] differ from the student's \[2\]"):
        run(student, tiny_llama(num_hidden_layers=3), "SquareHead", steps=1)
    # KD reads only the logits: another depth is allowed there
    result = run(student, tiny_llama(num_hidden_layers=3), "CE+KD", steps=1)
    assert result.steps == 1


# ---- spikes ------------------------------------------------------------------------------------------------
def test_a_nonfinite_loss_is_a_spike_and_flags_the_run():
    losses = [2.0, 1.9, 1.8, 1.8, 1.7, 1.7, float("nan"), 1.6, float("inf")]
    assert loss_spikes(losses) == [6, 8]
    assert loss_spikes([float("nan"), 1.0]) == [0]  # even before min_history
    record = [{"step": t + 1, "loss": value} for t, value in enumerate(losses)]
    record[2]["grad_norm"] = float("inf")
    record[3]["grad_norm"] = 0.5
    summary = stability_summary(record)
    assert summary["spikes"] == 2 and summary["spike_steps"] == [7, 9]
    assert summary["nonfinite_steps"] == [3, 7, 9] and summary["finite"] is False
    assert summary["max_grad_norm"] == 0.5
    # the finite losses after a NaN are still compared with a median (the NaN is left out of it)
    assert loss_spikes([1.0] * 6 + [float("nan"), 5.0]) == [6, 7]
    assert stability_summary([{"step": 1, "loss": 1.0}])["finite"] is True


# ---- the command line --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite_cli")
    teacher = tiny_mpt()
    teacher.save_pretrained(root / "teacher")
    pruned_copy(teacher).save_pretrained(root / "student")
    rows = causal_rows(16)
    (root / "data.jsonl").write_text("\n".join(json.dumps({"input_ids": r["input_ids"].tolist(),
                                                           "attention_mask": r["attention_mask"].tolist()})
                                               for r in rows))
    return root


def _finetune_cli(saved, out, *extra):
    return main(["finetune", str(saved / "student"), "--teacher", str(saved / "teacher"), "--data",
                 str(saved / "data.jsonl"), "--loss", "CE", "--steps", "6", "--batch-size", "4", "--warmup",
                 "1", "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--temperature", "inf"),
                                         ("--weight-decay", "nan"), ("--lr", "-1")])
def test_cli_refuses_a_nonfinite_number_by_flag_and_writes_nothing(saved, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        _finetune_cli(saved, out, flag, value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {flag} must be a finite number" in err and f"got {float(value)}" in err
    assert not out.exists()


def test_cli_stops_an_exploding_run_naming_the_step_and_writes_no_model(saved, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        _finetune_cli(saved, out, "--lr", "1e30")
    assert info.value.code == 4
    err = capsys.readouterr().err
    assert "fine-tuning stopped at optimizer step" in err and "learning rate 1e+30" in err
    assert not out.exists()


def test_an_encoder_decoder_label_outside_the_vocabulary_and_an_mpt_row_past_max_seq_len_are_named():
    t5 = tiny_t5()
    rows = seq2seq_rows(8)
    rows[6] = dict(rows[6], labels=rows[6]["labels"].clone())
    rows[6]["labels"][0] = VOCAB
    expected = rf"rows\[6\]\['labels'\] must hold token ids in \[0, {VOCAB}\) or -100"
    with pytest.raises(ValueError, match=expected):
        finetune(pruned_copy(t5), t5, rows, pad_collate, "CE", steps=1, batch_size=4)
    mpt = tiny_mpt()  # max_seq_len 32
    with pytest.raises(ValueError, match=r"rows\[0\]\['input_ids'\] must be at most 32 tokens .*Mpt"):
        run(pruned_copy(mpt), mpt, rows=causal_rows(8, length=40), steps=1)
