"""Do the sparse kernels and FlexAttention slow down under sustained load (clocks, power), and by how much?

Runs each case (our forward, Flex's forward, our forward+backward, Flex's, at one density) back to back for a few
seconds after an idle pause, times every call with CUDA events and samples the GPU's SM clock, power draw,
temperature and throttle reasons with `nvidia-smi -lms`. Prints per case the median call time over its first
50 ms and over its last second, and the clocks and power seen in those windows. Same problem as bench_attention
(B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, block 128).

    python benchmarks/diagnostics/power_check.py --json power.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import (  # first: puts the checkout on sys.path
    BLOCK, HEADS_Q, Recorder, benchmark_inputs, forward_backward_step, kernel_inputs, public_op,
)
from bench_attention import causal_density_mask, flex_block_mask

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def parse_args(argv):
    """The check's options from `argv` (None: the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--seconds", type=float, default=3.0, help="sustained run per case")
    p.add_argument("--pause", type=float, default=3.0, help="idle seconds before each case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", action="store_true",
                   help="run our three kernels alone (lists prebuilt) instead of the two ops")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def sustained(fn, seconds: float) -> list[tuple[float, float]]:
    """(host time at enqueue, ms) of each call of `fn` run back to back for `seconds`; the host waits for the GPU
    every 8 calls so that its clock stays within a few calls of the GPU's."""
    calls = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        batch = []
        for _ in range(8):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            batch.append((start, end))
        torch.cuda.synchronize()
        now = time.time()
        calls += [(now, s.elapsed_time(e)) for s, e in batch]
    return calls


def window(samples, t0: float, t1: float) -> dict:
    """Median SM clock, mean power, peak temperature and throttle reasons of the `nvidia-smi` samples
    `(time, MHz, W, C, reasons)` taken between `t0` and `t1` (empty when there are none)."""
    sel = [s for s in samples if t0 <= s[0] <= t1]
    if not sel:
        return {}
    return {"sm_mhz": statistics.median(s[1] for s in sel), "watts": round(statistics.mean(s[2] for s in sel), 1),
            "temp_c": max(s[3] for s in sel), "throttle": sorted({s[4] for s in sel})}


def kernel_cases(q, k, v, dout, mask) -> dict:
    """Our forward, dQ and dK/dV kernels alone, on prebuilt block lists and preallocated outputs."""
    from seer_kernels import gluon as ga

    scale = q.shape[-1] ** -0.5
    idx, cnt, tidx, tcnt, out, lse = kernel_inputs(q, k, v, mask, scale)
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    return {
        "seer forward kernel": lambda: ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=BLOCK,
                                                                  sm_scale=scale),
        "seer dq kernel": lambda: ga.gluon_attention_dq(q, k, v, out, dout, lse, delta, idx, cnt, dq,
                                                        block_size=BLOCK, sm_scale=scale),
        "seer dkdv kernel": lambda: ga.gluon_attention_dkdv(q, k, v, dout, lse, delta, tidx, tcnt, dk, dv,
                                                            block_size=BLOCK, sm_scale=scale),
    }


def main(argv=None) -> int:
    """Run every case after an idle pause while `nvidia-smi` samples the GPU; record and write the results.
    Returns 0, or 2 without a CUDA GPU."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("power_check needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import flex_attention

    device = torch.device("cuda")
    q, k, v, dout, _, nb = benchmark_inputs(args.seq_len, device)
    mask = causal_density_mask(1, HEADS_Q, nb, args.density, device=device, seed=args.seed + int(args.density * 1000))
    bm = flex_block_mask(mask, args.seq_len, BLOCK) if not args.kernels else None
    flex = torch.compile(flex_attention, dynamic=False)
    ours = public_op(mask)

    def theirs(*t):
        return flex(*t, block_mask=bm, enable_gqa=True)

    def forward(op):
        def run():
            with torch.no_grad():
                op(q, k, v)
        return run

    cases = {"seer fwd": forward(ours), "flex fwd": forward(theirs),
             "seer fwd+bwd": forward_backward_step(ours, q, k, v, dout),
             "flex fwd+bwd": forward_backward_step(theirs, q, k, v, dout)}
    if args.kernels:
        cases = kernel_cases(q, k, v, dout, mask)
    for fn in cases.values():  # compile outside the runs
        fn()
    torch.cuda.synchronize()

    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    spans = {}
    for name, fn in cases.items():
        time.sleep(args.pause)
        t0 = time.time()
        spans[name] = (t0, sustained(fn, args.seconds))
    time.sleep(0.3)
    smi.terminate()
    samples = []
    for line in smi.stdout.read().splitlines():
        parts = [x.strip() for x in line.split(",")]
        try:
            stamp, frac = parts[0].rsplit(".", 1)
            ts = time.mktime(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) + float("0." + frac)
            samples.append((ts, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
        except (ValueError, IndexError):
            continue
    if not samples:
        print("nvidia-smi gave no samples", flush=True)
    rec = Recorder(0)
    for name, (t0, calls) in spans.items():
        first = [ms for t, ms in calls if t <= t0 + 0.05 + 0.03] or [calls[0][1]]
        t_last = calls[-1][0]
        last = [ms for t, ms in calls if t >= t_last - 1.0]
        rec.record(case=name, calls=len(calls), first_50ms_ms=statistics.median(first),
                   last_1s_ms=statistics.median(last),
                   gpu_first=window(samples, t0, t0 + 0.15), gpu_last=window(samples, t_last - 1.0, t_last),
                   gpu_idle_before=window(samples, t0 - args.pause + 0.5, t0))
    rec.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
