"""The warp-specialized Gluon kernels (forward, dQ, dK/dV): dispatch rules everywhere, results on a Hopper GPU.

Gluon compiles for NVIDIA GPUs only (the Triton interpreter cannot run it) and the kernels are enabled only with
the Triton release they were tested on, so the numerical tests need a Hopper GPU with that release; elsewhere they
are skipped with the reason and the dispatch tests check that the Triton kernels are chosen instead.
"""

from __future__ import annotations

import pytest
import torch

from _oracle import make_inputs, random_block_mask
from seer_kernels import block_mask_to_indices, block_sparse_attention
from seer_kernels import gluon as ga
from seer_kernels.gluon import settings as gluon_settings
from seer_kernels.triton_backward import sparse_attention_backward
from seer_kernels.triton_block_lists import build_block_lists
from seer_kernels.triton_forward import sparse_attention_forward

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(
    not HOPPER or not ga.AVAILABLE,
    reason="Gluon kernels compile for Hopper GPUs only" if not HOPPER else f"Gluon unavailable: {ga.IMPORT_ERROR}",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def test_dispatch_falls_back_to_triton_off_hopper():
    q, k, v = make_inputs(1, 4, 2, 256, 64, dtype=torch.float16, device="cpu")
    assert not ga.gluon_supported(q, k, v, 128, None)
    idx, cnt = block_mask_to_indices(random_block_mask(1, 4, 2, 0.5, device="cpu"))
    with pytest.raises(ValueError, match="Gluon kernels cannot run here"):
        sparse_attention_forward(q, k, v, idx, cnt, block_size=128, sm_scale=0.125, use_gluon=True)


def test_program_items_only_where_block_equals_head_dim():
    assert gluon_settings.program_items("fwd", None, 128, 128) == gluon_settings.ITEMS_PER_PROGRAM["fwd"]
    assert gluon_settings.program_items("dq", 3, 64, 64) == 3
    assert gluon_settings.program_items("dq", 3, 128, 64) == 1  # the output tile would not fit the dS slot
    with pytest.raises(ValueError, match=">= 1"):
        gluon_settings.program_items("fwd", 0, 128, 128)


def test_rows_collapse_rejects_strided_views():
    contiguous = torch.empty(2, 4, 256, 64)
    assert gluon_settings.rows_collapse(contiguous)
    # transformers' [B, L, H, D] projections viewed as [B, H, L, D]: heads are not whole row ranges
    assert not gluon_settings.rows_collapse(torch.empty(2, 256, 4, 64).transpose(1, 2))
    assert not gluon_settings.rows_collapse(contiguous[..., :32])


# (B, L, block, Hq, Hkv, D, density, rows with nothing kept)
CASES = [
    (1, 1024, 128, 4, 1, 128, 0.5, False),  # GQA 4:1
    (2, 768, 128, 4, 4, 64, 0.3, False),  # MHA, head_dim 64, batch 2
    (1, 512, 128, 2, 2, 128, 1.0, False),  # dense causal
    (1, 640, 128, 4, 2, 128, 0.4, True),  # rows with no key: zero output, zero dQ
    (1, 128, 128, 2, 1, 64, 1.0, False),  # a single block
    (1, 896, 128, 2, 1, 128, 1.0, False),  # an odd number of blocks: a program's last item may not exist
    (2, 2048, 128, 8, 2, 128, 0.3, False),  # batch 2, GQA 4:1, several blocks per program
    (1, 1024, 64, 4, 1, 128, 0.5, False),  # block 64: one consumer warpgroup
    (2, 576, 64, 3, 3, 64, 0.3, True),  # block 64, head_dim 64, rows with no key
]


@needs_hopper
@pytest.mark.parametrize("items", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bsz,seq_len,block,hq,hkv,dim,density,empty_rows", CASES)
def test_gluon_forward_and_dq_against_reference(bsz, seq_len, block, hq, hkv, dim, density, empty_rows, dtype, items,
                                                monkeypatch):
    """Forward and dQ against the float32 reference and the Triton kernels, with 1-3 query blocks per program
    (more than one runs where block == head_dim)."""
    monkeypatch.setattr(gluon_settings, "ITEMS_PER_PROGRAM", {"fwd": items, "dq": items})
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=seq_len)
    nb = seq_len // block
    mask = random_block_mask(bsz, hq, nb, density, seed=seq_len, device=DEVICE)
    if empty_rows:
        mask[:, :, 1::2] = False
    assert ga.gluon_supported(q, k, v, block, None)
    idx, cnt = build_block_lists(mask)
    idx_t, cnt_t = build_block_lists(mask, transpose=True)
    scale = dim ** -0.5
    # NaN-filled outputs: every element must be written.
    out = torch.full_like(q, float("nan"))
    lse = torch.full((bsz, hq, seq_len), float("nan"), device=DEVICE)
    ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, out=out, lse=lse)
    out_t, lse_t = sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, use_gluon=False)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), mask, block_size=block, kernel="pytorch")
    if empty_rows:
        rows = torch.arange(seq_len, device=DEVICE) // block % 2 == 1
        assert torch.count_nonzero(out[:, :, rows]) == 0
        assert torch.isinf(lse[:, :, rows]).all()
    assert rel_err(out, ref) <= REL_TOL[dtype]
    assert rel_err(out, ref) <= 2 * rel_err(out_t, ref) + 1e-4
    finite = torch.isfinite(lse_t)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - lse_t[finite]).abs().max() < 1e-3

    dout = torch.randn_like(q)
    dq = torch.full_like(q, float("nan"))
    sparse_attention_backward(dout, q, k, v, out_t, lse_t, idx, cnt, idx_t, cnt_t, block_size=block,
                              sm_scale=scale, grads=(dq, torch.empty_like(k), torch.empty_like(v)),
                              use_gluon=True)
    dq_t, _, _ = sparse_attention_backward(dout, q, k, v, out_t, lse_t, idx, cnt, idx_t, cnt_t,
                                           block_size=block, sm_scale=scale, use_gluon=False)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    block_sparse_attention(*leaves, mask, block_size=block, kernel="pytorch").backward(dout.float())
    assert rel_err(dq, leaves[0].grad) <= REL_TOL[dtype]
    assert rel_err(dq, leaves[0].grad) <= 2 * rel_err(dq_t, leaves[0].grad) + 1e-4

    # dK/dV (the Gluon kernel does not depend on the items setting; checked once per case).
    if items == 1:
        delta = (out_t.float() * dout.float()).sum(-1)
        dk, dv = (torch.full_like(k, float("nan")) for _ in range(2))
        ga.gluon_attention_dkdv(q, k, v, dout, lse_t, delta, idx_t, cnt_t, dk, dv, block_size=block, sm_scale=scale)
        _, dk_t, dv_t = sparse_attention_backward(dout, q, k, v, out_t, lse_t, idx, cnt, idx_t, cnt_t,
                                                  block_size=block, sm_scale=scale, use_gluon=False)
        for name, got, trit, want in (("dk", dk, dk_t, leaves[1].grad), ("dv", dv, dv_t, leaves[2].grad)):
            assert rel_err(got, want) <= REL_TOL[dtype], name
            assert rel_err(got, want) <= 2 * rel_err(trit, want) + 1e-4, name


