"""Independent, deliberately simple oracles for the kernel tests: full L x L maps, repeated K/V, float64."""

from __future__ import annotations

import math

import torch


def make_inputs(bsz, hq, hkv, seq_len, dim, *, dtype=torch.float32, device="cpu", seed=0, q_scale=2.0):
    """Random q, k, v (q scaled up so that attention is peaked rather than uniform)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(bsz, hq, seq_len, dim, generator=gen) * q_scale
    k = torch.randn(bsz, hkv, seq_len, dim, generator=gen)
    v = torch.randn(bsz, hkv, seq_len, dim, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def random_block_mask(bsz, heads, nb, density, *, keep_diagonal=True, seed=0, device="cpu"):
    """bool [B, H, nB, nB]: each causal entry kept with probability `density` (plus the diagonal if asked).

    Entries above the diagonal are set at random too: the ops must ignore them.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    mask = torch.rand(bsz, heads, nb, nb, generator=gen) < density
    if keep_diagonal:
        mask |= torch.eye(nb, dtype=torch.bool)
    return mask.to(device)


def make_document_ids(bsz, seq_len, kind, *, seed=0, device="cpu"):
    """None, or int64 [B, L] ids: 'packed' (random document lengths) or 'padded' (packed + trailing padding
    whose tokens each carry an id of their own)."""
    if kind is None:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    ids = torch.empty(bsz, seq_len, dtype=torch.int64)
    for b in range(bsz):
        pos, doc = 0, 0
        end = seq_len if kind == "packed" else seq_len - int(torch.randint(1, max(2, seq_len // 4), (1,), generator=gen))
        while pos < end:
            length = int(torch.randint(1, max(2, seq_len // 2), (1,), generator=gen))
            ids[b, pos : min(end, pos + length)] = doc
            pos += length
            doc += 1
        for p in range(end, seq_len):
            ids[b, p] = 1000 + p  # padding: one id per token, so each pad token sees only itself
    return ids.to(device)


def token_mask(seq_len, document_ids, bsz, device):
    """bool [B, 1, L, L]: causal and same-document."""
    pos = torch.arange(seq_len, device=device)
    allowed = (pos[None, :] <= pos[:, None])[None, None].expand(bsz, 1, seq_len, seq_len)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    return allowed


def expand_block_mask(block_mask, seq_len, block_size):
    """bool [B, H, nB, nB] -> [B, H, L, L]."""
    idx = torch.arange(seq_len, device=block_mask.device) // block_size
    return block_mask[:, :, idx][:, :, :, idx]


def dense_masked_attention(q, k, v, block_mask, block_size, document_ids=None, sm_scale=None):
    """Softmax attention with one full boolean mask; differentiable through plain autograd."""
    bsz, hq, seq_len, dim = q.shape
    group = hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(dim)
    kr = k.repeat_interleave(group, dim=1)
    vr = v.repeat_interleave(group, dim=1)
    allowed = token_mask(seq_len, document_ids, bsz, q.device)
    if block_mask is not None:
        allowed = allowed & expand_block_mask(block_mask, seq_len, block_size)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    nonempty = allowed.any(-1, keepdim=True)
    # Rows with no allowed key: softmax over zeros, then multiplied by the (all False) mask -> zeros.
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~nonempty, 0.0)
    p = torch.softmax(s, dim=-1) * allowed
    return torch.matmul(p, vr)


def brute_force_ground_truth(q, k, block_size, document_ids=None, sm_scale=None, query_blocks=None):
    """Full attention map, then explicit loops over blocks for the max pooling; float64."""
    q, k = q.double(), k.double()
    bsz, hq, seq_len, dim = q.shape
    group = hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(dim)
    s = torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    allowed = token_mask(seq_len, document_ids, bsz, q.device)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    nb = math.ceil(seq_len / block_size)
    blocks = list(range(nb)) if query_blocks is None else [int(i) for i in query_blocks]
    out = torch.zeros(bsz, hq, len(blocks), nb, dtype=torch.float64)
    for n, i in enumerate(blocks):
        for j in range(nb):
            tile = p[:, :, i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size]
            out[:, :, n, j] = tile.amax(dim=(-1, -2))
    return out / out.sum(-1, keepdim=True)
