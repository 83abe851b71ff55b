"""The paper's YaRN + SeerAttention experiment end to end, on one GPU, as one command.

Given a base model trained at `--native` tokens (SmolLM2-135M: 8k; Qwen2.5-Coder-1.5B: 32k) and the corpora of
`../shared/data/get_corpora.sh`, it runs, with the same data, steps and learning rate:
  (a) the base model at its native length and, YaRN-scaled without training, at the target length;
  (b) dense YaRN fine-tuning at the target length (`+exp=<prefix>_dense`, `--exp-prefix`: yarn32k, yarn128k);
  (c) gate distillation at the native length with the base frozen (`--gate-init-exp`: gate_init8k,
      gate_init32k), then joint YaRN fine-tuning from those gates at each of `--sparsities`
      (`+exp=<prefix>_sparsity<NN>`: 50%, 90%, 95%), and any `--variant` (a sparse run with extra overrides,
      e.g. a gate-only stage at the target length).
Each is evaluated at the target length on two held-out families ("books": austen + shakespeare; "technical":
hol_light) at its trained sparsity, with realised sparsity and the gate's recall of the true attention, also
with oracle selection (blocks ranked by the true attention); passkey retrieval at 1/4, 1/2 and all of the target
length, with 95% intervals and per layer whether the needle's block was kept; the training time of every run
against the dense one, its peak GPU memory, and dense against 90% tokens/s; and, from a few steps of every run
timed alone after training (`--time-steps`), the GPU time of each sparse recipe (its gate initialisation
included) against the dense run's. Every perplexity uses the trainer's
loss (`lm_loss.CausalLMLoss`, `auto`): at 128k over a 151k vocabulary no evaluation holds the full logits.
Writes `results.json`, `results.md` (the table) and PNG plots (perplexity against
sparsity, LM and gate loss curves, realised density per layer) under `--out`, and logs every training run to
W&B (offline by default). `--jobs N` trains N runs at once (on a GPU the small model leaves room for).
Stages whose outputs exist are reused, so an interrupted invocation continues where it stopped.

    python benchmarks/bench_quality.py --model ~/.cache/seer-data/models/hf/smollm2-135m \
        --corpora ~/.cache/seer-data/corpora --out runs/quality
    python benchmarks/bench_quality.py --model ~/.cache/seer-data/models/hf/qwen2.5-coder-1.5b \
        --corpora ~/.cache/seer-data/corpora --out runs/quality128k --native 32768 --seq-len 131072 \
        --exp-prefix yarn128k --gate-init-exp gate_init32k --sparsities 0.5 0.9 --no-other-budget
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]

from seer_finetune.compose import compose_config  # noqa: E402
from seer_finetune.config import ConfigError  # noqa: E402

from quality_report import plots, table, training_cost  # noqa: E402

TRAIN_CORPORA = ("spurgeon_treasury_of_david", "bible_web", "acl2", "coq", "linux")
EVAL_FAMILIES = {"books": ("austen", "shakespeare"), "technical": ("hol_light",)}
# Each trained sparsity has its experiment, conf/exp/yarn32k_sparsity<NN>.yaml.
SPARSITIES = (0.5, 0.9, 0.95)
# Per-layer statistics of a sparse evaluation (realised density, recall of the ground truth, and the best recall
# of a selection of the same size).
LAYER_STATS = ("density", "recall", "oracle_recall")


def stage_data(corpora: Path, out: Path, train_mb: float, eval_mb: float = math.inf, min_eval_bytes: int = 0) -> dict[str, Path]:
    """Symlink the corpora's files into one training folder and one folder per evaluation family.

    At most `train_mb` MB of files are taken from each training corpus and `eval_mb` MB from each evaluation
    corpus (files in sorted order; evaluation files smaller than `min_eval_bytes`, too short for one window, are
    skipped), so tokenising stays proportional to what is read. Evaluation corpora are never linked into the
    training folder.
    """
    txt = corpora / "txt"
    folders = {"train": out / "data" / "train", **{f: out / "data" / f for f in EVAL_FAMILIES}}
    for name, sources in [("train", TRAIN_CORPORA), *EVAL_FAMILIES.items()]:
        dest = folders[name]
        if dest.is_dir() and any(dest.rglob("*")):
            continue
        for source in sources:
            if not (txt / source).is_dir():
                raise ConfigError(f"corpus {txt / source} is missing: run ../shared/data/get_corpora.sh")
            budget = (train_mb if name == "train" else eval_mb) * 1e6
            for path in sorted(p for p in (txt / source).rglob("*") if p.is_file()):
                if budget <= 0:
                    break
                if name != "train" and path.stat().st_size < min_eval_bytes:
                    continue
                link = dest / source / path.relative_to(txt / source)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
                budget -= path.stat().st_size
    return folders


def common_overrides(args, folders: dict[str, Path], run: str, seq_len: int) -> list[str]:
    """Hydra overrides every training run of one invocation shares: model, data, lengths, optimiser, logging.

    Args:
        args: the parsed options.
        folders: `stage_data`'s folders ("train", "books", "technical").
        run: the run's name (output folder and W&B run name).
        seq_len: training length in tokens.

    Returns:
        The overrides, `args.override` last so that the command line wins.
    """
    return [
        f"model.name_or_path={args.model}",
        f"data.source={folders['train']}",
        f"data.eval_source={folders['books']}",
        f"data.seq_len={seq_len}",
        f"data.max_eval_sequences={args.train_eval_windows}",
        f"data.num_proc={args.num_proc}",
        f"rope.original_max_position_embeddings={args.native}",
        f"optim.lr={args.lr}",
        f"trainer.max_steps={args.steps}",
        f"trainer.grad_accum_steps={args.grad_accum}",
        f"trainer.save_every={args.save_every}",
        "trainer.progress_bar=false",
        f"trainer.output_dir={args.out / 'runs' / run}",
        f"logger={'wandb_offline' if args.wandb == 'offline' else 'wandb' if args.wandb == 'online' else 'jsonl'}",
        "logger.project=seer-finetune-quality",
        f"logger.run_name={run}",
        *args.override,
    ]


def sparse_runs(args) -> dict[str, float]:
    """Density of each trained sparse run: `sparsity<NN>` for `--sparsities`, then each `--variant` (the density of
    its base, `sparsity<NN>`)."""
    runs = {f"sparsity{round(100 * s)}": round(1.0 - s, 6) for s in args.sparsities}
    for name, base, *_ in args.variant:
        match = re.fullmatch(r"sparsity(\d{1,2})", base)
        if not match:
            raise SystemExit(f"--variant {name}: its base run must be sparsity<NN> (e.g. sparsity90), not {base!r}")
        # A base need not be trained itself (not in --sparsities): it names the experiment and the density.
        runs[name] = round(1.0 - int(match.group(1)) / 100, 6)
    return runs


# Settings that change the gate's parameters or what they compute (gates initialised under other values are
# refused), and how fresh gates start: a sparse run whose experiment or variant sets any of them apart from the
# gate initialisation experiment gets a gate initialisation run of its own with those values.
GATE_SHAPE_FIELDS = (
    "attention.gate_hidden_size", "attention.q_pooling", "attention.k_pooling", "attention.block_size",
    "attention.gate_rope_units", "attention.gate_rope_fraction", "attention.gate_query", "attention.gate_weight_init",
)


def gate_fields(overrides: list[str]) -> dict[str, Any]:
    """The `GATE_SHAPE_FIELDS` values of the configuration composed from `overrides`."""
    attention = compose_config(overrides).attention
    return {field: getattr(attention, field.split(".", 1)[1]) for field in GATE_SHAPE_FIELDS}


def gate_shape(overrides: list[str], reference: dict[str, Any]) -> tuple[str, ...]:
    """Hydra overrides that give a gate initialisation the gate of the run composed from `overrides`: one per
    `GATE_SHAPE_FIELDS` value that differs from `reference` (`gate_fields` of the initialisation experiment)."""
    def written(value: Any) -> str:
        return str(value) if isinstance(value, (str, int, float)) else f"[{','.join(map(str, value))}]"

    return tuple(f"{field}={written(value)}" for field, value in gate_fields(overrides).items()
                 if written(value) != written(reference[field]))


def run_specs(args, folders: dict[str, Path]) -> dict[str, list[str]]:
    """The Hydra overrides of each training run of (b) and (c), in training order.

    A `--variant NAME BASE OVERRIDE...` trains like its base run (e.g. `sparsity90`) with the extra overrides
    last, e.g. `attention.init_steps=50` (a gate-only stage at the target length before joint training). A sparse
    run whose gate (`GATE_SHAPE_FIELDS`, from its experiment and its variant's overrides) differs from the gate
    initialisation experiment's gets its own gate initialisation, `gate_init_<NAME>` after the first run that
    needs it, trained with those values; later runs with the same gate share it.
    """
    target, native = args.seq_len, args.native
    factor = target // native
    def gate_init(name: str, gate_shape: list[str]) -> list[str]:
        return [
            f"+exp={args.gate_init_exp}",
            *common_overrides(args, folders, name, native),
            f"trainer.max_steps={args.init_steps}",
            f"optim.lr={args.gate_lr}",
            f"optim.gate_lr={args.gate_lr}",
            *gate_shape,
        ]

    specs = {
        "dense": [f"+exp={args.exp_prefix}_dense", f"rope.factor={factor}", *common_overrides(args, folders, "dense", target)],
        "gate_init": gate_init("gate_init", []),
    }
    variants = {name: (base, extra) for name, base, *extra in args.variant}
    # Both sides with `--override`, which every run gets.
    init_gate = gate_fields([f"+exp={args.gate_init_exp}", *args.override])
    init_of_shape = {(): "gate_init"}
    for run, density in sparse_runs(args).items():
        base, extra = variants.get(run, (run, []))
        starts_from = []
        # A variant that names its own gates_path (e.g. null: fresh gates, as gate_weight_init makes them) has no
        # gate initialisation run.
        if not any(o.startswith("attention.gates_path=") for o in extra):
            shape = gate_shape([f"+exp={args.exp_prefix}_{base}", *args.override, *extra], init_gate)
            if shape not in init_of_shape:
                init_of_shape[shape] = f"gate_init_{run}"
                specs[init_of_shape[shape]] = gate_init(init_of_shape[shape], list(shape))
            starts_from = [f"attention.gates_path={args.out / 'runs' / init_of_shape[shape] / 'final'}"]
        specs[run] = [
            f"+exp={args.exp_prefix}_{base}",
            f"rope.factor={factor}",
            *common_overrides(args, folders, run, target),
            *starts_from,
            f"attention.density={density}",
            f"optim.gate_lr={args.gate_lr}",
            *extra,
        ]
    return specs


def train_runs(args, specs: dict[str, list[str]]) -> dict[str, Path]:
    """(b) and (c): train what is not trained yet, `--jobs` runs at a time; returns each run's folder.

    With `--jobs 1` the runs train one after the other in this process. With more, each trains in its own
    `python -m seer_finetune train` process (log in `<out>/logs/<run>.log`), the sparse runs once the gate
    initialisation has finished: runs then share the GPU, so their step times say nothing about speed.
    """
    from seer_finetune.jobs import train_job

    dirs = {run: args.out / "runs" / run for run in specs}
    todo = []
    for run in specs:
        if (dirs[run] / "summary.json").is_file():
            print(f"[quality] {run}: reusing {dirs[run]}", flush=True)
        else:
            todo.append(run)
    if args.jobs == 1:
        for run in todo:
            print(f"[quality] training {run}", flush=True)
            if args.device == "cuda":
                # Each run's `train/peak_memory_gib` is its own, not the largest of the runs before it.
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            train_job(compose_config(specs[run]))
        return dirs
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    # A sparse run waits for the run that distils its starting gates (the folder above its gates_path).
    inits = gate_inits(specs)
    needs = {run: {inits[run]} & set(todo) if run in inits else set() for run in todo}
    running: dict[str, subprocess.Popen] = {}
    failed = []
    while todo or running:
        for run in [r for r in todo if not needs[r]]:
            if len(running) >= args.jobs:
                break
            print(f"[quality] training {run} (log: {logs / run}.log)", flush=True)
            with open(logs / f"{run}.log", "w") as log:
                running[run] = subprocess.Popen([sys.executable, "-m", "seer_finetune", "train", *specs[run]],
                                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            todo.remove(run)
        time.sleep(1.0)
        for run, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run]
            if proc.returncode != 0:
                failed.append(run)
                print(f"[quality] {run} failed (exit {proc.returncode}); see {logs / run}.log", flush=True)
            for other in needs.values():
                other.discard(run)
        # A run whose prerequisite failed cannot start.
        for run in [r for r in todo if needs[r] & set(failed)]:
            todo.remove(run)
            failed.append(run)
    if failed:
        raise SystemExit(f"[quality] training failed: {', '.join(failed)}")
    return dirs


def _without(spec: list[str], keys: tuple[str, ...]) -> list[str]:
    """`spec` without its overrides of `keys` (Hydra refuses two values for one group)."""
    return [o for o in spec if o.split("=", 1)[0].lstrip("+") not in keys]


def step_times_alone(args, specs: dict[str, list[str]]) -> dict[str, Optional[float]]:
    """Median seconds of one optimizer step of every training run with the device to itself.

    Each run's configuration builds a fresh trainer (a sparse run starts from its trained gates; nothing is written
    to its folder) that takes one warm-up step, then `--time-steps` timed steps. The runs' own step times cannot
    give the recipe's cost when `--jobs` trains several at once on one GPU; these can. A run with a gate-only
    stage at the target length (`attention.init_steps`) is timed in its joint stage.

    Returns:
        run -> seconds per step (median), for every run of `specs`; None for a run whose timing failed (its
        error is printed; the evaluation ran before and is kept).
    """
    from seer_finetune.trainer import Trainer

    cuda = args.device == "cuda"
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, spec in specs.items():
            keys = ("logger", "trainer.output_dir", "trainer.save_every", "trainer.resume", "trainer.eval_before")
            joint_only = [] if run.startswith("gate_init") else ["attention.init_steps=0"]
            cfg = compose_config([
                *_without(spec, keys + ("attention.init_steps",)), *joint_only, "logger=jsonl",
                f"trainer.output_dir={Path(tmp) / run}", "trainer.save_every=0", "trainer.save_final=false",
                "trainer.resume=false", "trainer.eval_before=false",
            ])
            try:
                times[run] = _time_steps(Trainer(cfg), args.time_steps, cuda)
                print(f"[quality] {run}: {times[run]:.3f} s a step, alone", flush=True)
            except Exception as error:  # a run that cannot be timed must not lose the others' figures
                times[run] = None
                print(f"[quality] {run}: step timing failed ({type(error).__name__}: {str(error).strip()[:300]})",
                      flush=True)
            if cuda:
                torch.cuda.empty_cache()
    return times


def _time_steps(trainer, steps: int, cuda: bool) -> float:
    """Median seconds of `steps` optimizer steps of `trainer`, after one warm-up step."""
    trainer.train_step()
    seconds = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def gate_inits(specs: dict[str, list[str]]) -> dict[str, str]:
    """Each sparse run's gate initialisation run (the folder above its `attention.gates_path`); a run whose
    gates start fresh (`attention.gates_path=null`) has none."""
    inits = {}
    for run, spec in specs.items():
        paths = [o.split("=", 1)[1] for o in spec if o.startswith("attention.gates_path=")]
        if paths and paths[-1].lower() not in ("null", "none", ""):
            inits[run] = Path(paths[-1]).parent.name
    return inits


def eval_windows(tokenizer, folder: Path, length: int, max_windows: int, cache: Path):
    """Up to `max_windows` evaluation windows of `length` tokens from the documents under `folder`.

    Returns:
        A `DocumentWindows` (each item: `length` token ids of one document); raises `ConfigError` when no
        document reaches `length` tokens.
    """
    from seer_finetune.data import DocumentWindows, build_corpus, load_documents

    corpus = build_corpus(load_documents(str(folder)), tokenizer, cache_dir=str(cache))
    windows = DocumentWindows(corpus, length, max_windows)
    if len(windows) == 0:
        raise ConfigError(f"no document in {folder} reaches {length} tokens")
    return windows


def evaluate_all(args, folders: dict[str, Path], specs: dict[str, list[str]], dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Perplexity on both families at the target length, realised density per layer, passkey retrieval.

    Each sparse run is also evaluated with oracle selection (blocks ranked by the true pooled attention
    instead of the gate, at the same density): the gap between the two rows is what a better gate could win,
    the gap between the oracle and dense is the cost of block sparsity itself at this density.
    """
    from seer_finetune.config import RopeConfig
    from seer_finetune.lm_loss import CausalLMLoss
    from seer_finetune.perplexity import perplexity
    from seer_finetune.modeling import load_model, load_tokenizer, load_trained
    from seer_finetune.passkey import passkey_accuracy
    from seer_finetune.seer import load_seer_model
    from seer_finetune.seer.plugin import runtime_from_config

    device = torch.device(args.device)
    dense_exp = f"+exp={args.exp_prefix}_dense"
    cfg = compose_config([dense_exp, *common_overrides(args, folders, "dense", args.seq_len), f"rope.factor={args.seq_len // args.native}"])
    tokenizer = load_tokenizer(cfg.model)
    cache = args.out / "cache"
    windows = {
        (family, length): eval_windows(tokenizer, folders[family], length, args.eval_windows, cache)
        for family in EVAL_FAMILIES
        for length in (args.native, args.seq_len)
    }
    passkey_lengths = [args.seq_len // 4, args.seq_len // 2, args.seq_len]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    done = args.out / "evals"
    done.mkdir(exist_ok=True)

    def record(name, load, length, sparsity_target, passkey=False):
        """Evaluate the model `load()` returns as (model, runtime or None); a finished row is reused on rerun."""
        cache = done / (re.sub(r"\W+", "_", name).strip("_") + ".json")
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            return
        model, runtime = load()
        lm_loss = CausalLMLoss(model, "auto", device)
        loss_fn = lambda batch: lm_loss.mean(batch["input_ids"].to(device), batch.get("labels", batch["input_ids"]).to(device),
                                             position_ids=batch["position_ids"].to(device))
        row: dict[str, Any] = {"run": name, "length": length, "target_sparsity": sparsity_target}
        per_layer: dict[str, dict[str, list[float]]] = {name: {} for name in LAYER_STATS}
        for family in EVAL_FAMILIES:
            if runtime is not None:
                runtime.take_stats()
            result = perplexity(model, windows[(family, length)], device=device, loss_fn=loss_fn)
            row[f"ppl_{family}"] = result["ppl"]
            row[f"windows_{family}"] = len(windows[(family, length)])
            if runtime is not None:
                stats = runtime.take_stats()
                for name in LAYER_STATS:
                    # Keys are <name>/<layer>: order by the layer number, not the string.
                    found = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in stats.items() if k.rsplit("/", 1)[0] == name)
                    per_layer[name][family] = [v for _, v in found]
        if runtime is not None and runtime.settings.mode == "joint":
            for name in LAYER_STATS:
                key = "realised_density" if name == "density" else name
                layers = [statistics.mean(vals) for vals in zip(*per_layer[name].values())]
                row[f"{key}_per_layer"] = layers
                row[key] = statistics.mean(layers) if layers else None
                # Per family too: the gate may rank one kind of text worse than another (technical text loses
                # more perplexity than books at the same mean recall).
                for family, values in per_layer[name].items():
                    row[f"{key}_per_layer_{family}"] = values
                    row[f"{key}_{family}"] = statistics.mean(values) if values else None
            row["realised_sparsity"] = 1.0 - row["realised_density"]
        else:
            row["realised_sparsity"] = 0.0
        if passkey:
            row["passkey"] = {
                str(n): passkey_accuracy(
                    model, tokenizer, n, trials=args.passkey_trials, device=device, runtime=runtime
                )
                for n in passkey_lengths
            }
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cache.write_text(json.dumps(row) + "\n")
        rows.append(row)
        print(f"[quality] {json.dumps(row)}", flush=True)

    # (a) the base model at its native length, then YaRN-scaled without training at the target length.
    base_cfg = compose_config([dense_exp, *common_overrides(args, folders, "base", args.seq_len), f"rope.factor={args.seq_len // args.native}"])
    base = lambda rope: (load_model(base_cfg.model, rope, device=device, seed=0).to(dtype).eval(), None)
    record("base (native length)", lambda: base(RopeConfig(type="none")), args.native, 0.0)
    record("base + YaRN, no training", lambda: base(base_cfg.rope), args.seq_len, 0.0)
    # (b) dense YaRN fine-tuning.
    record("dense YaRN fine-tuning", lambda: (load_trained(dirs["dense"] / "final", device=device, dtype=dtype), None), args.seq_len, 0.0, passkey=True)
    # (c) joint YaRN + SeerAttention at each trained sparsity, with the sink and local blocks and the budget it
    # trained with; then the same weights with oracle selection, and with the gate's selection under the other
    # budget (what the budget alone changes, without retraining).
    for run, density in sparse_runs(args).items():
        a = compose_config(specs[run]).attention
        name = f"seer joint, {round((1 - density) * 100)}% sparsity"
        settings = [(name, False, a.budget), (f"{name}, oracle selection", True, a.budget)]
        if not run.startswith("sparsity"):  # a --variant: its rows carry its name
            settings = [(f"{label}, {run}", oracle, budget) for label, oracle, budget in settings]
        elif args.other_budget:
            other = "row" if a.budget == "layer" else "layer"
            settings.append((f"{name}, {other} budget", False, other))
        if run.startswith("sparsity"):
            settings += [(f"{name}, oracle selection in layers {layers[0]}-{layers[-1]}", layers, a.budget)
                         for layers in args.oracle_layers]
        for label, oracle, budget in settings:
            runtime = runtime_from_config(a)
            # The gate loss's ground truth on every row also gives each layer's recall. `oracle`: True, False, or
            # the layers that rank by the truth while the others keep their gates.
            where = dict(oracle=oracle, oracle_layers=()) if isinstance(oracle, bool) else dict(oracle=False, oracle_layers=oracle)
            runtime.configure(density=density, budget=budget, compute_loss=True, **where)
            runtime.training = False
            load = lambda run=run, runtime=runtime: load_seer_model(dirs[run] / "final", runtime=runtime, device=device, dtype=dtype)
            record(label, load, args.seq_len, 1.0 - density, passkey=budget == a.budget)
    return rows


