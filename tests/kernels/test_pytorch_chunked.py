"""The chunked PyTorch kernel (`kernel="pytorch"`) against the dense oracles of `_oracle.py` (float32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from _oracle import (
    brute_force_ground_truth,
    dense_masked_attention,
    make_document_ids,
    make_inputs,
    random_block_mask,
)
from seer_kernels import (
    attention_ground_truth,
    attention_with_ground_truth,
    block_mask_to_indices,
    block_sparse_attention,
)

TOL = dict(atol=2e-5, rtol=1e-5)

# (L, block, Hq, Hkv, document kind, density, keep diagonal)
SPARSE_CASES = [
    (100, 16, 4, 1, None, 0.5, True),  # GQA 4:1, L not a multiple of the block
    (128, 32, 2, 2, "packed", 0.3, True),  # MHA, packed documents
    (77, 16, 4, 4, "padded", 1.0, True),  # padding ids, dense mask
    (50, 16, 4, 2, None, 0.0, False),  # nothing kept: every row empty
    (90, 16, 2, 1, "packed", 0.4, False),  # some rows with no allowed key
    (200, 64, 4, 1, "packed", 0.6, True),  # block 64
    (300, 128, 2, 1, None, 0.7, True),  # block 128
]


@pytest.mark.parametrize("seq_len,block,hq,hkv,docs,density,diag", SPARSE_CASES)
def test_pytorch_sparse_matches_dense_oracle(seq_len, block, hq, hkv, docs, density, diag):
    bsz, dim = 2, 16
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, seed=seq_len)
    nb = math.ceil(seq_len / block)
    mask = random_block_mask(bsz, hq, nb, density, keep_diagonal=diag, seed=seq_len)
    doc = make_document_ids(bsz, seq_len, docs, seed=seq_len)
    grad = torch.randn(bsz, hq, seq_len, dim)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, mask, block_size=block, document_ids=doc, kernel="pytorch")
    out.backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_masked_attention(*ref_leaves, mask, block, doc)
    ref.backward(grad)

    assert out.shape == (bsz, hq, seq_len, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)
    for name, got, want in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **TOL, msg=f"d{name} differs")
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
        assert torch.count_nonzero(leaves[0].grad) == 0


def test_pytorch_sparse_custom_scale_and_upper_entries_ignored():
    bsz, hq, hkv, seq_len, dim, block = 1, 2, 1, 64, 16, 16
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, seed=5)
    mask = random_block_mask(bsz, hq, 4, 0.5, seed=5)
    upper = torch.ones(4, 4, dtype=torch.bool).triu(1)
    out1 = block_sparse_attention(q, k, v, mask & ~upper, block_size=block, sm_scale=0.3, kernel="pytorch")
    out2 = block_sparse_attention(q, k, v, mask | upper, block_size=block, sm_scale=0.3, kernel="pytorch")
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    torch.testing.assert_close(out1, dense_masked_attention(q, k, v, mask, block, None, 0.3), **TOL)


# (L, block, Hq, Hkv, document kind)
GT_CASES = [
    (100, 16, 4, 1, None),
    (96, 32, 2, 2, "packed"),
    (77, 16, 4, 2, "padded"),
    (200, 64, 4, 1, "packed"),
    (260, 128, 2, 1, None),
]


@pytest.mark.parametrize("seq_len,block,hq,hkv,docs", GT_CASES)
def test_pytorch_ground_truth_matches_brute_force(seq_len, block, hq, hkv, docs):
    bsz, dim = 2, 16
    q, k, _ = make_inputs(bsz, hq, hkv, seq_len, dim, seed=seq_len + 1)
    doc = make_document_ids(bsz, seq_len, docs, seed=seq_len)
    gt = attention_ground_truth(q, k, block_size=block, document_ids=doc, kernel="pytorch")
    nb = math.ceil(seq_len / block)
    assert gt.shape == (bsz, hq, nb, nb) and gt.dtype == torch.float32
    assert not torch.isnan(gt).any()
    torch.testing.assert_close(gt.sum(-1), torch.ones(bsz, hq, nb), atol=1e-5, rtol=0)
    assert torch.count_nonzero(gt.triu(1)) == 0, "a key block after the query block got mass"
    torch.testing.assert_close(gt.double(), brute_force_ground_truth(q, k, block, doc), atol=2e-5, rtol=1e-4)


def test_pytorch_ground_truth_query_subset_equals_full_rows():
    bsz, hq, hkv, seq_len, dim, block = 1, 4, 2, 150, 16, 16
    q, k, _ = make_inputs(bsz, hq, hkv, seq_len, dim, seed=3)
    doc = make_document_ids(bsz, seq_len, "packed", seed=3)
    full = attention_ground_truth(q, k, block_size=block, document_ids=doc, kernel="pytorch")
    subset = torch.tensor([9, 0, 4, 7])  # unordered, includes the last (partial) block
    part = attention_ground_truth(
        q, k, block_size=block, document_ids=doc, query_blocks=subset, kernel="pytorch"
    )
    assert part.shape == (bsz, hq, 4, full.shape[-1])
    torch.testing.assert_close(part, full[:, :, subset], atol=1e-6, rtol=0)


def test_pytorch_attention_with_ground_truth():
    bsz, hq, hkv, seq_len, dim, block = 2, 4, 1, 70, 16, 16
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, seed=11)
    doc = make_document_ids(bsz, seq_len, "packed", seed=11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, gt = attention_with_ground_truth(*leaves, block_size=block, document_ids=doc, kernel="pytorch")
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_masked_attention(*ref_leaves, None, block, doc)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(gt.double(), brute_force_ground_truth(q, k, block, doc), atol=2e-5, rtol=1e-4)
    assert not gt.requires_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **TOL)


def test_block_mask_to_indices_lists_kept_blocks():
    mask = random_block_mask(2, 3, 9, 0.4, keep_diagonal=False, seed=2)
    idx, cnt = block_mask_to_indices(mask)
    idx_t, cnt_t = block_mask_to_indices(mask, transpose=True)
    tril = mask & torch.ones(9, 9, dtype=torch.bool).tril()
    for b in range(2):
        for h in range(3):
            for i in range(9):
                want = torch.nonzero(tril[b, h, i]).flatten().tolist()
                assert idx[b, h, i, : cnt[b, h, i]].tolist() == want
                want_t = torch.nonzero(tril[b, h, :, i]).flatten().tolist()
                assert idx_t[b, h, i, : cnt_t[b, h, i]].tolist() == want_t
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32


def test_block_mask_to_indices_drops_blocks_of_other_documents():
    # Two documents of 32 tokens with block 16: blocks 2, 3 (second document) never see blocks 0, 1.
    doc = torch.tensor([[0] * 32 + [1] * 32])
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    idx, cnt = block_mask_to_indices(mask, document_ids=doc, block_size=16)
    assert cnt.tolist() == [[[1, 2, 1, 2]]]
    assert idx[0, 0, 3, :2].tolist() == [2, 3]


def test_document_ids_from_cu_seqlens():
    from seer_kernels import document_ids_from_cu_seqlens

    ids = document_ids_from_cu_seqlens(torch.tensor([0, 3, 5, 9]), seq_len=12)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5]]
    assert document_ids_from_cu_seqlens(torch.tensor([0, 2, 2, 4])).tolist() == [[0, 0, 2, 2]]  # empty doc 1
    with pytest.raises(ValueError):
        document_ids_from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError):
        document_ids_from_cu_seqlens(torch.tensor([0, 5]), seq_len=4)
    # Packed attention equals attention over each document on its own.
    q, k, v = make_inputs(1, 2, 1, 9, 16, seed=8)
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    packed = block_sparse_attention(
        q, k, v, mask, block_size=16, document_ids=document_ids_from_cu_seqlens(torch.tensor([0, 4, 9])),
        kernel="pytorch",
    )
    for a, b in ((0, 4), (4, 9)):
        alone = block_sparse_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], mask, block_size=16, kernel="pytorch"
        )
        torch.testing.assert_close(packed[:, :, a:b], alone, **TOL)
