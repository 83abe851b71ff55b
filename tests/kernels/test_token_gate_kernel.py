"""`seer_kernels.token_gate_block_scores`: the fused token-scored gate against its chunked PyTorch implementation
and against the gate's own token path (`gate.block_scores`, itself tested against a float64 definition in
tests/seer/test_seer_gate_query.py), on awkward shapes: a partial last block, a block size and a hidden width that
are not powers of two, GQA 6/2, left padding with a block of padding alone, packed documents, key tiles narrower
than the row. Then the routing in `gate.block_scores` and the refusals. On CPU the kernel runs in Triton's
interpreter (float32: its bf16 dots are wrong), which ignores the dot precision; a GPU test checks that too."""

from __future__ import annotations

import math

import pytest
import torch

import seer_kernels
from seer_finetune.seer.gate import block_scores
from seer_finetune.seer.selection import block_candidates
from seer_kernels import TOKEN_GATE_MODES, token_gate_block_scores, triton_token_gate
from seer_kernels.pytorch_chunked import token_gate_scores
from seer_kernels.triton_token_gate import TokenGateTiles, token_gate_forward

CUDA = torch.cuda.is_available()
B, HQ, HKV = 2, 6, 2
# (tokens, block, hidden): a partial last block; whole blocks; a block of 12 (query tile padded to 16) with a
# hidden width of 24 (padded to 32).
SHAPES = [(75, 16, 32), (80, 16, 64), (75, 12, 24)]


