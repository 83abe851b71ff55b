"""Shared memory, registers and spill stack of the token-gate kernels, compiled for Hopper (sm_90) without a GPU,
beside `triton_token_gate_tiles.shared_memory_estimate` of the same tiles.

As `kernel_resources.py` (whose notes apply: the local Triton may differ from the GPU machine's), for the
token-scored gate's forward and backward at the tiles `default_tiles` picks (or those given):

    python benchmarks/diagnostics/token_gate_resources.py                       # blocks 64, 128 x hidden 128..512
    python benchmarks/diagnostics/token_gate_resources.py --block 64 --hidden 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/token_gate_resources.py -> repository root
sys.path[:0] = [str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from kernel_resources import compile_for_sm90  # noqa: E402

POINTERS = {"QT": "*fp32", "KH": "*fp32", "VALID": "*i8", "CAND": "*i8", "COS": "*fp32", "SIN": "*fp32",
            "OUT": "*fp32", "WIN": "*i32", "LSE": "*fp32", "DS": "*fp32", "DQ": "*fp32", "DKH": "*fp32"}
# Integer arguments that are not multiples of 16 in general; the JIT specializes the others (and every pointer)
# as divisible by 16 when they are, so the compile here assumes so.
NOT_DIVISIBLE = {"seq_len", "n_blocks", "n_heads_q", "group", "block_size", "hidden", "rot_dim"}


def compile_kernel(backward: bool, block_tokens: int, hidden: int, tiles, *, prob: bool = True) -> dict:
    """Compile one token-gate kernel for sm_90 (padding, candidates and RoPE on, as the gate launches it).

    Returns:
        `{"shared": bytes, "registers": per thread, "stack": spill bytes per thread}`.
    """
    import triton

    from seer_kernels import triton_token_gate as tg
    from seer_kernels import triton_token_gate_kernels as kernels

    kernel = kernels._token_gate_backward_kernel if backward else kernels._token_gate_kernel
    rows = min(block_tokens, tiles.query_rows or block_tokens)
    constexprs = dict(HAS_VALID=True, HAS_ROPE=True, PROB=prob, BLOCK_T=block_tokens, ROWS=rows,
                      BLOCK_J=tiles.key_blocks, HIDDEN=hidden, PRECISION=tg.DOT_PRECISION)
    if not backward:
        constexprs["SAVE_FOR_BACKWARD"] = True
    sig = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n] != "constexpr" and n not in NOT_DIVISIBLE}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    shared, line = compile_for_sm90(src, tiles.num_warps, tiles.num_stages)
    number = lambda key: int(re.search(rf"{key}:(\d+)", line).group(1))
    return {"shared": shared, "registers": number("REG"), "stack": number("STACK")}


def report(block: int, hidden: int, tiles=None) -> list[dict]:
    """One record per kernel (forward, backward) at a block size and a hidden width (both padded as the
    launchers pad them), with the default tiles unless `tiles` are given."""
    from seer_kernels.triton_token_gate_tiles import default_tiles, shared_memory_estimate

    block_tokens, padded = max(16, 1 << (block - 1).bit_length()), max(16, 1 << (hidden - 1).bit_length())
    records = []
    for backward in (False, True):
        chosen = tiles or default_tiles(block_tokens, padded, backward=backward)
        rows = min(block_tokens, chosen.query_rows or block_tokens)
        record = dict(kernel="backward" if backward else "forward", block=block, hidden=hidden, rows=rows,
                      key_blocks=chosen.key_blocks, num_warps=chosen.num_warps, num_stages=chosen.num_stages,
                      estimate=shared_memory_estimate(chosen, rows, padded, backward=backward))
        record.update(compile_kernel(backward, block_tokens, padded, chosen))
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Print one line per kernel, block and hidden width; optionally write the records as JSON. Returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--tiles", type=int, nargs=4, metavar=("KEY_BLOCKS", "WARPS", "STAGES", "ROWS"),
                        help="compile these tiles instead of the defaults (ROWS 0: the whole block)")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from seer_kernels.triton_token_gate_tiles import HARDWARE_SHARED_MEMORY, TokenGateTiles

    tiles = None
    if args.tiles:
        key_blocks, warps, stages, rows = args.tiles
        tiles = TokenGateTiles(key_blocks, warps, stages, rows or None)
    records = []
    for block in args.block:
        for hidden in args.hidden:
            for r in report(block, hidden, tiles):
                records.append(r)
                print(f"{r['kernel']:8s} block {block:3d} hidden {hidden:3d}: rows {r['rows']:3d} key blocks "
                      f"{r['key_blocks']:2d} warps {r['num_warps']} stages {r['num_stages']}: shared "
                      f"{r['shared'] / 1024:.1f} KiB (estimate {r['estimate'] / 1024:.1f}, hardware "
                      f"{HARDWARE_SHARED_MEMORY // 1024}), REG {r['registers']} STACK {r['stack']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
