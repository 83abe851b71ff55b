"""Attention speed on one GPU: seer_kernels' Triton kernels against SDPA (flash, cuDNN) and FlexAttention.

Problem: B=1, 32 query / 8 KV heads, head_dim 128, bf16, causal, L=32768, random per-head block masks with the
diagonal kept (row i keeps round(d * (i + 1)) of its i + 1 causal blocks). Times are medians from
`triton.testing.do_bench`, forward and forward+backward. FlexAttention runs compiled
(`torch.compile(flex_attention, dynamic=False)`) on the same mask in two constructions (`flex_block_mask`: the
causal-only `mask_mod` its authors use, and one that also looks the mask up), and ratios are against the faster.
Also: the ground-truth kernel against the cuDNN dense
forward, with its extra memory. Before timing, a correctness check runs the Triton kernels in bf16 against the
float32 reference at a shorter length, and the sparse output at full length against FlexAttention's. The table
ends with the targets the kernels are held to (PASS / MISS).

    python benchmarks/bench_attention.py --json benchmarks/results/attention.json

`main(argv)` is the entry point for `python -m seer_finetune bench attention`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "kernels"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's options from `argv` (None: the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="sparsity block of the sparse kernels (Flex uses 128)")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    p.add_argument("--gt-blocks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--check-len", type=int, default=8192, help="length of the bf16-vs-fp32 check (0: skip)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--warmup", type=int, default=100, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=400, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", action="store_true",
                   help="also time kernel-only variants: every tile candidate at each density")
    p.add_argument("--json", type=Path, default=None, help="write all records here")
    return p.parse_args(argv)


def causal_density_mask(bsz, heads, nb, density, *, device, seed):
    """bool [B, H, nB, nB]: row i keeps round(density * (i + 1)) causal blocks (>= 1), always its diagonal."""
    gen = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(bsz, heads, nb, nb, device=device, generator=gen)
    eye = torch.eye(nb, dtype=torch.bool, device=device)
    upper = torch.ones(nb, nb, dtype=torch.bool, device=device).triu(1)
    score = score.masked_fill(eye, 2.0).masked_fill(upper, -1.0)
    keep = torch.clamp(torch.round(density * torch.arange(1, nb + 1, device=device, dtype=torch.float32)), min=1)
    rank = score.argsort(-1, descending=True).argsort(-1)  # 0 = highest score
    return rank < keep[None, None, :, None]


def real_density(mask: torch.Tensor) -> float:
    """Share of the causal blocks that `mask` keeps.

    Args:
        mask: bool [B, H, nB, nB] block mask.

    Returns:
        Kept blocks on or below the diagonal over all causal blocks, in [0, 1].
    """
    nb = mask.shape[-1]
    return float(mask.tril().sum()) / (mask.shape[0] * mask.shape[1] * nb * (nb + 1) / 2)


FLEX_MASK_MODS = ("causal", "lookup")


def flex_block_mask(mask: torch.Tensor, seq_len: int, block: int, mask_mod: str = "causal"):
    """FlexAttention BlockMask with exactly our mask: off-diagonal kept blocks are full, the diagonals partial.

    Compiled Flex calls the `mask_mod` only inside partial blocks. Every kept diagonal block needs just the causal
    test there, which is how FlexAttention's authors build such masks (`"causal"`, the default and the faster);
    `"lookup"` also reads our block mask for every element of those blocks, which the same compiled kernel then
    pays for. Eager (uncompiled) Flex evaluates the `mask_mod` everywhere, so only `"lookup"` states the whole mask
    there.

    Args:
        mask: bool `[B, H, nB, nB]`, each row's diagonal kept.
        seq_len: Tokens per sequence.
        block: Tokens per block (Flex's `BLOCK_SIZE`).
        mask_mod: `causal` or `lookup`, see above.

    Returns:
        A `torch.nn.attention.flex_attention.BlockMask`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    from seer_kernels import block_mask_to_indices

    if mask_mod not in FLEX_MASK_MODS:
        raise ValueError(f"mask_mod={mask_mod!r} must be one of {FLEX_MASK_MODS}")
    nb = mask.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=mask.device)
    full_idx, full_cnt = block_mask_to_indices(mask & ~eye)
    full_idx = full_idx.clamp(max=nb - 1)  # filler must be a valid block number for Flex's transposition
    part_cnt = (mask & eye).any(-1).to(torch.int32)
    part_idx = torch.arange(nb, device=mask.device, dtype=torch.int32).view(1, 1, nb, 1).expand(
        *mask.shape[:2], nb, nb
    ).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def lookup(b, h, q_idx, kv_idx):
        return mask[b, h, q_idx // block, kv_idx // block] & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(
        part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=block,
        mask_mod=causal if mask_mod == "causal" else lookup, seq_lengths=(seq_len, seq_len),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||, computed in float64 (same shapes)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, args) -> float:
    """Median ms of `fn()` from `triton.testing.do_bench` with `args.warmup` / `args.rep`, after one untimed call
    that compiles and autotunes."""
    import triton.testing

    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))


