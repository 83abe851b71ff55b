"""Scale-out runs on one multi-GPU node through the project's own launcher path (torchrun + DeepSpeed).

Runs, each a separate `python -m seer_finetune train` over all local GPUs, and reports tokens/s and peak memory
per GPU from each run's metrics.jsonl:
  1. ZeRO-3, a 1B-class Llama architecture (random weights), YaRN 8k -> 32k, `yarn32k_sparsity90` joint training;
  2. the same model at 64k tokens (YaRN x8), dense attention, without sequence parallelism;
  3. the same 64k run with DeepSpeed-Ulysses degree = number of GPUs.
A run that fails with CUDA out-of-memory is recorded as such (that is the point of run 2).

    python benchmarks/bench_scale_out.py --out DIR [--gpus 2] [--steps 3] [--model builtin:llama3_1b_arch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "model.tokenizer=builtin:tiny_llama",
    "data=embedded_shakespeare",
    "data.eval_documents=0",
    "trainer.eval_before=false",
    "trainer.save_final=false",
    "trainer.save_every=0",
    "trainer.micro_batch_size=1",
    "trainer.grad_accum_steps=1",
    "trainer.progress_bar=false",
    "trainer.resume=false",
    "trainer.overwrite=true",  # each invocation starts its runs over (the previous ones move to previous_N/)
    "logger=jsonl",
    "deepspeed=zero3",
]


def runs(model: str, native: int, short_len: int, long_len: int) -> dict[str, list[str]]:
    """The three runs' Hydra overrides by run name (`GPUS` stands for the number of GPUs).

    Args:
        model: `model.name_or_path` of every run.
        native: the model's trained context, in tokens.
        short_len: length of the seer run.
        long_len: length of the two dense runs.
    """
    model_args = [f"model.name_or_path={model}", f"rope.original_max_position_embeddings={native}"]
    long_common = [*model_args, f"rope.factor={long_len // native}", f"data.seq_len={long_len}", "model.gradient_checkpointing=false"]
    return {
        f"zero3 {short_len // 1024}k yarn32k_sparsity90": [
            "+exp=yarn32k_sparsity90", "attention.init_steps=0", "attention.gates_path=null", *model_args,
            f"rope.factor={short_len // native}", f"data.seq_len={short_len}", "model.gradient_checkpointing=true",
        ],
        f"zero3 {long_len // 1024}k dense, no sequence parallelism": ["+exp=yarn32k_dense", *long_common],
        f"zero3 {long_len // 1024}k dense, Ulysses": ["+exp=yarn32k_dense", *long_common, "deepspeed.sequence_parallel_size=GPUS"],
    }


def launch(name: str, overrides: list[str], gpus: int, steps: int, out: Path) -> dict:
    """Train one run with torchrun over `gpus` local GPUs; its log goes to `out/<run>.log`.

    Returns:
        The run's record: name, overrides, return code, wall time and status ("ok", "out of memory", "failed");
        when ok also losses, median tokens/s and step time after the first step, rank 0's peak memory and the
        last realised density.
    """
    run_dir = out / name.replace(" ", "_").replace(",", "")
    overrides = [o.replace("GPUS", str(gpus)) for o in overrides]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "--master_port=29555",
        "-m", "seer_finetune", "train", *overrides, *COMMON, f"trainer.max_steps={steps}", f"trainer.output_dir={run_dir}",
    ]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / f"{run_dir.name}.log").write_text(" ".join(cmd) + "\n\n" + log[-200_000:])
    result = {"run": name, "overrides": overrides, "returncode": proc.returncode, "wall_s": time.time() - started}
    if proc.returncode != 0:
        result["status"] = "out of memory" if "out of memory" in log.lower() else "failed"
        return result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    timed = train[1:] or train  # the first step compiles kernels
    result.update(
        status="ok",
        steps=len(train),
        losses=[r["train/loss"] for r in train],
        tokens_per_s=statistics.median(r["train/tokens_per_s"] for r in timed),
        step_s=statistics.median(r["train/step_time_s"] for r in timed),
        peak_memory_gib_rank0=max(r.get("train/peak_memory_gib", 0.0) for r in train),
        density=train[-1].get("seer/density"),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the chosen runs one after the other, rewriting `--out`/scale_out.json after each, and print a table.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="builtin:llama3_1b_arch")
    parser.add_argument("--native-len", type=int, default=8192, help="the model's trained context")
    parser.add_argument("--short-len", type=int, default=32768)
    parser.add_argument("--long-len", type=int, default=65536)
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, overrides in runs(args.model, args.native_len, args.short_len, args.long_len).items():
        if args.only and args.only not in name:
            continue
        results.append(launch(name, overrides, args.gpus, args.steps, args.out))
        (args.out / "scale_out.json").write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'run':45s} {'status':14s} {'tok/s':>9s} {'step s':>8s} {'peak GiB/GPU':>13s}")
    for r in results:
        print(f"{r['run']:45s} {r['status']:14s} {r.get('tokens_per_s', float('nan')):9.0f} {r.get('step_s', float('nan')):8.2f} {r.get('peak_memory_gib_rank0', float('nan')):13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
