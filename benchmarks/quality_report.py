"""The report of `bench_quality.py`: each run's training cost, the markdown table and the PNG plots."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from seer_finetune.metrics import read_metrics

def training_cost(
    dirs: dict[str, Path], alone: dict[str, float] | None = None, inits: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Per training run: optimizer steps, training seconds (the sum of its step times), median tokens/s and the
    peak GPU memory of its steps (`peak_memory_gib`, GiB; None off CUDA).

    A run with a gate-only stage (`attention.init_steps`) counts that stage's steps and seconds too
    (`gate_stage_steps`, `gate_stage_s`); `train_s` and the peak include them.

    Args:
        dirs: each run's folder.
        alone: seconds per step of each run timed alone (`bench_quality.step_times_alone`), or None. With them,
            `step_s_alone` and `recipe_s_alone`: the run's steps (its gate-only stage's counted at its joint
            step's time, an upper bound) plus, for a sparse run, its gate initialisation's (`inits`), at those
            times; and `recipe_vs_dense`, that against the dense run's steps at the dense step's time. A run
            timed as None (its timing failed) gets None for the figures that need it.
        inits: each sparse run's gate initialisation run.
    """
    def steps(folder: Path) -> list[dict]:
        return [r for r in read_metrics(folder) if "train/step_time_s" in r] if (folder / "metrics.jsonl").is_file() else []

    cost = {}
    for run, folder in dirs.items():
        main, stage = steps(folder), steps(folder / "gate_init")
        speeds = [r["train/tokens_per_s"] for r in main][1:]
        peaks = [r["train/peak_memory_gib"] for r in main + stage if r.get("train/peak_memory_gib") is not None]
        cost[run] = {
            "steps": len(main),
            "gate_stage_steps": len(stage),
            "gate_stage_s": sum(r["train/step_time_s"] for r in stage),
            "train_s": sum(r["train/step_time_s"] for r in main + stage),
            "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
            "peak_memory_gib": max(peaks) if peaks else None,
        }
    if alone:
        for run, c in cost.items():
            c["step_s_alone"] = alone.get(run)
            step_s = c["step_s_alone"]
            c["recipe_s_alone"] = None if step_s is None else (c["steps"] + c["gate_stage_steps"]) * step_s
        for run, init in (inits or {}).items():
            own, other = cost[run]["recipe_s_alone"], cost[init]["recipe_s_alone"]
            cost[run]["recipe_s_alone"] = None if own is None or other is None else own + other
        dense = cost["dense"]["recipe_s_alone"]
        for run, c in cost.items():
            c["recipe_vs_dense"] = None if c["recipe_s_alone"] is None or not dense else c["recipe_s_alone"] / dense
    return cost


