import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("SPARSEKIT_SCALE", "smoke")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty $SPARSEKIT_CACHE for a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSEKIT_CACHE", str(cache))
    return cache
