"""benchmarks/diagnostics/kernel_resources.py compiles a kernel (an attention kernel, or the fused ranking kernel)
for sm_90 on this (GPU-less) machine and reports its usage."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_resources_reports_registers_and_stack():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diagnostics" / "kernel_resources.py"), "--block", "64",
         "--head-dim", "64", "--kernels", "dkdv"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("dkdv") and "REG:" in line and "STACK:" in line and "dynamic shared" in line


def test_kernel_resources_compiles_the_fused_ranking_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diagnostics" / "kernel_resources.py"), "--selection", "512"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("selection      512 blocks per row, tile 4x512 warps 8") and "REG:" in line and "STACK:" in line
