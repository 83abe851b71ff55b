"""Test setup shared by every test module.

Triton kernels run on CPU through the interpreter; it must be switched on before any kernel is defined,
so it is set here, before the test modules import `seer_kernels`. On a CUDA machine the real compiler is used.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# W&B never reaches the network from tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests also run from a plain checkout (e.g. on the GPU machine, where nothing is installed).
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "kernels", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Under pytest-xdist each worker shares the machine's cores with the others: one thread each keeps the workers
# from oversubscribing them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def trained_smoke_seer(tmp_path_factory):
    """The short smoke_seer run (`generation_helpers.train_smoke_seer`), trained once for every module that only
    reads it; returns its `final` folder."""
    from generation_helpers import train_smoke_seer

    root = tmp_path_factory.mktemp("smoke_seer")
    return train_smoke_seer(root / "run", root / "cache")


@pytest.fixture(autouse=True)
def _float32_matmul_precision_highest():
    """Reference checks compare float32 math at ~1e-5: a library that lowers the global float32 matmul precision
    (tf32 / bf16 passes, also on CPUs with bf16 units) must not leak into later tests of the same worker."""
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")
