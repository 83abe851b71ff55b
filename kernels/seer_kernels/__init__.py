"""Attention ops for SeerAttention: block-sparse attention and the block-max-pooled ground truth.

Layout follows transformers: `q [B, Hq, L, D]`, `k, v [B, Hkv, L, D]` with `Hq % Hkv == 0` (GQA; K/V are never
repeated in memory). `nB = ceil(L / block_size)`. `document_ids [B, L]` (int, optional): a query attends to a
key iff the key is not later and both carry the same id (packed sequences; padding gets an id of its own).

This module is the one place that states the ops' contracts and checks their inputs; the implementations below
it take checked inputs. Each op runs on one of two kernels, chosen by its `kernel` argument:
- `"pytorch"`: chunked pure PyTorch (`pytorch_chunked`), any device; the reference the GPU kernels are tested
  against;
- `"triton"`: the Triton kernels (`block_sparse`, `triton_*`), on CUDA tensors (CPU ones only in Triton's
  interpreter, `TRITON_INTERPRET=1`; elsewhere the ops refuse them); on Hopper at head_dim 128 the sparse
  forward, dQ and dK/dV run as warp-specialized Gluon kernels instead (`gluon`; `SEER_KERNELS_GLUON=0` turns
  them off);
- `"auto"`: Triton for CUDA tensors, PyTorch otherwise.

`probe_ground_truth` is the ground truth of a few probe tokens per query block (no gradient).
`token_gate_block_scores` is the fused token-scored SeerAttention gate: differentiable on the Triton kernel,
forward-only on the PyTorch one. `selection_ranking_keys` is the layer budget's row-wise ranking in one Triton kernel; its PyTorch reference is
`seer_finetune.seer.selection.SelectionPlan.ranking_keys`. `cross_entropy_with_grad` is not attention: the language-model loss's rows with
their gradient written in place, which the trainer's CUDA-graph loss runs on.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from .indexing import (
    block_mask_to_indices,
    causal_block_mask,
    document_ids_from_cu_seqlens,
    num_blocks,
    probe_positions,
)

__all__ = [
    "KERNELS",
    "TOKEN_GATE_MODES",
    "attention_ground_truth",
    "attention_with_ground_truth",
    "block_mask_to_indices",
    "block_sparse_attention",
    "causal_block_mask",
    "cross_entropy_with_grad",
    "document_ids_from_cu_seqlens",
    "num_blocks",
    "probe_ground_truth",
    "probe_positions",
    "runs_on_triton",
    "selection_ranking_keys",
    "token_gate_block_scores",
]

KERNELS = ("auto", "pytorch", "triton")
TOKEN_GATE_MODES = ("token_logit_max", "token_prob_max")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def runs_on_triton(kernel: str, q: torch.Tensor) -> bool:
    """Resolve the `kernel` argument for an op on `q`: True for the Triton kernels, False for the PyTorch one."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return q.is_cuda
    return kernel == "triton"


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    block_size: int,
    document_ids: torch.Tensor | None,
    on_triton: bool,
) -> None:
    """Raise a ValueError for inputs outside the ops' contract (and, on Triton, outside the kernels' scope)."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    if any(t.dim() != 4 for t in named.values()):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named.items())
        raise ValueError(f"{', '.join(named)} must be [B, H, L, D] tensors, got {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if not isinstance(block_size, Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if document_ids is not None and document_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"document_ids must be {(q.shape[0], q.shape[2])}, got {tuple(document_ids.shape)}")
    if not on_triton:
        return
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 16, got {dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two block_size >= 16, got {block_size}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) != 1 or q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {dtypes}")
    _check_triton_device(q, ", ".join(named))


def _check_triton_device(x: torch.Tensor, names: str) -> None:
    """Raise a ValueError when the Triton kernels would get tensors off CUDA outside Triton's CPU interpreter
    (where Triton's own error comes from deep inside the launch)."""
    from .triton_tuning import interpreting

    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {names} on {x.device}: move them to CUDA, run Triton's CPU "
            "interpreter (TRITON_INTERPRET=1, set before seer_kernels is imported) or pass kernel='pytorch'"
        )


