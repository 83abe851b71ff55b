"""One long-context joint training step on the GPU: SeerAttention at 90% sparsity against the dense YaRN baseline.

Both runs use the project's trainer end to end with a recipe's experiments (LoRA, gradient checkpointing, the
fused loss), on a built-in architecture with random weights (`--shape`): SmolLM2-135M's (`yarn32k_*`, 8k -> 32k,
block 64) or Qwen2.5-1.5B's (`yarn128k_*`, 32k -> 128k, block 128; the memory and speed side of the 1.5B recipe),
fed with the embedded corpus. For each variant: median step time over a few steps, then one profiled step
whose GPU kernel time is split into attention (dense SDPA kernels, or this project's block-sparse forward /
backward and ground-truth kernels) and everything else; GPU busy is that kernel time over the step's wall time.
Eager seer variants profile one more step with the host side on, whose kernels are split by the seer steps that
launched them (`seer.attention.STAGES`: gate, probe, selection, attention, ground truth, gate loss, ...); a graph
replay hides that split, so graphed variants have none.
Every variant runs with the same `model.fused_kernels` (`--fused-kernels`: Liger-Kernel's RMSNorm, SwiGLU and
RoPE, or transformers' own modules). Liger patches RoPE for a whole modeling module, so compare the two settings
across two processes (two runs of this script), not within one. Prints a table and writes JSON.

    python benchmarks/bench_training_step.py --out benchmarks/results/training_step.json [--shape smollm2|qwen1.5b]
        [--steps 3] [--seq-len N] [--fused-kernels auto|liger|none] [--only TEXT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from seer_finetune.compose import compose_config  # noqa: E402
from seer_finetune.modeling import base_model  # noqa: E402
from seer_finetune.seer.attention import STAGES  # noqa: E402
from seer_finetune.trainer import GRAPH_AFTER_STEPS, Trainer  # noqa: E402

# Kernel-name patterns of attention work: PyTorch's SDPA backends, and seer_kernels' Triton kernels.
ATTENTION_KERNELS = re.compile(r"flash|fmha|sdpa|cudnn.*(attn|attention|sdpa)|_sparse_fwd|_sparse_dq|_sparse_dkdv|_dkdv_work|_bwd_delta|_block_lists|_ground_truth|_lse_", re.I)
GROUND_TRUTH_KERNELS = re.compile(r"_ground_truth|_lse_", re.I)
# The longest kernels outside attention each variant records (the rest only count in gpu_ms).
OTHER_KERNELS = 80

# Per model shape: the built-in architecture (random weights), the default length, and the experiments whose
# recipe the dense and seer variants run (YaRN 8k -> 32k on SmolLM2-135M; 32k -> 128k on Qwen2.5-1.5B, block 128).
SHAPES = {
    "smollm2": ("builtin:smollm2_135m_arch", 32768, "yarn32k_dense", "yarn32k_sparsity90"),
    "qwen1.5b": ("builtin:qwen2_5_1_5b_arch", 131072, "yarn128k_dense", "yarn128k_sparsity90"),
}


def variants(shape: str) -> dict[str, list[str]]:
    """The variants of `shape`, dense first: name -> the Hydra overrides that make it."""
    _, _, dense_exp, seer_exp = SHAPES[shape]
    seer = [f"+exp={seer_exp}", "attention.init_steps=0", "attention.gates_path=null"]
    token_gate = ["attention.gate_query=token_prob_max", "attention.q_pooling=[avg]", "attention.gate_weight_init=uniform"]
    return {
        "dense (YaRN baseline, SDPA)": [f"+exp={dense_exp}"],
        "seer joint, density 0.1": seer,
        # Forward and backward replayed from a CUDA graph (`trainer.cuda_graphs`), both models; the loss is then
        # the capturable one (Liger's reads the device back).
        "dense (YaRN baseline, SDPA), CUDA graphs": [f"+exp={dense_exp}", "trainer.cuda_graphs=true"],
        "seer joint, density 0.1, CUDA graphs": [*seer, "trainer.cuda_graphs=true"],
        # The LoRA products in float32 (peft's precision without autocast), both models: what the default's
        # bfloat16 products save.
        "dense (YaRN baseline, SDPA), CUDA graphs, LoRA products in float32": [
            f"+exp={dense_exp}", "trainer.cuda_graphs=true", "peft.lora_compute=float32"],
        "seer joint, density 0.1, CUDA graphs, LoRA products in float32": [
            *seer, "trainer.cuda_graphs=true", "peft.lora_compute=float32"],
        # The layer budget's ranking keys from one fused Triton kernel (`seer_kernels.selection_ranking_keys`)
        # instead of PyTorch's row-wise top-k, sort and scatters: opt-in through `attention.kernel=triton`.
        "seer joint, density 0.1, CUDA graphs, fused selection": [*seer, "trainer.cuda_graphs=true",
                                                                 "attention.kernel=triton"],
        # What the 90% experiment's block per row by the logit bound costs, in the step that shows GPU time.
        "seer joint, density 0.1, CUDA graphs, no bound blocks": [*seer, "trainer.cuda_graphs=true",
                                                                 "attention.bound_blocks=0"],
        # What the 90% experiment's probe picks (their fused kernel) cost.
        "seer joint, density 0.1, CUDA graphs, no probe picks": [*seer, "trainer.cuda_graphs=true",
                                                                "attention.probe_blocks=0"],
        # The exact ground truth (a pass of its own per layer on a quarter of the query blocks) instead of the
        # 90% experiment's probe scores; and on an eighth of the query blocks.
        "seer joint, density 0.1, CUDA graphs, exact ground truth": [
            *seer, "trainer.cuda_graphs=true", "attention.ground_truth=exact"],
        "seer joint, density 0.1, CUDA graphs, exact ground truth on 1/8 of the rows": [
            *seer, "trainer.cuda_graphs=true", "attention.ground_truth=exact", "attention.ground_truth_query_fraction=0.125"],
        # The gate path (pooling to log-probabilities, gate loss) eager: compiled by default in CUDA training.
        "seer joint, density 0.1, eager gate path": [*seer, "attention.compile_gate=false"],
        # Per-row quotas instead of the layer budget (seer_joint's default): same number of blocks, spread evenly
        # (the rows' first picks by mass, which yarn32k_sparsity90 sets, belong to the layer budget).
        "seer joint, density 0.1, row budget": [*seer, "attention.budget=row", "attention.row_mass=0.0"],
        # The exact ground truth on half the query blocks (seer_joint's default is a quarter): twice its cost.
        "seer joint, density 0.1, exact ground truth on 1/2 of the rows": [
            *seer, "attention.ground_truth=exact", "attention.ground_truth_query_fraction=0.5"],
        # Gates that score every query token against the pooled key blocks: the chunked PyTorch path in training
        # (`auto`), and the fused token-gate kernel with its backward (opt-in: `attention.kernel=triton`). A token's
        # query is not pooled, so the logit-bound gate of yarn32k_sparsity90 (pooled mean and |mean|) gives way.
        "seer joint, density 0.1, token-scored gate": [*seer, *token_gate],
        "seer joint, density 0.1, token-scored gate, fused kernel": [*seer, *token_gate, "attention.kernel=triton"],
    }


def overrides(shape: str, seq_len: int, out_dir: Path) -> list[str]:
    """Hydra overrides every variant shares: the architecture of `shape`, the embedded corpus at `seq_len` tokens,
    one sequence per step, nothing saved, metrics to `out_dir`."""
    return [
        f"model.name_or_path={SHAPES[shape][0]}",
        "model.tokenizer=builtin:tiny_llama",
        "data=embedded_shakespeare",
        f"data.seq_len={seq_len}",
        "data.eval_documents=0",
        "trainer.eval_before=false",
        "trainer.save_final=false",
        "trainer.save_every=0",
        "trainer.grad_accum_steps=1",
        "trainer.micro_batch_size=1",
        "trainer.progress_bar=false",
        "trainer.resume=false",
        "logger=jsonl",
        f"trainer.output_dir={out_dir}",
    ]


def profile_step(trainer: Trainer) -> dict[str, float]:
    """Profile one `trainer.train_step()` on the GPU.

    Returns:
        Kernel time of the step in ms (`gpu_ms`), of its attention kernels (`attention_ms`) and of those the
        ground truth (`ground_truth_ms`), the number of kernel launches, each attention kernel's ms and
        launches, longest first (`attention_kernels`), and the `OTHER_KERNELS` longest of the rest
        (`other_kernels`: where the work outside attention goes).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    total = attention = ground_truth = 0.0
    launches = 0
    per_kernel, others = [], []
    for event in prof.key_averages():
        t = event.self_device_time_total / 1e3  # us -> ms; self time: kernels only, not their CPU-side parents
        if t <= 0:
            continue
        launches += event.count
        total += t
        if ATTENTION_KERNELS.search(event.key):
            per_kernel.append({"kernel": event.key[:120], "ms": t, "launches": event.count})
            attention += t
            if GROUND_TRUTH_KERNELS.search(event.key):
                ground_truth += t
        else:
            others.append({"kernel": event.key[:120], "ms": t, "launches": event.count})
    per_kernel.sort(key=lambda r: -r["ms"])
    others.sort(key=lambda r: -r["ms"])
    return {"gpu_ms": total, "attention_ms": attention, "ground_truth_ms": ground_truth, "kernel_launches": launches,
            "attention_kernels": per_kernel, "other_kernels": others[:OTHER_KERNELS]}


