"""The probe kernel (`seer_kernels.probe_ground_truth` on Triton, `triton_probe`) against its chunked PyTorch
reference: on CPU through Triton's interpreter in float32 (the interpreter computes bfloat16 tl.dot wrongly), on
CUDA also in bfloat16. Shapes are small enough for a few seconds of interpreting per case."""

from __future__ import annotations

import math

import pytest
import torch

from _oracle import make_inputs
from seer_kernels import attention_ground_truth, probe_ground_truth
from seer_kernels.triton_tuning import TileConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
LENGTH = 200


def _tolerance(dtype):
    """Same rounded inputs, scores accumulated in float32 on both sides: only summation order differs (looser in
    bfloat16, as for the ground-truth kernel: tensor cores accumulate in their own order and precision)."""
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-4, rtol=1e-3)


def _problem(bsz, hq, hkv, dim, *, docs, padding, dtype=torch.float32, seed=0):
    """q, k on DEVICE and the optional document ids and valid tokens of a LENGTH-token batch: with `docs`, row 0
    holds two packed documents (90 + 110 tokens); with `padding`, the last row is padding from token 170 on (its
    padding tokens carry ids of their own when there are ids)."""
    q, k, _ = make_inputs(bsz, hq, hkv, LENGTH, dim, dtype=dtype, device=DEVICE, seed=seed)
    ids = valid = None
    if docs:
        ids = torch.zeros(bsz, LENGTH, dtype=torch.int64, device=DEVICE)
        ids[0, 90:] = 1
    if padding:
        valid = torch.ones(bsz, LENGTH, dtype=torch.bool, device=DEVICE)
        valid[-1, 170:] = False
        if ids is not None:
            ids[-1, 170:] = torch.arange(170, LENGTH, device=DEVICE) + LENGTH
    return q, k, ids, valid


# (B, block, r, Hq, Hkv, D, documents, padding)
CASES = [
    (2, 16, 1, 3, 1, 16, False, False),  # GQA 3:1, partial last block, one probe per block, no masks
    (2, 16, 2, 2, 2, 16, True, False),  # MHA, two packed documents
    (2, 32, 4, 3, 1, 16, True, True),  # documents and padding
    (2, 16, 16, 3, 3, 16, False, True),  # r = block_size, padding without documents
    (2, 32, 1, 6, 2, 32, False, True),  # padding alone, one probe per block of 32
    (1, 32, 32, 3, 1, 16, True, False),  # r = block_size of 32
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bsz,block,probes,hq,hkv,dim,docs,padding", CASES)
def test_probe_kernel_matches_the_reference(bsz, block, probes, hq, hkv, dim, docs, padding, dtype):
    q, k, ids, valid = _problem(bsz, hq, hkv, dim, docs=docs, padding=padding, dtype=dtype, seed=block + probes)
    got = probe_ground_truth(q, k, block_size=block, probe_tokens=probes, document_ids=ids, valid=valid,
                             kernel="triton")
    ref = probe_ground_truth(q.float(), k.float(), block_size=block, probe_tokens=probes, document_ids=ids,
                             valid=valid, kernel="pytorch")
    nb = math.ceil(LENGTH / block)
    assert got.shape == (bsz, hq, nb, nb) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.count_nonzero(got.triu(1)) == 0
    torch.testing.assert_close(got, ref, **_tolerance(dtype))


@pytest.mark.parametrize("docs,padding", [(False, False), (True, True)])
@pytest.mark.parametrize("probes,tile", [
    (1, TileConfig(16, 16, 4, 1)),  # 16 query blocks in one program, which repeats block 12 three times
    (1, TileConfig(32, 32, 4, 1)),  # 32 rows, key tiles of two blocks
    (2, TileConfig(16, 8, 4, 1)),  # key tiles of half a block
    (4, TileConfig(16, 32, 4, 1)),  # 4 blocks per program, key tiles of two blocks
    (16, TileConfig(16, 32, 4, 1)),  # one block per program
])
@pytest.mark.parametrize("tma", [0, 1])
def test_probe_kernel_tiles_write_every_entry(probes, tile, docs, padding, tma, monkeypatch):
    """Tile shapes and both load modes on a NaN-filled output: each entry is written (the zeros of key blocks a
    program's rows cannot reach too) and matches the reference."""
    from seer_kernels import triton_tuning
    from seer_kernels.triton_probe import probe_forward

    monkeypatch.setitem(triton_tuning.KERNEL_OPTIONS, "probe", {**triton_tuning.KERNEL_OPTIONS["probe"], "TMA": tma})
    block, scale = 16, 0.3
    q, k, ids, valid = _problem(2, 3, 1, 16, docs=docs, padding=padding, seed=probes)
    nb = math.ceil(LENGTH / block)
    out = torch.full((2, 3, nb, nb), float("nan"), device=DEVICE)
    got = probe_forward(
        q, k, block_size=block, probe_tokens=probes, sm_scale=scale,
        document_ids=None if ids is None else ids.to(torch.int32).contiguous(),
        valid=None if valid is None else valid.to(torch.uint8).contiguous(), out=out, config=tile,
    )
    assert got.data_ptr() == out.data_ptr()
    ref = probe_ground_truth(q, k, block_size=block, probe_tokens=probes, document_ids=ids, valid=valid,
                             sm_scale=scale, kernel="pytorch")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padding_only_rows_are_zero():
    """A query block whose probes are all padding scores zero in every column, not NaN."""
    q, k, ids, valid = _problem(2, 2, 1, 16, docs=True, padding=True, seed=3)
    got = probe_ground_truth(q, k, block_size=16, probe_tokens=2, document_ids=ids, valid=valid, kernel="triton")
    assert torch.isfinite(got).all()
    assert not got[1, :, 11:].any()  # blocks 11 and 12 of row 1 (tokens 176 on) probe only padding
    torch.testing.assert_close(got[1, :, :11].sum(-1), torch.ones(2, 11, device=DEVICE))


@pytest.mark.parametrize("block", [16, 32])
def test_every_token_a_probe_is_the_ground_truth(block):
    """With r = block_size (and no padding, which the ground truth counts as queries) the probe kernel computes
    the ground-truth kernel's map."""
    q, k, ids, _ = _problem(2, 3, 1, 16, docs=True, padding=False, seed=block)
    got = probe_ground_truth(q, k, block_size=block, probe_tokens=block, document_ids=ids, kernel="triton")
    truth = attention_ground_truth(q, k, block_size=block, document_ids=ids, kernel="triton")
    torch.testing.assert_close(got, truth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
def test_probe_inputs_are_checked(kernel):
    q, k, _, _ = _problem(1, 2, 1, 16, docs=False, padding=False)
    with pytest.raises(ValueError, match="probe_tokens=3 must divide block_size=16"):
        probe_ground_truth(q, k, block_size=16, probe_tokens=3, kernel=kernel)
    with pytest.raises(ValueError, match="probe_tokens=32 must divide block_size=16"):
        probe_ground_truth(q, k, block_size=16, probe_tokens=32, kernel=kernel)
    with pytest.raises(ValueError, match="valid must be bool"):
        probe_ground_truth(q, k, block_size=16, valid=torch.ones(1, LENGTH, device=DEVICE), kernel=kernel)
    with pytest.raises(ValueError, match="valid must be bool"):
        probe_ground_truth(q, k, block_size=16, valid=torch.ones(1, 7, dtype=torch.bool, device=DEVICE), kernel=kernel)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        probe_ground_truth(q[:, :1].expand(1, 3, LENGTH, 16), k.expand(1, 2, LENGTH, 16), block_size=16, kernel=kernel)
