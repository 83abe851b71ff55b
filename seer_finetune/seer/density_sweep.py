"""`python -m seer_finetune eval`: perplexity over long documents at several lengths and densities/thresholds.

Every setting runs the same model through the `seer` attention: density 1.0 is exact dense attention (the
gates are not consulted), any other density or threshold uses the gates' block selection, and the realised
density (fraction of causal candidate blocks kept, averaged over layers and windows) is reported next to the
perplexity. Results go to a JSON file and a printed table.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError, SeerConfig
from .attach import seer_gates
from .plugin import runtime_from_config
from .runtime import SeerRuntime


def _settings(cfg: SeerConfig) -> list[tuple[str, float]]:
    """("density", d) and ("threshold", t) pairs to evaluate, densities first."""
    settings = [("density", float(d)) for d in cfg.eval.densities] + [("threshold", float(t)) for t in cfg.eval.thresholds]
    if not settings:
        raise ConfigError("eval: give eval.densities and/or eval.thresholds to evaluate")
    for kind, value in settings:
        if kind == "density" and not 0.0 < value <= 1.0:
            raise ConfigError(f"eval.densities: {value} must be in (0, 1]")
        if kind == "threshold" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"eval.thresholds: {value} must be in [0, 1]")
    return settings


def _load(cfg: SeerConfig, device: torch.device) -> tuple[torch.nn.Module, Optional[SeerRuntime], str, bool]:
    """(model, runtime or None for a model without gates, description of the gates, whether they were trained)."""
    from ..modeling import load_model, load_trained, resolve_dtype
    from .saving import CONFIG_NAME, load_gates, load_seer_model

    a = cfg.attention
    # The configured settings (block size, kernel, sink and local blocks); mode and density change per setting.
    runtime = runtime_from_config(a)
    runtime.configure(mode="joint", density=None, threshold=None, compute_loss=False)
    runtime.training = False
    if cfg.eval.model_path:
        path = Path(cfg.eval.model_path)
        # A trained run's own gates come first: attention.gates_path is where its training *started* from.
        gates_dir = path if (path / CONFIG_NAME).is_file() else Path(a.gates_path) if a.gates_path else None
        dtype = None if cfg.model.dtype == "auto" else resolve_dtype(cfg.model.dtype, device)
        if gates_dir is None:
            # A model without gates (a dense run, or any Hugging Face folder): the dense baseline, on SDPA.
            return load_trained(path, device=device, dtype=dtype), None, "none (dense model)", False
        if not (gates_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"eval: attention.gates_path={a.gates_path} holds no seer gates ({CONFIG_NAME})")
        model, runtime = load_seer_model(path, gates_path=gates_dir, runtime=runtime, device=device, dtype=dtype)
        _note_other_selection(gates_dir, runtime)
        return model, runtime, str(gates_dir), True
    model = load_model(cfg.model, cfg.rope, device=device, attn_implementation="sdpa", seed=cfg.trainer.seed)
    if a.gates_path:
        load_gates(model, a.gates_path, runtime=runtime)
        return model.eval(), runtime, str(a.gates_path), True
    from .attach import attach_seer_gates

    attach_seer_gates(
        model,
        runtime,
        gate_hidden_size=int(a.gate_hidden_size),
        q_pooling=tuple(a.q_pooling),
        k_pooling=tuple(a.k_pooling),
        rope_units=a.gate_rope_units,
        rope_fraction=float(a.gate_rope_fraction),
        gate_query=a.gate_query,
    )
    return model.eval(), runtime, "untrained (random) gates", False


def _note_other_selection(gates_dir: Path, runtime: SeerRuntime) -> None:
    """Say so when the configured selection (forced blocks, budget, row mass, selection temperature) differs
    from the one the gates trained with: the evaluation uses the configured one, e.g. another experiment's."""
    from .saving import read_gates_config

    trained = read_gates_config(gates_dir)
    now = runtime.settings
    differ = [
        f"{key}={trained[key]!r} (trained) vs {getattr(now, key)!r}"
        for key in (
            "sink_blocks", "local_blocks", "budget", "row_mass", "bound_blocks", "probe_blocks", "probe_tokens",
            "selection_temperature",
        )
        if key in trained and trained[key] != getattr(now, key)
    ]
    if differ:
        print(f"[seer-finetune] eval: selecting blocks with the configured settings, not the trained ones: {', '.join(differ)}", flush=True)


