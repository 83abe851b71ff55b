"""Registers, spill stack and shared memory of the Triton kernels, compiled for Hopper (sm_90) without a GPU.

Triton compiles ahead of time for a target it is told about, and its wheel ships `ptxas` and `cuobjdump`, so
this runs on a CPU-only machine: it costs no device time and answers "does this variant spill?" before a GPU run.
The local Triton may differ from the GPU machine's, and register allocation with it: the numbers are indicative.

    python benchmarks/diagnostics/kernel_resources.py          # the block-128 defaults of bench_attention
    python benchmarks/diagnostics/kernel_resources.py --block 64 --head-dim 64 --kernels dkdv dkdv_segments
    python benchmarks/diagnostics/kernel_resources.py --selection 512 2048   # the fused ranking kernel
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/kernel_resources.py -> repository root
sys.path[:0] = [str(ROOT / "kernels")]

POINTERS_BF16 = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
POINTERS_F32 = {"LSE", "DELTA", "OUT", "DK_ACC", "DV_ACC"}
POINTERS_I32 = {"KV_IDX", "KV_CNT", "Q_IDX", "Q_CNT", "DOC", "ITEMS", "META", "ARRIVALS", "Q_BLOCKS", "OUT_ROWS", "FIRST_KB"}
POINTERS_U8 = {"VALID"}
FLOATS = {"scale_log2", "sm_scale"}
# Integer arguments that are not multiples of 16 at the benchmark's shape; the JIT specializes the others (and
# every pointer) as divisible by 16, which is what lets it vectorize pointer loads, so the compile here does too.
NOT_DIVISIBLE = {"group", "n_heads_kv", "max_segs", "n_bhk"}


def kernel_table():
    """Kernels this script compiles, by name: (kernel, kind of its tile candidates, tensors streamed through TMA
    descriptors, tile key of those, extra constexprs)."""
    from seer_kernels import triton_dkdv, triton_dq, triton_forward
    from seer_kernels import triton_ground_truth as tg
    from seer_kernels import triton_probe as tp

    # name -> (kernel, kind for tile candidates, descriptor-streamed tensors, tile key of those, extra constexprs)
    return {
        "fwd": (triton_forward._sparse_fwd_kernel, "fwd", ("K", "V"), "BLOCK_N", {}),
        "dq": (triton_dq._sparse_dq_kernel, "dq", ("K", "V"), "BLOCK_N", {}),
        "dkdv": (triton_dkdv._sparse_dkdv_kernel, "dkdv", ("Q", "DO"), "BLOCK_M", {}),
        "dkdv_segments": (triton_dkdv._sparse_dkdv_segments_kernel, "dkdv", ("Q", "DO"), "BLOCK_M", {"GROUP_P2": 4}),
        "gt": (tg._ground_truth_kernel, "gt", ("K",), "BLOCK_N", {"HAS_LSE": False}),
        "probe": (tp._probe_kernel, "probe", ("K",), "BLOCK_N", {"HAS_VALID": False, "R": 1}),
    }


def divisibility(kernel, sig: dict) -> dict:
    """The `tt.divisibility` hints a launch at the benchmark's shape gets from the JIT's specialization."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name] != "constexpr" and not sig[name].startswith(("tensordesc", "fp")) and name not in NOT_DIVISIBLE}


def signature(kernel, constexprs: dict, descriptors: dict) -> dict:
    """Triton type of each argument of `kernel` at the benchmark's dtypes: constexpr, descriptor, pointer or
    scalar."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in descriptors:
            sig[name] = descriptors[name]
        elif name in POINTERS_BF16:
            sig[name] = "*bf16"
        elif name in POINTERS_F32:
            sig[name] = "*fp32"
        elif name in POINTERS_I32:
            sig[name] = "*i32"
        elif name in POINTERS_U8:
            sig[name] = "*u8"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_for_sm90(src, num_warps: int, num_stages: int) -> tuple[int, str]:
    """Compile a Triton `ASTSource` for Hopper (sm_90) without a GPU.

    Returns:
        (dynamic shared memory in bytes, the `cuobjdump --dump-resource-usage` line with `REG:` / `STACK:`).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
    return compiled.metadata.shared, next(ln for ln in out.splitlines() if "REG:" in ln)


