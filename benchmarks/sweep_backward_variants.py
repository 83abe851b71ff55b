"""The Gluon dK/dV kernel against baseline copies of the Gluon module, timed in one call on one GPU.

- dK/dV alone: the current `gluon_attention` against each `--baseline` (earlier `gluon_attention.py` files, loaded
  as further modules), in two rounds of all of them; dK and dV compared with the current module's.
- The whole forward+backward step of the public op (lists built inside, as bench_attention times it) with each
  dK/dV kernel, alternating the same way.
Kernels alone get prebuilt block lists. Times are `do_bench` medians with bench_attention's warm-up and repetition
(100 / 400 ms), so the GPU runs as loaded as in the benchmark (it holds its 700 W cap by lowering its clock).
Same problem as bench_attention (B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, random per-head masks).

    PYTHONPATH=.:kernels python benchmarks/sweep_backward_variants.py --baseline old_gluon_attention.py --json s.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from sweep_common import (  # sets up sys.path
    BLOCK, HEADS_Q, Recorder, benchmark_inputs, forward_backward_step, kernel_inputs, public_op,
)
from bench_attention import causal_density_mask


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--baseline", type=Path, nargs="+", required=True,
                   help="earlier gluon_attention.py files (each timed against the current module)")
    p.add_argument("--rep", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="bench_attention's --seed (same masks)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def load_baseline(path: Path, name: str):
    """`path` as module `seer_kernels.<name>` (its relative imports resolve inside seer_kernels)."""
    import seer_kernels  # noqa: F401

    spec = importlib.util.spec_from_file_location(f"seer_kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    from seer_kernels import gluon_attention as ga

    variants = {path.stem: load_baseline(path, f"_baseline{i}") for i, path in enumerate(args.baseline)}
    variants["current"] = ga
    device = torch.device("cuda")
    q, k, v, dout, scale, nb = benchmark_inputs(args.seq_len, device)
    rec = Recorder(args.rep, warmup_ms=100)
    for d in args.densities:
        mask = causal_density_mask(1, HEADS_Q, nb, d, device=device, seed=args.seed + int(d * 1000))
        idx, cnt, tidx, tcnt, out, lse = kernel_inputs(q, k, v, mask, scale)
        delta = torch.empty_like(lse)
        ga.gluon_attention_dq(q, k, v, out, dout, lse, delta, idx, cnt, torch.empty_like(q), block_size=BLOCK,
                              sm_scale=scale)

        def dkdv_run(module):
            dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
            module.gluon_attention_dkdv(q, k, v, dout, lse, delta, tidx, tcnt, dk, dv, block_size=BLOCK,
                                        sm_scale=scale)
            return dk, dv

        dk0, dv0 = dkdv_run(ga)
        for name, module in variants.items():
            if module is ga:
                continue
            dk1, dv1 = dkdv_run(module)
            rec.record(density=d, check=f"dkdv {name} vs current",
                       dk_max_diff=(dk0.float() - dk1.float()).abs().max().item(),
                       dv_max_diff=(dv0.float() - dv1.float()).abs().max().item(),
                       nan=bool(torch.isnan(dk1).any() or torch.isnan(dv1).any()))

        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for rnd in range(2):
            for name, module in variants.items():
                rec.record(density=d, kernel="dkdv", variant=name, round=rnd, ms=rec.bench(
                    lambda module=module: module.gluon_attention_dkdv(q, k, v, dout, lse, delta, tidx, tcnt, dk, dv,
                                                                      block_size=BLOCK, sm_scale=scale)))

        step = forward_backward_step(public_op(mask), q, k, v, dout)
        current_dkdv = ga.gluon_attention_dkdv
        for rnd in range(2):
            for name, module in variants.items():
                # The public op reaches the dK/dV launcher through the module attribute.
                ga.gluon_attention_dkdv = current_dkdv if module is ga else module.gluon_attention_dkdv
                rec.record(density=d, kernel="fwd+bwd step", variant=f"{name} dkdv", round=rnd, ms=rec.bench(step))
        ga.gluon_attention_dkdv = current_dkdv
    rec.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