def _check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, block_size: int) -> None:
    nb = num_blocks(q.shape[2], block_size)
    want = (q.shape[0], q.shape[1], nb, nb)
    if block_mask.shape != want:
        raise ValueError(f"block_mask must be {want} ([B, Hq, nB, nB]), got {tuple(block_mask.shape)}")


def _softmax_scale(sm_scale: float | None, q: torch.Tensor) -> float:
    return sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    kernel: str = "auto",
    split_long_columns: bool | None = None,
) -> torch.Tensor:
    """Exact causal attention restricted to the kept (query block, key block) pairs, with backward.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        v: `[B, Hkv, L, D]`.
        block_mask: bool `[B, Hq, nB, nB]`, row = query block, column = key block; entries above the diagonal
            are ignored. Inside kept blocks the token-level causal and document masks still apply.
        block_size: tokens per block (a power of two >= 16 for the Triton kernels; 64 or 128 in practice).
        document_ids: optional int `[B, L]`; keys of another document are masked.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        kernel: `"auto"`, `"pytorch"` or `"triton"` (see the module docstring).
        split_long_columns: Triton backward only: cut the dK/dV work of key blocks kept by many query blocks
            into segments spread over the GPU (worth it when a few columns are long, e.g. a sink block every row
            keeps; it costs time on evenly spread masks). None: `triton_tuning.KERNEL_OPTIONS` decides (off).
    Returns:
        `[B, Hq, L, D]` in q's dtype. A query row with no allowed key gives zeros.
    Raises:
        ValueError: for an unknown `kernel` or inputs outside the contract above.
    """
    on_triton = runs_on_triton(kernel, q)
    _check_inputs(q, k, v, block_size=block_size, document_ids=document_ids, on_triton=on_triton)
    _check_block_mask(block_mask, q, block_size)
    scale = _softmax_scale(sm_scale, q)
    if on_triton:
        from .block_sparse import BlockSparseAttention

        return BlockSparseAttention.apply(
            q, k, v, block_mask.to(q.device), block_size, document_ids, scale, split_long_columns
        )
    from .pytorch_chunked import ChunkedBlockSparseAttention

    return ChunkedBlockSparseAttention.apply(q, k, v, block_mask, block_size, document_ids, scale)


