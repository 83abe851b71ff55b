"""benchmarks/gate_rope_units.py on the embedded model and plays: every variant and family, and the JSON."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gate_rope_units_script_reports_each_variant(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gate_rope_units

    monkeypatch.setenv("SEER_CACHE", str(tmp_path / "cache"))
    plays = str(ROOT / "seer_finetune" / "assets" / "corpus" / "shakespeare")
    out = tmp_path / "result.json"
    args = ["--model", "builtin:tiny_llama", "--train", plays, "--train-mb", "0.3", "--eval", plays, "--native", "256",
            "--seq-len", "1024", "--block-size", "32", "--steps", "2", "--windows", "1", "--device", "cpu", "--json", str(out)]
    assert gate_rope_units.main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["family"]) for r in rows] == [(v, "shakespeare") for v in ("tokens", "blocks", "plain")]
    for r in rows:
        assert r["gate_loss"] > 0 and r["ppl_dense"] > 1 and r["ppl_gate"] > 1 and r["ppl_oracle"] > 1
    # the variants change the gate's positions, so its loss against the same ground truth differs
    assert len({round(r["gate_loss"], 9) for r in rows}) == 3
    assert "| blocks | shakespeare |" in capsys.readouterr().out
