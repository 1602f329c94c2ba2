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