def _layout(seq_len: int, block: int, padded: bool, device: str = "cpu"):
    """`valid` (None, or left padding on row 1 whose first block is padding alone) and the candidates of that
    padding with two packed documents on row 0 (`padded`), else the block-causal triangle."""
    valid, documents = None, torch.zeros(B, seq_len, dtype=torch.long, device=device)
    if padded:
        valid = torch.ones(B, seq_len, dtype=torch.bool, device=device)
        valid[1, : block + 5] = False
        documents[0, seq_len // 2 :] = 1
    return valid, block_candidates(seq_len, block, documents, valid)


def _operands(seq_len: int, block: int, hidden: int, seed: int = 0, device: str = "cpu"):
    """Projected token queries `[B, HQ, L, hidden]` (the gate's scale) and key blocks `[B, HKV, nB, hidden]`."""
    g = torch.Generator().manual_seed(seed)
    qt = torch.randn(B, HQ, seq_len, hidden, generator=g) / math.sqrt(hidden)
    kh = torch.randn(B, HKV, math.ceil(seq_len / block), hidden, generator=g)
    return qt.to(device), kh.to(device)


def _expected_infinities(mode: str, candidates: torch.Tensor, hq: int = HQ) -> torch.Tensor:
    """Where the scores are -inf: after each row's own block, and off the candidates in `token_prob_max`."""
    nb = candidates.shape[-1]
    later = torch.ones(nb, nb, dtype=torch.bool, device=candidates.device).triu(1)
    out = later | ~candidates if mode == "token_prob_max" else later.expand_as(candidates)
    return out[:, None].expand(-1, hq, -1, -1)


def _nan_filled(bsz: int, hq: int, nb: int, device: str = "cpu") -> torch.Tensor:
    """An output buffer whose entries stay NaN unless the kernel writes them."""
    return torch.full((bsz, hq, nb, nb), float("nan"), device=device)


@pytest.mark.parametrize("key_blocks", [2, 64], ids=["tiles_of_2", "one_tile"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded_packed"])
@pytest.mark.parametrize("seq_len,block,hidden", SHAPES)
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_kernel_matches_the_pytorch_implementation(mode, seq_len, block, hidden, padded, key_blocks):
    """Tiles of 2 key blocks: a row of 5 to 7 blocks runs 3 or 4 of them, the last one partly past the row."""
    qt, kh = _operands(seq_len, block, hidden)
    valid, candidates = _layout(seq_len, block, padded)
    prob = mode == "token_prob_max"
    nb = kh.shape[2]
    got = token_gate_forward(
        qt, kh, valid, candidates, block_size=block, prob=prob, tiles=TokenGateTiles(key_blocks, 4, 1),
        out=_nan_filled(B, HQ, nb),
    )
    want = token_gate_scores(qt, kh, valid, candidates, block_size=block, prob=prob)
    assert not got.isnan().any(), "the kernel left entries unwritten"
    assert torch.equal(torch.isinf(got), _expected_infinities(mode, candidates))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if padded:
        # Row 1's first block is padding alone: 0 at its candidates (itself).
        assert torch.equal(got[1, :, 0, 0], torch.zeros(HQ))


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_pytorch_implementation_matches_a_per_token_loop(mode):
    """The chunked PyTorch implementation against the definition written token by token, in float64."""
    seq_len, block, hidden = 75, 16, 32
    qt, kh = _operands(seq_len, block, hidden, seed=3)
    valid, candidates = _layout(seq_len, block, padded=True)
    got = token_gate_block_scores(qt, kh, valid, candidates, block_size=block, mode=mode, kernel="pytorch")
    nb = kh.shape[2]
    want = torch.full((B, HQ, nb, nb), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            for row in range(nb):
                allowed = candidates[b, row] if mode == "token_prob_max" else torch.ones(nb, dtype=torch.bool)
                allowed = allowed & (torch.arange(nb) <= row)
                tokens = [t for t in range(row * block, min(seq_len, (row + 1) * block)) if valid[b, t]]
                if not tokens:
                    want[b, h, row] = torch.where(allowed, 0.0, float("-inf"))
                    continue
                logits = qt[b, h, tokens].double() @ kh[b, h // (HQ // HKV)].double().T  # [tokens, nB]
                if mode == "token_prob_max":
                    logits = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
                want[b, h, row] = logits.amax(0).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _angles(nb: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block RoPE angles `[nB, rotary_dim]` as the models' rotary modules make them (halves repeated)."""
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(nb).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("rotary_dim", [32, 8], ids=["full", "partial"])
@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_rotation_inside_the_op_equals_rotated_queries(mode, kernel, rotary_dim):
    """Given the block angles, the op turns each token by its block's angles itself: the scores of unrotated
    queries with `cos`, `sin` equal those of queries the gate rotated (`apply_rotary` per block) without."""
    from seer_finetune.seer.gate_rope import apply_rotary

    seq_len, block, hidden = 75, 16, 32
    qt, kh = _operands(seq_len, block, hidden, seed=4)
    valid, candidates = _layout(seq_len, block, padded=True)
    nb = kh.shape[2]
    cos, sin = _angles(nb, rotary_dim)
    whole = torch.nn.functional.pad(qt, (0, 0, 0, nb * block - seq_len)).view(B, HQ, nb, block, hidden)
    rotated = apply_rotary(whole, cos[None, :, None], sin[None, :, None]).view(B, HQ, nb * block, hidden)
    call = dict(block_size=block, mode=mode, kernel=kernel)
    want = token_gate_block_scores(rotated[:, :, :seq_len].contiguous(), kh, valid, candidates, **call)
    got = token_gate_block_scores(qt, kh, valid, candidates, cos=cos, sin=sin, **call)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, token_gate_block_scores(qt, kh, valid, candidates, **call))


def _gate_inputs(seq_len: int, block: int, hidden: int, device: str = "cpu"):
    """Pre-RoPE queries and keys, float32 gate weights and block angles rotating half the hidden features."""
    g = torch.Generator().manual_seed(1)
    dim = 16
    q = torch.randn(B, seq_len, HQ, dim, generator=g)
    k = torch.randn(B, seq_len, HKV, dim, generator=g)
    q_weight = torch.randn(HQ, dim, hidden, generator=g) / math.sqrt(dim)
    k_weight = torch.randn(HKV, 2 * dim, hidden, generator=g) / math.sqrt(2 * dim)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, hidden // 2, 2).float() / (hidden // 2)))
    freqs = torch.arange(math.ceil(seq_len / block)).float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), -1)[None]
    return [t.to(device) for t in (q, k, q_weight, k_weight, angles.cos(), angles.sin())]


def _gate_shape(block: int, hidden: int, mode: str) -> dict:
    return dict(block_size=block, q_pooling=("avg",), k_pooling=("max", "min"), hidden_size=hidden, gate_query=mode)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded_packed"])
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_gate_routes_gradient_free_scores_to_the_kernel(monkeypatch, mode, padded):
    """`block_scores` without gradients, routed to the kernel (on CPU: through the interpreter), gives the
    scores of its chunked path; the kernel reads the gate's projected, scaled token queries and rotates them
    itself (half the hidden features here: partial RoPE)."""
    seq_len, block, hidden = 75, 16, 32
    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden)
    valid, candidates = _layout(seq_len, block, padded)
    shape = _gate_shape(block, hidden, mode)
    want = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)

    calls = []
    original = seer_kernels.token_gate_block_scores

    def counted(qt, kh, *args, **kwargs):
        calls.append((tuple(qt.shape), tuple(kh.shape), kwargs["kernel"], tuple(kwargs["cos"].shape)))
        return original(qt, kh, *args, **kwargs)

    monkeypatch.setattr(seer_kernels, "token_gate_block_scores", counted)
    with torch.no_grad():
        got = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="triton", **shape)
        # `attention.kernel=pytorch` never launches it; `auto` only for CUDA tensors.
        for kernel in ("pytorch", "auto"):
            same = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel=kernel, **shape)
            assert torch.equal(same, want)
    nb = math.ceil(seq_len / block)
    assert calls == [((B, HQ, seq_len, hidden), (B, HKV, nb, hidden), "triton", (nb, hidden // 2))]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # With gradients the chunked, checkpointed path runs even where the kernel could.
    q.requires_grad_()
    again = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="triton", **shape)
    assert len(calls) == 1 and again.requires_grad
    with pytest.raises(ValueError, match="kernel='cuda' must be one of"):
        with torch.no_grad():
            block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="cuda", **shape)


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_gate_on_cpu_without_gradients_keeps_the_pytorch_path(monkeypatch, mode):
    """Off CUDA, gradient-free scores still come from the chunked path: the same numbers as with gradients."""
    seq_len, block, hidden = 75, 16, 32
    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden)
    valid, candidates = _layout(seq_len, block, padded=True)
    shape = _gate_shape(block, hidden, mode)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran on CPU tensors")

    monkeypatch.setattr(seer_kernels, "token_gate_block_scores", refuse)
    q_weight.requires_grad_()
    with_grad = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)
    with torch.no_grad():
        without = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)
    assert with_grad.requires_grad and torch.equal(without, with_grad.detach())


