"""Prefill time to first token of whole models: seer gates + selection + block-sparse attention against dense.

Models (random weights: speed does not depend on them): `smollm2` (SmolLM2-135M's shape: Llama, 30 layers,
hidden 576, 9 query / 3 KV heads of 64), `qwen1.5b` (Qwen2.5-1.5B's shape: Qwen2, 28 layers, hidden 1536, 12 / 2
heads of 128, MLP 8960, vocabulary 151936, RoPE theta 1e6); `tiny` (the built-in tiny Llama) for CPU tests.
For each model and length, one prompt of random tokens (batch 1, bf16 on CUDA) and:
- `dense_cudnn`, `dense_flash`: the model on SDPA restricted to that backend (causal, GQA native where the
  backend has it, else repeated K/V); on CPU one `dense_sdpa` row (PyTorch's choice) instead;
- `no_attention`: the same model with attention replaced by a copy of its queries: everything but attention;
- `seer d=...`: the model with gates (untrained, of the trained configs' shape: `seer_joint`'s sink 1, local 2,
  layer budget), prefill through gates, selection and the block-sparse kernels at each density;
- `flex d=...`: the dense model on compiled FlexAttention with, per layer, the blocks the seer prefill selected
  (causal-only `mask_mod` plus kv block lists, `bench_attention.flex_block_mask`); its masks are built before the
  timing, so Flex pays for no gate and no selection.
Every prefill is one forward with `logits_to_keep=1` (the LM head scores the last position only) and a
`DynamicCache` filled as generation would. The cap of a density d is what the model could gain if attention
alone shrank to d: `dense / (no_attention + d * (dense - no_attention))`, from the measured cuDNN and
no-attention times. Decode: greedy tokens/s over `--decode-tokens` steps after the prefill, every step attending
densely to the cache (the dense model on SDPA, and the seer model, whose decode is dense too), both without SDPA's
cuDNN backend, which builds a new graph for every cache length (`seer_finetune.generation`). At density 1.0 the
seer prefill's first token is checked against the dense model's.

    python benchmarks/bench_prefill.py --json benchmarks/results/prefill.json --markdown benchmarks/results/prefill.md
    python benchmarks/bench_prefill.py --device cpu --shapes tiny --lengths 256 --densities 1.0 0.5   # CPU check

`main(argv)` is the entry point for `python -m seer_finetune bench prefill`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SHAPES = ("tiny", "smollm2", "qwen1.5b")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The benchmark's options from `argv` (None: the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["smollm2", "qwen1.5b"], choices=SHAPES)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--block", type=int, default=64, help="seer block size (the trained configs' 64)")
    p.add_argument("--budget", default="layer", choices=("layer", "row"), help="how a density is shared out (seer_joint: layer)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a functional check at tiny shapes")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per variant (median)")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed after a prefill (0: no decode)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument(
        "--liger",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Liger-Kernel's RMSNorm, SwiGLU and RoPE in every model, dense and seer alike (default: on CUDA when installed)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-gate", action="store_true", help="the seer model's gate path under torch.compile (attention.compile_gate)")
    p.add_argument("--gate-query", default="pooled", choices=("pooled", "token_logit_max", "token_prob_max"),
                   help="how the gates score query blocks (attention.gate_query)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder: one profiled seer prefill per length at the lowest density, its kernels by device time (a table per length, and the top entries in the JSON)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every record here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table (with command, GPU, versions)")
    return p.parse_args(argv)


def model_config(shape: str, max_len: int):
    """A transformers config of `shape` that accepts `max_len` positions (no sliding window, no dropout)."""
    from transformers import AutoConfig, Qwen2Config

    if shape == "tiny":
        config = AutoConfig.from_pretrained(ROOT / "seer_finetune" / "assets" / "tiny_llama")
    elif shape == "smollm2":
        config = AutoConfig.from_pretrained(ROOT / "seer_finetune" / "assets" / "smollm2_135m_arch")
    elif shape == "qwen1.5b":
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=28,
        )
    else:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    config.max_position_embeddings = max(int(config.max_position_embeddings), max_len)
    config.attention_dropout = 0.0
    return config


# -- attention implementations of the baselines ---------------------------------------------------------------


def _mask_none(*_args, **_kwargs):
    """Mask function of the baselines: they attend causally by themselves."""
    return None


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def register_baselines() -> None:
    """Register `bench_sdpa`, `bench_flex` and `bench_none` with transformers' attention and mask registries.

    `bench_sdpa` runs `F.scaled_dot_product_attention(causal)` inside whatever `sdpa_kernel` context the caller
    set, with native GQA when the backend takes it (`module.bench_gqa`, found once per backend by `probe_gqa`);
    `bench_flex` runs the compiled FlexAttention with the layer's `module.bench_block_mask`; `bench_none` returns
    the queries (everything of the model but attention).
    """
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        if getattr(module, "bench_gqa", True):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        else:
            out = F.scaled_dot_product_attention(query, _repeat(key, groups), _repeat(value, groups), is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # Flex's default tiles (128) must divide the mask's blocks: smaller blocks need tiles of their size.
        block = module.bench_block_mask.BLOCK_SIZE[0]
        options = {"BLOCK_M": block, "BLOCK_N": block} if block < 128 else None
        out = module.bench_flex_fn(
            query, key, value, block_mask=module.bench_block_mask, scale=scaling, enable_gqa=True, kernel_options=options
        )
        return out.transpose(1, 2).contiguous(), None

    def none(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return query.transpose(1, 2).contiguous(), None

    for name, fn in (("bench_sdpa", sdpa), ("bench_flex", flex), ("bench_none", none)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask_none)


def probe_gqa(q_heads: int, kv_heads: int, head_dim: int, device, dtype, backend) -> bool:
    """Whether SDPA restricted to `backend` takes GQA natively (`enable_gqa`) at this head layout."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, q_heads, 256, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, 256, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=q_heads != kv_heads)
        return True
    except RuntimeError:
        return False


