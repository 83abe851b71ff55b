"""The jobs behind `python -m seer_finetune <command>`: train, eval, export, bench and generate.

Each job takes a composed configuration (bench: a benchmark name and its arguments; generate: its own
command-line arguments) and runs to completion;
the command line (`__main__`) only parses and composes. Jobs sit on top of everything else: no module of the
package imports this one.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ConfigError, SeerConfig

BENCHMARKS = {
    "attention": "bench_attention.py",
    "training-step": "bench_training_step.py",
    "scale-out": "bench_scale_out.py",
    "quality": "bench_quality.py",
    "prefill": "bench_prefill.py",
}


def _say(text: str) -> None:
    print(f"[seer-finetune] {text}", flush=True)


def train_job(cfg: SeerConfig) -> dict[str, Any]:
    """Train `cfg`, preceded by a gate-distillation stage when `attention.init_steps > 0` (SeerAttention).

    Stage 1 (`seer.stages.gate_init_config`) runs in `<output_dir>/gate_init` and leaves its gates in
    `<output_dir>/gate_init/gates`; a resumed rerun skips it once they exist, a new run (`trainer.resume=false`)
    distils again. Stage 2 is `cfg` starting from them. Both stages' folders are checked against their
    contracts (`run_folder`) before stage 1 starts.

    Args:
        cfg: The validated configuration of the (final) stage.

    Returns:
        The final stage's summary; with two stages it holds `gate_init` (stage 1's summary, or "reused").
    """
    from .trainer import train

    if cfg.attention.init_steps == 0:
        return train(cfg)
    from .seer import stages

    if not stages.needs_gate_init(cfg):
        return train(cfg)
    from .distributed import env_is_main
    from .run_folder import run_folder_lock

    # One lock on the run folder for both stages (stage 1 trains in a sub-folder of it).
    with run_folder_lock(cfg.trainer.output_dir, is_main=env_is_main()):
        return _train_two_stages(cfg, stages.gate_init_config(cfg), stages.distilled_gates_dir(cfg))


def _train_two_stages(cfg: SeerConfig, init: SeerConfig, gates_dir: Path) -> dict[str, Any]:
    """`train_job`'s two stages, the run folder already locked: gate distillation in `init`'s folder, leaving
    gates in `gates_dir`, unless a resumed run already has them; then joint training from them."""
    from .seer import stages
    from .trainer import Trainer, train

    _check_two_stage_folder(cfg, init, gates_dir)
    stage1: Any = "reused"
    # A new run (resume=false) distils its own gates; only a resumed one reuses finished ones.
    if not (cfg.trainer.resume and stages.has_gates(gates_dir)):
        _say(f"stage 1/2: gate distillation, {cfg.attention.init_steps} steps -> {gates_dir}")
        trainer = Trainer(init, final_dir=gates_dir)
        stage1 = trainer.fit()
        if trainer.ctx.is_main:
            trend = stages.gate_loss_trend(Path(init.trainer.output_dir) / "metrics.jsonl")
            if trend is not None:
                _say(f"stage 1/2: gate loss {trend[0]:.5g} (first steps) -> {trend[1]:.5g} (last steps)")
    else:
        _say(f"stage 1/2: reusing the distilled gates in {gates_dir}")
    _say(f"stage 2/2: joint training from {gates_dir}")
    summary = train(stages.joint_config(cfg, gates_dir))
    summary["gate_init"] = stage1
    return summary


def _check_two_stage_folder(cfg: SeerConfig, init: SeerConfig, gates_dir: Path) -> None:
    """The run-folder contract of a two-stage run, checked for both stages before stage 1 starts.

    With `trainer.resume=false` the whole folder (stage 1's `gate_init/` included) is one run: refused when it
    holds one, or moved into `previous_N/` with `trainer.overwrite=true` (by the main process; the others reach
    the same decision from the files). On resume each stage's saved configuration must allow the changes, and
    gates that are already distilled cannot take a new `attention.init_steps`.

    Raises:
        ConfigError: as `run_folder.check_run_folder` does, for either stage.
    """
    from .distributed import env_is_main, env_world_size
    from .run_folder import check_run_folder, claim_run_folder, finish_pending_move, read_saved_config
    from .seer import stages

    processes = env_world_size()
    is_main = env_is_main()
    stage1_dir = Path(init.trainer.output_dir)
    finish_pending_move(Path(cfg.trainer.output_dir), is_main)
    if not cfg.trainer.resume:
        start = check_run_folder(cfg, processes, also=(stage1_dir,))
        claim_run_folder(start, is_main)
        return
    check_run_folder(stages.joint_config(cfg, gates_dir), processes)
    check_run_folder(init, processes)
    saved = read_saved_config(stage1_dir)
    if saved is not None and stages.has_gates(gates_dir):
        done = saved.get("trainer", {}).get("max_steps")
        if done is not None and done != init.trainer.max_steps:
            raise ConfigError(
                f"attention.init_steps {done} -> {init.trainer.max_steps}: stage 1 (gate distillation) already "
                f"finished in {stage1_dir}; to distil again, choose a new trainer.output_dir, or add "
                "trainer.resume=false trainer.overwrite=true to move this run into previous_N first"
            )


def eval_job(cfg: SeerConfig) -> dict[str, Any]:
    """Perplexity at `eval.lengths` for every density and threshold of `eval` (`seer.density_sweep.run_eval`).

    Args:
        cfg: The composed configuration (`eval`, `model`, `data`, `attention` sections).

    Returns:
        The report written to `eval.output` (see `run_eval`).
    """
    from .seer.density_sweep import run_eval

    return run_eval(cfg)


def _find_checkpoint(cfg: SeerConfig) -> tuple[str, Path, Optional[str]]:
    """(kind, folder, tag) of the checkpoint to export: ("plain", step folder, None), or ("deepspeed", checkpoint
    root, tag or None for the newest). The run's own kind follows `deepspeed.enabled`, as training wrote it."""
    from .checkpoint import STATE_NAME, CheckpointDamaged, list_checkpoints, verify_checkpoint
    from .deepspeed_engine import checkpoint_root

    run_dir = Path(cfg.trainer.output_dir)
    if cfg.export.checkpoint:
        source = Path(cfg.export.checkpoint)
        if (source / STATE_NAME).is_file():
            return "plain", source, None
        if (source / "latest").is_file():
            return "deepspeed", source, None
        if source.is_dir() and any(source.glob("*model_states.pt")):
            return "deepspeed", source.parent, source.name
        raise ConfigError(
            f"export.checkpoint={source}: not a checkpoint (a step folder with {STATE_NAME}, a DeepSpeed checkpoint "
            "folder with a 'latest' file, or one of its tag folders)"
        )
    if cfg.deepspeed.enabled:
        root = checkpoint_root(run_dir)
        if not (root / "latest").is_file():
            raise ConfigError(f"no DeepSpeed checkpoint at {root} (expected a folder with a 'latest' file)")
        return "deepspeed", root, None
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'} (trainer.save_every writes them)")
    # The newest checkpoint whose files are whole; a damaged newer one is named and passed over.
    for folder in reversed(found):
        try:
            verify_checkpoint(folder)
        except CheckpointDamaged as exc:
            print(f"[seer-finetune] warning: {exc}; trying an older checkpoint", file=sys.stderr, flush=True)
            continue
        return "plain", folder, None
    raise ConfigError(f"no intact checkpoint in {run_dir / 'checkpoints'}: every one is damaged (see the warnings)")


def export_job(cfg: SeerConfig) -> Path:
    """Turn a training checkpoint into the folder the run's final save writes, file for file.

    The model is rebuilt from `cfg` exactly as training built it (`assembly.build_model`: rope scaling,
    extension, LoRA), on the CPU and without a process group, loaded with the checkpoint's weights, and
    written by `final_save.save_final_model`. A plain checkpoint (`checkpoints/step_NNNNNN`) holds the trained
    tensors, the rest being rebuilt; its model is rebuilt in the dtype training held it in. A DeepSpeed
    checkpoint (ZeRO 0-3, any number of ranks) is reassembled to fp32 weights, the dtype of the plain copy
    that DeepSpeed's own final save fills on the CPU.

    Args:
        cfg: The training run's configuration (same overrides); `export.checkpoint` picks a checkpoint (default:
            the newest of `trainer.output_dir`), `export.output` the folder (default `<output_dir>/exported`).

    Returns:
        The written folder.
    """
    from .assembly import build_model, load_full_state
    from .final_save import save_final_model
    from .modeling import load_tokenizer

    kind, folder, tag = _find_checkpoint(cfg)
    extension_state: dict[str, torch.Tensor] = {}
    if kind == "plain":
        from .checkpoint import load_weights

        state, extension_state, saved_dtype = load_weights(folder)
        if saved_dtype is not None and cfg.model.dtype == "auto":
            cfg = copy.deepcopy(cfg)
            cfg.model.dtype = saved_dtype
    else:
        from .deepspeed_engine import checkpoint_state_dict

        state = checkpoint_state_dict(folder, tag)
    model, extension = build_model(cfg, torch.device("cpu"))
    load_full_state(model, state)
    if extension_state:
        extension.load_state_dict(extension_state)
    out = Path(cfg.export.output) if cfg.export.output else Path(cfg.trainer.output_dir) / "exported"
    final = save_final_model(model, extension, load_tokenizer(cfg.model), cfg, out)
    _say(f"exported {final}")
    return final


def bench_job(name: str, argv: list[str]) -> int:
    """Run the benchmark script `benchmarks/<script>` registered as `name`, with command-line arguments `argv`.

    The scripts live in the source checkout beside the kernels' sources; each exposes `main(argv) -> int`.

    Args:
        name: One of `BENCHMARKS`.
        argv: The script's own arguments.

    Returns:
        The script's exit code.
    """
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r} (available: {', '.join(BENCHMARKS)})")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[name]
    if not path.is_file():
        raise ConfigError(f"benchmark scripts are part of the source checkout; {path} is missing (clone the repository)")
    spec = importlib.util.spec_from_file_location(f"seer_benchmark_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one `ConfigError` line (no usage block, exit code 2 from `__main__`)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def generate_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m seer_finetune generate`."""
    p = _ArgumentParser(
        prog="generate",
        description="Generate from any model the project trains or loads (greedy unless --temperature > 0).",
    )
    p.add_argument("model", help="run folder, final/merged/export folder, Hugging Face folder or hub name, or builtin:NAME")
    p.add_argument("--prompt", help="the prompt text (default: --prompt-file, --jsonl, or stdin)")
    p.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    p.add_argument("--jsonl", help="one prompt per line (a string or {\"prompt\": ...}); prints one JSON line per prompt")
    p.add_argument("--output", help="write the results as JSON lines to this file instead of printing")
    p.add_argument("--max-new-tokens", type=int, default=128)
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--density", type=float, help="fraction of key blocks the prefill keeps (models with gates)")
    sparsity.add_argument("--threshold", type=float, help="minimum gate probability of a kept block (models with gates)")
    sparsity.add_argument("--dense", action="store_true", help="ignore the gates: dense prefill")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and the weights of a builtin: model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else as saved), float32, bfloat16, float16")
    p.add_argument("--kernel", choices=("auto", "pytorch", "triton"), help="seer_kernels implementation")
    return p


