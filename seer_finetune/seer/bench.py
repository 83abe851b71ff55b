"""Time one training step of a whole model through each attention path: SDPA, and seer in every mode.

    python -m seer_finetune.seer.bench --length 32768 --densities 0.5 0.1

Builds a randomly initialised Llama with SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads of 64, YaRN 4x
over 8k) unless `--model` names a config folder, and times forward + backward + gate loss of one sequence, with
activation checkpointing as the experiments use it. Prints a table and, with `--json`, writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=True,
)


def _model(args) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model) if args.model else AutoConfig.for_model("llama", **SMOLLM2_135M)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.to(args.device)


def time_step(model: torch.nn.Module, ids: torch.Tensor, *, extension=None, repeats: int = 3) -> dict[str, float]:
    """Median seconds of forward + backward (LM loss weighted as the extension says, plus its losses) and
    peak memory in GiB."""
    times = []
    device = ids.device
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss * (extension.lm_loss_weight if extension is not None else 1.0)
        if extension is not None:
            for value in extension.extra_losses().values():
                loss = loss + value
        if loss.requires_grad:
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step compiles kernels and warms caches
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": sorted(times)[len(times) // 2], "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    from ..config import AttentionConfig, ModelConfig, SeerConfig
    from .extension import build_extension

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--densities", type=float, nargs="*", default=[0.5, 0.1])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--ground-truth-fraction", type=float, default=0.5)
    parser.add_argument("--model", default=None, help="a config folder (default: SmolLM2-135M's shape, random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    base = _model(args)
    ids = torch.randint(0, base.config.vocab_size, (1, args.length), device=args.device)
    runs: list[tuple[str, dict[str, Any]]] = [("sdpa", {}), ("seer dense", {"mode": "dense"})]
    runs.append(("seer gate_distill", {"mode": "gate_distill"}))
    runs += [(f"seer joint d={d:g}", {"mode": "joint", "density": d}) for d in args.densities]
    rows = []
    for name, attention in runs:
        model = copy.deepcopy(base)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        extension = None
        if attention:
            cfg = SeerConfig(
                model=ModelConfig(name_or_path=args.model or "smollm2-135m-shape"),
                attention=AttentionConfig(
                    backend="seer", block_size=args.block_size, ground_truth_query_fraction=args.ground_truth_fraction, **attention
                ),
            )
            extension = build_extension(model, cfg)
            if extension.freeze_base:
                model.requires_grad_(False)
                for group in extension.param_groups():
                    for p in group["params"]:
                        p.requires_grad_(True)
        result = time_step(model, ids, extension=extension, repeats=args.repeats)
        metrics = extension.metrics() if extension is not None else {}
        result.update({"name": name, "length": args.length, "density": metrics.get("seer/density"), "gate_loss": metrics.get("seer/gate_loss")})
        rows.append(result)
        density = "" if result["density"] is None else f"{result['density']:.3f}"
        print(f"{name:>22}  {result['step_s'] * 1000:9.1f} ms  peak {result['peak_gib']:6.1f} GiB  density {density}", flush=True)
        del model, extension
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
