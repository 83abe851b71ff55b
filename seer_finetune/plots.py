"""PNG plots of a run's `metrics.jsonl`, written into `<run>/plots/` at the end of training (`trainer.plots`).

For users without W&B, the figures its dashboard shows:

- `loss.png`: training loss (and the LM loss when an extension adds its own), evaluation loss, and the
  extension's losses (the gate loss summed over layers);
- `eval_ppl.png`: evaluation perplexity over steps, at the trained density and dense, and the relative cost;
- `gate_recall.png`: the gates' recall per layer against the oracle's (the best blocks of the same count), at the
  last evaluation (every row) and over the last training steps (sampled rows), and the mean over layers by step;
- `density.png`: realised density per layer with the spread over heads, and over steps;
- `gate_loss.png`: the gate loss of every layer over the steps, and per layer at the start against the end.

A plot whose metrics the run did not log (a dense run has no gates) is not drawn. matplotlib is optional
(`pip install seer-finetune[plots]`): without it the run warns in one line and writes none. Each file is written
beside its final name and renamed into place, so a crash leaves the old plot or the new one.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .metrics import is_distribution, read_metrics, split_layer_key

PLOTS_DIR = "plots"
# Per-layer training values are averaged over this share of the last logged steps (at least one step).
LAST_SHARE = 0.25


def _warn(text: str) -> None:
    print(f"[seer-finetune] warning: {text}", file=sys.stderr, flush=True)


def write_plots(run_dir: Path, *, warn: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Draw the plots of a run folder's metrics into `<run_dir>/plots/`.

    A failure here never fails the run that called it: it is reported in one warning line.

    Args:
        run_dir: The run folder (holding `metrics.jsonl`).
        warn: Prints a warning line (default: stderr).

    Returns:
        The files written, in the order above; empty without matplotlib or metrics.
    """
    warn = warn or _warn
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warn(f"matplotlib is not installed, so {Path(run_dir) / PLOTS_DIR} gets no plots (pip install 'seer-finetune[plots]')")
        return []
    records = read_metrics(run_dir, warn=warn)
    out_dir = Path(run_dir) / PLOTS_DIR
    written = []
    for name, draw in DRAWINGS:
        try:
            figure = draw(Figure, records)
            if figure is not None:
                written.append(_save(figure, out_dir / name))
        except Exception as exc:  # a plot is a report: its failure must not cost the finished run
            warn(f"could not draw {out_dir / name} ({type(exc).__name__}: {exc})")
    return written


def _save(figure, path: Path) -> Path:
    """Write `figure` as PNG to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# -- reading series -------------------------------------------------------------------------------------------


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the records that hold a finite number for it.

    Args:
        records: `metrics.read_metrics` output.
        key: The metric name.

    Returns:
        Steps and values, in file order.
    """
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def layer_series(records: list[dict[str, Any]], section: str) -> dict[int, tuple[list[int], list[Any]]]:
    """layer -> (steps, values) of a per-layer section (`seer_recall` -> `seer_recall/layer_NN`)."""
    out: dict[int, tuple[list[int], list[Any]]] = {}
    for record in records:
        for key, value in record.items():
            found = split_layer_key(key)
            if found is None or found[0] != section or value is None:
                continue
            steps, values = out.setdefault(found[1], ([], []))
            steps.append(int(record["step"]))
            values.append(value)
    return dict(sorted(out.items()))


def last_per_layer(records: list[dict[str, Any]], section: str, *, share: float = LAST_SHARE) -> dict[int, float]:
    """layer -> mean of a per-layer section over the last `share` of its logged values (at least one)."""
    out = {}
    for layer, (_, values) in layer_series(records, section).items():
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if numbers:
            tail = numbers[-max(1, int(len(numbers) * share)) :]
            out[layer] = sum(tail) / len(tail)
    return out


