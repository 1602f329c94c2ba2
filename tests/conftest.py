import os

import pytest
import torch

# The unit tests use tiny tensors: one thread beats two spinning OpenMP threads (more so on a busy machine).
torch.set_num_threads(1)
os.environ.setdefault("SPARSEKIT_SCALE", "smoke")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty $SPARSEKIT_CACHE for a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSEKIT_CACHE", str(cache))
    return cache


@pytest.fixture()
def counting_math(tmp_path, monkeypatch):
    """The math task with a 2-step training config, a tmp cache, and a counter of training runs:
    ``(task, runs, monkeypatch)``."""
    import sparsekit.tasks.base as base
    from sparsekit import tasks
    from sparsekit.tasks.base import TrainConfig

    monkeypatch.setenv("SPARSEKIT_CACHE", str(tmp_path))
    task = tasks.get("math")
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, log_every=1)
    monkeypatch.setattr(task, "train_config", lambda scale="book": config)
    runs = []
    real_train = base.train

    def counting_train(*args, **kwargs):
        runs.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(base, "train", counting_train)
    task._tokenizers.pop("smoke", None)  # the tokenizer cache lives under the tmp cache dir too
    return task, runs, monkeypatch
