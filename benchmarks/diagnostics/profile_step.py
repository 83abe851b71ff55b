"""Where one forward+backward step of the public sparse op spends its GPU time, kernel by kernel.

For each density, runs the benchmark's step (`block_sparse_attention(..., kernel="triton")` forward, then
`.backward(dout)`) under `torch.profiler` and prints, per kernel name, its mean GPU time per step and share, the
sum of kernel times against the step's wall time (the gap is GPU idle: launch or host overhead), and the step's
`do_bench` median for reference. The same for a diagonal-only mask (every list has one entry), whose time is
mostly what every program pays regardless of its work: start-up, first loads, epilogue.
Same problem as bench_attention (B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, block 128).

    python benchmarks/diagnostics/profile_step.py --json profile.json
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from common import (  # first: puts the checkout on sys.path
    BLOCK, HEADS_Q, Recorder, benchmark_inputs, forward_backward_step, kernel_inputs, public_op,
)
from bench_attention import causal_density_mask


def parse_args(argv):
    """The profile's options from `argv` (None: the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1])
    p.add_argument("--steps", type=int, default=20, help="profiled steps per density")
    p.add_argument("--rep", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="bench_attention's --seed (same masks)")
    p.add_argument("--timing-modes", action="store_true",
                   help="also time the d=first-density step and its kernels in several ways (see `timing_modes`)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def kernel_times(step, steps: int) -> tuple[dict[str, float], float]:
    """Mean GPU microseconds per step of each kernel name, and the mean wall microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    per_name: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name[:90]] += ev.device_time / steps
    return dict(per_name), start.elapsed_time(end) * 1000 / steps


def events_ms(fn, calls: int = 20, flush: bool = False) -> float:
    """Mean ms per call of `calls` back-to-back calls enqueued behind a ~50 ms sleep kernel, so that the host is
    ahead of the GPU and any gap between kernels is the GPU's own; `flush`: clear the L2 (as do_bench) before each
    call, outside the timed events."""
    import triton.runtime

    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark() if flush else None
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    times = []
    for _ in range(calls):
        if flush:
            cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2]


def host_us(fn, calls: int = 30) -> float:
    """Host microseconds per call while the GPU is kept busy (nothing waits for it)."""
    import time

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) * 1e6 / calls
    torch.cuda.synchronize()
    return us


def timing_modes(rec: Recorder, step, kernels, forward) -> None:
    """The step, the forward alone and the three attention kernels alone (lists prebuilt), each timed by do_bench
    (L2 cleared before each call), by back-to-back events with and without clearing, and its host time; also
    whether the step synchronizes with the GPU (torch's sync debug mode)."""
    import warnings

    for name, fn in (("step", step), ("forward (no grad)", forward), ("kernels only", kernels)):
        rec.record(timing=name, do_bench_ms=rec.bench(fn), events_ms=events_ms(fn),
                   events_flush_ms=events_ms(fn, flush=True), host_us=round(host_us(fn), 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    rec.record(timing="sync warnings in one step", warnings=[str(w.message)[:200] for w in caught])


def main(argv=None) -> int:
    """Profile the step at each density and on the diagonal-only mask; record and write the results.
    Returns 0, or 2 without a CUDA GPU."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    q, k, v, dout, scale, nb = benchmark_inputs(args.seq_len, device)
    rec = Recorder(args.rep)
    masks = {d: causal_density_mask(1, HEADS_Q, nb, d, device=device, seed=args.seed + int(d * 1000))
             for d in args.densities}
    # Every list holds only the diagonal block: what each program pays regardless of its work.
    masks["diagonal"] = torch.eye(nb, dtype=torch.bool, device=device).expand(1, HEADS_Q, nb, nb).contiguous()
    for label, mask in masks.items():
        step = forward_backward_step(public_op(mask), q, k, v, dout)
        per_name, wall_us = kernel_times(step, args.steps)
        busy = sum(per_name.values())
        for name, us in sorted(per_name.items(), key=lambda kv: -kv[1]):
            rec.record(mask=label, kernel=name, us_per_step=round(us, 1), share=round(us / busy, 4))
        rec.record(mask=label, kernels_us=round(busy, 1), wall_us=round(wall_us, 1),
                   idle_us=round(wall_us - busy, 1), do_bench_ms=rec.bench(step))
    if args.timing_modes:
        from seer_kernels.triton_backward import sparse_attention_backward
        from seer_kernels.triton_forward import sparse_attention_forward

        mask = masks[args.densities[0]]
        idx, cnt, tidx, tcnt, out, lse = kernel_inputs(q, k, v, mask, scale)
        grads = tuple(torch.empty_like(t) for t in (q, k, v))

        def kernels():
            sparse_attention_forward(q, k, v, idx, cnt, block_size=BLOCK, sm_scale=scale)
            sparse_attention_backward(dout, q, k, v, out, lse, idx, cnt, tidx, tcnt, block_size=BLOCK,
                                      sm_scale=scale, grads=grads)

        def forward():
            with torch.no_grad():
                public_op(mask)(q, k, v)

        timing_modes(rec, forward_backward_step(public_op(mask), q, k, v, dout), kernels, forward)
    rec.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
