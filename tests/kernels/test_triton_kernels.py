"""Triton kernels against the references: on CPU through the interpreter (float32, float16), on CUDA in
bfloat16 and float16. Same shapes on both, small enough for the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from _oracle import make_document_ids, make_inputs, random_block_mask
from seer_kernels import (
    attention_ground_truth,
    attention_with_ground_truth,
    block_mask_to_indices,
    block_sparse_attention,
)
from seer_kernels.triton_backward import sparse_attention_backward
from seer_kernels.triton_forward import sparse_attention_forward

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter computes bfloat16 tl.dot wrongly, so CPU runs check float32 and float16.
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]
# Relative-norm tolerances against a float32 reference fed the same (rounded) inputs: the kernels round P and
# dS to the input dtype before their second matmul, the reference does not.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def assert_close_rel(got, want, dtype, what):
    err = rel_err(got, want)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


# (B, L, block, Hq, Hkv, D, document kind, density, keep diagonal)
SPARSE_CASES = [
    (2, 100, 16, 4, 1, 16, None, 0.5, True),  # GQA 4:1, L not a multiple of the block
    (1, 128, 32, 2, 2, 32, "packed", 0.3, True),  # MHA, packed documents
    (2, 77, 16, 4, 4, 16, "padded", 1.0, True),  # padding ids, dense
    (1, 50, 16, 4, 2, 16, None, 0.0, False),  # nothing kept
    (2, 90, 16, 2, 1, 16, "packed", 0.4, False),  # rows with no allowed key
    (1, 200, 64, 4, 1, 64, "packed", 0.6, True),  # block 64, head_dim 64
    (1, 300, 128, 2, 1, 32, None, 0.7, True),  # block 128
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bsz,seq_len,block,hq,hkv,dim,docs,density,diag", SPARSE_CASES)
def test_triton_sparse_attention_forward_backward(bsz, seq_len, block, hq, hkv, dim, docs, density, diag, dtype):
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=seq_len)
    nb = math.ceil(seq_len / block)
    mask = random_block_mask(bsz, hq, nb, density, keep_diagonal=diag, seed=seq_len, device=DEVICE)
    doc = make_document_ids(bsz, seq_len, docs, seed=seq_len, device=DEVICE)
    grad = torch.randn(bsz, hq, seq_len, dim, device=DEVICE).to(dtype)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, mask, block_size=block, document_ids=doc, kernel="triton")
    out.backward(grad)
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention(*ref_leaves, mask, block_size=block, document_ids=doc, kernel="pytorch")
    ref.backward(grad.float())

    assert out.dtype == dtype and out.shape == q.shape
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
        for leaf in leaves:
            assert torch.count_nonzero(leaf.grad) == 0
        return
    assert_close_rel(out, ref, dtype, "out")
    for name, got, want in zip("qkv", leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert_close_rel(got.grad, want.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_launchers_write_every_element(dtype):
    """Outputs poisoned with NaN must come back fully written (also rows with no allowed key)."""
    bsz, hq, hkv, seq_len, dim, block = 1, 4, 2, 70, 16, 16
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=7)
    nb = math.ceil(seq_len / block)
    mask = random_block_mask(bsz, hq, nb, 0.3, keep_diagonal=False, seed=7, device=DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    q_idx, q_cnt = block_mask_to_indices(mask, transpose=True)
    out = torch.empty_like(q).fill_(float("nan"))
    lse = torch.empty(bsz, hq, seq_len, device=DEVICE).fill_(float("nan"))
    sparse_attention_forward(q, k, v, kv_idx, kv_cnt, block_size=block, sm_scale=0.25, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    grads = tuple(torch.empty_like(t).fill_(float("nan")) for t in (q, k, v))
    dout = torch.randn_like(q)
    sparse_attention_backward(
        dout, q, k, v, out, lse, kv_idx, kv_cnt, q_idx, q_cnt, block_size=block, sm_scale=0.25, grads=grads
    )
    for g in grads:
        assert not torch.isnan(g).any()
    ref = block_sparse_attention(q.float(), k.float(), v.float(), mask, block_size=block, sm_scale=0.25, kernel="pytorch")
    assert_close_rel(out, ref, dtype, "out")


# (B, L, block, Hq, Hkv, D, document kind)
GT_CASES = [
    (2, 100, 16, 4, 1, 16, None),
    (1, 96, 32, 2, 2, 32, "packed"),
    (2, 77, 16, 4, 2, 16, "padded"),
    (1, 200, 64, 4, 1, 64, "packed"),
    (1, 260, 128, 2, 1, 32, None),
    (1, 330, 16, 2, 1, 16, "packed"),  # > 16 key blocks: the pooled values leave the kernel in chunks of 16
    (1, 300, 16, 2, 2, 16, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bsz,seq_len,block,hq,hkv,dim,docs", GT_CASES)
def test_triton_ground_truth(bsz, seq_len, block, hq, hkv, dim, docs, dtype):
    q, k, _ = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=seq_len + 3)
    doc = make_document_ids(bsz, seq_len, docs, seed=seq_len, device=DEVICE)
    gt = attention_ground_truth(q, k, block_size=block, document_ids=doc, kernel="triton")
    ref = attention_ground_truth(q.float(), k.float(), block_size=block, document_ids=doc, kernel="pytorch")
    nb = math.ceil(seq_len / block)
    assert gt.shape == (bsz, hq, nb, nb) and gt.dtype == torch.float32
    assert torch.isfinite(gt).all()
    torch.testing.assert_close(gt.sum(-1), torch.ones_like(gt[..., 0]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(gt.triu(1)) == 0
    # Same rounded inputs, scores accumulated in float32 on both sides: only summation order differs.
    torch.testing.assert_close(gt, ref, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)

    subset = torch.tensor([nb - 1, 0, nb // 2], device=DEVICE)
    part = attention_ground_truth(q, k, block_size=block, document_ids=doc, query_blocks=subset, kernel="triton")
    torch.testing.assert_close(part, gt[:, :, subset], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("docs", [None, "packed"])
@pytest.mark.parametrize("rows_per_program,key_tile", [(16, 32), (32, 16), (32, 32), (64, 32), (64, 8)])
def test_triton_ground_truth_program_shapes(rows_per_program, key_tile, docs, dtype, monkeypatch):
    """Several query blocks per program (KERNEL_OPTIONS["gt"]["ROWS"]) and key tiles of two blocks, on a length
    that leaves a partial last block, with an odd query-block subset (the last program's pair is padded)."""
    from seer_kernels import triton_tuning
    from seer_kernels.triton_ground_truth import ground_truth_forward
    from seer_kernels.triton_tuning import TileConfig

    monkeypatch.setitem(triton_tuning.KERNEL_OPTIONS, "gt", {**triton_tuning.KERNEL_OPTIONS["gt"],
                                                              "ROWS": rows_per_program})
    bsz, hq, hkv, seq_len, dim, block = 2, 4, 2, 150, 16, 16
    q, k, _ = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=41)
    doc = make_document_ids(bsz, seq_len, docs, seed=seq_len, device=DEVICE)
    scale = 1.0 / math.sqrt(dim)
    nb = math.ceil(seq_len / block)
    ref = attention_ground_truth(q.float(), k.float(), block_size=block, document_ids=doc, kernel="pytorch")
    doc32 = None if doc is None else doc.to(torch.int32).contiguous()
    cfg = TileConfig(block, key_tile, 4, 1)
    out = torch.full((bsz, hq, nb, nb), float("nan"), device=DEVICE)
    gt = ground_truth_forward(q, k, block_size=block, sm_scale=scale, document_ids=doc32, out=out, config=cfg)
    torch.testing.assert_close(gt, ref, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)
    subset = torch.tensor([3, nb - 1, 0, 5, 4], device=DEVICE)
    part = ground_truth_forward(q, k, block_size=block, sm_scale=scale, document_ids=doc32, query_blocks=subset,
                                config=cfg)
    torch.testing.assert_close(part, ref[:, :, subset], atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("docs", [None, "packed"])
def test_triton_attention_with_ground_truth(docs, dtype):
    bsz, hq, hkv, seq_len, dim, block = 2, 4, 1, 90, 32, 32
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=21)
    doc = make_document_ids(bsz, seq_len, docs, seed=21, device=DEVICE)
    subset = torch.tensor([2, 0], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, gt = attention_with_ground_truth(
        *leaves, block_size=block, document_ids=doc, query_blocks=subset, kernel="triton"
    )
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref, ref_gt = attention_with_ground_truth(
        *ref_leaves, block_size=block, document_ids=doc, query_blocks=subset, kernel="pytorch"
    )
    assert gt.shape == (bsz, hq, 2, 3) and not gt.requires_grad
    assert_close_rel(out, ref, dtype, "out")
    torch.testing.assert_close(gt, ref_gt, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    for name, got, want in zip("qkv", leaves, ref_leaves):
        assert_close_rel(got.grad, want.grad, dtype, f"d{name}")


def test_triton_rejects_bad_shapes():
    q, k, v = make_inputs(1, 3, 2, 32, 16, device=DEVICE)
    mask = torch.ones(1, 3, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention(q, k, v, mask, block_size=16, kernel="triton")
    q, k, v = make_inputs(1, 2, 1, 32, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        attention_ground_truth(q, k, block_size=16, kernel="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("docs", [None, "packed"])
def test_triton_tiles_smaller_than_blocks(docs, dtype):
    """Query/key tiles that split a block (as the GPU configs for block 128 do) give the same results."""
    from seer_kernels.triton_ground_truth import ground_truth_forward
    from seer_kernels.triton_tuning import TileConfig

    bsz, hq, hkv, seq_len, dim, block = 1, 4, 2, 110, 16, 32
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=31)
    nb = math.ceil(seq_len / block)
    mask = random_block_mask(bsz, hq, nb, 0.6, seed=31, device=DEVICE)
    doc = make_document_ids(bsz, seq_len, docs, seed=31, device=DEVICE)
    doc32 = None if doc is None else doc.to(torch.int32)
    kv_idx, kv_cnt = block_mask_to_indices(mask, document_ids=doc32, block_size=block)
    q_idx, q_cnt = block_mask_to_indices(mask, document_ids=doc32, block_size=block, transpose=True)
    scale = 0.3
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention(*ref_leaves, mask, block_size=block, document_ids=doc, sm_scale=scale, kernel="pytorch")
    dout = torch.randn_like(q)
    ref.backward(dout.float())
    ref_gt = attention_ground_truth(q.float(), k.float(), block_size=block, document_ids=doc, sm_scale=scale, kernel="pytorch")
    for bm, bn in [(16, 32), (32, 16), (16, 16)]:
        cfg = TileConfig(bm, bn, 4, 1)
        out, lse = sparse_attention_forward(
            q, k, v, kv_idx, kv_cnt, block_size=block, sm_scale=scale, document_ids=doc32, config=cfg
        )
        assert_close_rel(out, ref, dtype, f"out {bm}x{bn}")
        grads = sparse_attention_backward(
            dout, q, k, v, out, lse, kv_idx, kv_cnt, q_idx, q_cnt, block_size=block, sm_scale=scale,
            document_ids=doc32, dq_config=cfg, dkdv_config=cfg,
        )
        for name, got, want in zip("qkv", grads, ref_leaves):
            assert_close_rel(got, want.grad, dtype, f"d{name} {bm}x{bn}")
        gt = ground_truth_forward(
            q, k, block_size=block, sm_scale=scale, document_ids=doc32, config=TileConfig(block, bn, 4, 1)
        )
        torch.testing.assert_close(gt, ref_gt, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("docs", [None, "packed"])
def test_triton_block_list_builder_matches_torch(transpose, docs):
    from seer_kernels.triton_block_lists import build_block_lists

    bsz, heads, seq_len, block = 2, 3, 150, 16  # 10 blocks: not a power of two
    nb = math.ceil(seq_len / block)
    mask = random_block_mask(bsz, heads, nb, 0.4, keep_diagonal=False, seed=4, device=DEVICE)
    doc = make_document_ids(bsz, seq_len, docs, seed=4, device=DEVICE)
    want = block_mask_to_indices(mask, document_ids=doc, block_size=block, transpose=transpose)
    got = build_block_lists(mask, document_ids=doc, block_size=block, transpose=transpose)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])  # filler included: every slot is written


class LaunchProblem:
    """Inputs, block lists and float32 reference gradients for tests that call the launchers directly."""

    def __init__(self, bsz, hq, hkv, seq_len, dim, block, density, docs, dtype, seed, *, keep_diagonal=True,
                 sink=False, scale=0.3):
        self.block, self.scale = block, scale
        self.q, self.k, self.v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=dtype, device=DEVICE, seed=seed)
        nb = math.ceil(seq_len / block)
        self.mask = random_block_mask(bsz, hq, nb, density, keep_diagonal=keep_diagonal, seed=seq_len, device=DEVICE)
        if sink:
            self.mask[..., 0] = True
        self.doc = make_document_ids(bsz, seq_len, docs, seed=seq_len, device=DEVICE)
        self.doc32 = None if self.doc is None else self.doc.to(torch.int32)
        self.kv_lists = block_mask_to_indices(self.mask, document_ids=self.doc32, block_size=block)
        self.q_lists = block_mask_to_indices(self.mask, document_ids=self.doc32, block_size=block, transpose=True)
        self.ref_leaves = [t.float().clone().requires_grad_() for t in (self.q, self.k, self.v)]
        self.ref = block_sparse_attention(
            *self.ref_leaves, self.mask, block_size=block, document_ids=self.doc, sm_scale=scale, kernel="pytorch"
        )
        self.dout = torch.randn_like(self.q)
        self.ref.backward(self.dout.float())

    def forward(self, config=None, out=None):
        return sparse_attention_forward(
            self.q, self.k, self.v, *self.kv_lists, block_size=self.block, sm_scale=self.scale,
            document_ids=self.doc32, config=config, out=out,
        )

    def backward(self, out, lse, **kwargs):
        """Gradients into NaN-filled buffers (every element must be written)."""
        grads = tuple(torch.full_like(t, float("nan")) for t in (self.q, self.k, self.v))
        sparse_attention_backward(
            self.dout, self.q, self.k, self.v, out, lse, *self.kv_lists, *self.q_lists, block_size=self.block,
            sm_scale=self.scale, document_ids=self.doc32, grads=grads, **kwargs,
        )
        return grads


# Each kernel variant switch on its own (see triton_tuning.KERNEL_OPTIONS).
VARIANTS = {
    "tma_host": {kind: {"TMA": 1} for kind in ("fwd", "dq", "dkdv", "gt")},
    "split_long_columns": {"dkdv": {"SPLIT_LONG_COLUMNS": 1}},
    "split_long_columns_pointers": {"dkdv": {"SPLIT_LONG_COLUMNS": 1, "TMA": 0}},
    "pointers": {kind: {"TMA": 0} for kind in ("fwd", "dq", "dkdv", "gt")},
    "gt_one_block_per_program": {"gt": {"ROWS": 1}},
}


@pytest.fixture
def kernel_variant(request, monkeypatch):
    from seer_kernels import triton_tuning

    for kind, opts in VARIANTS[request.param].items():
        monkeypatch.setitem(triton_tuning.KERNEL_OPTIONS, kind, {**triton_tuning.KERNEL_OPTIONS[kind], **opts})
    return request.param


@pytest.mark.parametrize("kernel_variant", list(VARIANTS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "hq,hkv,seq_len,docs,density,tiles",
    [
        (4, 1, 110, None, 0.5, [(32, 32), (16, 32), (32, 16)]),  # GQA 4:1, partial last block, split tiles
        (3, 3, 96, "packed", 0.6, [(32, 32), (16, 16)]),  # MHA, packed documents
        (4, 2, 128, None, 0.2, [(32, 32)]),  # low density: empty transposed lists for some heads
    ],
)
def test_triton_kernel_variants(kernel_variant, dtype, hq, hkv, seq_len, docs, density, tiles):
    """Every variant computes the same function: outputs, all gradients and the ground truth vs the reference."""
    from seer_kernels.triton_ground_truth import ground_truth_forward
    from seer_kernels.triton_tuning import TileConfig

    block = 32
    pb = LaunchProblem(2, hq, hkv, seq_len, 16, block, density, docs, dtype, seq_len + hq, keep_diagonal=density > 0.3)
    ref_gt = attention_ground_truth(
        pb.q.float(), pb.k.float(), block_size=block, document_ids=pb.doc, sm_scale=pb.scale, kernel="pytorch"
    )
    for bm, bn in tiles:
        cfg = TileConfig(bm, bn, 4, 1)
        out, lse = pb.forward(config=cfg, out=torch.full_like(pb.q, float("nan")))
        assert_close_rel(out, pb.ref, dtype, f"out {bm}x{bn}")
        grads = pb.backward(out, lse, dq_config=cfg, dkdv_config=cfg)
        for name, got, want in zip("qkv", grads, pb.ref_leaves):
            assert_close_rel(got, want.grad, dtype, f"d{name} {bm}x{bn}")
        gt = ground_truth_forward(
            pb.q, pb.k, block_size=block, sm_scale=pb.scale, document_ids=pb.doc32, config=TileConfig(block, bn, 4, 1)
        )
        torch.testing.assert_close(gt, ref_gt, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-3)


@pytest.mark.parametrize("kernel_variant", ["tma_host"], indirect=True)
def test_triton_descriptors_fall_back_on_misaligned_inputs(kernel_variant):
    """A tensor TMA cannot address (base not 16-byte aligned) takes the pointer path and stays exact."""
    from seer_kernels.triton_tuning import descriptor_ok

    bsz, hq, hkv, seq_len, dim, block = 1, 2, 1, 64, 16, 32
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=torch.float32, device=DEVICE, seed=5)
    buf = torch.empty(k.numel() + 1, device=DEVICE)
    k_off = buf[1:].view_as(k)
    k_off.copy_(k)
    assert not descriptor_ok(k_off) and descriptor_ok(k)
    mask = random_block_mask(bsz, hq, seq_len // block, 1.0, seed=5, device=DEVICE)
    out = block_sparse_attention(q, k_off, v, mask, block_size=block, kernel="triton")
    ref = block_sparse_attention(q, k, v, mask, block_size=block, kernel="pytorch")
    assert_close_rel(out, ref, torch.float32, "out")


def test_tuned_choices_report(monkeypatch):
    """The benchmark's report of the autotuners' picks: one readable entry per tuner."""
    import triton

    from seer_kernels import triton_dq, triton_tuning

    tuner = triton.autotune(configs=[triton.Config({"BLOCK_N": 16})], key=["seq_len"])(triton_dq._bwd_delta_kernel)
    monkeypatch.setattr(triton_tuning, "_TUNERS", {("fwd", 128, (("BLOCK", 128), ("HAS_DOCS", False), ("TMA", 1))): tuner})
    assert triton_tuning.tuned_choices() == {"fwd bs128 HAS_DOCS=False,TMA=1": "None"}


@pytest.mark.parametrize("kernel_variant", ["split_long_columns", "split_long_columns_pointers"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("docs", [None, "packed"])
def test_triton_split_long_columns_cuts_long_lists(kernel_variant, dtype, docs, monkeypatch):
    """A sink column (every row keeps key block 0) with short segments: its list is cut across programs, the
    float32 partials meet in the scratch, the last segment writes dK/dV and leaves the scratch zeroed."""
    from seer_kernels import triton_dkdv
    from seer_kernels.triton_tuning import TileConfig

    monkeypatch.setattr(triton_dkdv, "MIN_SEGMENT", 1)
    monkeypatch.setattr(triton_dkdv, "_persistent_programs", lambda device: 40)
    scratches = []
    allocate = triton_dkdv._segment_scratch

    def recorded(*args):
        scratches.append(allocate(*args))
        return scratches[-1]

    monkeypatch.setattr(triton_dkdv, "_segment_scratch", recorded)
    pb = LaunchProblem(2, 4, 2, 150, 16, 16, 0.3, docs, dtype, 11, sink=True)
    out, lse = pb.forward()
    for cfg in (TileConfig(16, 16, 4, 1), TileConfig(16, 8, 4, 1)):
        grads = pb.backward(out, lse, dkdv_config=cfg)
        for name, got, want in zip("qkv", grads, pb.ref_leaves):
            assert_close_rel(got, want.grad, dtype, f"d{name} {cfg}")
    assert len(scratches) == 2
    for dk_acc, dv_acc, arrivals in scratches:
        assert not dk_acc.any() and not dv_acc.any() and not arrivals.any()


def test_split_long_columns_through_the_public_function(monkeypatch):
    """`split_long_columns=True` reaches the segmented dK/dV kernel and gives the reference gradients."""
    from seer_kernels import triton_dkdv

    launches = []
    programs = triton_dkdv._persistent_programs
    monkeypatch.setattr(triton_dkdv, "_persistent_programs", lambda device: launches.append(1) or programs(device))
    bsz, hq, hkv, seq_len, dim, block = 1, 4, 2, 96, 16, 16
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, dtype=torch.float32, device=DEVICE, seed=13)
    mask = random_block_mask(bsz, hq, seq_len // block, 0.3, seed=13, device=DEVICE)
    mask[..., 0] = True
    grads = {}
    for split in (True, None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kernel = "triton" if split else "pytorch"
        out = block_sparse_attention(*leaves, mask, block_size=block, kernel=kernel, split_long_columns=split)
        out.backward(torch.ones_like(out))
        grads[split] = [t.grad for t in leaves]
    assert launches == [1]
    for got, want in zip(grads[True], grads[None]):
        assert_close_rel(got, want, torch.float32, "grad")
