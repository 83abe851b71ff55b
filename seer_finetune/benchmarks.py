"""`python -m seer_finetune bench NAME [args]`: the benchmark scripts under `benchmarks/`, by name.

The scripts live beside the kernels' sources (a source checkout); each exposes `main(argv) -> int`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import ConfigError

SCRIPTS = {
    "attention": "bench_attention.py",
    "training-step": "bench_training_step.py",
    "scale-out": "bench_scale_out.py",
    "quality": "bench_quality.py",
}


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run benchmark `name` with command-line arguments `argv`; returns its exit code."""
    if name not in SCRIPTS:
        raise ConfigError(f"unknown benchmark {name!r} (available: {', '.join(SCRIPTS)})")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / SCRIPTS[name]
    if not path.is_file():
        raise ConfigError(f"benchmark scripts are part of the source checkout; {path} is missing (clone the repository)")
    spec = importlib.util.spec_from_file_location(f"seer_benchmark_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)
