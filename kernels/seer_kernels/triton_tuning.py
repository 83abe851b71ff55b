"""How the Triton kernels are launched: tile shapes, autotuning, constexpr switches and TMA descriptors.

Every launcher goes through `launch`, so the tile policy lives in one place:
- in the CPU interpreter a tile is a whole sparsity block (fewest interpreted steps);
- on a GPU, inputs of at least `AUTOTUNE_MIN_LEN` tokens pick their tile among `candidates` with Triton's
  autotuner (once per length, head count and flags; `SEER_KERNELS_AUTOTUNE=0` turns this off), shorter ones
  take the first candidate, which is also the default where tuning is off.
`KERNEL_OPTIONS` holds the constexpr switches of each kernel kind; `kernel_options` adapts them to the tensors
of one launch (descriptors need 16-byte aligned tensors, else the kernels fall back to pointer loads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

# Below this length the problem is too small for tuning to pay (and tests would compile every candidate).
AUTOTUNE_MIN_LEN = 4096


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning(seq_len: int) -> bool:
    """Whether launches of this length pick their tiles by Triton's autotuner (GPU only)."""
    if interpreting() or os.environ.get("SEER_KERNELS_AUTOTUNE", "1") == "0":
        return False
    return seq_len >= AUTOTUNE_MIN_LEN


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch settings of one kernel. `block_m` and `block_n` divide the sparsity block."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates per kernel kind for (block 128 | block 64); the first is also the untuned default (the autotuner's
# usual pick at long lengths, see benchmarks/results/). Chosen around the shapes that wgmma likes on Hopper: 64 rows
# per warpgroup, 64/128-wide key tiles.
_CANDIDATES = {
    "fwd": {
        128: [
            TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3),
            TileConfig(64, 128, 4, 3),
        ],
        64: [TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 4), TileConfig(64, 32, 4, 3)],
    },
    "dq": {
        128: [TileConfig(128, 128, 8, 2), TileConfig(64, 128, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 2)],
        64: [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 3)],
    },
    # 4-warp 64 x 64 tiles let two programs share an SM: one's softmax overlaps the other's matmuls.
    "dkdv": {
        128: [TileConfig(64, 64, 4, 2), TileConfig(64, 128, 8, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 128, 8, 3)],
        64: [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(32, 64, 4, 2)],
    },
    # The ground-truth kernel takes whole query blocks (block_m = block, see KERNEL_OPTIONS["gt"]["ROWS"]); only
    # the key tile varies, up to two key blocks wide.
    "gt": {
        128: [TileConfig(128, 128, 4, 2), TileConfig(128, 128, 8, 2), TileConfig(128, 128, 8, 3), TileConfig(128, 64, 4, 2)],
        64: [TileConfig(64, 128, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 128, 8, 2), TileConfig(64, 128, 4, 3)],
    },
    # The probe kernel's block_m is its probe rows per program (raised to the probe tokens of one block when
    # fewer); its key tile spans up to two key blocks, as the ground truth's. Not yet timed on a GPU: the
    # ground truth's shapes, with fewer rows as options because the probe rows are few.
    "probe": {
        128: [TileConfig(64, 128, 4, 2), TileConfig(128, 128, 8, 2), TileConfig(32, 128, 4, 2), TileConfig(64, 64, 4, 3)],
        64: [TileConfig(64, 128, 4, 2), TileConfig(32, 128, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(16, 128, 4, 2)],
    },
}


def candidates(kind: str, block: int) -> list[TileConfig]:
    """Tile candidates of a kernel kind, clamped to small blocks (tests).

    Args:
        kind: 'fwd', 'dq', 'dkdv', 'gt' or 'probe'.
        block: the sparsity block size.
    Returns:
        The candidates, the default first.
    """
    table = _CANDIDATES[kind]
    cands = table.get(block) or [TileConfig(min(64, block), min(64, block), 4, 2)]
    widest = 2 * block if kind in ("gt", "probe") else block  # their key tiles may span two key blocks
    out = []
    for c in cands:
        clamped = TileConfig(min(c.block_m, block), min(c.block_n, widest), c.num_warps, c.num_stages)
        if clamped not in out:
            out.append(clamped)
    return out


def default_config(kind: str, block: int) -> TileConfig:
    """The untuned choice: whole blocks in the interpreter (fewest steps), else the first candidate."""
    if interpreting():
        return TileConfig(block, block, 4, 1)
    return candidates(kind, block)[0]


# Constexpr switches per kernel kind. Every combination computes the same function and is tested; the defaults
# are the fastest on Hopper (see benchmarks/results/).
# - TMA: the tiles streamed in the loops come through host-made tensor descriptors (TMA copies on Hopper; 1) or
#   pointer loads (0).
# - SPLIT_LONG_COLUMNS (dkdv): persistent dK/dV programs over a work list that cuts long key-block lists into
#   segments (`_sparse_dkdv_segments_kernel`), so a column kept by every row (a sink block) does not become one
#   long program. The public ops' `split_long_columns` argument overrides it per call.
# - ROWS (gt): rows per ground-truth program: max(1, ROWS // block) query blocks share one tile, so block 64 runs
#   on the 128-row tiles that wgmma likes.
KERNEL_OPTIONS: dict[str, dict[str, int]] = {
    "fwd": {"TMA": 1},
    "dq": {"TMA": 1},
    "dkdv": {"TMA": 1, "SPLIT_LONG_COLUMNS": 0},
    "gt": {"TMA": 1, "ROWS": 128},
    "probe": {"TMA": 1},
}