@torch.no_grad()
def attention_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    query_blocks: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Block-max-pooled, row-normalised attention probabilities (the gate's training target). No gradient.

    For query block i and key block j: the max over rows r of block i and keys c of block j of the row's real
    (causal, document-masked) attention probability softmax_r(c); each row of the result is then divided by
    its sum over j. Keys that are not allowed contribute 0.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        block_size: tokens per block.
        document_ids: optional int `[B, L]`.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        query_blocks: optional int64 `[nQ]`, the query blocks to compute, each in `[0, nB)` (None: all, `nQ = nB`).
        kernel: `"auto"`, `"pytorch"` or `"triton"`.
    Returns:
        float32 `[B, Hq, nQ, nB]`; row n belongs to query block `query_blocks[n]`.
    Raises:
        ValueError: for an unknown `kernel` or inputs outside the contract above.
    """
    on_triton = runs_on_triton(kernel, q)
    _check_inputs(q, k, None, block_size=block_size, document_ids=document_ids, on_triton=on_triton)
    scale = _softmax_scale(sm_scale, q)
    if on_triton:
        from .triton_ground_truth import ground_truth
    else:
        from .pytorch_chunked import ground_truth
    return ground_truth(
        q, k, block_size=block_size, sm_scale=scale, document_ids=document_ids, query_blocks=query_blocks
    )


def attention_with_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    query_blocks: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention output and its ground truth from one forward.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        v: `[B, Hkv, L, D]`.
        block_size: tokens per block of the ground truth.
        document_ids: optional int `[B, L]`.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        query_blocks: optional int64 `[nQ]` for the ground truth (None: all query blocks).
        kernel: `"auto"`, `"pytorch"` or `"triton"`.
    Returns:
        `(out, ground_truth)`: `out [B, Hq, L, D]` in q's dtype (differentiable w.r.t. q, k, v) and float32
        `ground_truth [B, Hq, nQ, nB]` as in `attention_ground_truth` (no gradient).
    Raises:
        ValueError: for an unknown `kernel` or inputs outside the contract above.
    """
    on_triton = runs_on_triton(kernel, q)
    _check_inputs(q, k, v, block_size=block_size, document_ids=document_ids, on_triton=on_triton)
    scale = _softmax_scale(sm_scale, q)
    if on_triton:
        from .triton_ground_truth import AttentionWithGroundTruth

        return AttentionWithGroundTruth.apply(q, k, v, block_size, document_ids, scale, query_blocks)
    from .pytorch_chunked import attention_with_ground_truth as chunked

    return chunked(q, k, v, block_size=block_size, sm_scale=scale, document_ids=document_ids, query_blocks=query_blocks)


@torch.no_grad()
def probe_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    probe_tokens: int = 1,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    sm_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """`attention_ground_truth` with r = `probe_tokens` query tokens per block (`probe_positions`). No gradient.

    For probe token p: its softmax attention probabilities over the keys it may attend to (key position <= p,
    the same document id, a valid key), max-pooled over each key block's tokens; then the max over the block's
    probe tokens, and each row divided by its sum over key blocks. With `probe_tokens = block_size` this is
    `attention_ground_truth`, except that padding queries are skipped here (the ground truth counts a padding
    token as a query that attends to itself). Nothing is read back to the host, so a CUDA graph can capture it.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        block_size: tokens per block.
        probe_tokens: probe tokens per query block, r: divides `block_size`. Default 1 (the block's last token).
        document_ids: optional int `[B, L]`.
        valid: optional bool `[B, L]`, False for padding tokens (neither probes nor keys).
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        kernel: `"auto"` (Triton on CUDA, PyTorch elsewhere), `"pytorch"` or `"triton"`.
    Returns:
        float32 `[B, Hq, nB, nB]`; rows sum to 1 (or are zero, for a block without a valid probe token), zero
        wherever no probe token may attend.
    Raises:
        ValueError: for an unknown `kernel` or inputs outside the contract above.
    """
    on_triton = runs_on_triton(kernel, q)
    _check_inputs(q, k, None, block_size=block_size, document_ids=document_ids, on_triton=on_triton)
    if not isinstance(probe_tokens, Integral) or not 1 <= probe_tokens <= block_size or block_size % probe_tokens:
        raise ValueError(f"probe_tokens={probe_tokens} must divide block_size={block_size}")
    if valid is not None and (valid.shape != (q.shape[0], q.shape[2]) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be bool {(q.shape[0], q.shape[2])}, got {valid.dtype} {tuple(valid.shape)}")
    if on_triton:
        from .triton_probe import probe_ground_truth as run
    else:
        from .pytorch_chunked import probe_ground_truth as run
    return run(
        q, k, block_size=block_size, probe_tokens=probe_tokens, sm_scale=_softmax_scale(sm_scale, q),
        document_ids=document_ids, valid=valid,
    )


def _check_token_gate_inputs(
    qt: torch.Tensor,
    kh: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
    *,
    block_size: int,
    mode: str,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    on_triton: bool,
) -> None:
    """Raise a ValueError for inputs outside `token_gate_block_scores`'s contract."""
    if mode not in TOKEN_GATE_MODES:
        raise ValueError(f"mode must be one of {TOKEN_GATE_MODES}, got {mode!r}")
    if not on_triton and _needs_gradient(qt, kh):
        raise ValueError(
            "token_gate_block_scores is forward-only on the PyTorch kernel and qt or kh requires a gradient: call "
            "it under torch.no_grad(), pass kernel='triton' (differentiable), or use the gate's chunked path for "
            "training (seer_finetune's gate.block_scores, which recomputes its chunks in backward)"
        )
    if qt.dim() != 4 or kh.dim() != 4:
        raise ValueError(
            f"qt must be [B, Hq, L, hidden] and kh [B, Hkv, nB, hidden], got qt {tuple(qt.shape)} and "
            f"kh {tuple(kh.shape)}"
        )
    if qt.dtype != torch.float32 or kh.dtype != torch.float32:
        raise ValueError(f"qt and kh must be float32 (the gate scores in float32), got {qt.dtype} and {kh.dtype}")
    if not isinstance(block_size, Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    bsz, hq, seq_len, hidden = qt.shape
    nb = num_blocks(seq_len, block_size)
    if kh.shape[0] != bsz or kh.shape[2] != nb or kh.shape[3] != hidden:
        raise ValueError(
            f"kh {tuple(kh.shape)} must be [B, Hkv, nB, hidden] = [{bsz}, Hkv, {nb}, {hidden}] for qt "
            f"{tuple(qt.shape)} in blocks of {block_size}"
        )
    if kh.shape[1] == 0 or hq % kh.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({kh.shape[1]})")
    if valid is not None and (valid.shape != (bsz, seq_len) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be bool {(bsz, seq_len)}, got {valid.dtype} {tuple(valid.shape)}")
    if candidates is not None and (candidates.shape != (bsz, nb, nb) or candidates.dtype != torch.bool):
        raise ValueError(f"candidates must be bool {(bsz, nb, nb)}, got {candidates.dtype} {tuple(candidates.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None:
        rd = cos.shape[-1] if cos.dim() == 2 else -1
        if cos.shape != sin.shape or cos.shape[:1] != (nb,) or rd % 2 or not 2 <= rd <= hidden:
            raise ValueError(
                f"cos and sin must be [nB, rotary_dim] = [{nb}, an even width in 2..{hidden}], got "
                f"{tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        if cos.dtype != torch.float32 or sin.dtype != torch.float32:
            raise ValueError(f"cos and sin must be float32, got {cos.dtype} and {sin.dtype}")
    others = [t for t in (kh, valid, candidates, cos, sin) if t is not None]
    if any(t.device != qt.device for t in others):
        devices = [str(t.device) for t in (qt, *others)]
        raise ValueError(f"qt, kh, valid, candidates, cos and sin must share one device, got {devices}")
    if on_triton:
        _check_triton_device(qt, "qt, kh")


def _needs_gradient(qt: torch.Tensor, kh: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (qt.requires_grad or kh.requires_grad)


def token_gate_block_scores(
    qt: torch.Tensor,
    kh: torch.Tensor,
    valid: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    *,
    block_size: int,
    mode: str,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Block scores of a token-scored gate: every query token against the pooled key blocks, max over the tokens
    of each query block. Differentiable w.r.t. `qt` and `kh` on the Triton kernel (`kernel="triton"`, or `auto`
    on CUDA tensors); forward-only on the PyTorch one.

    With `s[i, j] = qt[b, h, i] . kh[b, h // (Hq / Hkv), j]` for token i of query block I (a valid one: not
    padding, inside the sequence) and key block j <= I:
    - `token_logit_max`: `S[I, j] = max_i s[i, j]`;
    - `token_prob_max`: `S[I, j] = max_i (s[i, j] - logsumexp_{j' candidate of I} s[i, j'])` at the candidates
      of I, -inf at the others.
    A query block with no valid token scores 0 (at its candidates, in `token_prob_max`); key blocks after a
    row's own (j > I) are -inf in both modes. Scores are computed in float32 and no `[B, Hq, L, nB]` per-token
    logits are held (the Triton kernel keeps one tile of them in registers; the PyTorch one works in chunks).

    Args:
        qt: float32 `[B, Hq, L, hidden]`, each token's query as the gate scores it (projected, scaled by
            1/sqrt(hidden), and rotated at its block's position unless `cos`, `sin` are given).
        kh: float32 `[B, Hkv, nB, hidden]`, the projected, rotated key blocks; `Hq % Hkv == 0` (query head h
            reads KV head h // (Hq / Hkv)); `nB = ceil(L / block_size)`.
        valid: optional bool `[B, L]`, False for padding tokens (None: every token is valid).
        candidates: optional bool `[B, nB, nB]`, the key blocks each query block may attend to (entries above the
            diagonal are ignored); `token_prob_max` normalises over them. None: the block-causal triangle.
            `token_logit_max` ignores it.
        block_size: tokens per block (the last block may be partial; the Triton kernel pads the query tile to a
            power of two >= 16, as it does the hidden width).
        mode: `token_logit_max` or `token_prob_max` (`TOKEN_GATE_MODES`).
        cos, sin: optional float32 `[nB, rotary_dim]` block RoPE angles (rotate-half convention, `rotary_dim` even
            and at most hidden): the op turns token i's query by the angles of its block in the first
            `rotary_dim` features before scoring, so the caller writes no rotated copy of `qt`. Default None.
        kernel: `"auto"`, `"pytorch"` or `"triton"` (see the module docstring).

    Returns:
        float32 `[B, Hq, nB, nB]` (row = query block, column = key block). On the Triton kernel, with gradients
        enabled and `qt` or `kh` requiring one, the scores carry a backward: float32 gradients `[B, Hq, L,
        hidden]` for `qt` (w.r.t. the unrotated queries when `cos`, `sin` are given) and `[B, Hkv, nB, hidden]`
        for `kh`; each max passes its gradient to its winning token, and the constant entries (-inf, and the 0
        of a block without valid tokens) pass none. `valid`, `candidates`, `cos` and `sin` get no gradient. The
        backward keeps, besides the inputs, an int32 winner per (query block, key block) and query head, and in
        `token_prob_max` one float per token and query head.

    Raises:
        ValueError: for an unknown `kernel` or `mode`, inputs outside the contract above, CPU tensors on the
            Triton kernel outside Triton's interpreter, or (with gradients enabled) a `qt` or `kh` that requires
            a gradient on the PyTorch kernel: it has no backward, so it refuses them rather than return scores
            that silently cut the graph.
    """
    on_triton = runs_on_triton(kernel, qt)
    _check_token_gate_inputs(
        qt, kh, valid, candidates, block_size=block_size, mode=mode, cos=cos, sin=sin, on_triton=on_triton
    )
    prob = mode == "token_prob_max"
    if on_triton and _needs_gradient(qt, kh):
        from .triton_token_gate import differentiable_token_gate_scores

        return differentiable_token_gate_scores(
            qt, kh, valid, candidates, block_size=block_size, prob=prob, cos=cos, sin=sin
        )
    if on_triton:
        from .triton_token_gate import token_gate_forward as forward
    else:
        from .pytorch_chunked import token_gate_scores as forward
    return forward(qt, kh, valid, candidates, block_size=block_size, prob=prob, cos=cos, sin=sin)


def cross_entropy_with_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    write_grad: bool = True,
    kernel: str = "auto",
) -> torch.Tensor:
    """Cross entropy of each row of `logits`, and (with `write_grad`) its gradient written over `logits`.

    For row i with target `t = targets[i]` (not `ignore_index`): `loss[i] = logsumexp(logits[i]) - logits[i, t]`,
    computed in float32 whatever the logits' dtype, and `logits[i] <- softmax(logits[i]) - onehot(t)` in the
    logits' dtype: the gradient of `loss.sum()` with respect to the row. A row whose target is `ignore_index`
    has loss 0 and gradient 0. Nothing is read back to the host, so a CUDA graph can capture the op. Not
    differentiable itself: the caller multiplies the gradient out (`seer_finetune.lm_loss`).

    Args:
        logits: `[N, V]` float16/bfloat16/float32, last dim contiguous; overwritten when `write_grad`.
        targets: int64 `[N]` on the same device, each in `[0, V)` or `ignore_index`.
        ignore_index: The target of a row without one. Default -100.
        write_grad: Write the gradient over `logits`. Default True.
        kernel: `"auto"`, `"pytorch"` or `"triton"` (see the module docstring).

    Returns:
        float32 `[N]`: each row's loss.

    Raises:
        ValueError: for shapes, dtypes or devices outside the contract above, or CPU tensors on the Triton kernel
            outside Triton's interpreter.
    """
    on_triton = runs_on_triton(kernel, logits)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.dtype not in _TRITON_DTYPES or targets.dtype != torch.int64:
        raise ValueError(f"logits must be float16/bfloat16/float32 and targets int64, got {logits.dtype} and {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets must share a device, got {logits.device} and {targets.device}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in their last dim (the gradient is written over them)")
    if on_triton:
        _check_triton_device(logits, "logits")
        from .triton_cross_entropy import cross_entropy_with_grad_triton as run
    else:
        from .pytorch_chunked import cross_entropy_with_grad as run
    return run(logits, targets, ignore_index, write_grad)


def selection_ranking_keys(
    log_probs: torch.Tensor,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    room: torch.Tensor,
    *,
    bound: torch.Tensor | None = None,
    bound_blocks: int = 0,
    probe: torch.Tensor | None = None,
    probe_blocks: int = 0,
    row_mass: float = 0.0,
) -> torch.Tensor:
    """The key by which a layer budget ranks every block, in one Triton kernel (`triton_selection`).

    Forced blocks and non-candidates get -inf; a free candidate its log-probability, raised by 4e4 when it is one
    of its row's `bound_blocks` blocks of highest `bound` or `probe_blocks` of highest `probe` (the lists taken
    alternately, bound first, while the row has `room`), else by 2e4 when it is one of the row's most probable
    blocks that, with the forced ones, hold `row_mass` of its probability (at most `room` of them); raised keys
    are clamped at -1e4 first. Ties rank the lower column first.

    Args:
        log_probs: float32 `[B, H, nB, nB]`, rows normalised over their candidates.
        candidates, forced: bool `[B, nB, nB]` (every head alike).
        room: int `[B, nB]`: each row's quota beyond its forced blocks.
        bound, probe: float `[B, H, nB, nB]` (broadcastable); needed when `bound_blocks` / `probe_blocks` > 0.
        bound_blocks, probe_blocks: Default 0 (off).
        row_mass: In [0, 1). Default 0 (off).

    Returns:
        float32 `[B, H, nB, nB]`.

    Raises:
        ValueError: for inputs outside the contract above, or CPU tensors outside Triton's interpreter.
    """
    if log_probs.dim() != 4 or log_probs.shape[2] != log_probs.shape[3]:
        raise ValueError(f"log_probs must be [B, H, nB, nB], got {tuple(log_probs.shape)}")
    bsz, nb = log_probs.shape[0], log_probs.shape[-1]
    for name, t in (("candidates", candidates), ("forced", forced)):
        if t.shape != (bsz, nb, nb) or t.dtype != torch.bool:
            raise ValueError(f"{name} must be bool {(bsz, nb, nb)}, got {t.dtype} {tuple(t.shape)}")
    if room.shape != (bsz, nb):
        raise ValueError(f"room must be [B, nB] = {(bsz, nb)}, got {tuple(room.shape)}")
    for name, t, count in (("bound", bound, bound_blocks), ("probe", probe, probe_blocks)):
        if not isinstance(count, Integral) or count < 0:
            raise ValueError(f"{name}_blocks={count} must be an int >= 0")
        if count > 0 and (t is None or t.dim() != 4 or t.shape[-2:] != (nb, nb)):
            raise ValueError(f"{name}_blocks={count} needs {name} [B, H, nB, nB], got {None if t is None else tuple(t.shape)}")
    if not 0.0 <= row_mass < 1.0:
        raise ValueError(f"row_mass={row_mass} must be in [0, 1)")
    _check_triton_device(log_probs, "log_probs")
    from .triton_selection import ranking_keys

    return ranking_keys(
        log_probs, candidates, forced, room, bound=bound, bound_blocks=int(bound_blocks), probe=probe,
        probe_blocks=int(probe_blocks), row_mass=row_mass,
    )
