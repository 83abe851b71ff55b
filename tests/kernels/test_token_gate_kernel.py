"""`seer_kernels.token_gate_block_scores`: the fused token-scored gate against its chunked PyTorch implementation
and against the gate's own token path (`gate.block_scores`, itself tested against a float64 definition in
tests/seer/test_seer_gate_query.py), on awkward shapes: a partial last block, a block size and a hidden width that
are not powers of two, GQA 6/2, left padding with a block of padding alone, packed documents, key tiles narrower
than the row. Then the backward (gradients of `qt` and `kh` against autograd through the definition, and of the
gate's inputs and weights against its chunked path), the routing in `gate.block_scores` and the refusals. On CPU
the kernels run in Triton's interpreter (float32: its bf16 dots are wrong), which ignores the dot precision and
runs the atomics one program at a time; on a GPU the same tests run on CUDA tensors (tf32x3 dots, real atomics),
and GPU-only tests add long sequences and wide gates. Tests about CPU tensors (the chunked path that `auto` takes
there, the refusals) keep them on every machine."""

from __future__ import annotations

import functools
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
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's float32 dots against the kernel's tf32x3 ones (about float32 accuracy) and atomics adding in
# any order on a GPU.
TOL = dict(rtol=1e-4, atol=1e-4) if CUDA else dict(rtol=1e-5, atol=1e-5)
# A GPU's tl.dot needs tile dims >= 16: key tiles of 2 blocks (several per row at these lengths) run in the
# interpreter only; on a GPU the narrowest are 16 (one per row here).
NARROW_KEY_TILE = 16 if CUDA else 2
INTERPRETER_ONLY = pytest.mark.skipif(CUDA, reason="tiles of 2 key blocks: interpreter only (a GPU's tl.dot needs 16)")
B, HQ, HKV = 2, 6, 2
# (tokens, block, hidden): a partial last block; whole blocks; a block of 12 (query tile padded to 16) with a
# hidden width of 24 (padded to 32).
SHAPES = [(75, 16, 32), (80, 16, 64), (75, 12, 24)]


