"""The common task protocol: registry, cache keys, shared training loop."""

import pytest
import torch

from sparsekit import tasks
from sparsekit.tasks import cache
from sparsekit.tasks.training import lr_at


def test_names_lists_the_three_tasks():
    assert set(tasks.names()) == {"translation", "speech", "math"}


def test_get_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="translation"):
        tasks.get("vision")


def test_get_non_string():
    with pytest.raises(TypeError, match="name"):
        tasks.get(3)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


def test_cache_key_changes_with_every_component():
    base = dict(task="t", scale="smoke", model_config={"d": 1}, train_config={"lr": 1.0}, data_version="1",
                data_key="abc")
    key = cache.cache_key(**base)
    assert key == cache.cache_key(**base)
    for field, value in [
        ("task", "u"),
        ("scale", "book"),
        ("model_config", {"d": 2}),
        ("train_config", {"lr": 2.0}),
        ("data_version", "2"),
        ("data_key", "abd"),
    ]:
        assert cache.cache_key(**{**base, field: value}) != key


def test_lr_schedule_warmup_then_linear_decay():
    assert lr_at(0, 1.0, warmup=4, steps=14) == pytest.approx(0.25)
    assert lr_at(3, 1.0, warmup=4, steps=14) == pytest.approx(1.0)
    assert lr_at(9, 1.0, warmup=4, steps=14) == pytest.approx(0.5)
    assert lr_at(14, 1.0, warmup=4, steps=14) == pytest.approx(0.0)


# ---- teacher cache (math task at smoke scale, 2 training steps) ---------------------------------
from dataclasses import replace  # noqa: E402

import sparsekit.tasks.base as base  # noqa: E402


def test_teacher_is_cached_and_reused(counting_math):
    task, runs, _ = counting_math
    first = task.teacher("smoke", progress=False)
    second = task.teacher("smoke", progress=False)
    assert len(runs) == 1
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    path = task.teacher_path("smoke")
    assert (path / "model.safetensors").exists() and (path / "tokenizer" / "tokenizer.json").exists()
    log = task.training_log("smoke")
    assert [e["step"] for e in log["curve"]] == [1, 2]
    assert log["meta"]["train_config"]["steps"] == 2
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle files


def test_teacher_cache_invalidated_by_config_change(counting_math):
    task, runs, monkeypatch = counting_math
    task.teacher("smoke", progress=False)
    old_path = task.teacher_path("smoke")
    changed = replace(task.train_config("smoke"), lr=2e-3)
    monkeypatch.setattr(task, "train_config", lambda scale="book": changed)
    task.teacher("smoke", progress=False)
    assert len(runs) == 2
    assert task.teacher_path("smoke") != old_path


def test_teacher_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        tasks.get("math").teacher("huge")


def test_student_like_is_an_independent_copy_in_train_mode(counting_math):
    task, _, _ = counting_math
    teacher = task.teacher("smoke", progress=False)
    student = task.student_like(teacher)
    assert student.training and not teacher.training
    name, param = next(iter(student.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    assert not torch.equal(param, dict(teacher.named_parameters())[name])


def test_train_batches_are_seeded_and_bucketed():
    task = tasks.get("math")
    first = next(task.train_batches(4, "smoke", seed=1))
    again = next(task.train_batches(4, "smoke", seed=1))
    other = next(task.train_batches(4, "smoke", seed=2))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"][:, :8], other["input_ids"][:, :8])
    with pytest.raises(ValueError, match="batch_size"):
        next(task.train_batches(0, "smoke"))


# ---- evaluate(limit=...) is validated once, in the base class, for every task ---------------------
@pytest.mark.parametrize("name", ["translation", "speech", "math"])
@pytest.mark.parametrize(
    "limit, error", [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError), ("3", TypeError)]
)
def test_evaluate_rejects_bad_limit_in_every_task(name, limit, error):
    task = tasks.get(name)
    with pytest.raises(error, match="limit"):
        task.evaluate(None, "test", limit=limit, scale="smoke")  # rejected before the model is touched
    with pytest.raises(error, match="limit"):
        task.evaluate(None, "test", limit, "smoke")  # positional too


def test_check_limit_accepts_none_and_positive_ints():
    assert base.check_limit(None) is None and base.check_limit(1) == 1 and base.check_limit(300) == 300


def test_code_digest_follows_the_code_not_the_file():
    def plus_one(x):
        return x + 1

    def plus_two(x):
        return x + 2

    def plus_one_again(x):  # same code, another name and line

        return x + 1

    assert base.code_digest(plus_one) == base.code_digest(plus_one_again)
    assert base.code_digest(plus_one) != base.code_digest(plus_two)


def test_tokenizer_key_follows_the_tokenizer_code():
    from sparsekit.tasks.translation import TranslationTask

    class OtherTokenizer(TranslationTask):
        def _train_tokenizer(self, scale):
            return None

    assert OtherTokenizer().data_key("smoke") == TranslationTask().data_key("smoke")
    assert OtherTokenizer().tokenizer_key("smoke") != TranslationTask().tokenizer_key("smoke")


def test_code_digest_is_the_same_in_every_process():
    import os
    import subprocess
    import sys

    script = (
        "from sparsekit.tasks.base import code_digest\n"
        "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta'}\n"
        "print(code_digest(f))"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1


def test_student_like_is_a_trainable_copy_of_a_frozen_teacher():
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).eval().requires_grad_(False)
    student = tasks.get("math").student_like(teacher)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for a, b in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
