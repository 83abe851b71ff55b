"""Cross entropy of logit rows, with the gradient written over the logits: the LM loss's kernel under CUDA graphs.

One program per row reads the row twice: an online max and sum of exponentials in float32 (its log-sum-exp),
then, when asked, writes `softmax(row) - onehot(target)` over the row in its own dtype. The loss of each row goes
to a float32 vector. Nothing is read back to the host (the count of targets stays with the caller), so a CUDA
graph can capture it. The PyTorch reference is `pytorch_chunked.cross_entropy_with_grad`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns a program reads at once (the vocabulary is swept in steps of this many).
BLOCK_COLUMNS = 4096


@triton.jit
def _cross_entropy_grad_kernel(
    X, stride_x, Y, Loss, n_cols, ignore_index,
    BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    y = tl.load(Y + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    # Pass 1: the row's log-sum-exp, accumulated in float32 with a running max.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    # The target's logit is read before pass 2 writes over it.
    target_logit = tl.load(X + y_safe).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        # Pass 2: d(loss)/d(logits) = softmax - onehot(target); zero for a row without a target.
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(X + cols, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == y_safe, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(X + cols, grad.to(X.dtype.element_ty), mask=inside)


def cross_entropy_with_grad_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                   write_grad: bool) -> torch.Tensor:
    """Launch `_cross_entropy_grad_kernel` over the rows of `logits` `[N, V]` (last dim contiguous); returns the
    float32 `[N]` losses and, with `write_grad`, leaves the gradient in `logits`."""
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    block = min(BLOCK_COLUMNS, triton.next_power_of_2(cols))
    _cross_entropy_grad_kernel[(rows,)](
        logits, logits.stride(0), targets, losses, cols, ignore_index,
        BLOCK=block, WRITE_GRAD=write_grad, num_warps=16 if block >= 4096 else 4,
    )
    return losses