def _windows(cfg: SeerConfig, tokenizer, lengths: list[int]):
    """Evaluation windows per length, cut from the held-out documents (never across documents)."""
    from ..data import DocumentWindows, build_corpus, load_documents

    d = cfg.data
    if d.eval_source is not None:
        documents = load_documents(
            d.eval_source, text_field=d.text_field, split=d.split, file_glob=d.file_glob, invalid_files=d.invalid_files
        )
    else:
        documents = load_documents(
            d.source, text_field=d.text_field, split=d.split, file_glob=d.file_glob, invalid_files=d.invalid_files
        )
        if d.eval_documents <= 0 or len(documents) <= d.eval_documents:
            raise ConfigError("eval: give data.eval_source, or data.eval_documents held out from a larger data.source")
        documents = documents[-d.eval_documents :]
    corpus = build_corpus(documents, tokenizer, cache_dir=d.cache_dir, num_proc=d.num_proc)
    out = {}
    for length in lengths:
        windows = DocumentWindows(corpus, length, d.max_eval_sequences)
        if len(windows) == 0:
            longest = int(max(corpus.doc_starts[i + 1] - corpus.doc_starts[i] for i in range(corpus.num_documents)))
            raise ConfigError(f"eval: no evaluation document reaches {length} tokens (the longest has {longest})")
        out[length] = windows
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of eval results (one line per length and setting; recall: mean over layers)."""
    head = (
        f"{'length':>8} {'setting':>16} {'selection':>10} {'ppl':>12} {'loss':>9} {'density':>9} {'sparsity':>9} "
        f"{'recall':>8} {'best':>8} {'windows':>8}"
    )
    lines = [head, "-" * len(head)]

    def opt(x):
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        setting = f"{r['setting']}={r['value']:g}"
        lines.append(
            f"{r['length']:>8} {setting:>16} {r['selection']:>10} {r['ppl']:>12.3f} {r['loss']:>9.4f} "
            f"{r['realised_density']:>9.3f} {r['sparsity']:>9.3f} {opt(r.get('recall')):>8} "
            f"{opt(r.get('oracle_recall')):>8} {r['windows']:>8}"
        )
    return "\n".join(lines)


def run_eval(cfg: SeerConfig) -> dict[str, Any]:
    """Perplexity of a model (with gates, or dense) at `eval.lengths` for every density in `eval.densities` and
    threshold in `eval.thresholds`, and needle retrieval by generation (`eval.needle_tasks`) at the same settings.

    Args:
        cfg: The composed configuration. `eval.model_path` names a saved run folder (full model or LoRA
            adapter; gates from the same folder or `attention.gates_path`; a folder without gates is the dense
            baseline, scored at density 1.0 only); without it the configured `model` (with `rope`) is loaded
            and gates come from `attention.gates_path` (or are untrained). `eval.lengths` defaults to
            `data.eval_seq_len` or `data.seq_len`; windows come from the held-out documents (`data.eval_source`,
            or the last `data.eval_documents` of `data.source`), at most `data.max_eval_sequences` per length.
            With `eval.oracle`, every sparse setting is evaluated a second time with oracle selection (blocks
            ranked by the true pooled attention instead of the gates). Needle haystacks are cut from
            `data.eval_source`, else `data.source`.

    Returns:
        The JSON-ready result, also written to `eval.output` (default `<trainer.output_dir>/eval.json`):
        `{"model", "gates", "gates_trained", "block_size", "results": [{"length", "setting", "value",
        "selection", "ppl", "loss", "tokens", "windows", "realised_density", "sparsity", "recall",
        "oracle_recall", "recall_per_layer", "oracle_recall_per_layer"}, ...], "needles": [{"setting", "value",
        "selection", "task", "length", "depth", "trials", "hits", "accuracy", "ci_low", "ci_high",
        "value_recall"}, ...]}`, `selection` being `dense`, `gate` or `oracle` (recall: with `eval.recall`, for
        sparse settings; None otherwise); `depth` is `"all"` on each task and length's summary row. With needle
        tasks, their table is also written beside the JSON (`<output stem>.needles.md`).
    """
    from ..modeling import load_tokenizer, resolve_device

    torch.manual_seed(cfg.trainer.seed)
    settings = _settings(cfg)
    lengths = [int(n) for n in cfg.eval.lengths] or [int(cfg.data.eval_seq_len or cfg.data.seq_len)]
    device = resolve_device(cfg.trainer.device)
    model, runtime, gates, trained = _load(cfg, device)
    if runtime is None:
        skipped = [f"{kind}={value:g}" for kind, value in settings if not (kind == "density" and value >= 1.0)]
        if skipped:
            print(f"[seer-finetune] eval: {gates}: scoring density 1.0 only (skipping {', '.join(skipped)})", flush=True)
        settings = [("density", 1.0)]
    elif not seer_gates(model):
        raise ConfigError("eval: the model has no seer gates")
    tokenizer = load_tokenizer(cfg.model)
    rows: list[dict[str, Any]] = []
    if cfg.eval.perplexity:
        windows = _windows(cfg, tokenizer, lengths)
        print(format_table([]), flush=True)
        sparse = [s for s in settings if not (s[0] == "density" and s[1] >= 1.0)]
        for length in lengths:
            common = dict(device=device, batch_size=cfg.trainer.micro_batch_size, recall=cfg.eval.recall)
            results = evaluate_settings(model, runtime, windows[length], settings, **common)
            if cfg.eval.oracle and sparse:
                results += evaluate_settings(model, runtime, windows[length], sparse, oracle=True, **common)
            for result in results:
                realised = result["realised_density"]
                realised = math.nan if realised is None else realised
                rows.append(
                    {
                        "length": length,
                        **result,
                        "windows": len(windows[length]),
                        "realised_density": realised,
                        "sparsity": 1.0 - realised,
                    }
                )
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    needles = _needle_rows(cfg, model, runtime, tokenizer, settings, lengths) if cfg.eval.needle_tasks else []
    settings = runtime.settings if runtime is not None else None
    report = {
        "model": cfg.eval.model_path or cfg.model.name_or_path,
        "gates": gates,
        "gates_trained": trained,
        "block_size": settings.block_size if settings else None,
        # What the gates' selection kept whatever their scores, and how a density was shared out.
        "sink_blocks": settings.sink_blocks if settings else None,
        "local_blocks": settings.local_blocks if settings else None,
        "budget": settings.budget if settings else None,
        "results": rows,
        "needles": needles,
    }
    output = Path(cfg.eval.output) if cfg.eval.output else Path(cfg.trainer.output_dir) / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    if settings is not None:
        print(
            f"\n[seer-finetune] eval of {report['model']} with {gates} (block {settings.block_size}, "
            f"{settings.sink_blocks} sink and {settings.local_blocks} local blocks kept, {settings.budget} budget)"
        )
    else:
        print(f"\n[seer-finetune] eval of {report['model']} (dense, no gates)")
    if rows:
        print(format_table(rows))
    if needles:
        from ..needles import format_needle_table

        table = format_needle_table(needles)
        print(table)
        # The same table as a file beside the JSON, ready to commit with the results.
        what = f"{report['model']} ({gates})"
        intro = f"Needle retrieval of {what}: accuracy per depth and over all depths, 95% Wilson interval.\n\n"
        output.with_suffix(".needles.md").write_text(intro + "```\n" + table + "\n```\n")
    print(f"[seer-finetune] wrote {output}", flush=True)
    return report


def _haystack(cfg: SeerConfig, tokenizer, longest: int) -> list[int]:
    """Token ids of the needle haystacks: the text of `data.eval_source`, else of `data.source`, enough of it for
    a few dozen different windows of the longest length (a corpus that is shorter is cycled)."""
    from ..data import load_documents

    d = cfg.data
    source = d.eval_source if d.eval_source is not None else d.source
    documents = load_documents(source, text_field=d.text_field, split=d.split, file_glob=d.file_glob, invalid_files=d.invalid_files)
    # About four characters per token: 32 windows of the longest length is plenty of different haystacks.
    wanted, parts, size = 4 * 32 * longest, [], 0
    for text in documents:
        parts.append(text)
        size += len(text)
        if size >= wanted:
            break
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]
    if len(ids) < longest:
        print(f"[seer-finetune] eval: the needle haystack ({source}) holds {len(ids)} tokens, fewer than {longest}: it is repeated", flush=True)
    return ids


def _needle_rows(cfg: SeerConfig, model, runtime: Optional[SeerRuntime], tokenizer, settings, lengths) -> list[dict[str, Any]]:
    """Needle retrieval (`needles.evaluate_needles`) at every density/threshold setting, each row tagged with it."""
    from ..generation import sparsity_settings
    from ..needles import evaluate_needles, format_needle_table

    from ..needles import build_trial, sentence_ends

    e = cfg.eval
    needle_lengths = [int(n) for n in e.needle_lengths] or lengths
    haystack = _haystack(cfg, tokenizer, max(needle_lengths))
    # Refuse a length too short for a task's needles before any generation runs.
    ends = sentence_ends(tokenizer, haystack[:4096])
    for task in e.needle_tasks:
        try:
            build_trial(tokenizer, haystack[:4096], ends, task, min(needle_lengths), 0.5, random.Random(0))
        except ValueError as exc:
            raise ConfigError(f"eval.needle_lengths: {exc}") from None
    if tokenizer.pad_token_id is None:
        raise ConfigError("eval: the tokenizer has no pad token for batched generation")
    out: list[dict[str, Any]] = []
    for kind, value in settings:
        tag = {"setting": kind, "value": value, "selection": "dense" if kind == "density" and value >= 1.0 else "gate"}
        changes = sparsity_settings(density=value if kind == "density" else None, threshold=value if kind == "threshold" else None)
        with (runtime.using(**changes) if runtime is not None else contextlib.nullcontext()):
            saved = (runtime.training, runtime.record_stats) if runtime is not None else None
            if runtime is not None:
                # Generation: no gate loss, and no statistics (nothing takes them; they would pile up per prompt).
                runtime.training, runtime.record_stats = False, False
            try:
                rows = evaluate_needles(
                    model,
                    tokenizer,
                    haystack,
                    tasks=list(e.needle_tasks),
                    lengths=needle_lengths,
                    depths=[float(d) for d in e.needle_depths],
                    trials=int(e.needle_trials),
                    batch_size=int(e.needle_batch_size),
                    seed=cfg.trainer.seed,
                )
            finally:
                if runtime is not None:
                    runtime.training, runtime.record_stats = saved
        for row in rows:
            out.append({**tag, **row})
        print("\n" + format_needle_table(out[-len(rows) :]), flush=True)
    return out


def evaluate_settings(
    model: torch.nn.Module,
    runtime: Optional[SeerRuntime],
    dataset,
    settings: list[tuple[str, float]],
    *,
    device: torch.device,
    batch_size: int = 1,
    oracle: bool = False,
    recall: bool = False,
) -> list[dict[str, Any]]:
    """Perplexity and realised density of `model` on `dataset` for each ("density"|"threshold", value).

    Args:
        model: A model with gates attached (see `attach_seer_gates` / `load_seer_model`).
        runtime: Its gates' shared runtime; its settings and training switch are restored afterwards. None for a
            model without gates: one dense row, whatever `settings` holds.
        dataset: Items with `input_ids` and `position_ids` (e.g. `DocumentWindows`).
        settings: What to evaluate; ("density", 1.0) runs exact dense attention.
        device: Where the model runs.
        batch_size: Windows per forward. Default 1.
        oracle: Rank blocks by the true pooled attention instead of the gates (`SeerSettings.oracle`). Default
            False.
        recall: For sparse settings, also measure the selection's recall of the ground truth per layer (every
            row), and the best recall of a selection of the same size (`selection.block_recall`). Default False.

    Returns:
        One dict per setting: setting, value, selection (`dense`, `gate` or `oracle`), ppl, loss, tokens,
        realised_density (None if no layer reported), recall and oracle_recall (means over layers) with their
        per-layer lists (None without `recall` or for dense).
    """
    from ..perplexity import perplexity

    if runtime is None:
        # A model without gates: the dense baseline, on its own attention.
        result = perplexity(model, dataset, device=device, batch_size=batch_size)
        row = {"setting": "density", "value": 1.0, "selection": "dense", "ppl": result["ppl"], "loss": result["loss"]}
        empty = {name: None for name in ("recall", "oracle_recall", "recall_per_layer", "oracle_recall_per_layer")}
        return [{**row, "tokens": result["tokens"], "realised_density": 1.0, **empty}]
    saved_training = runtime.training
    out = []
    try:
        runtime.training = False
        for kind, value in settings:
            dense = kind == "density" and value >= 1.0
            with runtime.using(
                mode="dense" if dense else "joint",
                density=value if kind == "density" and not dense else None,
                threshold=value if kind == "threshold" else None,
                compute_loss=recall and not dense,
                oracle=oracle,
            ):
                runtime.take_stats()
                result = perplexity(model, dataset, device=device, batch_size=batch_size)
                stats = runtime.take_stats()
            per_layer = {name: _layer_values(stats, name) for name in ("density", "recall", "oracle_recall")}
            densities = per_layer["density"]
            realised = 1.0 if dense else (sum(densities) / len(densities) if densities else None)
            row = {
                "setting": kind,
                "value": value,
                "selection": "dense" if dense else "oracle" if oracle else "gate",
                "ppl": result["ppl"],
                "loss": result["loss"],
                "tokens": result["tokens"],
                "realised_density": realised,
            }
            for name in ("recall", "oracle_recall"):
                values = per_layer[name]
                row[name] = sum(values) / len(values) if values else None
                row[f"{name}_per_layer"] = values or None
            out.append(row)
    finally:
        runtime.training = saved_training
    return out


def _layer_values(stats: dict[str, float], name: str) -> list[float]:
    """The per-layer values `<name>/<layer>` of `SeerRuntime.take_stats`, in layer order."""
    found = [(int(key.rsplit("/", 1)[1]), value) for key, value in stats.items() if key.rsplit("/", 1)[0] == name]
    return [value for _, value in sorted(found)]