def _layout(seq_len: int, block: int, padded: bool, device: str = DEVICE):
    """`valid` (None, or left padding on row 1 whose first block is padding alone) and the candidates of that
    padding with two packed documents on row 0 (`padded`), else the block-causal triangle."""
    valid, documents = None, torch.zeros(B, seq_len, dtype=torch.long, device=device)
    if padded:
        valid = torch.ones(B, seq_len, dtype=torch.bool, device=device)
        valid[1, : block + 5] = False
        documents[0, seq_len // 2 :] = 1
    return valid, block_candidates(seq_len, block, documents, valid)


def _operands(seq_len: int, block: int, hidden: int, seed: int = 0, device: str = DEVICE):
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


def _nan_filled(bsz: int, hq: int, nb: int, device: str = DEVICE) -> torch.Tensor:
    """An output buffer whose entries stay NaN unless the kernel writes them."""
    return torch.full((bsz, hq, nb, nb), float("nan"), device=device)


@pytest.mark.parametrize("key_blocks", [pytest.param(2, marks=INTERPRETER_ONLY), 64], ids=["tiles_of_2", "one_tile"])
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
    torch.testing.assert_close(got, want, **TOL)
    if padded:
        # Row 1's first block is padding alone: 0 at its candidates (itself).
        assert torch.equal(got[1, :, 0, 0], torch.zeros(HQ, device=got.device))


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_pytorch_implementation_matches_a_per_token_loop(mode):
    """The chunked PyTorch implementation against the definition written token by token, in float64."""
    seq_len, block, hidden = 75, 16, 32
    qt, kh = _operands(seq_len, block, hidden, seed=3, device="cpu")
    valid, candidates = _layout(seq_len, block, padded=True, device="cpu")
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


def _angles(nb: int, rotary_dim: int, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Block RoPE angles `[nB, rotary_dim]` as the models' rotary modules make them (halves repeated)."""
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(nb).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(device), emb.sin().to(device)


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
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(got, token_gate_block_scores(qt, kh, valid, candidates, **call))


def _gate_inputs(seq_len: int, block: int, hidden: int, device: str = DEVICE):
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
    itself (half the hidden features here: partial RoPE). `auto` launches it on CUDA tensors only."""
    seq_len, block, hidden = 75, 16, 32
    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden)
    valid, candidates = _layout(seq_len, block, padded)
    shape = _gate_shape(block, hidden, mode)
    # The chunked path, named: on CUDA `auto` would take the kernel here (no input needs a gradient).
    want = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="pytorch", **shape)

    calls = []
    original = seer_kernels.token_gate_block_scores

    def counted(qt, kh, *args, **kwargs):
        calls.append((tuple(qt.shape), tuple(kh.shape), kwargs["kernel"], tuple(kwargs["cos"].shape)))
        return original(qt, kh, *args, **kwargs)

    monkeypatch.setattr(seer_kernels, "token_gate_block_scores", counted)
    gate = functools.partial(block_scores, q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)
    with torch.no_grad():
        scores = {kernel: gate(kernel=kernel) for kernel in ("triton", "pytorch", "auto")}
    # `attention.kernel=pytorch` never launches it; `auto` only for CUDA tensors.
    got = scores["triton"]
    assert torch.equal(scores["pytorch"], want) and torch.equal(scores["auto"], got if CUDA else want)
    nb = math.ceil(seq_len / block)
    launch = ((B, HQ, seq_len, hidden), (B, HKV, nb, hidden), "triton", (nb, hidden // 2))
    assert calls == [launch] * (2 if CUDA else 1)
    torch.testing.assert_close(got, want, **TOL)
    # With gradients only an explicit `triton` takes the kernel: `auto` and `pytorch` keep the chunked path.
    launched = len(calls)
    q.requires_grad_()
    for kernel in ("pytorch", "auto", "triton"):
        assert gate(kernel=kernel).requires_grad
    assert len(calls) == launched + 1 and calls[-1][2] == "triton"
    with pytest.raises(ValueError, match="kernel='cuda' must be one of"):
        with torch.no_grad():
            block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel="cuda", **shape)


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_gate_on_cpu_without_gradients_keeps_the_pytorch_path(monkeypatch, mode):
    """Off CUDA, gradient-free scores still come from the chunked path: the same numbers as with gradients (CPU
    tensors on every machine)."""
    seq_len, block, hidden = 75, 16, 32
    q, k, q_weight, k_weight, cos, sin = _gate_inputs(seq_len, block, hidden, device="cpu")
    valid, candidates = _layout(seq_len, block, padded=True, device="cpu")
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
    torch.testing.assert_close(compiled, eager, **TOL)


@pytest.mark.parametrize("kernel", ["pytorch", "auto"])
def test_pytorch_kernel_refuses_inputs_requiring_gradients_unless_gradients_are_off(kernel):
    """The PyTorch kernel (`auto` on CPU tensors, kept on CPU on every machine) has no backward; the Triton one
    differentiates (on CUDA tensors on a GPU)."""
    qt, kh = _operands(32, 16, 32, device="cpu")
    call = dict(block_size=16, mode="token_logit_max")
    for needs_grad in (qt, kh):
        needs_grad.requires_grad_()
        with pytest.raises(ValueError, match="forward-only on the PyTorch kernel.*torch.no_grad.*kernel='triton'"):
            token_gate_block_scores(qt, kh, kernel=kernel, **call)
        assert token_gate_block_scores(qt.to(DEVICE), kh.to(DEVICE), kernel="triton", **call).requires_grad
        needs_grad.requires_grad_(False)
    qt.requires_grad_()
    with torch.no_grad():
        out = token_gate_block_scores(qt, kh, block_size=16, mode="token_logit_max", kernel=kernel)
    assert out.shape == (B, HQ, 2, 2) and not out.requires_grad


@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
def test_bad_inputs_are_refused(kernel):
    qt, kh = _operands(75, 16, 32, device="cpu")
    valid, candidates = _layout(75, 16, padded=True, device="cpu")
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
    """`auto` takes the PyTorch implementation for CPU tensors and the Triton one for CUDA tensors; they agree
    (on CPU, the Triton one in the interpreter)."""
    qt, kh = _operands(75, 16, 32, seed=2)
    valid, candidates = _layout(75, 16, padded=True)
    for mode in TOKEN_GATE_MODES:
        runs = {kernel: token_gate_block_scores(qt, kh, valid, candidates, block_size=16, mode=mode, kernel=kernel)
                for kernel in ("pytorch", "triton", "auto")}
        assert torch.equal(runs["auto"], runs["triton" if CUDA else "pytorch"])
        torch.testing.assert_close(runs["triton"], runs["pytorch"], **TOL)
    # Without candidates, `token_prob_max` normalises over the block-causal triangle.
    causal = torch.ones(5, 5, dtype=torch.bool, device=DEVICE).tril().expand(B, 5, 5)
    for kernel in ("pytorch", "triton"):
        implicit = token_gate_block_scores(qt, kh, valid, None, block_size=16, mode="token_prob_max", kernel=kernel)
        explicit = token_gate_block_scores(qt, kh, valid, causal, block_size=16, mode="token_prob_max", kernel=kernel)
        assert torch.equal(implicit, explicit)


# (block, hidden) of the GPU-only tests: the narrow gate's tiles, a gate of hidden 256 (forward: 32 key blocks per
# tile, one stage; backward: sub-tiles of 32 rows) and one of 512 on blocks of 128 (sub-tiles of 32 rows in the
# forward, of 16 in the backward): see `triton_token_gate_tiles.default_tiles`.
GPU_SHAPES = [(64, 128), (64, 256), (128, 512)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block,hidden", GPU_SHAPES)
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_kernel_matches_pytorch_on_gpu(mode, block, hidden):
    """4133 tokens (the last block partial), GQA 6/2, padding and documents, default tiles and dot precision
    (tf32x3: about float32 accuracy); then the gate's routing on CUDA."""
    seq_len = 4133
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


def _differentiable_reference(qt, kh, valid, candidates, cos, sin, *, block: int, mode: str) -> torch.Tensor:
    """The op's definition through autograd, holding all per-token logits `[B, Hq, L, nB]` (small shapes only):
    each token rotated by its block's angles, scored against every key block (log-softmaxed over its block's
    candidates in `token_prob_max`), maxed over the valid tokens of each block."""
    bsz, hq, seq_len, _ = qt.shape
    nb = kh.shape[2]
    block_of = torch.arange(seq_len, device=qt.device) // block
    if cos is not None:
        rd, half = cos.shape[1], cos.shape[1] // 2
        rot = qt[..., :rd]
        partner = torch.cat((-rot[..., half:], rot[..., :half]), -1)
        qt = torch.cat((rot * cos[block_of] + partner * sin[block_of], qt[..., rd:]), -1)
    logits = qt @ kh.repeat_interleave(hq // kh.shape[1], 1).transpose(-1, -2)
    allowed = torch.ones(nb, nb, dtype=torch.bool, device=qt.device).tril().expand(bsz, nb, nb)
    if mode == "token_prob_max":
        allowed = allowed & candidates
        logits = logits.masked_fill(~allowed[:, None, block_of], float("-inf")).log_softmax(-1)
    keep = torch.ones(bsz, seq_len, dtype=torch.bool, device=qt.device) if valid is None else valid
    pad = nb * block - seq_len
    keep = torch.nn.functional.pad(keep, (0, pad), value=False).view(bsz, 1, nb, block, 1)
    logits = torch.nn.functional.pad(logits, (0, 0, 0, pad)).view(bsz, hq, nb, block, nb)
    best = logits.masked_fill(~keep, float("-inf")).amax(3).masked_fill(~keep.any(3), 0.0)
    return best.masked_fill(~allowed[:, None], float("-inf"))


def _assert_scores_and_gradients_match(got, want, fused_inputs, ref_inputs) -> None:
    """The kernel's scores `got` equal the reference's `want`, and so do the gradients of their inputs (`qt`, `kh`)
    under one random upstream gradient."""
    torch.testing.assert_close(got.detach(), want.detach(), **TOL)
    upstream = _upstream_gradient(want)
    got.backward(upstream)
    want.backward(upstream)
    for fused, ref in zip(fused_inputs, ref_inputs):
        torch.testing.assert_close(fused.grad, ref.grad, **TOL)


def _upstream_gradient(scores: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A random gradient of the scores, 0 at their -inf entries (as a softmax over them gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(scores.shape, generator=g).to(scores.device).masked_fill(torch.isinf(scores), 0.0)


@pytest.fixture
def narrow_key_tiles(monkeypatch):
    """Key tiles of 2 blocks in the interpreter: rows of 5 blocks run 3 tiles, so several tiles add to each key
    block's gradient (on a GPU, 16: one tile per row)."""
    narrow = TokenGateTiles(NARROW_KEY_TILE, 4, 1)
    monkeypatch.setattr(triton_token_gate, "default_tiles", lambda *args, **kwargs: narrow)


@pytest.mark.parametrize("layout", ["dense", "padded_packed_partial_rope"])
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_kernel_gradients_match_autograd_through_the_definition(narrow_key_tiles, mode, layout):
    """75 tokens in blocks of 16 (a partial last block), GQA 6/2, hidden 32; with padding (a block of padding
    alone), two packed documents and RoPE on 8 of the 32 features, or none of them."""
    seq_len, block, hidden = 75, 16, 32
    qt, kh = _operands(seq_len, block, hidden, seed=5)
    padded = layout != "dense"
    valid, candidates = _layout(seq_len, block, padded)
    cos, sin = _angles(kh.shape[2], 8) if padded else (None, None)
    call = dict(block_size=block, mode=mode, cos=cos, sin=sin)
    fused_qt, fused_kh = qt.clone().requires_grad_(), kh.clone().requires_grad_()
    got = token_gate_block_scores(fused_qt, fused_kh, valid, candidates, kernel="triton", **call)
    ref_qt, ref_kh = qt.clone().requires_grad_(), kh.clone().requires_grad_()
    want = _differentiable_reference(ref_qt, ref_kh, valid, candidates, cos, sin, block=block, mode=mode)
    with torch.no_grad():
        forward_only = token_gate_block_scores(qt, kh, valid, candidates, kernel="triton", **call)
    assert got.requires_grad and torch.equal(got.detach(), forward_only)
    _assert_scores_and_gradients_match(got, want, (fused_qt, fused_kh), (ref_qt, ref_kh))
    # Tokens of a block of padding alone, and padding tokens, get no gradient.
    if padded:
        assert not fused_qt.grad[1, :, : block + 5].any()


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_query_sub_tiles_give_the_scores_and_gradients_of_whole_blocks(monkeypatch, mode):
    """Blocks of 40 tokens (a tile of 64 rows) in sub-tiles of 16 rows, as wide gates run: three per block, the
    last partly past it; row 1's first block is padding alone and its second starts with 5 padding tokens; RoPE
    on 8 of the 24 features. Scores and gradients against autograd through the definition."""
    seq_len, block, hidden = 150, 40, 24
    qt, kh = _operands(seq_len, block, hidden, seed=6)
    valid, candidates = _layout(seq_len, block, padded=True)
    cos, sin = _angles(kh.shape[2], 8)
    sub_tiles = TokenGateTiles(NARROW_KEY_TILE, 4, 1, query_rows=16)
    monkeypatch.setattr(triton_token_gate, "default_tiles", lambda *args, **kwargs: sub_tiles)
    fused_qt, fused_kh = qt.clone().requires_grad_(), kh.clone().requires_grad_()
    got = token_gate_block_scores(
        fused_qt, fused_kh, valid, candidates, block_size=block, mode=mode, cos=cos, sin=sin, kernel="triton"
    )
    ref_qt, ref_kh = qt.clone().requires_grad_(), kh.clone().requires_grad_()
    want = _differentiable_reference(ref_qt, ref_kh, valid, candidates, cos, sin, block=block, mode=mode)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    _assert_scores_and_gradients_match(got, want, (fused_qt, fused_kh), (ref_qt, ref_kh))
    assert not fused_qt.grad[1, :, : block + 5].any()


def _gate_gradients(mode: str, kernel: str, device: str = DEVICE, seq_len: int = 75, block: int = 16, hidden: int = 32):
    """The token gate's scores (`block_scores`, padding, packed documents, RoPE on half the hidden features) and
    the gradients of a random loss on them w.r.t. q, k, q_weight and k_weight."""
    inputs = _gate_inputs(seq_len, block, hidden, device=device)
    for t in inputs[:4]:
        t.requires_grad_()
    q, k, q_weight, k_weight, cos, sin = inputs
    valid, candidates = _layout(seq_len, block, padded=True, device=device)
    shape = _gate_shape(block, hidden, mode)
    scores = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, kernel=kernel, **shape)
    scores.backward(_upstream_gradient(scores))
    return scores.detach(), [t.grad for t in inputs[:4]]


@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_gate_trains_on_the_kernel_with_the_gradients_of_its_chunked_path(narrow_key_tiles, monkeypatch, mode):
    """`block_scores(kernel="triton")` with gradients runs the fused kernel forward and backward, and gives q, k and
    the gate weights the gradients of the chunked, checkpointed path (`kernel="pytorch"`)."""
    launches = []

    def counted(name):
        launcher = getattr(triton_token_gate, name)

        def launch(*args, **kwargs):
            launches.append(name)
            return launcher(*args, **kwargs)

        return launch

    for name in ("token_gate_forward", "token_gate_backward"):
        monkeypatch.setattr(triton_token_gate, name, counted(name))
    chunked, chunked_grads = _gate_gradients(mode, "pytorch")
    assert launches == []
    fused, fused_grads = _gate_gradients(mode, "triton")
    assert launches == ["token_gate_forward", "token_gate_backward"]
    torch.testing.assert_close(fused, chunked, **TOL)
    for name, got, want in zip(("q", "k", "q_weight", "k_weight"), fused_grads, chunked_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=TOL["atol"], msg=lambda m, n=name: f"d{n}: {m}")
    # `auto` keeps the chunked path in training: no launch, the same scores and gradients (to the bit on CPU; a
    # GPU's backward may add in another order).
    auto, auto_grads = _gate_gradients(mode, "auto")
    assert len(launches) == 2
    same = dict(rtol=1e-6, atol=1e-7) if CUDA else dict(rtol=0, atol=0)
    for got, want in zip((auto, *auto_grads), (chunked, *chunked_grads)):
        torch.testing.assert_close(got, want, **same)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block,hidden", GPU_SHAPES)
@pytest.mark.parametrize("mode", TOKEN_GATE_MODES)
def test_kernel_gradients_match_the_chunked_path_on_gpu(mode, block, hidden):
    """4133 tokens (the last block partial), GQA 6/2, padding and documents, default tiles and dot precision
    (tf32x3), real atomics: the gate's gradients on the fused kernel against its chunked path."""
    shape = dict(device="cuda", seq_len=4133, block=block, hidden=hidden)
    chunked, chunked_grads = _gate_gradients(mode, "pytorch", **shape)
    fused, fused_grads = _gate_gradients(mode, "triton", **shape)
    torch.testing.assert_close(fused, chunked, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("q", "k", "q_weight", "k_weight"), fused_grads, chunked_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")