def stage_split(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Profile one `trainer.train_step()` with the host side on and split its kernel time by the seer step that
    launched it (the `seer.<stage>` ranges of `seer.attention`). Only what a layer's forward (and its checkpoint's
    recomputation) launches: the attention's backward runs outside them, in the attention kernels' time.

    Returns:
        {stage: {"ms": kernel time on the GPU (on a CPU-only run: host time), "calls": ranges}} for the stages
        that ran; empty for a model without seer attention.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    split = {}
    for event in prof.key_averages():
        stage = event.key.removeprefix("seer.")
        # The host-side range: its device time is its kernels' (the GPU-side copy of a range spans its idle gaps).
        host_side = event.device_type == torch.autograd.DeviceType.CPU
        if host_side and event.key.startswith("seer.") and stage in STAGES:
            us = event.device_time_total if cuda else event.cpu_time_total
            split[stage] = {"ms": us / 1e3, "calls": event.count}
    return dict(sorted(split.items(), key=lambda item: STAGES.index(item[0])))


def run_variant(name: str, extra: list[str], shape: str, seq_len: int, steps: int, workdir: Path) -> dict:
    """Build a trainer with `extra` overrides, warm it up for 2 steps, time `steps` steps, profile one more.

    Returns:
        The variant's record: median step ms, tokens/s, peak memory, last loss and density, and
        `profile_step`'s fields.
    """
    cfg = compose_config([*extra, *overrides(shape, seq_len, workdir / re.sub(r"\W+", "_", name))])
    trainer = Trainer(cfg)
    # Compile kernels, warm the allocator; with CUDA graphs also the step that captures.
    for _ in range(GRAPH_AFTER_STEPS + 1 if cfg.trainer.cuda_graphs else 2):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        metrics = trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "variant": name,
        "overrides": extra,
        "step_ms": 1e3 * statistics.median(times),
        "tokens_per_s": seq_len / statistics.median(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": metrics["train/loss"],
        "density": metrics.get("seer/density"),
        "fused_kernels": getattr(base_model(trainer.model), "seer_fused_kernels", "none"),
    }
    result.update(profile_step(trainer))
    result["gpu_busy"] = result["gpu_ms"] / result["step_ms"]
    if cfg.attention.backend == "seer" and not cfg.trainer.cuda_graphs:
        result["seer_stages"] = stage_split(trainer)
    del trainer
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    """Time the dense variant and those `--only` selects, print the table, write `--out`.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0, or 2 without a CUDA GPU.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                        help="model architecture and recipe (default smollm2: SmolLM2-135M, 8k -> 32k)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per step (default: the recipe's length)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default="", help="run only the variants whose name this regular expression finds "
                        "(re.search; e.g. 'density 0.1$' for the plain seer step); dense always runs")
    parser.add_argument("--fused-kernels", choices=("auto", "liger", "none"), default="auto",
                        help="model.fused_kernels of every variant (default auto: Liger on CUDA)")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or SHAPES[args.shape][1]
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        chosen = {n: e for i, (n, e) in enumerate(variants(args.shape).items()) if i == 0 or re.search(args.only, n)}
        shared = [f"model.fused_kernels={args.fused_kernels}"]
        results = [
            run_variant(name, [*extra, *shared], args.shape, args.seq_len, args.steps, Path(tmp))
            for name, extra in chosen.items()
        ]
    from bench_quality import host_loop_ms, package_versions

    dense, host_ms = results[0], host_loop_ms()
    print(
        f"\ntraining step, {torch.cuda.get_device_name()}, seq_len {args.seq_len}, {args.shape} architecture ({SHAPES[args.shape][0]}), "
        f"fused kernels outside attention: {dense['fused_kernels']} (model.fused_kernels={args.fused_kernels}); "
        f"host: a 2M-iteration Python loop in {host_ms:.0f} ms"
    )
    print(f"{'variant':40s} {'step ms':>9s} {'vs dense':>9s} {'tok/s':>9s} {'attn ms':>9s} {'(gt ms)':>8s} {'GPU ms':>9s} {'GPU busy':>9s} {'kernels':>8s} {'peak GiB':>9s} {'attn vs dense':>14s}")
    for r in results:
        print(
            f"{r['variant']:40s} {r['step_ms']:9.1f} {r['step_ms'] / dense['step_ms']:8.3f}x {r['tokens_per_s']:9.0f} "
            f"{r['attention_ms']:9.2f} {r['ground_truth_ms']:8.2f} {r['gpu_ms']:9.1f} {100 * r['gpu_busy']:8.1f}% "
            f"{r['kernel_launches']:8d} {r['peak_memory_gib']:9.2f} {dense['attention_ms'] / max(r['attention_ms'], 1e-9):13.2f}x"
        )
    for r in results[1:]:
        print(f"\n{r['variant']}: attention kernels of the profiled step")
        for k in r["attention_kernels"][:12]:
            print(f"  {k['ms']:8.2f} ms {k['launches']:6d} x  {k['kernel'][:90]}")
    for r in results:
        if r.get("seer_stages"):
            cells = ", ".join(f"{k} {v['ms']:.1f}" for k, v in r["seer_stages"].items())
            print(f"\n{r['variant']}: GPU ms by seer step (one more profiled step): {cells}")
    for r in results:
        print(f"\n{r['variant']}: outside attention {r['gpu_ms'] - r['attention_ms']:.1f} ms, longest kernels")
        for k in r["other_kernels"][:10]:
            print(f"  {k['ms']:8.2f} ms {k['launches']:6d} x  {k['kernel'][:90]}")
    if args.out:
        meta = {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "versions": package_versions(),
            "fused_kernels": args.fused_kernels,
            "host_loop_ms": host_ms,
            "command": "python benchmarks/bench_training_step.py " + " ".join(argv or sys.argv[1:]),
        }
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