def layer_range(text: str) -> tuple[int, ...]:
    """`"A-B"` (or `"A"`) -> the layers A to B inclusive; a ValueError for anything else."""
    first, dash, last = text.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()) or int(last or first) < int(first):
        raise ValueError(f"--oracle-layers takes ranges FIRST-LAST of layers, FIRST <= LAST (e.g. 0-9), got {text!r}")
    return tuple(range(int(first), int(last or first) + 1))


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "triton", "transformers", "peft", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def host_loop_ms(iterations: int = 2_000_000) -> float:
    """Milliseconds this host's Python takes for a plain loop of `iterations` integer additions (best of three):
    a yardstick of the host, which bounds a launch-bound step. Host-bound step times of two machines compare
    only next to it."""
    best = math.inf
    for _ in range(3):
        start, total = time.perf_counter(), 0
        for i in range(iterations):
            total += i
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    """Stage the data, train what is not trained yet, evaluate, write `results.json`, `results.md` and the plots.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder (e.g. SmolLM2-135M as get_model.sh writes it)")
    parser.add_argument("--corpora", type=Path, required=True, help="get_corpora.sh's output folder (holds txt/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--native", type=int, default=8192, help="the base model's trained context")
    parser.add_argument("--seq-len", type=int, default=32768, help="target context (training and evaluation)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each run at the target length")
    parser.add_argument("--init-steps", type=int, default=100, help="gate distillation steps at the native length")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of every run at the target length (model; gates use --gate-lr)")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps of each run (a rerun resumes)")
    parser.add_argument("--exp-prefix", default="yarn32k",
                        help="experiment family: conf/exp/<prefix>_dense.yaml and <prefix>_sparsity<NN>.yaml")
    parser.add_argument("--gate-init-exp", default="gate_init8k", help="gate initialisation experiment (at --native)")
    parser.add_argument("--other-budget", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate each sparse run's gates under the budget it did not train with")
    parser.add_argument("--gate-lr", type=float, default=1e-3)
    parser.add_argument("--train-mb", type=float, default=40.0, help="MB of files taken from each training corpus")
    parser.add_argument("--eval-mb", type=float, default=math.inf, help="MB of files taken from each evaluation corpus")
    parser.add_argument("--eval-windows", type=int, default=8, help="evaluation windows per family and length")
    parser.add_argument("--train-eval-windows", type=int, default=2)
    parser.add_argument("--passkey-trials", type=int, default=20)
    parser.add_argument("--num-proc", type=int, default=8)
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every training run")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES),
                        help="trained sparsities (each needs conf/exp/<prefix>_sparsity<NN>.yaml)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME BASE OVERRIDE",
                        help="one more sparse run: trained like BASE (e.g. sparsity90) with these Hydra overrides; "
                        "evaluated with the gate and with oracle selection")
    parser.add_argument("--oracle-layers", nargs="+", default=[], metavar="FIRST-LAST",
                        help="for each run of --sparsities, also evaluate its gates with oracle selection in these "
                        "layers only (ranges such as 0-9; one row each, passkey included): where the gate's loss is")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once (above 1: separate processes sharing the GPU; times not compared)")
    parser.add_argument("--time-steps", type=int, default=3,
                        help="after training, time this many steps of every run alone on the device, for the "
                        "recipe's cost against the dense run (0: off)")
    args = parser.parse_args(argv)
    if any(len(v) < 2 for v in args.variant):
        parser.error("--variant needs a name and a base run (e.g. --variant gate32k sparsity90 attention.init_steps=50)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        args.oracle_layers = [layer_range(text) for text in args.oracle_layers]
    except ValueError as err:
        parser.error(str(err))
    if args.time_steps < 0:
        parser.error("--time-steps must be 0 or more")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    # A file shorter than ~2 bytes per token of the target length cannot hold one evaluation window.
    folders = stage_data(args.corpora, args.out, args.train_mb, args.eval_mb, min_eval_bytes=2 * args.seq_len)
    specs = run_specs(args, folders)
    dirs = train_runs(args, specs)
    rows = evaluate_all(args, folders, specs, dirs)
    alone = step_times_alone(args, specs) if args.time_steps else {}
    cost = training_cost(dirs, alone, gate_inits(specs))
    text = table(rows, cost, args.seq_len, args.jobs)
    made = plots(rows, dirs, args.out, tuple(EVAL_FAMILIES))
    report = {"command": " ".join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])]), "rows": rows,
              "training": cost, "jobs": args.jobs}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    report["torch"] = torch.__version__
    report["versions"] = package_versions()
    report["host_loop_ms"] = host_loop_ms()
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(text + "\n")
    print("\n" + text)
    print(f"[quality] wrote {args.out / 'results.json'}, results.md and {', '.join(p.name for p in made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