def test_compiled_gate_launches_the_kernel_outside_its_graph(monkeypatch):
    """`torch.compile` of `block_scores` (as `attention.compile_gate` does) breaks its graph at the launcher and
    gives the eager scores."""
    seq_len, block, hidden, mode = 75, 16, 32, "token_prob_max"
    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden)
    valid, candidates = _layout(seq_len, block, padded=True)
    shape = _gate_shape(block, hidden, mode)
    launches = []
    launcher = triton_token_gate.token_gate_forward

    def counted(*args, **kwargs):
        launches.append(1)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(triton_token_gate, "token_gate_forward", counted)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="triton", **shape)
        compiled_gate = torch.compile(block_scores)
        compiled = compiled_gate(
            q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="triton", **shape
        )
    torch._dynamo.reset()
    assert len(launches) == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["pytorch", "triton", "auto"])
def test_inputs_requiring_gradients_are_refused_unless_gradients_are_off(kernel):
    qt, kh = _operands(32, 16, 32)
    for needs_grad in (qt, kh):
        needs_grad.requires_grad_()
        with pytest.raises(ValueError, match="forward-only.*torch.no_grad"):
            token_gate_block_scores(qt, kh, block_size=16, mode="token_logit_max", kernel=kernel)
        needs_grad.requires_grad_(False)
    qt.requires_grad_()
    with torch.no_grad():
        out = token_gate_block_scores(qt, kh, block_size=16, mode="token_logit_max", kernel=kernel)
    assert out.shape == (B, HQ, 2, 2) and not out.requires_grad


