import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each (children too)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own lmlab cache, so nothing leaks between tests or from the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("lmlab-cache")
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
    return cache
