"""The math task at smoke scale: data, tokenizer, metric, baseline, real path."""

from collections import Counter

import pytest
import torch

from sparsekit import tasks
from sparsekit.tasks.math import (
    DRILL,
    HELDOUT_TEMPLATES,
    TEMPLATES,
    MathTask,
    accuracy,
    borrow_scratchpad,
    final_number,
    identity,
    operations,
    prompt,
    with_scratchpads,
)

EVAL_SPLITS = ("validation", "test", "heldout")


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
    for split in task.splits:
        assert fresh.rows(split, "smoke") == task.rows(split, "smoke"), split


@pytest.mark.parametrize("scale", ["smoke", "book"])
def test_no_evaluated_problem_shares_its_identity_with_train(scale):
    task = MathTask()
    train = {identity(r) for r in task.rows("train", scale) + task.rows("calibration", scale)}
    for split in EVAL_SPLITS:
        keys = [identity(r) for r in task.rows(split, scale)]
        assert not set(keys) & train, split
        assert len(set(keys)) == len(keys), split  # each evaluated problem counts once
        result = task.baseline(split, scale)
        assert result["lookup"] <= 0.05, split
    assert task.baseline("train", scale)["lookup"] == 1.0  # the lookup does find training problems
    counts = Counter(r["template"] for r in task.rows("test", scale))
    assert set(counts) == set(TEMPLATES) and max(counts.values()) - min(counts.values()) <= 1


def test_templates_and_drills(task):
    train = task.rows("train", "smoke")
    assert {r["template"] for r in train} == set(TEMPLATES) | {DRILL}
    assert {r["template"] for r in task.rows("heldout", "smoke")} == set(HELDOUT_TEMPLATES)
    evaluated = set().union(*(operations(r["cot"]) for s in EVAL_SPLITS for r in task.rows(s, "smoke")))
    drills = [r for r in train if r["template"] == DRILL]
    assert drills and not evaluated & set().union(*(operations(r["cot"]) for r in drills))
    assert all(r["template"] != DRILL for r in task.eval_rows("train", "smoke"))


def test_references_score_perfectly_and_fit_the_generation_limit(task, monkeypatch):
    """The metric pipeline (evaluate -> final_number -> accuracy) on the reference chains of thought."""
    tok = task.tokenizer("smoke")
    references = {r["question"]: r["cot"] for s in task.splits for r in task.rows(s, "smoke")}
    monkeypatch.setattr(task, "solve", lambda model, questions, *a, **k: [references[q] for q in questions])
    for split in ("train", *task.splits[1:]):
        rows = task.eval_rows(split, "smoke")
        result = task.evaluate(None, split, scale="smoke")
        assert result["accuracy"] == result["answered"] == 1.0 and result["n"] == len(rows)
        assert set(result["by_template"].values()) == {1.0}
        longest = max(len(tok(" " + r["cot"])["input_ids"]) + 1 for r in rows)
        assert longest < task.generation_limit(split, "smoke"), split


def test_tokenizer_covers_the_heldout_text(task):
    tok = task.tokenizer("smoke")
    for r in task.rows("heldout", "smoke"):
        text = prompt(r["question"]) + " " + r["cot"]
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_borrow_scratchpad_is_right_for_every_pair():
    for a in range(100):
        for b in range(a + 1):
            units, tens = borrow_scratchpad(a, b).strip("()").split(", ")
            lhs, low = units.split("=")
            *_, high = tens.split("=")
            assert int(high) * 10 + int(low) == a - b, (a, b)
            assert (lhs.split("-")[0] != str(a % 10)) == (a % 10 < b % 10), (a, b)  # borrowed
    assert borrow_scratchpad(71, 38) == "(11-8=3, 7-1-3=3)"
    with pytest.raises(ValueError, match="a - b"):
        borrow_scratchpad(3, 5)


def test_scratchpads_leave_identity_and_operations_alone():
    cot = "so 80 students - 30 girls = 50 boys.\nthen 50 boys - 5 absent = 45 boys.\n31+4=35\n#### 45"
    padded = with_scratchpads(cot)
    assert "= (0-0=0, 8-3=5) 50 boys" in padded and "= (10-5=5, 5-1-0=4) 45 boys" in padded
    assert identity({"template": 39, "cot": padded}) == identity({"template": 39, "cot": cot})
    assert operations(padded) == operations(cot) == {(80, "-", 30), (50, "-", 5), (31, "+", 4)}


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


def test_final_number_is_strict():
    assert final_number("3 + 4 = 7\n#### 7") == 7
    assert final_number("#### -5") == -5
    assert final_number("#### 12\nmore text") == 12
    assert final_number("2000+125=<<2000+125=2125>>2,125\n#### 2,125") == 2125  # GSM8K's thousands
    assert final_number("#### 109,200,000") == 109_200_000 and final_number("#### -1,080") == -1080
    for text in ("#### 12.5", "#### 1,0", "#### 12,34", "#### 1234,567", "#### 1,234,56", "#### -5 apples",
                 "#### x", "no answer", "12"):
        assert final_number(text) is None, text
    assert final_number("#### 12.5\n#### 12") is None  # the first #### decides


def test_accuracy():
    assert accuracy([7, None, 3], [7, 2, 4]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="predicted"):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_baselines(task):
    result = task.baseline("test", "smoke")
    answers = [r["answer"] for r in task.rows("test", "smoke")]
    train = [r for r in task.rows("train", "smoke") if r["template"] != DRILL]
    common = Counter(r["answer"] for r in train).most_common(1)[0][0]
    assert result["always"] == common
    assert result["most_common"] == pytest.approx(sum(a == common for a in answers) / len(answers))
    assert result["accuracy"] == max(result["most_common"], result["lookup"])
    assert result["baseline"] in ("most_common", "lookup")


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