def bench_pair(make_fwd, q, k, v, dout, args) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of `make_fwd(q, k, v) -> out`."""
    with torch.no_grad():
        fwd = bench(lambda: make_fwd(q, k, v), args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        make_fwd(*leaves).backward(dout)
        for t in leaves:
            t.grad = None

    return fwd, bench(step, args)


def correctness_check(args, device, records: list) -> None:
    """bf16 Triton vs float32 reference (same rounded inputs) at `--check-len`."""
    import seer_kernels as sk

    L = args.check_len
    bsz, hq, hkv, dim = args.batch, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    q, k, v = (
        torch.randn(bsz, h, L, dim, device=device, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv)
    )
    dout = torch.randn(bsz, hq, L, dim, device=device, generator=gen).to(torch.bfloat16)
    nb = math.ceil(L / args.block)
    docs = torch.div(torch.arange(L, device=device), max(1, L // 3) + 17, rounding_mode="floor")[None].expand(bsz, L)
    for name, mask, doc in [
        ("sparse d=0.3", causal_density_mask(bsz, hq, nb, 0.3, device=device, seed=1), None),
        ("sparse d=0.5 docs", causal_density_mask(bsz, hq, nb, 0.5, device=device, seed=2), docs.contiguous()),
    ]:
        outs = {}
        for kernel, cast in (("triton", lambda t: t), ("pytorch", lambda t: t.float())):
            leaves = [cast(t).detach().clone().requires_grad_() for t in (q, k, v)]
            o = sk.block_sparse_attention(*leaves, mask, block_size=args.block, document_ids=doc, kernel=kernel)
            o.backward(cast(dout))
            outs[kernel] = [o] + [t.grad for t in leaves]
        errs = {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["pytorch"])}
        records.append({"check": name, "L": L, "rel_err": errs, "pass": all(e < 2e-2 for e in errs.values())})
        print(f"check {name}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
    for gblock in args.gt_blocks:
        sub = torch.arange(0, math.ceil(L / gblock), 3, device=device)
        gt = sk.attention_ground_truth(q, k, block_size=gblock, query_blocks=sub, kernel="triton")
        ref = sk.attention_ground_truth(q.float(), k.float(), block_size=gblock, query_blocks=sub, kernel="pytorch")
        err = float((gt - ref).abs().max())
        records.append({"check": f"ground truth block {gblock}", "L": L, "max_abs_err": err, "pass": err < 1e-3})
        print(f"check ground truth block {gblock}: max abs err {err:.2e}", flush=True)


def time_variants(args, q, k, v, masks: dict, rows: list) -> None:
    """Kernel-only forward times (block lists built outside the timing) for each tile candidate at each
    density, and each ground-truth tile candidate. Informs the defaults; not a target."""
    import seer_kernels as sk
    from seer_kernels.triton_forward import sparse_attention_forward
    from seer_kernels.triton_ground_truth import ground_truth_forward
    from seer_kernels.triton_tuning import candidates

    scale = 1.0 / math.sqrt(q.shape[-1])
    for d, mask in masks.items():
        idx, cnt = sk.block_mask_to_indices(mask)
        for cfg in candidates("fwd", args.block):
            ms = bench(lambda cfg=cfg: sparse_attention_forward(
                q, k, v, idx, cnt, block_size=args.block, sm_scale=scale, config=cfg), args)
            rows.append({"variant": "fwd kernel only", "density": d, "config": str(cfg), "ms": ms})
            print(rows[-1], flush=True)
    for gblock in args.gt_blocks:
        for cfg in candidates("gt", gblock):
            ms = bench(lambda gblock=gblock, cfg=cfg: ground_truth_forward(
                q, k, block_size=gblock, sm_scale=scale, config=cfg), args)
            rows.append({"variant": f"ground truth bs{gblock}", "config": str(cfg), "ms": ms})
            print(rows[-1], flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and every timing, print the table and the targets, write `--json`.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0, or 2 without a CUDA GPU.
    """
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench attention needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import seer_kernels as sk
    from seer_kernels.triton_tuning import tuned_choices

    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    env = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "argv": sys.argv if argv is None else ["bench_attention.py", *argv],
    }
    print(json.dumps(env), flush=True)
    records: list[dict] = []
    t_start = time.time()
    if args.check_len:
        correctness_check(args, device, records)

    bsz, hq, hkv, L, dim = args.batch, args.heads, args.kv_heads, args.seq_len, args.head_dim
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(bsz, h, L, dim, device=device, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv))
    dout = torch.randn(bsz, hq, L, dim, device=device, generator=gen).to(torch.bfloat16)
    flops_fwd = 4 * bsz * hq * dim * L * L / 2  # causal: half of QK^T and PV
    rows: list[dict] = []

    def sdpa(backend):
        def run(q_, k_, v_):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

        return run

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        fn = sdpa(backend)
        try:
            fwd, fb = bench_pair(fn, q, k, v, dout, args)
        except RuntimeError as exc:
            # Backend without native GQA: give it repeated K/V (built outside the timing).
            print(f"{name} with enable_gqa failed ({str(exc).splitlines()[0][:120]}); repeating K/V", flush=True)
            kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
            name += "(repeated kv)"
            fwd, fb = bench_pair(fn, q, kk, vv, dout, args)
            del kk, vv
        rows.append({"kernel": name, "density": 1.0, "fwd_ms": fwd, "fwdbwd_ms": fb,
                     "fwd_tflops": flops_fwd / fwd * 1e-9, "fwdbwd_tflops": 3.5 * flops_fwd / fb * 1e-9})
        print(rows[-1], flush=True)
    cudnn = next(r for r in rows if r["kernel"].startswith("sdpa_cudnn"))

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    nb = math.ceil(L / args.block)
    variant_rows: list[dict] = []
    if args.variants:
        masks = {d: causal_density_mask(bsz, hq, nb, d, device=device, seed=args.seed + int(d * 1000))
                 for d in args.densities}
        time_variants(args, q, k, v, masks, variant_rows)
        del masks
    for d in args.densities:
        mask = causal_density_mask(bsz, hq, nb, d, device=device, seed=args.seed + int(d * 1000))
        rd = real_density(mask)

        def ours(q_, k_, v_, mask=mask):
            return sk.block_sparse_attention(q_, k_, v_, mask, block_size=args.block, kernel="triton")

        fwd, fb = bench_pair(ours, q, k, v, dout, args)
        rows.append({"kernel": f"seer_triton_bs{args.block}", "density": d, "real_density": rd,
                     "fwd_ms": fwd, "fwdbwd_ms": fb})
        print(rows[-1], flush=True)
        ours_row = rows[-1]
        ours_row.update(fwd_vs_cudnn=fwd / cudnn["fwd_ms"], fwdbwd_vs_cudnn=fb / cudnn["fwdbwd_ms"])
        if flex is not None:
            if args.block != 128:
                print("FlexAttention comparison needs --block 128", flush=True)
                continue
            # Both constructions on the same mask, one after the other; ratios are against the faster of the two,
            # forward and forward+backward each.
            flex_rows = []
            for mask_mod in FLEX_MASK_MODS:
                bm = flex_block_mask(mask, L, 128, mask_mod)

                def flex_fn(q_, k_, v_, bm=bm):
                    return flex(q_, k_, v_, block_mask=bm, enable_gqa=True)

                with torch.no_grad():
                    err = rel_err(ours(q, k, v), flex_fn(q, k, v))
                ffwd, ffb = bench_pair(flex_fn, q, k, v, dout, args)
                flex_rows.append({"kernel": f"flex_bs128_{mask_mod}", "density": d, "real_density": rd,
                                  "fwd_ms": ffwd, "fwdbwd_ms": ffb, "rel_err_vs_seer": err})
                print(flex_rows[-1], flush=True)
                del bm
            rows += flex_rows
            best_fwd = min(r["fwd_ms"] for r in flex_rows)
            best_fb = min(r["fwdbwd_ms"] for r in flex_rows)
            ours_row.update(speedup_fwd_vs_flex=best_fwd / fwd, speedup_fwdbwd_vs_flex=best_fb / fb,
                            rel_err_vs_flex=max(r["rel_err_vs_seer"] for r in flex_rows))
        del mask

    for gblock in args.gt_blocks:
        with torch.no_grad():
            gt_fn = lambda gblock=gblock: sk.attention_ground_truth(q, k, block_size=gblock, kernel="triton")  # noqa: E731
            gt_fn()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            gt = gt_fn()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
            map_bytes = gt.numel() * gt.element_size()
            del gt
            ms = bench(gt_fn, args)
            owgt = bench(lambda gblock=gblock: sk.attention_with_ground_truth(
                q, k, v, block_size=gblock, kernel="triton"), args)
        rows.append({"kernel": f"seer_ground_truth_bs{gblock}", "density": 1.0, "fwd_ms": ms,
                     "vs_cudnn_fwd": ms / cudnn["fwd_ms"], "extra_GiB": extra / 2**30,
                     "pooled_map_GiB": map_bytes / 2**30, "extra_over_map": extra / map_bytes,
                     "attention_with_ground_truth_fwd_ms": owgt})
        print(rows[-1], flush=True)

    tuned = tuned_choices()
    from seer_kernels import gluon
    from seer_kernels.gluon import pick_gluon

    # Which kernels the timed seer rows ran (block 128, these inputs): Gluon or Triton.
    gluon_used = {"forward_and_dq": pick_gluon(None, None, q, k, v, 128, None),
                  "dkdv": pick_gluon(None, None, q, k, v, 128, None, kind="dkdv"),
                  "import_error": gluon.IMPORT_ERROR}
    print("gluon kernels:", json.dumps(gluon_used), flush=True)
    result = {"env": env, "checks": records, "results": rows, "variants": variant_rows, "tuned_configs": tuned,
              "gluon": gluon_used, "wall_s": time.time() - t_start}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print("tuned configs:", json.dumps(tuned), flush=True)
    for r in variant_rows:
        print(f"variant {r['variant']:<18} d={r.get('density', '-')!s:<4} {r['config']:<60} {r['ms']:.3f} ms")
    print_table(rows, records, cudnn)
    return 0


