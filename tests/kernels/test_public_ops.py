"""The public ops' contract checks: bad inputs fail with a ValueError that says what is wrong, on every kernel,
before any kernel runs; good inputs on the two kernels agree."""

from __future__ import annotations

import pytest
import torch

from _oracle import make_inputs, random_block_mask
from seer_kernels import (
    KERNELS,
    attention_ground_truth,
    attention_with_ground_truth,
    block_sparse_attention,
)

KERNEL_CHOICES = ["pytorch", "triton", "auto"]


def _problem(bsz=1, hq=4, hkv=2, seq_len=64, dim=16, block=16):
    q, k, v = make_inputs(bsz, hq, hkv, seq_len, dim, seed=1)
    mask = random_block_mask(bsz, hq, seq_len // block, 0.5, seed=1)
    return q, k, v, mask


def _call(op, q, k, v, mask, **kwargs):
    """One op with the shared arguments; `mask` only for the sparse op, `v` not for the ground truth alone."""
    if op is block_sparse_attention:
        return op(q, k, v, mask, **kwargs)
    if op is attention_ground_truth:
        return op(q, k, **kwargs)
    return op(q, k, v, **kwargs)


OPS = [block_sparse_attention, attention_ground_truth, attention_with_ground_truth]
OP_IDS = ["block_sparse_attention", "attention_ground_truth", "attention_with_ground_truth"]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_unknown_kernel_lists_the_valid_ones(op):
    q, k, v, mask = _problem()
    with pytest.raises(ValueError, match="kernel must be one of") as err:
        _call(op, q, k, v, mask, block_size=16, kernel="reference")
    for name in KERNELS:
        assert repr(name) in str(err.value)
    assert KERNELS == ("auto", "pytorch", "triton")


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_wrong_ranks_are_rejected(op, kernel):
    q, k, v, mask = _problem()
    with pytest.raises(ValueError, match=r"must be \[B, H, L, D\] tensors"):
        _call(op, q[0], k, v, mask, block_size=16, kernel=kernel)
    with pytest.raises(ValueError, match=r"must be \[B, H, L, D\] tensors"):
        _call(op, q, k[:, :, :, :, None], v, mask, block_size=16, kernel=kernel)
    if op is not attention_ground_truth:
        with pytest.raises(ValueError, match=r"must be \[B, H, L, D\] tensors"):
            _call(op, q, k, v[0], mask, block_size=16, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_query_heads_must_be_a_multiple_of_kv_heads(op, kernel):
    q, k, v, mask = _problem(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        _call(op, q, k, v, mask, block_size=16, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_mismatched_shapes_are_rejected(op, kernel):
    q, k, v, mask = _problem()
    with pytest.raises(ValueError, match="differ in batch, length or head_dim"):
        _call(op, q[:, :, :32], k, v, mask, block_size=16, kernel=kernel)
    if op is not attention_ground_truth:
        with pytest.raises(ValueError, match="must match k"):
            _call(op, q, k, v[:, :1], mask, block_size=16, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_block_mask_shape_is_checked(kernel):
    q, k, v, mask = _problem()
    with pytest.raises(ValueError, match=r"block_mask must be \(1, 4, 4, 4\)"):
        block_sparse_attention(q, k, v, mask[:, :2], block_size=16, kernel=kernel)
    with pytest.raises(ValueError, match=r"block_mask must be \(1, 4, 2, 2\) .*got \(1, 4, 4, 4\)"):
        block_sparse_attention(q, k, v, mask, block_size=32, kernel=kernel)  # nB = 2 at block 32


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_document_ids_shape_is_checked(op, kernel):
    q, k, v, mask = _problem(bsz=2)
    mask = random_block_mask(2, 4, 4, 0.5, seed=1)
    with pytest.raises(ValueError, match=r"document_ids must be \(2, 64\)"):
        _call(op, q, k, v, mask, block_size=16, document_ids=torch.zeros(1, 64, dtype=torch.long), kernel=kernel)


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_block_size_must_be_a_positive_int(op, kernel):
    q, k, v, _ = _problem()
    for bad in (0, -16, 16.0):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            _call(op, q, k, v, torch.ones(1, 4, 1, 1, dtype=torch.bool), block_size=bad, kernel=kernel)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_triton_scope_is_checked_only_for_triton(op):
    """Head dims, block sizes and dtypes the Triton kernels do not take: rejected there, fine on PyTorch."""
    q, k, v = make_inputs(1, 2, 1, 48, 24, seed=2)  # head_dim 24: not a power of two
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        _call(op, q, k, v, mask, block_size=16, kernel="triton")
    _call(op, q, k, v, mask, block_size=16, kernel="pytorch")

    q, k, v = make_inputs(1, 2, 1, 48, 16, seed=2)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        _call(op, q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool), block_size=12, kernel="triton")
    _call(op, q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool), block_size=12, kernel="pytorch")
    with pytest.raises(ValueError, match="must share one of float16/bfloat16/float32"):
        _call(op, q.double(), k.double(), v.double(), mask, block_size=16, kernel="triton")
    with pytest.raises(ValueError, match="must share one of float16/bfloat16/float32"):
        _call(op, q, k.half(), v.half(), mask, block_size=16, kernel="triton")


def test_auto_runs_pytorch_on_cpu_tensors(monkeypatch):
    """`kernel="auto"` on CPU tensors takes the chunked PyTorch path (the Triton modules are not even needed)."""
    from seer_kernels import pytorch_chunked

    calls = []
    original = pytorch_chunked.ChunkedBlockSparseAttention.apply
    monkeypatch.setattr(pytorch_chunked.ChunkedBlockSparseAttention, "apply",
                        lambda *a: calls.append(1) or original(*a))
    q, k, v, mask = _problem()
    out = block_sparse_attention(q, k, v, mask, block_size=16)
    assert calls == [1]
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask, block_size=16, kernel="pytorch"),
                               atol=0, rtol=0)
