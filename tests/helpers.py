"""Small builders shared by the tests: tiny random models of several architectures saved as HF folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "tiny_llama"

TINY = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str, **overrides):
    """A tiny random config of `model_type` (llama, mistral, qwen2, qwen3) sharing the embedded tokenizer's vocab."""
    kwargs = {**TINY, **overrides}
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.eos_token_id = config.bos_token_id = 0
    config.pad_token_id = 1
    return config


def save_tiny_model(folder: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Build a tiny random model of `model_type` and save it with the embedded tokenizer as a HF folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)
    return folder


def assert_same_folder(expected: Path, got: Path) -> None:
    """Two saved model folders hold the same files: equal JSON content, equal tensors (bit for bit), equal bytes
    for everything else."""
    import json

    from safetensors.torch import load_file

    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files(got) == files(expected)
    for name in files(expected):
        a, b = expected / name, got / name
        if name.endswith(".json"):
            assert json.loads(b.read_text()) == json.loads(a.read_text()), name
        elif name.endswith(".safetensors"):
            left, right = load_file(str(a)), load_file(str(b))
            assert left.keys() == right.keys() and left, name
            for key, value in left.items():
                assert right[key].dtype == value.dtype and torch.equal(right[key], value), f"{name}: {key}"
        else:
            assert b.read_bytes() == a.read_bytes(), name


# Bit-for-bit comparisons between processes need every process to reduce in the same order: MKL may otherwise
# pick fewer threads for a matmul when the machine is busy (MKL_DYNAMIC), and the gate's KL loss between nearly
# equal distributions turns such last-bit differences into visible ones.
DETERMINISTIC_THREADS = {"MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def start_train_cli(args: list[str], run_dir: Path, cache: Path, output=None):
    """`python -m seer_finetune train ARGS trainer.output_dir=RUN_DIR` in its own process (token cache `cache`,
    `DETERMINISTIC_THREADS`), stdout and stderr together in its `stdout`, or in the open file `output`."""
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "seer_finetune", "train", *args, f"trainer.output_dir={run_dir}"],
        env={**os.environ, "SEER_CACHE": str(cache), **DETERMINISTIC_THREADS},
        stdout=subprocess.PIPE if output is None else output,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_train_cli(args: list[str], run_dir: Path, cache: Path, timeout: float = 900.0) -> str:
    """`start_train_cli` run to its end; fails on a non-zero exit. Returns its output."""
    process = start_train_cli(args, run_dir, cache)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def run_cli(*args: str, cwd, env=None):
    """`python -m seer_finetune ARGS` in `cwd`, output captured (a `subprocess.CompletedProcess`)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "seer_finetune", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def kill_when(process, exists: Path, timeout: float = 300.0) -> None:
    """SIGKILL `process` as soon as the path `exists` appears (failing if the process ends or time runs out first)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not exists.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{exists} did not appear within {timeout} s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
