import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

# Tests must behave the same on a 2-core laptop and in CI: keep intra-op threads modest.
os.environ.setdefault("OMP_NUM_THREADS", "2")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for forward-heavy test modules: on a shared 2-core runner two threads per
    process oversubscribe the cores and run several times slower (measured: r18 batch 1, 0.13 s with one
    thread vs 0.7 s with two under load); the previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