def final_per_layer(records: list[dict[str, Any]], section: str) -> dict[int, float]:
    """layer -> the last logged finite value of a per-layer section."""
    out = {}
    for layer, (_, values) in layer_series(records, section).items():
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if numbers:
            out[layer] = numbers[-1]
    return out


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (as numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- the plots ------------------------------------------------------------------------------------------------


def _figure(Figure, panels: int):
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.2 * panels, 4.2))
    axes = [figure.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        # Steps and layers are whole numbers.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def plot_loss(Figure, records):
    """Training and evaluation loss over steps; the extension's losses beside them."""
    steps, loss = series(records, "train/loss")
    if not steps:
        return None
    extra = sorted(
        k for r in records for k in r
        if k.startswith("train/") and k.endswith("_loss") and k not in ("train/loss", "train/lm_loss")
    )
    extra = list(dict.fromkeys(extra))
    gate_steps, gate = series(records, "seer/gate_loss")
    figure, axes = _figure(Figure, 2 if extra or gate_steps else 1)
    ax = axes[0]
    ax.plot(steps, loss, label="train loss")
    lm_steps, lm = series(records, "train/lm_loss")
    if lm and lm != loss:
        ax.plot(lm_steps, lm, label="train LM loss")
    eval_steps, eval_loss = series(records, "eval/loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss (nats)", title="loss")
    ax.legend()
    if len(axes) > 1:
        ax = axes[1]
        for key in extra:
            ax.plot(*series(records, key), label=f"{key} (weighted, in the loss)")
        if gate_steps:
            ax.plot(gate_steps, gate, label="gate loss, sum over layers")
        eval_gate = series(records, "eval/seer/gate_loss")
        if eval_gate[0]:
            ax.plot(*eval_gate, "o-", label="eval gate loss (every row)")
        ax.set(xlabel="step", ylabel="loss", title="extension losses")
        ax.legend()
    return figure


def plot_eval_ppl(Figure, records):
    """Evaluation perplexity over steps: trained setting and dense; the relative cost of sparsity."""
    steps, ppl = series(records, "eval/ppl")
    if not steps:
        return None
    dense_steps, dense = series(records, "eval/ppl_dense")
    figure, axes = _figure(Figure, 2 if dense_steps else 1)
    ax = axes[0]
    ax.plot(steps, ppl, "o-", label="at the trained density" if dense_steps else "perplexity")
    if dense_steps:
        ax.plot(dense_steps, dense, "s--", label="dense (density 1.0)")
    ax.set(xlabel="step", ylabel="perplexity", title="evaluation perplexity")
    ax.legend()
    if dense_steps:
        cost_steps, cost = series(records, "eval/sparsity_cost")
        axes[1].plot(cost_steps, [100 * c for c in cost], "o-", color="C3")
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        axes[1].set(xlabel="step", ylabel="% perplexity over dense", title="cost of sparsity")
    return figure


def plot_gate_recall(Figure, records):
    """The gates' recall per layer against the oracle's, and the layer means over steps. A run whose gates learn
    the probe scores (`ground_truth=probe`) logs its training recall against them (`seer_probe_recall`)."""
    probe = not last_per_layer(records, "seer_recall") and bool(last_per_layer(records, "seer_probe_recall"))
    kind, against = ("probe_", ", against the probe scores") if probe else ("", "")
    train_gate = last_per_layer(records, f"seer_{kind}recall")
    train_oracle = last_per_layer(records, f"seer_{kind}oracle_recall")
    eval_gate, eval_oracle = final_per_layer(records, "eval_seer_recall"), final_per_layer(records, "eval_seer_oracle_recall")
    if not (train_gate or eval_gate):
        return None
    figure, axes = _figure(Figure, 2)
    ax = axes[0]
    for values, style, label in (
        (eval_gate, "o-", "gates, last evaluation (every row)"),
        (eval_oracle, "s--", "oracle, last evaluation"),
        (train_gate, "o-", f"gates, last training steps{against or ' (sampled rows)'}"),
        (train_oracle, "s--", f"oracle, last training steps{against}"),
    ):
        if values:
            ax.plot(list(values), list(values.values()), style, label=label, alpha=0.9)
    ax.set(xlabel="layer", ylabel="share of attention in kept blocks", title="gate recall per layer", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, style, label in (
        (f"seer/{kind}recall", "-", f"gates (training{against})"),
        (f"seer/{kind}oracle_recall", "--", f"oracle (training{against})"),
        ("eval/seer/recall", "o-", "gates (evaluation)"),
        ("eval/seer/oracle_recall", "s--", "oracle (evaluation)"),
    ):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label)
    ax.set(xlabel="step", ylabel="recall, mean over layers", title="gate recall over steps", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return figure


def plot_density(Figure, records):
    """Realised density per layer with the spread over heads, and the layer mean over steps.

    Training's values when its attention is sparse, else (gate distillation) the evaluations'."""
    prefix = "" if layer_series(records, "seer_density") else "eval_"
    overview = "seer/" if not prefix else "eval/seer/"
    per_layer = last_per_layer(records, f"{prefix}seer_density")
    if not per_layer:
        return None
    when = "training steps" if not prefix else "evaluations"
    figure, axes = _figure(Figure, 2)
    ax = axes[0]
    heads = {}
    for layer, (_, values) in layer_series(records, f"{prefix}seer_density_heads").items():
        lists = [v for v in values if is_distribution(v) and v]
        if lists:
            heads[layer] = [float(x) for x in lists[-1] if math.isfinite(x)]
    if heads:
        layers = list(heads)
        low = [min(h) for h in heads.values()]
        high = [max(h) for h in heads.values()]
        ax.fill_between(layers, low, high, alpha=0.2, label="heads, min to max (last log)")
        ax.plot(layers, [_quantile(h, 0.5) for h in heads.values()], ":", label="heads, median (last log)")
    ax.plot(list(per_layer), list(per_layer.values()), "o-", label=f"layer mean (last {when})")
    ax.set(xlabel="layer", ylabel="fraction of candidate blocks kept", title="realised density per layer", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax = axes[1]
    steps, mean = series(records, f"{overview}density")
    ax.plot(steps, mean, "o-" if prefix else "-", label="mean over layers")
    low_steps, low = series(records, f"{overview}density_heads_p10")
    high_steps, high = series(records, f"{overview}density_heads_p90")
    if low_steps and low_steps == high_steps:
        ax.fill_between(low_steps, low, high, alpha=0.2, label="heads, 10th to 90th percentile")
    ax.set(xlabel="step", ylabel="realised density", title=f"density over steps ({when})", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return figure


def plot_gate_loss(Figure, records):
    """Every layer's gate loss over steps, and per layer at the start against the end."""
    layers = layer_series(records, "seer_gate_loss")
    if not layers:
        return None
    from matplotlib import colormaps

    figure, axes = _figure(Figure, 2)
    colors = colormaps["viridis"]
    ax = axes[0]
    first, last = {}, {}
    for i, (layer, (steps, values)) in enumerate(layers.items()):
        points = [(s, float(v)) for s, v in zip(steps, values) if isinstance(v, (int, float)) and math.isfinite(v)]
        if not points:
            continue
        ax.plot([s for s, _ in points], [v for _, v in points], color=colors(i / max(1, len(layers) - 1)), linewidth=1)
        share = max(1, int(len(points) * LAST_SHARE))
        first[layer] = sum(v for _, v in points[:share]) / share
        last[layer] = sum(v for _, v in points[-share:]) / share
    ax.set(xlabel="step", ylabel="gate loss", title=f"gate loss per layer (colour: layer 0 to {max(layers)})")
    ax = axes[1]
    ax.plot(list(first), list(first.values()), "o--", label="first steps")
    ax.plot(list(last), list(last.values()), "o-", label="last steps")
    eval_loss = final_per_layer(records, "eval_seer_gate_loss")
    if eval_loss:
        ax.plot(list(eval_loss), list(eval_loss.values()), "s-", label="last evaluation (every row)")
    ax.set(xlabel="layer", ylabel="gate loss", title="gate loss per layer")
    ax.legend(fontsize=8)
    return figure


DRAWINGS = (
    ("loss.png", plot_loss),
    ("eval_ppl.png", plot_eval_ppl),
    ("gate_recall.png", plot_gate_recall),
    ("density.png", plot_density),
    ("gate_loss.png", plot_gate_loss),
)
