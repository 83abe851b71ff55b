"""Tiles of the token-gate kernels (`triton_token_gate_kernels`, launched by `triton_token_gate`) and the shared
memory they take on Hopper.

A launch holds, per program, a query sub-tile `[ROWS, HIDDEN]` (ROWS tokens of one query block, HIDDEN the gate's
width rounded up to a power of two >= 16) and streams key tiles `[BLOCK_J, HIDDEN]`, all float32. With
`tl.dot(..., input_precision="tf32x3")` Triton splits each dot operand into a high and a low tf32 part, and on
Hopper `wgmma` reads them from shared memory, so the shared memory grows with both tiles' areas times the width:
a gate of hidden 256 on blocks of 64 tokens with 64 key blocks per tile and 2 stages asked for 320 KiB (the
H100 has 227 KiB). `default_tiles` picks, per kernel, the largest tiles whose `shared_memory_estimate` stays
within `SHARED_MEMORY_BUDGET`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .triton_tuning import interpreting

# The H100's (and H200's) shared memory per block is 227 KiB; the tiles keep their estimate within 200 KiB, so a
# Triton release that stages a little more still launches.
HARDWARE_SHARED_MEMORY = 227 * 1024
SHARED_MEMORY_BUDGET = 200 * 1024
# Besides the tiles: the staged candidate, gradient and winner rows, barriers and reduction scratch (measured
# under 1 KiB).
_SMALL_BUFFERS = 4 * 1024
# What `default_tiles` tries, in order, for each number of query rows (the whole block first, then halves down
# to 16): (key blocks per tile, stages).
_KEY_TILES = ((64, 2), (64, 1), (32, 1), (16, 1))


@dataclass(frozen=True)
class TokenGateTiles:
    """Launch settings of the token-gate kernels.

    Attributes:
        key_blocks: key blocks per tile (`BLOCK_J`, a power of two; >= 16 on a GPU, where `tl.dot` needs it).
        num_warps, num_stages: Triton launch settings.
        query_rows: tokens of a query block per sub-tile (`ROWS`, a power of two >= 16 on a GPU), or None for
            the whole block (its tokens rounded up to a power of two >= 16); a program walks its block's
            sub-tiles one after the other.
    """

    key_blocks: int
    num_warps: int
    num_stages: int
    query_rows: int | None = None


def shared_memory_estimate(tiles: TokenGateTiles, rows: int, hidden: int, *, backward: bool) -> int:
    """Bytes of shared memory a launch of the token-gate forward (or backward) kernel takes on Hopper: an upper
    bound of what the compiler allocates.

    Per float of width (4 bytes x `hidden`):
    - the query rows' high and low parts, `2 x rows`; the backward holds them twice (laid out as the first
      operand of the logits' dot and as the second of dK = dS^T q), `4 x rows`;
    - the key tile's high and low parts and `num_stages - 1` prefetched copies, `(num_stages + 1) x key_blocks`;
    the backward adds the high and low parts of dS `[rows, key_blocks]` (the first operand of dQ = dS k; of dK
    as dS^T), `8 x rows x key_blocks` bytes, and both 4 KiB of small buffers. Against the Hopper compiler
    (`benchmarks/diagnostics/token_gate_resources.py`, Triton 3.9; the GPU machine's 3.6 asked for the same
    320 KiB at the failed launch): the tiles `default_tiles` picks with 64 or more rows allocate within 4 KiB of
    the forward's estimate and 36 KiB of the backward's; fewer rows (mma dots instead of wgmma) take less.

    Args:
        tiles: the launch's tiles.
        rows: the query rows per sub-tile (`tiles.query_rows`, or the padded block when that is None).
        hidden: the padded hidden width.
        backward: the backward kernel (else the forward).
    """
    query = (4 if backward else 2) * rows
    keys = (tiles.num_stages + 1) * tiles.key_blocks
    gradients = 8 * rows * tiles.key_blocks if backward else 0
    return 4 * hidden * (query + keys) + gradients + _SMALL_BUFFERS


def default_tiles(block_tokens: int, hidden: int, *, backward: bool = False) -> TokenGateTiles:
    """The tiles of a launch whose query blocks have `block_tokens` (padded) tokens and `hidden` (padded)
    features.

    The interpreter takes the whole block and wide key tiles (fewest interpreted steps). On a GPU: the whole
    block as one sub-tile when it fits, else halves of it (down to 16 rows), and for each, the first of 64 key
    blocks per tile over 2 stages, then 1 stage, then 32 and 16 key blocks, whose `shared_memory_estimate`
    stays within `SHARED_MEMORY_BUDGET` (200 KiB). In KiB, 4 x hidden x (query + keys) [+ 8 x rows x key
    blocks, the backward's dS] + 4:
    - hidden 128, block 64: forward 64 rows, 64 x 2 stages: 0.5 x (128 + 192) + 4 = 164; backward 64 rows,
      32 x 1: 0.5 x (256 + 64) + 16 + 4 = 180;
    - hidden 256, block 64: forward 64 rows, 32 x 1: 1 x (128 + 64) + 4 = 196; backward 32 rows (64 need
      1 x (256 + 32) + 8 + 4 = 300 even with 16 key blocks), 16 x 1: 1 x (128 + 32) + 4 + 4 = 168;
    - hidden 512: forward 32 rows, 16 x 1: 2 x (64 + 32) + 4 = 196; backward 16 rows, 16 x 1:
      2 x (64 + 32) + 2 + 4 = 198.
    Gates wider than 512 get the narrowest tiles (16 rows, 16 key blocks, 1 stage), which may not fit (Triton's
    OutOfResources at launch). A query sub-tile of more than 64 x 128 floats gets 8 warps, so the registers
    holding it (and the backward's dQ) stay within a thread's budget. Not timed on a GPU: the order favours the
    widest tiles that fit.

    Args:
        block_tokens: the query block's tokens rounded up to a power of two >= 16.
        hidden: the gate's width rounded up to a power of two >= 16.
        backward: tiles for the backward kernel (else the forward).
    """
    if interpreting():
        return TokenGateTiles(64, 4, 1)
    rows = block_tokens
    while True:
        warps = 8 if rows * hidden > 64 * 128 else 4
        for key_blocks, stages in _KEY_TILES:
            tiles = TokenGateTiles(key_blocks, warps, stages, None if rows == block_tokens else rows)
            estimate = shared_memory_estimate(tiles, rows, hidden, backward=backward)
            if estimate <= SHARED_MEMORY_BUDGET:
                return tiles
        if rows <= 16:
            # Wider than 512: the narrowest tiles, which Triton refuses at launch if they do not fit after all.
            return tiles
        rows //= 2
