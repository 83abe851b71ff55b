"""`seer_kernels.cross_entropy_with_grad`: each row's cross entropy and its gradient written over the logits, on the
Triton kernel (Triton's interpreter on CPU, CUDA on a GPU) against autograd through `torch.nn.functional.
cross_entropy` in float64, and the PyTorch reference the CPU path takes. Awkward shapes: a vocabulary that is not a
power of two and one wider than a program's column block (two sweeps), rows without a target (first, last, all).
Inputs are NaN-filled before the logits are written, so an unwritten gradient shows up."""

from __future__ import annotations

import pytest
import torch

import seer_kernels
from seer_kernels import cross_entropy_with_grad
from seer_kernels.triton_cross_entropy import BLOCK_COLUMNS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IGNORE = -100
# (rows, vocabulary): a short odd row count and vocabulary; a vocabulary wider than BLOCK_COLUMNS.
SHAPES = [(7, 1000), (5, BLOCK_COLUMNS + 903)]


def _inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((rows, vocab), float("nan"), dtype=dtype, device=DEVICE)
    logits.copy_((3 * torch.randn(rows, vocab, generator=g)).to(dtype))
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0] = IGNORE
    targets[-1] = vocab - 1  # the last column: inside the last, partial column block
    return logits, targets.to(DEVICE)


def _exact(logits: torch.Tensor, targets: torch.Tensor):
    """Losses and d(sum of losses)/d(logits) by autograd in float64."""
    x = logits.detach().double().requires_grad_()
    losses = torch.nn.functional.cross_entropy(x, targets, reduction="none", ignore_index=IGNORE)
    losses.sum().backward()
    return losses.detach(), x.grad


@pytest.mark.parametrize("kernel", ["triton", "pytorch"])
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_float32_losses_and_gradients_match_autograd(kernel, rows, vocab):
    logits, targets = _inputs(rows, vocab, torch.float32)
    want_loss, want_grad = _exact(logits, targets)
    losses = cross_entropy_with_grad(logits, targets, kernel=kernel)
    assert losses.dtype == torch.float32 and losses.shape == (rows,)
    assert losses[0] == 0 and not logits.isnan().any()
    torch.testing.assert_close(losses.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert (logits[0] == 0).all()


@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_bfloat16_within_twice_pytorchs_own_error(rows, vocab):
    """The kernel on bf16 logits against float64, beside PyTorch's cross entropy run on the same bf16 logits
    (float32 math, the gradient rounded to bf16 as the kernel writes it). Triton's CPU interpreter casts float32
    to bf16 toward zero (a target's -0.99999 becomes -0.9961), where a GPU rounds to nearest: there the bound
    also admits one bf16 step of the largest gradient."""
    logits, targets = _inputs(rows, vocab, torch.bfloat16, seed=1)
    want_loss, want_grad = _exact(logits, targets)
    x = logits.detach().float().requires_grad_()
    torch_loss = torch.nn.functional.cross_entropy(x, targets, reduction="none", ignore_index=IGNORE)
    torch_loss.sum().backward()
    torch_grad = x.grad.to(torch.bfloat16)
    losses = cross_entropy_with_grad(logits, targets, kernel="triton")
    for ours, theirs, exact, in_bf16 in ((losses, torch_loss.detach(), want_loss, False),
                                         (logits, torch_grad, want_grad, True)):
        ours_err = (ours.double() - exact).abs().max()
        torch_err = (theirs.double() - exact).abs().max()
        truncation = 2.0**-8 * exact.abs().max() if in_bf16 and not CUDA else 0.0
        assert ours_err <= max(2 * torch_err, truncation) + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("kernel", ["triton", "pytorch"])
def test_without_gradient_the_logits_stay_and_rows_without_targets_cost_nothing(kernel):
    logits, targets = _inputs(6, 777, torch.float32, seed=2)
    targets[:] = IGNORE
    before = logits.clone()
    losses = cross_entropy_with_grad(logits, targets, write_grad=False, kernel=kernel)
    assert (losses == 0).all() and torch.equal(logits, before)
    targets[2] = 5
    losses = cross_entropy_with_grad(logits, targets, write_grad=False, kernel=kernel)
    want, _ = _exact(before, targets)
    torch.testing.assert_close(losses.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)


def test_auto_takes_the_pytorch_reference_on_cpu_tensors(monkeypatch):
    import seer_kernels.triton_cross_entropy as triton_ce

    def no_triton(*args):
        raise AssertionError("auto ran the Triton kernel on CPU tensors")

    monkeypatch.setattr(triton_ce, "cross_entropy_with_grad_triton", no_triton)
    logits, targets = torch.randn(3, 50), torch.tensor([1, IGNORE, 49])
    want, _ = _exact(logits, targets)
    torch.testing.assert_close(cross_entropy_with_grad(logits, targets).double(), want, rtol=1e-5, atol=1e-5)


def test_inputs_outside_the_contract_are_refused_with_one_line():
    logits, targets = torch.randn(4, 10), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        cross_entropy_with_grad(logits[None], targets)
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        cross_entropy_with_grad(logits, targets[:3])
    with pytest.raises(ValueError, match="int64"):
        cross_entropy_with_grad(logits, targets.int())
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy_with_grad(logits.t(), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="kernel must be one of"):
        cross_entropy_with_grad(logits, targets, kernel="cuda")
    assert "cross_entropy_with_grad" in seer_kernels.__all__