def print_table(rows: list[dict], checks: list[dict], cudnn: dict) -> None:
    """Print the timing rows, then each target as PASS or MISS.

    Args:
        rows: the `results` records of `main` (one per kernel and density).
        checks: the correctness records of `correctness_check`.
        cudnn: the SDPA cuDNN row, the dense reference of the ratios.
    """
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    print()
    print(f"{'kernel':<26} {'dens':>5} {'fwd ms':>8} {'f+b ms':>8} {'xFlex f':>8} {'xFlex fb':>8} {'/cuDNN f':>8} {'/cuDNN fb':>9}")
    for r in rows:
        print(
            f"{r['kernel']:<26} {f(r.get('real_density', r['density']), '{:.3f}'):>5} {f(r['fwd_ms'], '{:.3f}'):>8} "
            f"{f(r.get('fwdbwd_ms'), '{:.3f}'):>8} {f(r.get('speedup_fwd_vs_flex')):>8} "
            f"{f(r.get('speedup_fwdbwd_vs_flex')):>8} {f(r.get('fwd_vs_cudnn', r.get('vs_cudnn_fwd'))):>8} "
            f"{f(r.get('fwdbwd_vs_cudnn')):>9}"
        )
    targets = []
    for r in rows:
        if r["kernel"].startswith("seer_triton") and "speedup_fwd_vs_flex" in r:
            need = {0.1: (1.25, 1.2), 0.5: (1.1, 1.1)}.get(round(r["density"], 2))
            if need:
                targets.append((f"d={r['density']} fwd vs Flex >= {need[0]}", r["speedup_fwd_vs_flex"] >= need[0]))
                targets.append((f"d={r['density']} f+b vs Flex >= {need[1]}", r["speedup_fwdbwd_vs_flex"] >= need[1]))
        if r["kernel"].startswith("seer_triton") and r["density"] == 1.0:
            targets.append(("d=1.0 fwd <= 1.3x cuDNN", r["fwd_vs_cudnn"] <= 1.3))
            targets.append(("d=1.0 f+b <= 1.3x cuDNN", r["fwdbwd_vs_cudnn"] <= 1.3))
        if r["kernel"].startswith("seer_ground_truth"):
            targets.append((f"{r['kernel']} <= 1.2x cuDNN fwd", r["vs_cudnn_fwd"] <= 1.2))
            targets.append((f"{r['kernel']} extra mem <= 2x map ({r['extra_over_map']:.2f}x)", r["extra_over_map"] <= 2))
    for c in checks:
        targets.append((f"check {c['check']}", c["pass"]))
    print(f"cuDNN dense: fwd {cudnn['fwd_ms']:.3f} ms, f+b {cudnn['fwdbwd_ms']:.3f} ms")
    for name, ok in targets:
        print(f"  [{'PASS' if ok else 'MISS'}] {name}")


if __name__ == "__main__":
    raise SystemExit(main())
