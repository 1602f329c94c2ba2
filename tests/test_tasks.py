"""The common task protocol: registry, cache keys, shared training loop."""

import pytest

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
    base = dict(task="t", scale="smoke", model_config={"d": 1}, train_config={"lr": 1.0}, data_version="1")
    key = cache.cache_key(**base)
    assert key == cache.cache_key(**base)
    for field, value in [("task", "u"), ("scale", "book"), ("model_config", {"d": 2}),
                         ("train_config", {"lr": 2.0}), ("data_version", "2")]:
        assert cache.cache_key(**{**base, field: value}) != key


def test_lr_schedule_warmup_then_linear_decay():
    assert lr_at(0, 1.0, warmup=4, steps=14) == pytest.approx(0.25)
    assert lr_at(3, 1.0, warmup=4, steps=14) == pytest.approx(1.0)
    assert lr_at(9, 1.0, warmup=4, steps=14) == pytest.approx(0.5)
    assert lr_at(14, 1.0, warmup=4, steps=14) == pytest.approx(0.0)
