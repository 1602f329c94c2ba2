"""The math task at smoke scale: data, tokenizer, metric, baseline, real path."""

import pytest
import torch

from sparsekit import tasks
from sparsekit.tasks.math import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, MathTask, accuracy, final_number


@pytest.fixture(scope="module", autouse=True)
def _tmp_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    tasks.get("math")._tokenizers.clear()
    yield
    mp.undo()


@pytest.fixture(scope="module")
def task():
    return tasks.get("math")


def test_splits_disjoint_and_deterministic(task):
    questions = {s: [r["question"] for r in task.rows(s, "smoke")] for s in task.splits}
    for s, qs in questions.items():
        assert len(set(qs)) == len(qs), s
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(questions[a]) & set(questions[b]), (a, b)
    fresh = MathTask()  # a new instance rebuilds the splits from the seeds
    assert [r["question"] for r in fresh.rows("test", "smoke")] == questions["test"]


def test_templates_and_number_range(task):
    assert {r["template"] for r in task.rows("train", "smoke")} == set(TRAIN_TEMPLATES)
    assert {r["template"] for r in task.rows("heldout", "smoke")} == set(HELDOUT_TEMPLATES)
    for r in task.rows("test", "smoke"):
        assert final_number(r["cot"]) == r["answer"]


def test_tokenizer_round_trips_and_splits_digits(task):
    tok = task.tokenizer("smoke")
    for r in task.rows("test", "smoke")[:10]:
        text = r["question"] + " " + r["cot"]
        assert tok.decode(tok(text)["input_ids"]) == text
    pieces = tok.convert_ids_to_tokens(tok("123")["input_ids"])
    assert [p.lstrip("Ġ") for p in pieces if p.strip("Ġ")] == ["1", "2", "3"]


def test_collate_masks_the_prompt(task):
    rows = task.rows("train", "smoke")[:3]
    batch = task.collate(rows, "smoke")
    tok = task.tokenizer("smoke")
    for i, r in enumerate(rows):
        labels = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert tok.decode(labels, skip_special_tokens=True) == " " + r["cot"]
        assert labels[-1] == tok.eos_token_id


def test_final_number_and_accuracy():
    assert final_number("3 + 4 = 7\n#### 7") == 7
    assert final_number("#### 1,234") == 1234
    assert final_number("#### -5 apples") == -5
    assert final_number("no answer") is None
    assert accuracy([7, None, 3], [7, 2, 4]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="predicted"):
        accuracy([1], [1, 2])


def test_baseline_is_the_most_common_train_answer(task):
    result = task.baseline("test", "smoke")
    common = int(result["baseline"].split()[-1])
    answers = [r["answer"] for r in task.rows("test", "smoke")]
    assert result["accuracy"] == pytest.approx(sum(a == common for a in answers) / len(answers))


def test_evaluate_smoke_teacher(task):
    model = task.teacher("smoke", progress=False)
    result = task.evaluate(model, "test", limit=8, scale="smoke")
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["answered"] <= 1.0
    calib = task.calibration_batches(n=8, batch_size=4, scale="smoke")
    assert len(calib) == 2 and calib[0]["input_ids"].shape[0] == 4


def test_real_path_loads_a_saved_model_by_path(task, tmp_path):
    model = task.new_model("smoke")
    model.save_pretrained(tmp_path, safe_serialization=True)
    task.tokenizer("smoke").save_pretrained(tmp_path)
    loaded = task.real.load_model(str(tmp_path))
    assert type(loaded).__name__ == task.real.model_class == "MptForCausalLM"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tok = task.real.load_tokenizer(str(tmp_path))
    assert tok("#### 12")["input_ids"] == task.tokenizer("smoke")("#### 12")["input_ids"]
    assert task.real.model_id == "neuralmagic/mpt-7b-gsm8k-pt" and task.real.dataset_id == "openai/gsm8k"


def test_bad_split_and_calibration_size(task):
    with pytest.raises(ValueError, match="split"):
        task.rows("dev", "smoke")
    with pytest.raises(ValueError, match="n must be"):
        task.calibration_batches(n=10_000, scale="smoke")