@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
def test_bad_inputs_are_refused(kernel):
    qt, kh = _operands(75, 16, 32)
    valid, candidates = _layout(75, 16, padded=True)
    call = dict(block_size=16, mode="token_prob_max", kernel=kernel)
    cases = [
        ((qt[0], kh, None, None), call, r"qt must be \[B, Hq, L, hidden\]"),
        ((qt, kh[:, :, :4], None, None), call, r"must be \[B, Hkv, nB, hidden\] = \[2, Hkv, 5, 32\]"),
        ((qt, kh[..., :16], None, None), call, r"must be \[B, Hkv, nB, hidden\]"),
        ((qt[:, :5], kh, None, None), call, r"query heads \(5\) must be a multiple of KV heads \(2\)"),
        ((qt.double(), kh, None, None), call, "must be float32"),
        ((qt, kh.half(), None, None), call, "must be float32"),
        ((qt, kh, valid[:, :70], None), call, r"valid must be bool \(2, 75\)"),
        ((qt, kh, valid.int(), None), call, r"valid must be bool"),
        ((qt, kh, valid, candidates[:, :4]), call, r"candidates must be bool \(2, 5, 5\)"),
        ((qt, kh, None, None), {**call, "mode": "pooled"}, "mode must be one of"),
        ((qt, kh, None, None), {**call, "block_size": 0}, "block_size must be a positive int"),
        ((qt, kh, None, None), {**call, "kernel": "cuda"}, "kernel must be one of"),
        ((qt, kh, None, None), {**call, "cos": torch.ones(5, 8)}, "give both cos and sin, or neither"),
        ((qt, kh, None, None), {**call, "cos": torch.ones(4, 8), "sin": torch.ones(4, 8)}, r"\[5, an even width"),
        ((qt, kh, None, None), {**call, "cos": torch.ones(5, 7), "sin": torch.ones(5, 7)}, r"\[5, an even width"),
        ((qt, kh, None, None), {**call, "cos": torch.ones(5, 64), "sin": torch.ones(5, 64)}, r"2\.\.32"),
        ((qt, kh, None, None), {**call, "cos": torch.ones(5, 8).double(), "sin": torch.ones(5, 8).double()},
         "cos and sin must be float32"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            token_gate_block_scores(*args, **kwargs)


def test_public_op_on_both_kernels_and_auto():
    """`auto` takes the PyTorch implementation for CPU tensors; the Triton one agrees (in the interpreter)."""
    qt, kh = _operands(75, 16, 32, seed=2)
    valid, candidates = _layout(75, 16, padded=True)
    for mode in TOKEN_GATE_MODES:
        runs = {kernel: token_gate_block_scores(qt, kh, valid, candidates, block_size=16, mode=mode, kernel=kernel)
                for kernel in ("pytorch", "triton", "auto")}
        assert torch.equal(runs["auto"], runs["pytorch"])
        torch.testing.assert_close(runs["triton"], runs["pytorch"], rtol=1e-5, atol=1e-5)
    # Without candidates, `token_prob_max` normalises over the block-causal triangle.
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(B, 5, 5)
    for kernel in ("pytorch", "triton"):
        implicit = token_gate_block_scores(qt, kh, valid, None, block_size=16, mode="token_prob_max", kernel=kernel)
        explicit = token_gate_block_scores(qt, kh, valid, causal, block_size=16, mode="token_prob_max", kernel=kernel)
        assert torch.equal(implicit, explicit)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_kernel_matches_pytorch_on_gpu(mode):
    """4133 tokens in blocks of 64 (65 blocks, the last partial), hidden 128, GQA 6/2, padding and documents,
    default tiles and dot precision (tf32x3: about float32 accuracy); then the gate's routing on CUDA."""
    seq_len, block, hidden = 4133, 64, 128
    qt, kh = _operands(seq_len, block, hidden, device="cuda")
    valid, candidates = _layout(seq_len, block, padded=True, device="cuda")
    prob = mode == "token_prob_max"
    got = token_gate_forward(
        qt, kh, valid, candidates, block_size=block, prob=prob, out=_nan_filled(B, HQ, kh.shape[2], "cuda")
    )
    want = token_gate_scores(qt, kh, valid, candidates, block_size=block, prob=prob)
    assert not got.isnan().any()
    assert torch.equal(torch.isinf(got), _expected_infinities(mode, candidates))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden, device="cuda")
    shape = _gate_shape(block, hidden, mode)
    with torch.no_grad():
        fused = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)
    chunked = block_scores(q, k, q_weight.requires_grad_(), k_weight, cos, sin, valid, candidates=candidates, **shape)
    torch.testing.assert_close(fused, chunked.detach(), rtol=1e-4, atol=1e-4)
