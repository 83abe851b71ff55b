"""Warp-specialized Gluon kernels for Hopper (forward, dQ, dK/dV), and the rule that decides when they run.

Why these next to the Triton kernels: in Triton the warpgroups of a program run in lockstep and every matrix
product is waited for before the softmax that reads it, so the tensor cores and the exponentials take turns.
The Gluon kernels split each program into a TMA producer warp and consumer warpgroups that never wait for each
other (see `forward.py`, `dq.py`, `dkdv.py`); they compute the same functions as the Triton kernels.

Scope (`gluon_supported`): CUDA Hopper (sm_90), bf16/fp16, block 64 or 128, head_dim 64 or 128, lengths that
are multiples of the block, no document ids, `[B, H, L, D]` tensors whose (batch, head, position) dims collapse
into one row index. Also only with Triton 3.6, the release they were built and tested with: Gluon is experimental
and its API moves between releases. This module probes that API without importing the kernel modules; only
where it is usable are they imported (`AVAILABLE`; `IMPORT_ERROR` says why not). Elsewhere, and in the CPU
interpreter, which cannot run Gluon, the Triton kernels run. `SEER_KERNELS_GLUON=0` turns these kernels off.
"""

from __future__ import annotations

import os

import torch
import triton

from .settings import rows_collapse

__all__ = ["AVAILABLE", "IMPORT_ERROR", "TESTED_TRITON", "gluon_supported", "pick_gluon"]

TESTED_TRITON = "3.6."


def _probe_gluon() -> str | None:
    """None when the Gluon API the kernels use imports on this Triton, else why it does not."""
    try:
        if not triton.__version__.startswith(TESTED_TRITON):
            raise ImportError(
                f"the Gluon kernels are tested with Triton {TESTED_TRITON}x only, found {triton.__version__}"
            )
        from triton.experimental import gluon  # noqa: F401
        from triton.experimental.gluon import language  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
            fence_async_shared,
            mbarrier,
            tma,
            warpgroup_mma,
            warpgroup_mma_wait,
        )
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the installed Triton
        return f"{type(err).__name__}: {err}"
    return None


IMPORT_ERROR: str | None = _probe_gluon()
AVAILABLE = IMPORT_ERROR is None

if AVAILABLE:  # pragma: no cover - needs Triton 3.6
    from .launch import gluon_attention_dkdv, gluon_attention_dq, gluon_attention_forward

    __all__ += ["gluon_attention_dkdv", "gluon_attention_dq", "gluon_attention_forward"]


def gluon_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, document_ids: torch.Tensor | None
) -> bool:
    """Whether the Gluon kernels handle these inputs (else the Triton ones run).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`.
        block_size: tokens per block.
        document_ids: int `[B, L]` or None.
    Returns:
        True on a usable Gluon, a Hopper GPU and inputs in scope (see the module docstring).
    """
    if not AVAILABLE or os.environ.get("SEER_KERNELS_GLUON", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if document_ids is not None or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if block_size not in (64, 128) or q.shape[-1] not in (64, 128) or q.shape[2] % block_size:
        return False
    return all(rows_collapse(t) for t in (q, k, v))


def pick_gluon(use_gluon, config, q, k, v, block_size, document_ids, *outputs, kind: str = "fwd") -> bool:
    """Whether a launch goes to the Gluon kernels instead of the Triton ones.

    Args:
        use_gluon: True forces them (a ValueError where they cannot run), False forbids them, None decides.
        config: the Triton tile config asked for, if any (then None keeps Triton).
        q, k, v, block_size, document_ids: the launch's inputs (see `gluon_supported`).
        outputs: the launch's output tensors (None: allocated by the launcher); they must collapse into rows.
        kind: 'fwd', 'dq' or 'dkdv'.
    Returns:
        With use_gluon None: True where the kernels support the inputs and are the faster choice on Hopper,
        head_dim 128 (for dK/dV, block 128 only: at block 64 its shared memory leaves one program per
        multiprocessor), and no Triton `config` was asked for.
    """
    if use_gluon is False:
        return False
    supported = gluon_supported(q, k, v, block_size, document_ids) and all(
        t is None or rows_collapse(t) for t in outputs
    )
    if use_gluon and not supported:
        reason = IMPORT_ERROR or "inputs outside its scope (see seer_kernels.gluon)"
        raise ValueError(f"the Gluon kernels cannot run here: {reason}")
    faster = q.shape[-1] == 128 and (kind != "dkdv" or block_size == 128)
    return supported and (bool(use_gluon) or (config is None and faster))
