"""`python -m seer_finetune <command> [hydra overrides...]`.

Commands:
    train   fine-tune a model (`python -m seer_finetune train +exp=smoke`)
    eval    perplexity over long documents at several lengths and densities
    bench   benchmarks: `bench attention`, `bench training-step`, `bench scale-out`, `bench quality`,
            `bench prefill`
    export  a training checkpoint (plain or DeepSpeed) to the run's final folder (same overrides as the run)
    generate  text from any model folder, with or without gates
              (`python -m seer_finetune generate runs/smoke_seer --prompt "..." --density 0.1`; --help for options)
    lm-eval lm-eval-harness's command line with the `seer` model type (`--model seer --model_args
            pretrained=runs/x,density=0.1 --tasks ...`; needs `pip install seer-finetune[lm-eval]`)
Add `--print-config` to print the composed configuration and exit.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError

USAGE = __doc__
COMMANDS = ("train", "eval", "bench", "export", "generate", "lm-eval")
PRINT_CONFIG = "--print-config"


def _run(command: str, args: list[str], print_config: bool) -> int:
    """Compose the configuration from `args` and hand it to the job (bench: its name and arguments)."""
    from . import jobs

    if command == "bench":
        if not args:
            raise ConfigError(f"bench needs a benchmark name: {', '.join(jobs.BENCHMARKS)}")
        return jobs.bench_job(args[0], args[1:])
    if command == "generate":
        jobs.generate_job(args)
        return 0
    if command == "lm-eval":
        from .seer.lm_eval_adapter import main as lm_eval_main

        return lm_eval_main(args)
    from .compose import compose_config, to_yaml

    cfg = compose_config(args)
    if print_config:
        print(to_yaml(cfg))
        return 0
    jobs.run_job(command, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit code (2 for a usage or configuration error, printed on one line).

    Args:
        argv: The arguments after the program name. Default `sys.argv[1:]`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], [a for a in argv[1:] if a != PRINT_CONFIG]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (available: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return _run(command, rest, print_config=PRINT_CONFIG in argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def leave(code: int) -> None:
    """Exit with `code`.

    A process that ran a distributed job and destroyed its process group skips the interpreter's teardown: by then
    its files are written and its logger closed, and the teardown of the communication libraries' threads (gloo,
    DeepSpeed's shared-memory collectives on CPU) can still abort a finished run with SIGABRT ("terminate called
    without an active exception"), which its launcher would report as a failure.
    """
    engine = sys.modules.get("seer_finetune.deepspeed_engine")
    if engine is not None and engine.left_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def cli() -> None:
    """The `seer-finetune` console script: `main` on the command line, then `leave`."""
    leave(main())


if __name__ == "__main__":
    cli()
