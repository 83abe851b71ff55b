"""benchmarks/oracle_sparsity.py on the embedded model and plays: one line per setting, oracle and gates."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_oracle_sparsity_script_prints_every_setting(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import oracle_sparsity

    monkeypatch.setenv("SEER_CACHE", str(tmp_path / "cache"))
    plays = str(ROOT / "seer_finetune" / "assets" / "corpus" / "shakespeare")
    args = ["--model", "builtin:tiny_llama", "--corpus", plays, "--length", "512", "--windows", "1", "--block-size", "32",
            "--device", "cpu", "--settings", "0.5:1:2", "0.25:0:1"]
    assert oracle_sparsity.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " ppl " in line]
    assert [line.split(" ppl ")[0].strip() for line in lines] == [
        "dense", "density 0.5 sink 1 local 2 oracle", "density 0.25 sink 0 local 1 oracle"]
    assert all(float(line.split(" ppl ")[1].split()[0]) > 1 for line in lines)
    with pytest.raises(SystemExit):
        oracle_sparsity.main([*args[:-2], "0.5"])  # not density:sink:local
