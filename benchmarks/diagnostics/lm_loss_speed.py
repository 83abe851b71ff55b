"""The language-model loss alone: forward+backward time and peak memory of each way `seer_finetune.lm_loss` computes
it, on the hidden states of one sequence (random, bf16), in one process.

- `full logits`: transformers' way, the whole `[N, V]` logits upcast to float32 (skipped above `--full-max-gib`);
- `chunked`: chunks of rows under activation checkpointing (`lm_loss.chunked_loss_sum`, every row);
- `liger`: Liger-Kernel's fused linear cross entropy, as `lm_loss.liger_loss_sum` calls it (reads the target
  count back to the host, so no CUDA graph can hold it);
- `capturable`: the gradients computed in the forward on `seer_kernels.cross_entropy_with_grad`
  (`lm_loss.linear_cross_entropy_sum`), the loss of `trainer.cuda_graphs`.
Shapes: `smollm2` (32768 rows, hidden 576, vocabulary 49152, the head trained: SmolLM2's tied embeddings train in
the 32k recipe) and `qwen1.5b` (131072 rows, hidden 1536, vocabulary 151936, the head frozen: LoRA + norms). Each
loss's value and hidden-state gradient are compared with the first variant's; times are the median of `--repeats`
after two warm-up calls, peak memory is above the inputs. One CUDA GPU.

    python benchmarks/diagnostics/lm_loss_speed.py [--shapes smollm2 qwen1.5b] [--json lm_loss.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from seer_finetune.lm_loss import CHUNK_LOGITS, chunked_loss_sum, linear_cross_entropy_sum, liger_loss_sum  # noqa: E402

# name -> (rows, hidden, vocabulary, head trains)
SHAPES = {"smollm2": (32768, 576, 49152, True), "qwen1.5b": (131072, 1536, 151936, False)}


def variants(head: torch.nn.Linear, rows: int, full_max_gib: float) -> dict[str, Callable]:
    """name -> loss(hidden, targets), each the summed cross entropy as the trainer's losses compute it."""
    chunk = max(1, CHUNK_LOGITS // head.out_features)
    found: dict[str, Callable] = {}
    if rows * head.out_features * 4 / 2**30 <= full_max_gib:
        found["full logits"] = lambda h, t: torch.nn.functional.cross_entropy(
            head(h).float(), t, reduction="sum", ignore_index=-100)
    found["chunked"] = lambda h, t: chunked_loss_sum(head, h, t, rows=chunk, every_row=True)
    found["liger"] = lambda h, t: liger_loss_sum(head, h, t)
    found["capturable"] = lambda h, t: linear_cross_entropy_sum(h, head.weight, head.bias, t, rows=chunk)
    return found


def measure(shape: str, repeats: int, full_max_gib: float) -> list[dict]:
    """Time and check every variant at `shape`; returns one record per variant."""
    rows, hidden_size, vocab, head_trains = SHAPES[shape]
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.02)
    head.weight.requires_grad_(head_trains)
    hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[-1] = -100
    records, reference = [], None
    for name, loss_fn in variants(head, rows, full_max_gib).items():
        def step():
            hidden.grad = None
            head.weight.grad = None
            loss = loss_fn(hidden, targets)
            loss.backward()
            return loss

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        record = {"shape": shape, "variant": name, "ms": statistics.median(times),
                  "peak_gib_above_inputs": (torch.cuda.max_memory_allocated() - base) / 2**30,
                  "loss": float(loss) / (rows - 1)}
        grad = hidden.grad.float()
        if reference is None:
            reference = (record["loss"], grad)
        else:
            record["loss_rel_diff"] = abs(record["loss"] - reference[0]) / abs(reference[0])
            record["grad_cosine"] = float(torch.nn.functional.cosine_similarity(grad.flatten(), reference[1].flatten(), 0))
        records.append(record)
        print(f"[lm_loss] {json.dumps(record)}", flush=True)
    return records


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--full-max-gib", type=float, default=16.0, help="skip the full-logits loss above this many GiB of float32 logits")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lm_loss_speed.py times CUDA kernels: it needs a CUDA GPU", file=sys.stderr)
        return 2
    records = [r for shape in args.shapes for r in measure(shape, args.repeats, args.full_max_gib)]
    print(f"\nLM loss, forward+backward, {torch.cuda.get_device_name()}")
    print(f"{'shape':10s} {'variant':12s} {'ms':>9s} {'peak GiB':>9s} {'loss':>9s} {'vs first':>10s} {'grad cos':>9s}")
    for r in records:
        print(f"{r['shape']:10s} {r['variant']:12s} {r['ms']:9.2f} {r['peak_gib_above_inputs']:9.2f} {r['loss']:9.4f} "
              f"{r.get('loss_rel_diff', 0.0):10.2e} {r.get('grad_cosine', 1.0):9.6f}")
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
