"""benchmarks/diagnostics/oracle_sparsity.py on the embedded model and plays: one line per setting, oracle and
gates."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_oracle_sparsity_script_prints_every_setting(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks" / "diagnostics"))
    import oracle_sparsity

    monkeypatch.setenv("SEER_CACHE", str(tmp_path / "cache"))
    plays = str(ROOT / "seer_finetune" / "assets" / "corpus" / "shakespeare")
    args = ["--model", "builtin:tiny_llama", "--corpus", plays, "--length", "512", "--windows", "1", "--block-size", "32",
            "--device", "cpu", "--settings", "0.5:1:2", "0.25:0:1", "0.25:0:1:layer"]
    assert oracle_sparsity.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " ppl " in line]
    assert [line.split(" ppl ")[0].strip() for line in lines] == [
        "dense", "density 0.5 sink 1 local 2 row oracle", "density 0.25 sink 0 local 1 row oracle",
        "density 0.25 sink 0 local 1 layer oracle"]
    ppl = [float(line.split(" ppl ")[1].split()[0]) for line in lines]
    assert all(p > 1 for p in ppl) and ppl[2] != ppl[3]  # the budget changes which blocks are kept
    for bad in ("0.5", "0.5:1:2:head"):  # not density:sink:local[:row|layer]
        with pytest.raises(SystemExit):
            oracle_sparsity.main([*args[:-3], bad])
