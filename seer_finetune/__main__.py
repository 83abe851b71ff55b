"""`python -m seer_finetune <command> [hydra overrides...]`.

Commands:
    train   fine-tune a model (`python -m seer_finetune train +exp=smoke`)
    eval    perplexity over long documents at several lengths and densities
    bench   benchmarks: `bench attention`, `bench training-step`, `bench scale-out`, `bench quality`
    export  a DeepSpeed checkpoint to a plain Hugging Face folder (same overrides as the training run)
Add `--print-config` to print the composed configuration and exit.
"""

from __future__ import annotations

import sys

from .config import ConfigError

USAGE = __doc__


def _train(overrides: list[str]) -> int:
    from .compose import compose_config, to_yaml
    from .seer.stages import run_stages

    cfg = compose_config(overrides)
    if "--print-config" in sys.argv:
        print(to_yaml(cfg))
        return 0
    # One training stage, or gate distillation then joint training when attention.init_steps > 0.
    run_stages(cfg)
    return 0


def _eval(overrides: list[str]) -> int:
    from .compose import compose_config, to_yaml
    from .seer.evaluate import run_eval

    cfg = compose_config(overrides)
    if "--print-config" in sys.argv:
        print(to_yaml(cfg))
        return 0
    run_eval(cfg)
    return 0


def _bench(args: list[str]) -> int:
    from .benchmarks import SCRIPTS, run_benchmark

    if not args:
        raise ConfigError(f"bench needs a benchmark name: {', '.join(SCRIPTS)}")
    return run_benchmark(args[0], args[1:])


def _export(overrides: list[str]) -> int:
    from .compose import compose_config
    from .deepspeed_engine import export_checkpoint

    final = export_checkpoint(compose_config(overrides))
    print(f"[seer-finetune] exported {final}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "bench": _bench, "export": _export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], [a for a in argv[1:] if a != "--print-config"]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (available: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