def generate_job(argv: list[str], stdin=None, stdout=None) -> list[str]:
    """`python -m seer_finetune generate MODEL [options]`: load the model in one call and generate.

    Args:
        argv: The command's arguments (see `generate_parser`).
        stdin: Where a prompt is read when no option gives one. Default `sys.stdin`.
        stdout: Where completions go. Default `sys.stdout`.

    Returns:
        The completions, one per prompt.
    """
    import json

    # Arguments first: a usage error or --help does not wait for the generation stack to import.
    args = generate_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    from .generation import generate_texts, read_prompts
    from .modeling import resolve_device
    from .seer.loading import load_for_generation

    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    prompts, as_jsonl = read_prompts(prompt=args.prompt, prompt_file=args.prompt_file, jsonl=args.jsonl, stdin=stdin)
    device = resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    elif args.dtype in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, args.dtype)
    else:
        raise ConfigError(f"--dtype={args.dtype!r} is not one of auto, float32, bfloat16, float16")
    loaded = load_for_generation(
        args.model,
        density=args.density,
        threshold=args.threshold,
        dense=args.dense,
        device=device,
        dtype=dtype,
        kernel=args.kernel,
        seed=args.seed,
    )
    rt = loaded.runtime
    how = "dense (no gates)" if rt is None else (
        "dense prefill through the gates' kernels" if rt.settings.mode == "dense"
        else f"gates at density {rt.settings.density:g}" if rt.settings.density is not None
        else f"gates at threshold {rt.settings.threshold:g}"
    )
    print(f"[seer-finetune] generate: {args.model}, {how}, on {device}", file=sys.stderr, flush=True)
    completions = generate_texts(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.output or as_jsonl:
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in zip(prompts, completions)]
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text("\n".join(lines) + "\n")
        else:
            stdout.write("\n".join(lines) + "\n")
    else:
        stdout.write(completions[0] + "\n")
    stdout.flush()
    return completions


JOBS = {"train": train_job, "eval": eval_job, "export": export_job}


def run_job(command: str, cfg: SeerConfig) -> Any:
    """Run the configured job `command` (`train`, `eval` or `export`); returns what the job returns."""
    if command not in JOBS:
        raise ConfigError(f"unknown job {command!r} (available: {', '.join(JOBS)})")
    return JOBS[command](cfg)