@needs_hopper
def test_public_op_uses_gluon_kernels_and_matches_triton(monkeypatch):
    """At block 128 / head_dim 128 the public op runs the Gluon forward, dQ (with its delta) and dK/dV; outputs and
    gradients match the Triton kernels' (`SEER_KERNELS_GLUON=0`)."""
    q, k, v = make_inputs(1, 4, 2, 1024, 128, dtype=torch.bfloat16, device=DEVICE, seed=3)
    mask = random_block_mask(1, 4, 8, 0.5, seed=3, device=DEVICE)
    dout = torch.randn_like(q)
    calls = []
    for name in ("gluon_attention_forward", "gluon_attention_dq", "gluon_attention_dkdv"):
        launch = getattr(ga, name)
        monkeypatch.setattr(ga, name, lambda *a, _launch=launch, _name=name, **kw: calls.append(_name) or _launch(*a, **kw))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*leaves, mask, block_size=128, kernel="triton")
        out.backward(dout)
        return [out] + [t.grad for t in leaves]

    got = run()
    assert sorted(set(calls)) == ["gluon_attention_dkdv", "gluon_attention_dq", "gluon_attention_forward"], calls
    monkeypatch.setenv("SEER_KERNELS_GLUON", "0")
    calls.clear()
    want = run()
    assert not calls
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < 1e-2, name
