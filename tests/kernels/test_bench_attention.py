"""The attention benchmark's own logic: its masks, the FlexAttention mask built from them, its entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_attention as bench  # noqa: E402
from seer_kernels import block_sparse_attention  # noqa: E402


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_density_mask_keeps_rounded_share_of_each_causal_row(density):
    nb = 40
    mask = bench.causal_density_mask(2, 3, nb, density, device="cpu", seed=1)
    rows = torch.arange(1, nb + 1, dtype=torch.float32)
    want = torch.clamp(torch.round(density * rows), min=1).long()
    assert torch.equal(mask.sum(-1), want.expand(2, 3, nb))
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert not mask.triu(1).any()
    assert abs(bench.real_density(mask) - density) < 0.05
    # Heads draw different blocks.
    assert density == 1.0 or not torch.equal(mask[0, 0], mask[0, 1])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_is_the_same_attention():
    from torch.nn.attention.flex_attention import flex_attention

    seq_len, block = 1024, 128
    mask = bench.causal_density_mask(1, 4, seq_len // block, 0.4, device="cpu", seed=3)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, seq_len, 32, generator=gen)
    k, v = (torch.randn(1, 2, seq_len, 32, generator=gen) for _ in range(2))
    ours = block_sparse_attention(q, k, v, mask, block_size=block, kernel="pytorch")
    # Eager Flex evaluates the mask_mod everywhere: only the construction that looks the mask up states it whole.
    flex = flex_attention(q, k, v, block_mask=bench.flex_block_mask(mask, seq_len, block, "lookup"), enable_gqa=True)
    torch.testing.assert_close(flex, ours, atol=2e-5, rtol=1e-5)
    # Compiled Flex calls it only inside the partial (diagonal) blocks, where the causal test alone is the mask:
    # the construction the benchmark times first.
    compiled = torch.compile(flex_attention, dynamic=False)
    for mask_mod in bench.FLEX_MASK_MODS:
        out = compiled(q, k, v, block_mask=bench.flex_block_mask(mask, seq_len, block, mask_mod), enable_gqa=True)
        torch.testing.assert_close(out, ours, atol=2e-5, rtol=1e-5, msg=mask_mod)
    with pytest.raises(ValueError, match="mask_mod"):
        bench.flex_block_mask(mask, seq_len, block, "dense")


def test_main_runs_on_cuda_and_refuses_without(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--seq-len", "1024", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--densities", "0.5",
        "--gt-blocks", "128", "--check-len", "0", "--no-flex", "--warmup", "1", "--rep", "5", "--json", str(out),
    ]
    rc = bench.main(argv)
    if not torch.cuda.is_available():
        assert rc == 2 and not out.exists()
        return
    assert rc == 0
    result = json.loads(out.read_text())
    kernels = [r["kernel"] for r in result["results"]]
    assert "seer_triton_bs128" in kernels and "seer_ground_truth_bs128" in kernels
    assert all(r["fwd_ms"] > 0 for r in result["results"])