def resources(name: str, block: int, head_dim: int, tma: int, config=None) -> str:
    """One line of `cuobjdump --dump-resource-usage` for kernel `name` (REG, STACK, SHARED, ...)."""
    import triton

    from seer_kernels.triton_tuning import default_config

    kernel, kind, streamed, rows_key, extra = kernel_table()[name]
    cfg = config or default_config(kind, block)
    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    constexprs = dict(HAS_DOCS=False, BLOCK=block, HEAD_DIM=head_dim, PRECISION="tf32", TMA=tma, **extra)
    from seer_kernels.triton_tuning import KERNEL_OPTIONS

    if kind == "gt":
        constexprs["QB"] = max(1, KERNEL_OPTIONS["gt"]["ROWS"] // block)
    elif kind == "probe":
        constexprs["BLOCK_M"] = cfg.block_m
    else:
        constexprs.update(EVEN_L=True, BLOCK_M=cfg.block_m)
    constexprs["BLOCK_N"] = cfg.block_n
    descriptors = {n: f"tensordesc<bf16[1,1,{tiles[rows_key]},{head_dim}]>" for n in streamed} if tma else {}
    sig = signature(kernel, constexprs, descriptors)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=divisibility(kernel, sig))
    shared, line = compile_for_sm90(src, cfg.num_warps, cfg.num_stages)
    usage = re.sub(r"\s*SHARED.*", "", line.strip())
    return (f"{name:14s} tiles {cfg.block_m}x{cfg.block_n} warps {cfg.num_warps} stages {cfg.num_stages} TMA {tma}: "
            f"{usage} dynamic shared {shared // 1024} KiB")


def selection_resources(n_blocks: int) -> str:
    """One resource line for the fused ranking-key kernel (`triton_selection`) on rows of `n_blocks` blocks, with
    the 90% experiment's early picks (1 bound block, 16 probe blocks, a row-mass tier) and the launcher's tile."""
    import triton

    from seer_kernels.triton_selection import _ranking_keys_kernel as kernel
    from seer_kernels.triton_selection import launch_config

    block, rows, warps = launch_config(n_blocks)
    constexprs = dict(BOUND_BLOCKS=1, PROBE_BLOCKS=16, ROW_MASS=True, ROWS=rows, BLOCK=block)
    pointers = {"CAND": "*u8", "FORCED": "*u8", "ROOM": "*i64"}
    sig = {name: "constexpr" if name in constexprs else pointers.get(name, "*fp32" if name.isupper() else "i32")
           for name in kernel.arg_names}
    sig["row_mass"] = "fp32"
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs={})
    _, line = compile_for_sm90(src, warps, 1)
    usage = re.sub(r"\s*SHARED.*", "", line.strip())
    return f"selection      {n_blocks} blocks per row, tile {rows}x{block} warps {warps}: {usage}"


def main(argv: list[str] | None = None) -> int:
    """Print one resource line per chosen kernel and load mode (or per `--selection` row length). Returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tma", type=int, nargs="+", default=[1], help="load modes to compile: 1 descriptors, 0 pointers")
    parser.add_argument("--kernels", nargs="+", default=list(kernel_table()), choices=list(kernel_table()))
    parser.add_argument("--tiles", type=int, nargs=4, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"),
                        help="compile this tile config instead of each kernel's default")
    parser.add_argument("--selection", type=int, nargs="+", metavar="BLOCKS",
                        help="compile the fused ranking-key kernel for rows of these block counts instead")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    for n_blocks in args.selection or []:
        print(selection_resources(n_blocks), flush=True)
    for name in [] if args.selection else args.kernels:
        for tma in args.tma:
            block = 64 if name == "gt" and args.block not in (64, 128) else args.block
            config = None
            if args.tiles:
                from seer_kernels.triton_tuning import TileConfig

                config = TileConfig(*args.tiles)
            print(resources(name, block, args.head_dim, tma, config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