def table(rows: list[dict[str, Any]], cost: dict[str, dict[str, float]], seq_len: int, jobs: int = 1) -> str:
    """The markdown table of `rows` (perplexity relative to the dense run at `seq_len`) and the training cost.

    Args:
        rows: `evaluate_all`'s rows.
        cost: `training_cost`'s figures per run.
        seq_len: the target length.
        jobs: how many runs trained at once (above 1 their times are not comparable and are not reported).
    """
    dense = next(r for r in rows if r["run"].startswith("dense"))
    lines = [
        "| run | length | target sparsity | realised sparsity | ppl books | vs dense | ppl technical | vs dense "
        "| recall (best) | recall books / technical (best) | passkey 1/4, 1/2, full [95% interval] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = lambda fam: "" if r["length"] != seq_len else f"{100 * (r[f'ppl_{fam}'] / dense[f'ppl_{fam}'] - 1):+.2f}%"
        passkey = "; ".join(
            f"{p['accuracy']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]" for p in r["passkey"].values()
        ) if "passkey" in r else "-"
        recall = f"{r['recall']:.3f} ({r['oracle_recall']:.3f})" if r.get("recall") is not None else "-"
        by_family = (
            f"{r['recall_books']:.3f} / {r['recall_technical']:.3f} "
            f"({r['oracle_recall_books']:.3f} / {r['oracle_recall_technical']:.3f})"
            if r.get("recall_books") is not None else "-"
        )
        lines.append(
            f"| {r['run']} | {r['length']} | {r['target_sparsity']:.2f} | {r['realised_sparsity']:.3f} | "
            f"{r['ppl_books']:.3f} | {rel('books')} | {r['ppl_technical']:.3f} | {rel('technical')} | {recall} "
            f"| {by_family} | {passkey} |"
        )
    passkey_runs = [r for r in rows if "passkey" in r]
    if passkey_runs:
        trials = next(iter(passkey_runs[0]["passkey"].values()))["trials"]
        lines += ["", f"Passkey: {trials} trials per length, needle depths 0.1 to 0.9, teacher-forced greedy answer."]
    timed = all("recipe_vs_dense" in c for c in cost.values())
    lines += ["", "| training run | steps | gate-only steps at the target length | training time vs dense | peak GPU memory "
              + ("| step alone | recipe GPU time vs dense (gate initialisation included) |" if timed else "|"),
              "|---|---|---|---|---|" + ("---|---|" if timed else "")]
    dense_s = cost["dense"]["train_s"]
    for run, c in cost.items():
        vs = "not comparable (runs shared the GPU)" if jobs > 1 else f"{c['train_s'] / dense_s:.2f}x"
        stage = c["gate_stage_steps"] if not run.startswith("gate_init") else "-"
        peak = "-" if c.get("peak_memory_gib") is None else f"{c['peak_memory_gib']:.1f} GiB"
        line = f"| {run} | {c['steps']} | {stage} | {vs} | {peak} |"
        if timed:
            figure = lambda value, text: "failed" if value is None else text.format(value)
            recipe = "-" if run.startswith("gate_init") else figure(c["recipe_vs_dense"], "{:.2f}x")
            line += f" {figure(c['step_s_alone'], '{:.3f} s')} | {recipe} |"
        lines.append(line)
    if timed:
        lines += ["", "Step alone: median of a few steps of the run's configuration timed with the device to itself after "
                  "training (`--time-steps`). Recipe: the run's steps and its gate initialisation's at those times; "
                  "gate-only steps at the target length are counted at the joint step's time (an upper bound)."]
    if jobs == 1 and "sparsity90" in cost:
        dense, sparse = cost["dense"]["tokens_per_s"], cost["sparsity90"]["tokens_per_s"]
        if math.isnan(dense) or math.isnan(sparse):
            # The first step (compilation, allocation) is left out of the median: one step gives none.
            lines += ["", f"Training throughput at {seq_len} tokens: not measured (each run needs 2 or more steps)."]
        else:
            lines += ["", f"Training throughput at {seq_len} tokens: dense {dense:.0f} tokens/s, 90% sparsity "
                      f"{sparse:.0f} tokens/s ({sparse / dense:.2f}x)."]
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], dirs: dict[str, Path], out: Path, families=("books", "technical")) -> list[Path]:
    """Write the three PNG plots under `out` and return their paths.

    Args:
        rows: `evaluate_all`'s rows.
        dirs: each training run's folder (its `metrics.jsonl` gives the loss curves).
        out: the invocation's output folder.
        families: the evaluation families (each row's `ppl_<family>`). Default books and technical.

    Returns:
        Paths of `ppl_vs_sparsity.png`, `loss_curves.png` and `density_per_layer.png`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # Perplexity relative to the dense YaRN baseline, so that both families share one axis; the oracle rows
    # (same weights, blocks ranked by the true attention) bound what a better gate could reach.
    dense = next(r for r in rows if r["run"].startswith("dense"))
    # Rows evaluated under the other budget than the run trained with are in the table only.
    # Only the runs of `--sparsities` make the curve (not the other-budget rows, nor `--variant` runs).
    trained = [r for r in rows if re.fullmatch(r"seer joint, \d+% sparsity(, oracle selection)?", r["run"])]
    gated = [dense, *(r for r in trained if "oracle" not in r["run"])]
    oracle = [dense, *(r for r in trained if "oracle" in r["run"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, family in enumerate(families):
        for series, style, label in ((gated, "o-", "gate"), (oracle, "s--", "oracle selection")):
            if len(series) < 2:
                continue
            xs = [r["realised_sparsity"] for r in series]
            ys = [100 * (r[f"ppl_{family}"] / dense[f"ppl_{family}"] - 1) for r in series]
            ax.plot(xs, ys, style, color=f"C{i}", label=f"{family}, {label}")
    ax.plot([0.5, 0.9], [0.5, 3.0], "k*", markersize=10, label="targets (+0.5%, +3%)")
    ax.set_xlabel("realised sparsity")
    ax.set_ylabel("perplexity vs dense YaRN (%)")
    ax.set_title("perplexity increase against sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "ppl_vs_sparsity.png")
    fig.savefig(made[-1], dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for run, run_dir in dirs.items():
        records = [r for r in read_metrics(run_dir) if "train/lm_loss" in r]
        steps = [r["step"] for r in records]
        if not run.startswith("gate_init"):
            axes[0].plot(steps, [r["train/lm_loss"] for r in records], label=run)
        gate = [r.get("seer/gate_loss") for r in records]
        if any(g is not None for g in gate):
            axes[1].plot(steps, gate, label=run)
    axes[0].set_title("LM loss")
    axes[1].set_title("gate loss (KL, summed over layers)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    made.append(out / "loss_curves.png")
    fig.savefig(made[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        if "realised_density_per_layer" in r and r in trained and "oracle" not in r["run"]:
            ax.plot(r["realised_density_per_layer"], "o-", label=r["run"])
    ax.set_xlabel("layer")
    ax.set_ylabel("realised density")
    ax.set_title("realised density per layer (evaluation)")
    ax.legend()
    fig.tight_layout()
    made.append(out / "density_per_layer.png")
    fig.savefig(made[-1], dpi=120)
    plt.close("all")
    return made
