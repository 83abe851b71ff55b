"""What a training step holds at its memory peak, tensor by tensor: bench_training_step's recipe under a tracker.

Builds the trainer of one of `bench_training_step`'s variants (`dense` or `seer`: the first two of `--shape`'s
variants, plus `--override`s), runs a warm-up step, then one tracked step, and prints the tensors alive at the
end of its forward and at its peak, grouped by (phase, op, shape, dtype, the first project / transformers / peft
frames that made them). Every storage an aten op allocates is tracked (a `TorchDispatchMode`), so tensors that
only autograd or a cache hold are counted too. On CPU (`--cpu`) the model is cut to `--layers`
layers and runs in bfloat16 without fused kernels, with a smaller chunk of the chunked LM loss (its 1 GiB logits
chunk would otherwise be the CPU peak); on CUDA it is the benchmark's recipe as it is.

    python benchmarks/diagnostics/step_memory.py seer --cpu --seq-len 16384 --layers 4 \
        --override attention.block_size=16      # nB = 1024 as at 128k tokens in blocks of 128
    python benchmarks/diagnostics/step_memory.py seer --shape qwen1.5b   # on a GPU
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/step_memory.py -> repository root
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]

# Frames that name where a tensor was made (the innermost two of them).
SITES = ("/seer_finetune/", "/seer_kernels/", "/transformers/models/", "/peft/", "/liger_kernel/", "torch/optim/",
         "torch/utils/checkpoint.py")


def _site() -> str:
    frame, out = sys._getframe(3), []
    while frame is not None and len(out) < 2:
        name = frame.f_code.co_filename
        if any(s in name for s in SITES):
            out.append(f"{name.rsplit('/', 1)[-1]}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(out)


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages that aten ops returned and that are still alive, with the live set at the peak.

    Attributes:
        mark: A label put on every tensor made from now on (e.g. the step).
        live, peak: Bytes alive now, and the most since `reset`.
        at_peak: `(bytes, tag)` of every storage alive at the peak (refreshed when it grows by 8 MiB or more).
    """

    def __init__(self):
        super().__init__()
        self.mark = ""
        self._keys = WeakIdKeyDictionary()
        self._entries: dict[int, tuple[int, tuple]] = {}
        self._counter = itertools.count()
        self.live = self.peak = self._last_snapshot = 0
        self.at_peak: list[tuple[int, tuple]] = []

    def _free(self, key: int) -> None:
        self.live -= self._entries.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: it was counted (or predates the tracker).
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t.untyped_storage()) in inputs:
                continue
            storage = t.untyped_storage()
            size = storage.nbytes()
            if size == 0 or storage in self._keys:
                continue
            key = next(self._counter)
            self._keys[storage] = key
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            tag = (f"{self.mark}{phase}", func.__name__, tuple(t.shape), str(t.dtype).replace("torch.", ""), _site())
            self._entries[key] = (size, tag)
            weakref.finalize(storage, self._free, key)
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
                if self.live >= self._last_snapshot + (8 << 20):
                    self._last_snapshot, self.at_peak = self.live, self.snapshot()
        return out

    def snapshot(self) -> list[tuple[int, tuple]]:
        return list(self._entries.values())

    def reset(self) -> None:
        self.peak = self._last_snapshot = self.live
        self.at_peak = self.snapshot()


def grouped(entries: list[tuple[int, tuple]], min_bytes: int = 1 << 20) -> list[dict]:
    """Entries summed by tag, largest first, those of at least `min_bytes`."""
    total, count = collections.Counter(), collections.Counter()
    for size, tag in entries:
        total[tag] += size
        count[tag] += 1
    return [
        {"mib": size / 2**20, "count": count[tag], "phase": tag[0], "op": tag[1], "shape": list(tag[2]),
         "dtype": tag[3], "site": tag[4]}
        for tag, size in total.most_common() if size >= min_bytes
    ]


def build_trainer(variant: str, args: argparse.Namespace):
    from bench_training_step import overrides, variants
    import seer_finetune.modeling as modeling
    from seer_finetune.compose import compose_config
    from seer_finetune.trainer import Trainer

    seq_len = args.seq_len or {"smollm2": 32768, "qwen1.5b": 131072}[args.shape]
    extra = list(args.override)
    if args.cpu:
        extra += ["model.dtype=bfloat16", "trainer.device=cpu", "model.fused_kernels=none"]
    if args.layers:
        load_config = modeling.load_model_config

        def fewer_layers(cfg, rope_cfg):
            config = load_config(cfg, rope_cfg)
            config.num_hidden_layers = args.layers
            return config

        modeling.load_model_config = fewer_layers
    chosen = list(variants(args.shape).values())[0 if variant == "dense" else 1]
    out_dir = Path(args.work_dir) / variant
    return Trainer(compose_config([*chosen, *overrides(args.shape, seq_len, out_dir), *extra])), seq_len


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("dense", "seer"))
    parser.add_argument("--shape", default="qwen1.5b", choices=("smollm2", "qwen1.5b"))
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    parser.add_argument("--cpu", action="store_true", help="CPU, bfloat16, no fused kernels")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--work-dir", default="/tmp/step_memory")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    tracker = LiveTensors()
    with tracker:
        trainer, seq_len = build_trainer(args.variant, args)
        if args.cpu:
            trainer.lm_loss.chunk_logits = 2**24
        tracker.mark = "warm-up "
        trainer.train_step()
        start = tracker.snapshot()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tracker.mark = ""
        tracker.reset()
        seen: dict = {}
        backward = trainer.engine.backward

        def noting_backward(loss):
            seen.update(live=tracker.live, entries=tracker.snapshot(), forward_peak=tracker.peak)
            return backward(loss)

        trainer.engine.backward = noting_backward
        metrics = trainer.train_step()
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    own = lambda entries: [e for e in entries if not e[1][0].startswith("warm-up")]  # noqa: E731
    result = {
        "variant": args.variant, "seq_len": seq_len, "layers": args.layers, "overrides": args.override,
        "mib": {"step_start": sum(e[0] for e in start) / 2**20, "end_of_forward": seen["live"] / 2**20,
                "forward_peak": seen["forward_peak"] / 2**20, "step_peak": tracker.peak / 2**20,
                "cuda_max_allocated": None if cuda_peak is None else cuda_peak / 2**20},
        "loss": metrics["train/loss"],
        "live_at_step_start": grouped(start),
        "made_in_step_alive_at_end_of_forward": grouped(own(seen["entries"])),
        "made_in_step_alive_at_peak": grouped(own(tracker.at_peak)),
    }
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    for key in ("live_at_step_start", "made_in_step_alive_at_end_of_forward", "made_in_step_alive_at_peak"):
        rows = result[key]
        print(f"\n== {key}: {sum(r['mib'] for r in rows):.1f} MiB in groups of 1 MiB or more")
        for r in rows[: args.top]:
            print(f"{r['mib']:9.1f} MiB {r['count']:4d}x {r['phase']:16s} {r['op']:28s} {str(r['shape']):24s} "
                  f"{r['dtype']:8s} {r['site']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