def descriptor_ok(t: torch.Tensor) -> bool:
    """Whether TMA can address `t`: 16-byte aligned base and strides, the last dim contiguous."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


def kernel_options(kind: str, *streamed: torch.Tensor) -> dict[str, int]:
    """The constexpr switches of a launch of `kind` whose loops stream the `streamed` tensors.

    Args:
        kind: a key of `KERNEL_OPTIONS`.
        streamed: the tensors the kernel's loops load tile by tile (descriptor candidates).
    Returns:
        A copy of `KERNEL_OPTIONS[kind]`, with TMA off when one of `streamed` cannot be addressed by TMA.
    """
    opts = dict(KERNEL_OPTIONS[kind])
    if opts.get("TMA") and not all(descriptor_ok(t) for t in streamed):
        opts["TMA"] = 0
    return opts


def host_descriptor(t: torch.Tensor, rows_key: str):
    """A `[B, H, L, D]` TMA descriptor of `t` whose tile is `[1, 1, meta[rows_key], D]` (set per launch config).

    Args:
        t: `[B, H, L, D]` tensor passing `descriptor_ok`.
        rows_key: the tile meta-parameter that gives the tile's rows ('BLOCK_M' or 'BLOCK_N').
    Returns:
        A `triton.tools.tensor_descriptor.TensorDescriptor`.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    desc = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]])
    desc.seer_rows_key = rows_key
    return desc


def set_descriptor_tiles(nargs: dict) -> None:
    """Size each host descriptor's tile for the launch config (autotuner pre-hook, and explicit configs).

    Args:
        nargs: the launch's arguments by name, with the tile meta-parameters (`BLOCK_M`, `BLOCK_N`).
    """
    for value in nargs.values():
        key = getattr(value, "seer_rows_key", None)
        if key is not None:
            value.block_shape = [1, 1, nargs[key], value.shape[-1]]


_TUNERS: dict = {}
# Kernel arguments besides the common ones that change a kind's best tile (the autotuner re-tunes per value).
_TUNING_KEYS = {"gt": ["HAS_LSE"], "probe": ["R", "HAS_VALID"]}


def _tuning_bench(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=50, rep=300, quantiles=quantiles)


def check_kernel_kwargs(kernel, kwargs: dict) -> None:
    """Reject unknown keyword arguments: the GPU launcher does, but the interpreter ignores them, so CPU tests
    check here."""
    unknown = set(kwargs) - set(kernel.arg_names)
    if unknown:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        raise TypeError(f"{name} got unknown arguments {sorted(unknown)}")


def launch(kernel, kind: str, block: int, seq_len: int, grid, args: tuple, kwargs: dict, config=None):
    """Launch `kernel` with an explicit config, or through a per (kernel, block) autotuner on long inputs.

    The tuners key on the sizes and flags that change the best tile, so a new length or head count is tuned once.

    Args:
        kernel: the `@triton.jit` kernel.
        kind: its kind in `candidates` ('fwd', 'dq', 'dkdv', 'gt' or 'probe').
        block: the sparsity block size.
        seq_len: L (decides whether to tune).
        grid: maps the tile meta-parameters (`BLOCK_M`, `BLOCK_N`) to the launch grid.
        args, kwargs: the kernel's arguments, without the tile meta-parameters.
        config: explicit tile settings (default: tuned on long GPU inputs, else `default_config`).
    """
    names = ("BLOCK_N",) if kind == "gt" else ("BLOCK_M", "BLOCK_N")
    check_kernel_kwargs(kernel, {**kwargs, **{n: 0 for n in names}})
    if config is None and autotuning(seq_len):
        key = (kind, block, tuple(sorted((n, v) for n, v in kwargs.items() if isinstance(v, (bool, int)))))
        tuner = _TUNERS.get(key)
        if tuner is None:
            configs = [
                triton.Config(
                    {n: v for n, v in zip(("BLOCK_M", "BLOCK_N"), (c.block_m, c.block_n)) if n in names},
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                    pre_hook=set_descriptor_tiles,
                )
                for c in candidates(kind, block)
            ]
            keys = ["seq_len", "n_heads_q", "HAS_DOCS", "HEAD_DIM"] + _TUNING_KEYS.get(kind, [])
            # Longer timing than Triton's default (25 ms warm-up, 100 ms): candidates a few percent apart would
            # otherwise be picked by noise.
            tuner = triton.autotune(configs=configs, key=keys, do_bench=_tuning_bench)(kernel)
            _TUNERS[key] = tuner
        tuner[grid](*args, **kwargs)
        return
    cfg = config or default_config(kind, block)
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    set_descriptor_tiles({**meta, **{str(i): a for i, a in enumerate(args)}})
    kernel[grid(meta)](
        *args, **kwargs, **{n: meta[n] for n in names}, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


def tuned_choices() -> dict[str, str]:
    """What the autotuners picked so far (for benchmark reports).

    Returns:
        `{"<kind> bs<block> <flags>": str(best config)}`, one entry per tuner.
    """
    out = {}
    for (kind, block, flags), tuner in _TUNERS.items():
        name = f"{kind} bs{block} " + ",".join(f"{n}={v}" for n, v in flags if n not in ("BLOCK", "HEAD_DIM"))
        out[name] = str(getattr(tuner, "best_config", None))
    return out
