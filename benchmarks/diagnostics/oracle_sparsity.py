"""How much perplexity block sparsity itself costs a model: oracle block selection at several settings.

Ranks each layer's key blocks by the true block-max-pooled attention (what a perfect gate would predict) and
keeps the top blocks per query block (or per layer, with the `layer` budget) at each density, with `sink_blocks`
leading and `local_blocks` trailing blocks forced, then prints the perplexity of held-out windows next to dense
attention. With `--gates`, the same settings also run with those trained gates' selection. Runs on CPU
(reference kernels) or CUDA.

    python benchmarks/diagnostics/oracle_sparsity.py --model ~/.cache/seer-data/models/hf/smollm2-135m \
        --corpus ~/.cache/seer-data/corpora/txt/austen --length 4096 --windows 2 \
        --settings 0.1:0:1 0.1:1:1 0.1:1:2 0.1:1:2:layer
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/oracle_sparsity.py -> repository root
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from seer_finetune.config import ModelConfig, RopeConfig  # noqa: E402
from seer_finetune.data import DocumentWindows, build_corpus, load_documents  # noqa: E402
from seer_finetune.perplexity import perplexity  # noqa: E402
from seer_finetune.modeling import load_model, load_tokenizer  # noqa: E402
from seer_finetune.seer import SeerRuntime, attach_seer_gates  # noqa: E402
from seer_finetune.seer.saving import load_gates  # noqa: E402


def parse_setting(text: str) -> tuple[float, int, int, str]:
    """`density:sink_blocks:local_blocks[:budget]`, e.g. `0.1:1:2` or `0.1:1:2:layer`."""
    try:
        density, sink, local, *budget = text.split(":")
        if len(budget) > 1 or (budget and budget[0] not in ("row", "layer")):
            raise ValueError
        return float(density), int(sink), int(local), budget[0] if budget else "row"
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not density:sink_blocks:local_blocks[:row|layer] (e.g. 0.1:1:2 or 0.1:1:2:layer)"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Print dense perplexity, then each setting's with oracle (and with `--gates`, gate) selection.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder or name")
    parser.add_argument("--corpus", required=True, help="a folder of text files (held-out documents)")
    parser.add_argument("--length", type=int, default=4096, help="tokens per evaluation window")
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--settings", type=parse_setting, nargs="+", default=[(0.5, 1, 2, "row"), (0.1, 1, 2, "row")])
    parser.add_argument("--gates", help="trained gates folder: also evaluate each setting with the gates' selection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model_cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(model_cfg)
    windows = DocumentWindows(build_corpus(load_documents(args.corpus), tokenizer), args.length, args.windows)
    if len(windows) == 0:
        raise SystemExit(f"no document in {args.corpus} reaches {args.length} tokens")
    model = load_model(model_cfg, RopeConfig(type="none"), device=device, seed=0).eval()
    if device.type == "cpu":
        model = model.float()
    runtime = SeerRuntime(mode="dense", block_size=args.block_size, compute_loss=False)
    runtime.training = False
    if args.gates:
        load_gates(model, args.gates, runtime=runtime)
    else:
        attach_seer_gates(model, runtime)

    def run(label: str) -> None:
        start = time.perf_counter()
        ppl = perplexity(model, windows, device=device)["ppl"]
        print(f"{label:<48} ppl {ppl:9.3f}   ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"{args.model}: {len(windows)} windows of {args.length} tokens from {args.corpus}, block {args.block_size}")
    run("dense")
    for density, sink, local, budget in args.settings:
        for oracle in (True, False) if args.gates else (True,):
            runtime.configure(
                mode="joint", density=density, sink_blocks=sink, local_blocks=local, budget=budget, oracle=oracle
            )
            run(f"density {density} sink {sink} local {local} {budget} {'oracle' if oracle else 'gates'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
