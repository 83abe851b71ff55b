"""The prefill benchmark at tiny shapes on CPU: every variant runs, the seer prefill's first token at density 1.0
is the dense model's, FlexAttention on the selected blocks gives the seer prefill's first token, and the table's
ratios and cap follow from the records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_prefill as bench  # noqa: E402


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_main_at_tiny_shapes_on_cpu(tmp_path):
    out, md = tmp_path / "prefill.json", tmp_path / "prefill.md"
    argv = [
        "--device", "cpu", "--shapes", "tiny", "--lengths", "256", "300", "--densities", "1.0", "0.5",
        "--block", "32", "--repeats", "1", "--decode-tokens", "2", "--json", str(out), "--markdown", str(md),
    ]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    records = report["records"]
    assert not [r for r in records if "error" in r]
    for length in (256, 300):
        rows = {r["variant"]: r for r in records if r["length"] == length}
        assert set(rows) == {
            "dense_sdpa", "no_attention", "seer d=1", "seer d=0.5", "flex d=0.5", "decode dense", "decode seer d=0.5"
        }
        assert rows["seer d=1"]["first_token"] == rows["dense_sdpa"]["first_token"]
        assert rows["seer d=1"]["first_token_agrees"] is True
        assert rows["flex d=0.5"]["first_token_as_seer"] is True
        assert rows["decode dense"]["tokens_per_s"] > 0 and rows["decode seer d=0.5"]["tokens_per_s"] > 0
    summary = report["summary"]
    assert [(e["model"], e["length"]) for e in summary] == [("tiny", 256), ("tiny", 300)]
    for e in summary:
        dense, rest = e["dense_ms"], e["no_attention_ms"]
        assert e["speedup"]["0.5"] == pytest.approx(dense / e["seer_ms"]["0.5"])
        assert e["vs_flex"]["0.5"] == pytest.approx(e["flex_ms"]["0.5"] / e["seer_ms"]["0.5"])
        if dense > rest:
            assert e["cap"]["0.5"] == pytest.approx(dense / (rest + 0.5 * (dense - rest)))
    text = md.read_text()
    assert "bench_prefill.py --device cpu" in text and "Cap d" in text and "| tiny | 256 |" in text
    assert report["env"]["torch"] == torch.__version__


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_token_gate_prefill_runs_and_is_dense_at_density_1(tmp_path):
    out = tmp_path / "prefill.json"
    argv = [
        "--device", "cpu", "--shapes", "tiny", "--lengths", "300", "--densities", "1.0", "0.5", "--block", "32",
        "--repeats", "1", "--decode-tokens", "0", "--no-flex", "--gate-query", "token_prob_max", "--json", str(out),
    ]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["env"]["gate_query"] == "token_prob_max"
    rows = {r["variant"]: r for r in report["records"]}
    assert not [r for r in rows.values() if "error" in r]
    assert rows["seer d=1"]["first_token"] == rows["dense_sdpa"]["first_token"]
    assert rows["seer d=0.5"]["ms"] > 0
    from transformers import AutoModelForCausalLM

    from seer_finetune.seer.attach import attention_modules

    dense = AutoModelForCausalLM.from_config(bench.model_config("tiny", 300), attn_implementation="sdpa")
    seer, _ = bench.seer_model(dense, 32, torch.device("cpu"), gate_query="token_prob_max")
    assert {m.seer_gate.gate_query for m in attention_modules(seer)} == {"token_prob_max"}


def test_cap_and_ratios_from_records():
    base = dict(model="qwen1.5b", length=131072)
    records = [
        {**base, "variant": "dense_cudnn", "ms": 100.0},
        {**base, "variant": "dense_flash", "ms": 110.0},
        {**base, "variant": "no_attention", "ms": 20.0},
        {**base, "variant": "seer d=0.1", "ms": 30.0},
        {**base, "variant": "flex d=0.1", "ms": 45.0},
    ]
    (e,) = bench.summarize(records, [0.1])
    assert e["attention_share"] == pytest.approx(0.8)
    assert e["cap"][0.1] == pytest.approx(100.0 / 28.0)
    assert e["speedup"][0.1] == pytest.approx(100.0 / 30.0) and e["vs_flex"][0.1] == pytest.approx(1.5)
    assert "3.57x" in bench.format_table([e], [0.1])


def test_model_shapes():
    qwen = bench.model_config("qwen1.5b", 131072)
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.num_attention_heads, qwen.num_key_value_heads) == (28, 1536, 12, 2)
    assert (qwen.head_dim, qwen.intermediate_size, qwen.vocab_size) == (128, 8960, 151936)
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.max_position_embeddings >= 131072
    smol = bench.model_config("smollm2", 65536)
    assert (smol.num_hidden_layers, smol.hidden_size, smol.num_attention_heads, smol.num_key_value_heads) == (30, 576, 9, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused():
    assert bench.main(["--device", "cuda", "--shapes", "tiny", "--lengths", "256"]) == 2
