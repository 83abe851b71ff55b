"""The token-gate kernels' tiles (`triton_token_gate_tiles`): the rule keeps the estimated shared memory of both
kernels within the budget for every gate the project builds, and the estimate bounds what Triton's Hopper compiler
allocates (compiled for sm_90 without a GPU). Then the refusal of CPU tensors on the Triton kernels outside the
interpreter, which cannot launch there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seer_finetune.seer.gate import block_scores
from seer_kernels import block_sparse_attention, token_gate_block_scores
from seer_kernels.triton_token_gate_tiles import (
    HARDWARE_SHARED_MEMORY,
    SHARED_MEMORY_BUDGET,
    TokenGateTiles,
    default_tiles,
    shared_memory_estimate,
)

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = (16, 32, 64, 128)
HIDDEN = (16, 32, 64, 128, 256, 512)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """`default_tiles` as on a GPU (the interpreter takes its own)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_default_tiles_fit_the_budget_for_every_block_and_width(gpu_tiles, backward):
    for block in BLOCKS:
        for hidden in HIDDEN:
            tiles = default_tiles(block, hidden, backward=backward)
            rows = tiles.query_rows or block
            estimate = shared_memory_estimate(tiles, rows, hidden, backward=backward)
            where = f"block {block}, hidden {hidden}: {tiles}, {estimate / 1024:.1f} KiB"
            assert estimate <= SHARED_MEMORY_BUDGET < HARDWARE_SHARED_MEMORY, where
            # tl.dot takes tile dims >= 16 on a GPU; the sub-tiles split the block evenly.
            assert tiles.key_blocks >= 16 and 16 <= rows <= block and block % rows == 0, where
            assert tiles.query_rows is None or tiles.query_rows < block, where


def test_the_rule_keeps_narrow_gates_whole_and_splits_wide_ones(gpu_tiles):
    # The launch that failed on an H100: hidden 256, blocks of 64, 64 key blocks over 2 stages (Triton asked for
    # 320 KiB).
    assert shared_memory_estimate(TokenGateTiles(64, 8, 2), 64, 256, backward=False) == 324 * 1024
    # The docstring's examples.
    assert default_tiles(64, 128) == TokenGateTiles(64, 4, 2)
    assert default_tiles(64, 128, backward=True) == TokenGateTiles(32, 4, 1)
    assert default_tiles(64, 256) == TokenGateTiles(32, 8, 1)
    assert default_tiles(64, 256, backward=True) == TokenGateTiles(16, 4, 1, query_rows=32)
    assert default_tiles(64, 512) == TokenGateTiles(16, 8, 1, query_rows=32)
    assert default_tiles(128, 512, backward=True) == TokenGateTiles(16, 4, 1, query_rows=16)
    # Wider than the rule covers: the narrowest tiles, over the budget.
    assert default_tiles(64, 1024, backward=True) == TokenGateTiles(16, 8, 1, query_rows=16)


def test_the_interpreter_takes_whole_blocks_and_wide_key_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert default_tiles(128, 512, backward=True) == TokenGateTiles(64, 4, 1)


@pytest.mark.slow
def test_the_estimate_bounds_what_the_hopper_compiler_allocates(tmp_path):
    """The widest gates at both block sizes, compiled for sm_90 by `token_gate_resources.py` (Triton ships the
    compiler; no GPU needed): every kernel's shared memory is within its estimate and the H100's."""
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "benchmarks" / "diagnostics" / "token_gate_resources.py"
    for block, hidden in ((64, 256), (128, 512)):
        run = subprocess.run(
            [sys.executable, str(script), "--block", str(block), "--hidden", str(hidden), "--json", str(out)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        records = json.loads(out.read_text())
        assert [r["kernel"] for r in records] == ["forward", "backward"]
        for r in records:
            assert r["shared"] <= r["estimate"] <= SHARED_MEMORY_BUDGET, r


def _cpu_operands(seq_len: int = 64, block: int = 16, hidden: int = 32):
    g = torch.Generator().manual_seed(0)
    qt = torch.randn(2, 4, seq_len, hidden, generator=g) / math.sqrt(hidden)
    kh = torch.randn(2, 2, math.ceil(seq_len / block), hidden, generator=g)
    return qt, kh


REFUSED = (
    r"^the Triton kernels need CUDA tensors, got {} on cpu: move them to CUDA, run Triton's CPU interpreter "
    r"\(TRITON_INTERPRET=1, set before seer_kernels is imported\) or pass kernel='pytorch'$"
)


def test_triton_ops_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Outside the interpreter (as on a GPU machine) a CPU tensor cannot reach a Triton kernel: the ops say so
    in one line, naming the ways out, before any launch (Triton's own error comes from deep in the launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qt, kh = _cpu_operands()
    for mode in ("token_logit_max", "token_prob_max"):
        with pytest.raises(ValueError, match=REFUSED.format("qt, kh")) as refused:
            token_gate_block_scores(qt, kh, block_size=16, mode=mode, kernel="triton")
        assert "\n" not in str(refused.value)
        # Also with gradients (the differentiable path) and through the gate (`attention.kernel=triton`).
        with pytest.raises(ValueError, match=REFUSED.format("qt, kh")):
            token_gate_block_scores(qt.requires_grad_(), kh, block_size=16, mode=mode, kernel="triton")
        qt.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 64, 4, 8, generator=g), torch.randn(2, 64, 2, 8, generator=g)
    weights = torch.randn(4, 8, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    causal = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    shape = dict(block_size=16, q_pooling=("avg",), k_pooling=("max", "min"), hidden_size=16, candidates=causal,
                 gate_query="token_prob_max")
    with torch.no_grad(), pytest.raises(ValueError, match=REFUSED.format("qt, kh")):
        block_scores(q, k, *weights, None, None, None, kernel="triton", **shape)
    # The attention ops share the check.
    x = torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match=REFUSED.format("q, k, v")):
        block_sparse_attention(x, x, x, torch.ones(1, 2, 2, 2, dtype=torch.bool), block_size=16, kernel="triton")
    # The PyTorch kernel, and `auto` (PyTorch for CPU tensors), still run.
    for kernel in ("pytorch", "auto"):
        scores = token_gate_block_scores(qt, kh, block_size=16, mode="token_prob_max", kernel=kernel)
        assert scores.shape == (2, 4, 4, 4)
    with torch.no_grad():
        assert block_scores(q, k, *weights, None, None, None, kernel="auto", **shape).shape == (2, 4, 4, 4)
