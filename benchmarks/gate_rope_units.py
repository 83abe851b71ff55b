"""Do gates distilled at the native length transfer to the YaRN-extended length? Three gate RoPE variants.

The gate applies the model's rotary embedding at *block* positions. Under YaRN the model's settings are in
*token* units (e.g. original 8192), so in block units the gate sees 128 positions at 8k and 512 at 32k without
the interpolation YaRN gives the model's own attention. This distils gates at `--native` tokens (base frozen,
dense, no RoPE scaling), then loads them on the base model YaRN-extended to `--seq-len` and measures, before
any joint training, the gate loss (KL against the true pooled attention) and the perplexity at `--density`
(gate selection, and oracle selection as the bound) for the gate's rotary configured as:
  tokens: the model's own YaRN settings (the default);
  blocks: YaRN with its lengths divided by the block size (interpolation matched to block positions);
  plain:  no scaling (the rotary the gates were distilled with, extrapolated to 4x the positions).

    python benchmarks/gate_rope_units.py --model ~/.cache/seer-data/models/hf/smollm2-135m \
        --train ~/.cache/seer-data/corpora/txt/bible_web --eval ~/.cache/seer-data/corpora/txt/austen
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from seer_finetune.config import ModelConfig, RopeConfig  # noqa: E402
from seer_finetune.data import DocumentWindows, PackedSequences, build_corpus, load_documents  # noqa: E402
from seer_finetune.evaluation import perplexity  # noqa: E402
from seer_finetune.modeling import load_model, load_tokenizer  # noqa: E402
from seer_finetune.seer.attention import SeerRuntime, _rotary_module, attach_seer_gates, seer_gates  # noqa: E402
from seer_finetune.seer.gate import gate_rotary_embedding  # noqa: E402


def variant_rotary(model_config, rotary, hidden_size: int, block_size: int, variant: str):
    """The gate's rotary module per variant: `tokens` / `blocks` are `attention.gate_rope_units`; `plain`
    drops the scaling (the rotary the gates were distilled with)."""
    if variant == "plain":
        config = copy.deepcopy(model_config)
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
        return gate_rotary_embedding(config, rotary, hidden_size)
    return gate_rotary_embedding(model_config, rotary, hidden_size, block_size=block_size, units=variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", nargs="+", required=True, help="folders of training documents (gate distillation)")
    parser.add_argument("--train-mb", type=float, default=2.0, help="MB of text taken from each training folder")
    parser.add_argument("--eval", nargs="+", required=True, help="folders of held-out documents, one per family")
    parser.add_argument("--native", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150, help="gate distillation steps at the native length")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows per family")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(model_cfg)

    # Gate distillation at the native length: base frozen and dense, KL on every query block.
    model = load_model(model_cfg, RopeConfig(type="none"), device=device, seed=0).to(dtype).eval()
    model.requires_grad_(False)
    runtime = SeerRuntime(mode="gate_distill", block_size=args.block_size, ground_truth_query_fraction=1.0)
    attach_seer_gates(model, runtime)
    gates = seer_gates(model)
    for gate in gates:
        gate.to(device)
    optimizer = torch.optim.AdamW([p for g in gates for p in g.parameters()], lr=args.lr, weight_decay=0.0)
    documents = []
    for folder in args.train:
        budget = args.train_mb * 1e6
        for doc in load_documents(folder):
            if budget <= 0:
                break
            documents.append(doc)
            budget -= len(doc)
    train = PackedSequences(build_corpus(documents, tokenizer, num_proc=8), args.native)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for step in range(args.steps):
        item = train[order[step % len(train)]]
        model(input_ids=item["input_ids"][None].to(device), position_ids=item["position_ids"][None].to(device), use_cache=False)
        loss = torch.stack(list(runtime.take_losses().values())).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.take_stats()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"distil step {step + 1}: gate loss {loss.item():.3f} (summed over layers)", flush=True)
    print(f"distilled {args.steps} steps at {args.native} in {time.perf_counter() - start:.0f} s", flush=True)
    state = {g.layer_idx: {k: v.detach().clone() for k, v in g.state_dict().items()} for g in gates}
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The same gates on the YaRN-extended model, before any joint training.
    factor = args.seq_len / args.native
    yarn = RopeConfig(
        type="yarn", factor=factor, original_max_position_embeddings=args.native, max_position_embeddings=args.seq_len
    )
    model = load_model(model_cfg, yarn, device=device, seed=0).to(dtype).eval()
    runtime = SeerRuntime(mode="gate_distill", block_size=args.block_size, training=False)
    attach_seer_gates(model, runtime)
    rotary = _rotary_module(model)
    for gate in seer_gates(model):
        gate.load_state_dict(state[gate.layer_idx])
        gate.to(device)
    windows = {
        Path(folder).name: DocumentWindows(
            build_corpus(load_documents(folder), tokenizer, num_proc=8), args.seq_len, args.windows
        )
        for folder in args.eval
    }
    results = []
    for variant in ("tokens", "blocks", "plain"):
        for gate in seer_gates(model):
            gate.rotary = variant_rotary(model.config, rotary, gate.hidden_size, args.block_size, variant).to(device)
        for family, data in windows.items():
            row = {"variant": variant, "family": family}
            runtime.mode, runtime.density, runtime.compute_loss, runtime.oracle = "gate_distill", None, True, False
            runtime.take_stats()
            row["ppl_dense"] = perplexity(model, data, device=device)["ppl"]
            stats = runtime.take_stats()
            row["gate_loss"] = sum(v for k, v in stats.items() if k.startswith("gate_loss/"))
            runtime.mode, runtime.density, runtime.compute_loss = "joint", args.density, False
            runtime.sink_blocks, runtime.local_blocks = 1, 2
            row["ppl_gate"] = perplexity(model, data, device=device)["ppl"]
            runtime.oracle = True
            row["ppl_oracle"] = perplexity(model, data, device=device)["ppl"]
            runtime.oracle = False
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| gate rotary | family | gate loss (sum over layers) | ppl dense | ppl gate @ {args.density} | ppl oracle |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['family']} | {r['gate_loss']:.2f} | {r['ppl_dense']:.3f} | {r['ppl_gate']:.3f} | {r['ppl_oracle']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