# -- timing -----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """(median ms over `repeats` timed calls after one untimed warm-up call, the last call's result)."""
    result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        del result
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """One prefill: the forward over the prompt filling a fresh cache, scoring the last position only.

    Returns:
        (next token `[B]`, the filled cache).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return out.logits[:, -1].argmax(-1), cache


def profile_prefill(model, ids: torch.Tensor, path: Path, rows: int = 30) -> list[dict]:
    """One prefill under the PyTorch profiler: its operators and kernels by self device time.

    Writes the profiler's table to `path` and returns the top `rows` entries as `{"name", "ms", "calls"}` (device
    time of the one prefill), so a run's JSON says where the time went (gates, selection, kernels, linear layers).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        prefill(model, ids)
        _sync(ids.device)
    events = prof.key_averages()
    key = "self_device_time_total" if ids.is_cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=key, row_limit=rows) + "\n")
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"name": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count} for e in top]


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_rate(model, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """Greedy decode tokens per second over `steps` steps after a prefill of `ids` (the prefill untimed)."""
    token, cache = prefill(model, ids)
    token = token[:, None]
    # One untimed step, so the first timed one does not pay a lazy initialisation.
    kw = cache_keyword(model)
    out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return steps * ids.shape[0] / (time.perf_counter() - start)


# -- one model ---------------------------------------------------------------------------------------------------


def apply_liger(model, device: torch.device) -> bool:
    """Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in `model`, as training applies them (`model.fused_kernels`;
    Liger's recommended setup for Llama and Qwen2 models). Applied before the seer copy, so both have them.

    Returns:
        Whether they were applied (a refusal is printed, and the shape runs without them: its rows say so).
    """
    from seer_finetune.config import ConfigError
    from seer_finetune.fused_kernels import apply_fused_kernels

    try:
        return apply_fused_kernels(model, "liger", device) == "liger"
    except ConfigError as exc:
        print(f"[bench prefill] Liger-Kernel not applied: {exc}", flush=True)
        return False


def seer_model(
    dense, block: int, device: torch.device, budget: str = "layer", compile_gate: bool = False,
    gate_query: str = "pooled",
):
    """A copy of `dense` with untrained gates of the trained configs' shape (hidden 128, sink 1, local 2, the
    given budget and `gate_query`), the gate path compiled when `compile_gate`."""
    from seer_finetune.seer import SeerRuntime, attach_seer_gates

    model = copy.deepcopy(dense)
    runtime = SeerRuntime(
        mode="dense", block_size=block, sink_blocks=1, local_blocks=2, budget=budget, compute_loss=False,
        compile_gate=compile_gate,
    )
    runtime.training = False
    # As in generation: no per-forward statistics (nothing would read them).
    runtime.record_stats = False
    # Gates are created float32 (as in training) on the device of each attention module.
    attach_seer_gates(model, runtime, gate_hidden_size=128, rope_units="blocks", gate_query=gate_query)
    return model.to(device).eval(), runtime


def bench_shape(shape: str, args, device: torch.device, dtype: torch.dtype, records: list[dict]) -> None:
    """Every variant of one model shape at every length, appended to `records`."""
    from transformers import AutoModelForCausalLM

    from bench_attention import flex_block_mask
    from seer_finetune.seer.attach import attention_modules
    from seer_finetune.generation import CACHED_SDPA, register_cached_sdpa

    config = model_config(shape, max(args.lengths))
    torch.manual_seed(args.seed)
    with torch.device(device):
        dense = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    liger = bool(args.liger) and apply_liger(dense, device)
    seer, runtime = seer_model(dense, args.block, device, args.budget, args.compile_gate, args.gate_query)
    layers = attention_modules(dense)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, layers[0].head_dim
    params = sum(p.numel() for p in dense.parameters())
    print(f"[bench prefill] {shape}: {params / 1e6:.0f}M parameters, {len(layers)} layers, {heads}/{kv_heads} heads of {head_dim}", flush=True)

    baselines: list[tuple[str, Any]] = []
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        baselines = [("dense_cudnn", SDPBackend.CUDNN_ATTENTION), ("dense_flash", SDPBackend.FLASH_ATTENTION)]
    else:
        baselines = [("dense_sdpa", None)]
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)

    gen = torch.Generator().manual_seed(args.seed)
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)
        base = dict(model=shape, length=length, params=params, layers=len(layers), block=args.block, liger=liger)

        def record(variant: str, **values) -> dict:
            row = {**base, "variant": variant, **values}
            records.append(row)
            print(json.dumps(row), flush=True)
            return row

        def guarded(variant: str, fn: Callable[[], dict]) -> Optional[dict]:
            try:
                return record(variant, **fn())
            except torch.OutOfMemoryError:
                _free(device)
                return record(variant, error="out of memory")
            except (RuntimeError, NotImplementedError) as exc:
                _free(device)
                return record(variant, error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

        dense_token = None
        for name, backend in baselines:
            dense.set_attn_implementation("bench_sdpa")

            def run_dense(backend=backend):
                from contextlib import nullcontext

                if backend is not None:
                    from torch.nn.attention import sdpa_kernel

                    gqa = probe_gqa(heads, kv_heads, head_dim, device, dtype, backend)
                    for layer in layers:
                        layer.bench_gqa = gqa
                    context = lambda: sdpa_kernel([backend])
                else:
                    gqa, context = True, nullcontext
                with context():
                    ms, (token, _cache) = time_call(lambda: prefill(dense, ids), device, args.repeats)
                return {"ms": ms, "native_gqa": gqa, "first_token": int(token[0])}

            row = guarded(name, run_dense)
            if dense_token is None and row and "first_token" in row:
                dense_token = row["first_token"]
        dense.set_attn_implementation("bench_none")
        guarded("no_attention", lambda: {"ms": time_call(lambda: prefill(dense, ids), device, args.repeats)[0]})

        for density in args.densities:
            runtime.configure(mode="dense" if density >= 1.0 else "joint", density=None if density >= 1.0 else density)
            runtime.record_block_masks = flex_fn is not None and density < 1.0

            def run_seer():
                ms, (token, _cache) = time_call(lambda: prefill(seer, ids), device, args.repeats)
                out = {"density": density, "ms": ms, "first_token": int(token[0])}
                if dense_token is not None:
                    out["first_token_agrees"] = int(token[0]) == dense_token
                return out

            seer_row = guarded(f"seer d={density:g}", run_seer)
            if args.profile is not None and density == min(args.densities) and seer_row and "ms" in seer_row:
                seer_row["profile_top"] = profile_prefill(seer, ids, args.profile / f"seer_{shape}_{length}_d{density:g}.txt")
            seer_token = seer_row.get("first_token") if seer_row else None
            runtime.record_block_masks = False
            masks = dict(runtime.block_masks)
            runtime.block_masks.clear()
            if flex_fn is not None and density < 1.0 and masks:

                def run_flex():
                    for layer in layers:
                        layer.bench_block_mask = flex_block_mask(masks[layer.layer_idx], length, args.block)
                        layer.bench_flex_fn = flex_fn
                    dense.set_attn_implementation("bench_flex")
                    try:
                        ms, (token, _cache) = time_call(lambda: prefill(dense, ids), device, args.repeats)
                    finally:
                        for layer in layers:
                            layer.bench_block_mask = None
                    # The same blocks attended: the same first token as the seer prefill (a check of the mask).
                    return {"density": density, "ms": ms, "first_token": int(token[0]), "first_token_as_seer": int(token[0]) == seer_token}

                guarded(f"flex d={density:g}", run_flex)
            masks = {}
            _free(device)

        if args.decode_tokens > 0:
            # transformers' SDPA with the cache-friendly backends, as `generate` runs it (`seer.decode`).
            register_cached_sdpa()
            dense.set_attn_implementation(CACHED_SDPA)
            guarded("decode dense", lambda: {"tokens_per_s": decode_rate(dense, ids, args.decode_tokens, device)})
            density = min(args.densities)
            runtime.configure(mode="dense" if density >= 1.0 else "joint", density=None if density >= 1.0 else density)
            guarded(
                f"decode seer d={density:g}",
                lambda: {"density": density, "tokens_per_s": decode_rate(seer, ids, args.decode_tokens, device)},
            )
        _free(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- table ---------------------------------------------------------------------------------------------------------


def summarize(records: list[dict], densities: list[float]) -> list[dict]:
    """Per model and length: the dense times, the attention share, and per density the seer and Flex times with
    their ratios and the cap.

    Args:
        records: The benchmark's records.
        densities: The densities measured.

    Returns:
        One dict per (model, length) with `dense_ms` (cuDNN, else the first dense baseline), `flash_ms`,
        `no_attention_ms`, `attention_share`, `decode_dense`, `decode_seer`, and per density d:
        `seer_ms[d]`, `flex_ms[d]`, `speedup[d]` (dense / seer), `vs_flex[d]` (flex / seer), `cap[d]`.
    """
    out = []
    keys = sorted({(r["model"], r["length"]) for r in records}, key=lambda k: (SHAPES.index(k[0]), k[1]))
    for model, length in keys:
        rows = {r["variant"]: r for r in records if (r["model"], r["length"]) == (model, length)}
        ms = lambda name: rows.get(name, {}).get("ms")
        dense = ms("dense_cudnn") or ms("dense_sdpa") or ms("dense_flash")
        rest = ms("no_attention")
        share = None if not dense or rest is None else max(0.0, (dense - rest) / dense)
        entry: dict[str, Any] = {
            "model": model,
            "length": length,
            "dense_ms": dense,
            "flash_ms": ms("dense_flash"),
            "no_attention_ms": rest,
            "attention_share": share,
            "decode_dense": rows.get("decode dense", {}).get("tokens_per_s"),
            "decode_seer": next((r.get("tokens_per_s") for v, r in rows.items() if v.startswith("decode seer")), None),
            "seer_ms": {}, "flex_ms": {}, "speedup": {}, "vs_flex": {}, "cap": {},
        }
        for d in densities:
            seer, flex = ms(f"seer d={d:g}"), ms(f"flex d={d:g}")
            entry["seer_ms"][d], entry["flex_ms"][d] = seer, flex
            entry["speedup"][d] = dense / seer if dense and seer else None
            entry["vs_flex"][d] = flex / seer if flex and seer else None
            entry["cap"][d] = dense / (rest + d * (dense - rest)) if dense and rest is not None and dense > rest else None
        out.append(entry)
    return out


def format_table(summary: list[dict], densities: list[float]) -> str:
    """The markdown table of `summarize`'s rows."""
    f = lambda x, spec=".0f": "-" if x is None else format(x, spec)
    head = ["model", "length", "dense ms (cuDNN)", "dense flash ms", "no-attention ms", "attention share"]
    for d in densities:
        head += [f"seer d={d:g} ms", f"speedup d={d:g}", f"cap d={d:g}", f"flex d={d:g} ms", f"seer vs flex d={d:g}"]
    head += ["decode dense tok/s", "decode seer tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["model"], str(e["length"]), f(e["dense_ms"]), f(e["flash_ms"]), f(e["no_attention_ms"]), f(e["attention_share"], ".0%")]
        for d in densities:
            cells += [f(e["seer_ms"][d]), f(e["speedup"][d], ".2f") + "x" * (e["speedup"][d] is not None),
                      f(e["cap"][d], ".2f") + "x" * (e["cap"][d] is not None), f(e["flex_ms"][d]),
                      f(e["vs_flex"][d], ".2f") + "x" * (e["vs_flex"][d] is not None)]
        cells += [f(e["decode_dense"], ".1f"), f(e["decode_seer"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(argv: Optional[list[str]], device: torch.device) -> dict[str, Any]:
    """GPU, versions and the command, for the record."""
    import transformers

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/bench_prefill.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    if device.type == "cuda":
        import triton

        env.update(triton=triton.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def main(argv: Optional[list[str]] = None) -> int:
    """Run every shape, length and variant; print the table; write `--json` and `--markdown`.

    Args:
        argv: Command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0, or 2 when `--device cuda` has no GPU.
    """
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench prefill needs a CUDA GPU (or --device cpu --shapes tiny for a functional check)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.liger is None:
        args.liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    register_baselines()
    env = environment(argv, device)
    from bench_quality import package_versions

    env["liger"] = package_versions()["liger-kernel"] if args.liger else "off"
    env["compile_gate"] = args.compile_gate
    env["gate_query"] = args.gate_query
    print(json.dumps(env), flush=True)
    records: list[dict] = []
    for shape in args.shapes:
        bench_shape(shape, args, device, dtype, records)
    summary = summarize(records, args.densities)
    table = format_table(summary, args.densities)
    notes = (
        f"Prefill of one prompt (batch 1, {str(dtype).replace('torch.', '')}, random weights, `logits_to_keep=1`, "
        f"KV cache filled), median of {args.repeats} after a warm-up; Liger-Kernel RMSNorm, SwiGLU and RoPE in every "
        f"model: {env['liger']}; seer: untrained gates of block {args.block}, "
        f"sink 1, local 2, {args.budget} budget, gate queries {args.gate_query}, gates + selection + block-sparse attention included. Flex: compiled "
        "FlexAttention with the blocks the seer prefill selected, mask built outside the timing (no gate, no "
        "selection). Speedups are against the dense cuDNN time (on CPU: PyTorch's SDPA). Cap d: dense / (no-attention + d x attention), what cutting attention alone to d could give: "
        "the linear layers, norms and embeddings stay."
    )
    print(f"\n{notes}\n{table}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "records": records, "summary": _jsonable(summary)}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Prefill time to first token\n\n`{env['command']}`\n\n{json.dumps(env)}\n\n{notes}\n\n"
        args.markdown.write_text(header + table + "\n")
    return 0


def _jsonable(summary: list[dict]) -> list[dict]:
    """Density-keyed dicts with string keys (JSON objects)."""
    return [{k: ({format(d, "g"): x for d, x in v.items()} if isinstance(v, dict) else v) for k, v in e.items()} for e in summary]


if __name__ == "__main__":
    sys.exit(main())
