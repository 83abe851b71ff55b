"""The quality benchmark (benchmarks/bench_quality.py) end to end on CPU with the embedded model and corpus
standing in for SmolLM2 and the Debian corpora."""

import json
import sys
from pathlib import Path

import pytest

from seer_finetune.compose import available, compose_config
from seer_finetune.seer.selection import block_candidates, row_quotas


ROOT = Path(__file__).resolve().parents[1]
PLAYS = sorted((ROOT / "seer_finetune" / "assets" / "corpus" / "shakespeare").glob("*.txt"))


def _fake_corpora(root: Path) -> Path:
    """get_corpora.sh's layout (txt/<corpus>/...), filled with the shipped plays."""
    layout = {
        "spurgeon_treasury_of_david": PLAYS[0:2],
        "bible_web": PLAYS[2:4],
        "acl2": PLAYS[4:5],
        "coq": PLAYS[5:6],
        "linux": PLAYS[6:8],
        "austen": PLAYS[8:9],
        "shakespeare": PLAYS[9:10],
        "hol_light": PLAYS[10:12],
    }
    for name, files in layout.items():
        (root / "txt" / name).mkdir(parents=True)
        for f in files:
            (root / "txt" / name / f.name).write_text(f.read_text())
    return root


@pytest.mark.slow
def test_quality_pipeline_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    monkeypatch.setenv("SEER_CACHE", str(tmp_path / "cache"))
    corpora = _fake_corpora(tmp_path / "corpora")
    out = tmp_path / "quality"
    argv = [
        "--model", "builtin:tiny_llama", "--corpora", str(corpora), "--out", str(out),
        "--native", "256", "--seq-len", "1024", "--steps", "2", "--init-steps", "2",
        "--eval-windows", "2", "--train-eval-windows", "1", "--passkey-trials", "2", "--num-proc", "1",
        "--lr", "1e-3", "--device", "cpu", "--sparsities", "0.5", "0.9", "--jobs", "2", "--time-steps", "1",
        "--variant", "gate_stage", "sparsity50", "attention.init_steps=1", "attention.gate_hidden_size=16",
        "--oracle-layers", "0-3", "2",
        # 192 gate features hold the 90% experiment's logit-bound gate at head_dim 32 (64 of them without RoPE).
        "--override", "attention.gate_hidden_size=192", "trainer.micro_batch_size=1", "trainer.save_every=0",
    ]
    assert bench_quality.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["versions"]["torch"] and 0 < report["host_loop_ms"] < 60_000  # the host's yardstick, in ms
    runs = [r["run"] for r in report["rows"]]
    assert runs == ["base (native length)", "base + YaRN, no training", "dense YaRN fine-tuning",
                    "seer joint, 50% sparsity", "seer joint, 50% sparsity, oracle selection",
                    "seer joint, 50% sparsity, row budget",
                    "seer joint, 50% sparsity, oracle selection in layers 0-3",
                    "seer joint, 50% sparsity, oracle selection in layers 2-2",
                    "seer joint, 90% sparsity", "seer joint, 90% sparsity, oracle selection",
                    "seer joint, 90% sparsity, row budget",
                    "seer joint, 90% sparsity, oracle selection in layers 0-3",
                    "seer joint, 90% sparsity, oracle selection in layers 2-2",
                    "seer joint, 50% sparsity, gate_stage", "seer joint, 50% sparsity, oracle selection, gate_stage"]
    # Every run trained in its own process; the variant's gate-only stage is counted in its training cost. Its
    # gates have another shape than the shared initialisation's, so it started from its own, and so did the 90%
    # experiment's logit-bound gate.
    assert (out / "logs" / "gate_stage.log").is_file()
    own_gates = json.loads((out / "runs" / "gate_init_gate_stage" / "final" / "seer_gates.json").read_text())
    assert own_gates["gate_hidden_size"] == 16
    assert json.loads((out / "runs" / "gate_init" / "final" / "seer_gates.json").read_text())["gate_hidden_size"] == 192
    bound = json.loads((out / "runs" / "gate_init_sparsity90" / "final" / "seer_gates.json").read_text())
    assert (bound["q_pooling"], bound["rope_fraction"], bound["gate_hidden_size"]) == (["avg", "abs_avg"], 0.5, 192)
    assert report["training"]["gate_stage"]["gate_stage_steps"] == 1 and report["training"]["sparsity90"]["gate_stage_steps"] == 0
    assert all(c["steps"] == 2 for run, c in report["training"].items() if not run.startswith("gate_init"))
    assert "not comparable" in (out / "results.md").read_text()
    rows = {r["run"]: r for r in report["rows"]}
    for r in report["rows"]:
        assert r["ppl_books"] > 1 and r["ppl_technical"] > 1
    # realised sparsity is what the gates kept at evaluation, close to the trained target
    assert abs(rows["seer joint, 50% sparsity"]["realised_sparsity"] - 0.5) < 0.05
    # At 16 blocks, 90% sparsity is below the floor of the forced blocks (seer_joint keeps the sink block and two
    # local blocks): evaluation keeps exactly what the quotas of the trained settings allow.
    cand = block_candidates(1024, 64)
    floor = 1 - row_quotas(cand, 0.1, sink_blocks=1, local_blocks=2).sum().item() / cand.sum().item()
    assert 0.5 < floor < 0.9
    assert rows["seer joint, 90% sparsity"]["realised_sparsity"] == pytest.approx(floor, abs=1e-6)
    assert len(rows["seer joint, 90% sparsity"]["realised_density_per_layer"]) == 4
    dense_passkey = rows["dense YaRN fine-tuning"]["passkey"]
    assert set(dense_passkey) == {"256", "512", "1024"}
    assert all(p["trials"] == 2 and p["ci_low"] <= p["accuracy"] <= p["ci_high"] for p in dense_passkey.values())
    assert all(p["needle_kept_per_layer"] is None for p in dense_passkey.values())
    # The oracle rows evaluate the same weights at the same density with blocks ranked by the true attention,
    # passkey included; every sparse row says per layer whether the question's blocks kept the needle.
    oracle = rows["seer joint, 90% sparsity, oracle selection"]
    assert oracle["realised_sparsity"] == pytest.approx(floor, abs=1e-6)
    for row in (oracle, rows["seer joint, 90% sparsity"]):
        assert all(len(p["needle_kept_per_layer"]) == 4 for p in row["passkey"].values())
        # recall of the ground truth per layer, never above the best selection of the same size
        assert all(0 < g <= o + 1e-6 for g, o in zip(row["recall_per_layer"], row["oracle_recall_per_layer"]))
        # and per family, whose layers average to the row's
        for family in ("books", "technical"):
            gate, best = row[f"recall_per_layer_{family}"], row[f"oracle_recall_per_layer_{family}"]
            assert len(gate) == 4 and all(0 < g <= o + 1e-6 for g, o in zip(gate, best))
            assert row[f"recall_{family}"] == pytest.approx(sum(gate) / 4)
        mean = [(b + t) / 2 for b, t in zip(row["recall_per_layer_books"], row["recall_per_layer_technical"])]
        assert row["recall_per_layer"] == pytest.approx(mean)
    # At 50% the gate chooses among free blocks, and the oracle chooses differently.
    assert rows["seer joint, 50% sparsity, oracle selection"]["ppl_books"] != rows["seer joint, 50% sparsity"]["ppl_books"]
    # The other budget (seer_joint trains with the layer budget) spends the same number of blocks per row.
    # Oracle selection in every layer (0-3 of the tiny model's four) is the oracle row. In layer 2 alone: layers 0
    # and 1 select (and recall) as the gate row does, and layer 2, on the same input, recalls at least as much.
    every, one = rows["seer joint, 90% sparsity, oracle selection in layers 0-3"], rows["seer joint, 90% sparsity, oracle selection in layers 2-2"]
    assert every["ppl_books"] == pytest.approx(oracle["ppl_books"], rel=1e-6) and "passkey" in one
    gate_row = rows["seer joint, 90% sparsity"]
    assert one["recall_per_layer"][:2] == pytest.approx(gate_row["recall_per_layer"][:2], abs=1e-6)
    assert one["recall_per_layer"][2] >= gate_row["recall_per_layer"][2] - 1e-6
    per_row = rows["seer joint, 50% sparsity, row budget"]
    assert per_row["realised_sparsity"] == pytest.approx(rows["seer joint, 50% sparsity"]["realised_sparsity"], abs=1e-6)
    assert "passkey" not in per_row and per_row["ppl_books"] != rows["seer joint, 50% sparsity"]["ppl_books"]
    assert report["training"]["dense"]["tokens_per_s"] > 0 and report["training"]["sparsity90"]["train_s"] > 0
    # Every run timed alone after training; a sparse recipe's cost adds its gate initialisation's steps.
    training = report["training"]
    assert all(c["step_s_alone"] > 0 for c in training.values())
    for run, init in (("sparsity90", "gate_init_sparsity90"), ("gate_stage", "gate_init_gate_stage")):
        own = (training[run]["steps"] + training[run]["gate_stage_steps"]) * training[run]["step_s_alone"]
        assert training[run]["recipe_s_alone"] == pytest.approx(own + training[init]["steps"] * training[init]["step_s_alone"])
        assert training[run]["recipe_vs_dense"] == pytest.approx(
            training[run]["recipe_s_alone"] / (training["dense"]["steps"] * training["dense"]["step_s_alone"]))
    assert training["dense"]["recipe_vs_dense"] == 1.0
    assert "recipe GPU time vs dense (gate initialisation included)" in (out / "results.md").read_text()
    for png in ("ppl_vs_sparsity.png", "loss_curves.png", "density_per_layer.png"):
        assert (out / png).stat().st_size > 1000
    assert "| seer joint, 90% sparsity | 1024 |" in (out / "results.md").read_text()
    assert list((out / "runs" / "dense" / "wandb").glob("offline-run-*"))
    # The training corpora never contain an evaluation family's files.
    train_files = {p.name for p in (out / "data" / "train").rglob("*.txt")}
    eval_files = {p.name for f in ("books", "technical") for p in (out / "data" / f).rglob("*.txt")}
    assert train_files and eval_files and not train_files & eval_files
    # A second invocation reuses every trained run and every finished evaluation.
    finished = [*(out / "runs").glob("*/summary.json"), *(out / "evals").glob("*.json")]
    assert len(finished) == 7 + 15
    before = {p: p.stat().st_mtime for p in finished}
    assert bench_quality.main(argv) == 0
    assert {p: p.stat().st_mtime for p in finished} == before
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]


def test_the_128k_family_composes_from_the_same_code(tmp_path):
    """`--exp-prefix yarn128k --gate-init-exp gate_init32k`: every training run of the Qwen table composes from its
    experiment with the invocation's lengths, and the table reports each run's peak GPU memory and throughput."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import bench_quality
    from seer_finetune.compose import compose_config

    folders = {name: tmp_path / "data" / name for name in ("train", "books", "technical")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "a.txt").write_text("text")
    args = argparse.Namespace(
        model="builtin:tiny_qwen2", native=32768, seq_len=131072, steps=15, init_steps=100, grad_accum=1, lr=2e-4,
        gate_lr=1e-3, train_eval_windows=1, num_proc=1, save_every=5, out=tmp_path, wandb="disabled", override=[],
        sparsities=[0.5, 0.9], variant=[], exp_prefix="yarn128k", gate_init_exp="gate_init32k",
    )
    specs = bench_quality.run_specs(args, folders)
    assert list(specs) == ["dense", "gate_init", "sparsity50", "sparsity90"]
    cfgs = {run: compose_config(spec) for run, spec in specs.items()}
    assert cfgs["gate_init"].data.seq_len == 32768 and cfgs["gate_init"].rope.type == "none"
    assert cfgs["gate_init"].attention.mode == "gate_distill" and cfgs["gate_init"].trainer.max_steps == 100
    for run in ("dense", "sparsity50", "sparsity90"):
        c = cfgs[run]
        assert (c.data.seq_len, c.rope.factor, c.rope.original_max_position_embeddings) == (131072, 4.0, 32768)
        assert c.model.gradient_checkpointing and c.trainer.lm_loss == "auto" and c.trainer.max_steps == 15
        assert c.trainer.save_every == 5 and c.peft.trainable_norms
    for run, density in (("sparsity50", 0.5), ("sparsity90", 0.1)):
        a = cfgs[run].attention
        assert a.mode == "joint" and a.density == pytest.approx(density) and a.block_size == 128
        assert a.gates_path == str(tmp_path / "runs" / "gate_init" / "final")
    assert cfgs["gate_init"].attention.block_size == 128

    rows = [{"run": "dense YaRN fine-tuning", "length": 131072, "target_sparsity": 0.0, "realised_sparsity": 0.0,
             "ppl_books": 10.0, "ppl_technical": 3.0}]
    cost = {run: {"steps": 15, "gate_stage_steps": 0, "gate_stage_s": 0.0, "train_s": s, "tokens_per_s": t,
                  "peak_memory_gib": peak}
            for run, s, t, peak in (("dense", 300.0, 8000.0, 61.25), ("gate_init", 60.0, 50000.0, 20.0),
                                    ("sparsity90", 100.0, 24000.0, 58.5))}
    text = bench_quality.table(rows, cost, 131072)
    assert "| dense | 15 | 0 | 1.00x | 61.2 GiB |" in text and "| sparsity90 | 15 | 0 | 0.33x | 58.5 GiB |" in text
    assert "dense 8000 tokens/s, 90% sparsity 24000 tokens/s (3.00x)" in text
    # Runs of one step have no throughput (their first step is left out of the median): said, not "nan".
    cost["sparsity90"]["tokens_per_s"] = float("nan")
    text = bench_quality.table(rows, cost, 131072)
    assert "throughput at 131072 tokens: not measured (each run needs 2 or more steps)" in text and "nan" not in text


def test_a_run_whose_step_timing_failed_keeps_the_others_figures(tmp_path):
    """`training_cost` with one run timed as None (its timing raised): that run, and only it, has no step time,
    recipe time or ratio; the table says "failed" for it and gives the others' figures."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality_report import table, training_cost

    steps = {"dense": 4, "gate_init": 6, "sparsity90": 4, "gate_init_tokprob": 6, "tokprob": 4}
    dirs = {}
    for run, n in steps.items():
        dirs[run] = tmp_path / run
        dirs[run].mkdir()
        records = [{"step": i, "train/step_time_s": 0.5, "train/tokens_per_s": 1000.0} for i in range(n)]
        (dirs[run] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    alone = {"dense": 1.0, "gate_init": 0.25, "sparsity90": 0.5, "gate_init_tokprob": 0.25, "tokprob": None}
    inits = {"sparsity90": "gate_init", "tokprob": "gate_init_tokprob"}
    cost = training_cost(dirs, alone, inits)
    assert cost["sparsity90"]["recipe_vs_dense"] == pytest.approx((4 * 0.5 + 6 * 0.25) / 4.0)
    assert cost["gate_init_tokprob"]["step_s_alone"] == 0.25
    assert cost["tokprob"]["step_s_alone"] is None and cost["tokprob"]["recipe_vs_dense"] is None
    rows = [{"run": "dense YaRN fine-tuning", "length": 64, "target_sparsity": 0.0, "realised_sparsity": 0.0,
             "ppl_books": 10.0, "ppl_technical": 5.0}]
    text = table(rows, cost, 64)
    assert "| tokprob | 4 | 0 | 1.00x | - | failed | failed |" in text
    assert "| sparsity90 | 4 | 0 | 1.00x | - | 0.500 s | 0.88x |" in text


def test_runs_with_the_same_gate_share_one_gate_initialisation(tmp_path):
    """A sparse run whose gate (from its experiment and its variant's overrides) differs from the gate
    initialisation experiment's gets its own gate initialisation with those values, trained once for every run
    with the same gate; a run whose gate is the experiment's starts from the plain one. A variant's base need not
    be trained itself: it names the experiment and the density."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import bench_quality

    bound = ["attention.q_pooling=[avg,abs_avg]", "attention.gate_hidden_size=256", "attention.gate_rope_fraction=0.5",
             "attention.gate_weight_init=logit_bound"]
    folders = {name: tmp_path / "data" / name for name in ("train", "books", "technical")}
    args = argparse.Namespace(
        model="builtin:tiny_llama", native=8192, seq_len=32768, steps=10, init_steps=20, grad_accum=1, lr=2e-4,
        gate_lr=1e-3, train_eval_windows=1, num_proc=1, save_every=5, out=tmp_path, wandb="disabled", override=[],
        sparsities=[0.9], exp_prefix="yarn32k", gate_init_exp="gate_init8k",
        variant=[
            ["norope50", "sparsity50", "attention.gate_rope_units=none"],
            ["norope95", "sparsity95", "attention.gate_rope_units=none", "attention.gate_rope_fraction=1.0"],
            ["mass50", "sparsity50", "attention.row_mass=0.3"],
            ["wide50", "sparsity50", "attention.gate_hidden_size=256"],
            ["tokenmax50", "sparsity50", "attention.gate_query=token_prob_max"],
            ["bound50", "sparsity50", *bound],
            ["uniform90", "sparsity90", "attention.gate_weight_init=uniform"],
            ["mass90", "sparsity90", "attention.row_mass=0.5"],
            ["fresh90", "sparsity90", "attention.gates_path=null", "optim.gate_lr=0"],
        ],
    )
    specs = bench_quality.run_specs(args, folders)
    assert [run for run in specs if run.startswith("gate_init")] == [
        "gate_init", "gate_init_sparsity90", "gate_init_norope50", "gate_init_norope95", "gate_init_wide50",
        "gate_init_tokenmax50", "gate_init_uniform90",
    ]
    # The 90% experiment's own gate (the logit-bound one) reaches its initialisation, how it starts included.
    assert all(o in specs["gate_init_sparsity90"] for o in bound)
    assert not [o for o in specs["gate_init"] if o.split("=", 1)[0] in bench_quality.GATE_SHAPE_FIELDS]
    assert "attention.gate_weight_init=logit_bound" not in specs["gate_init_uniform90"]
    assert "attention.gate_hidden_size=256" in specs["gate_init_uniform90"]
    assert "attention.gate_rope_units=none" in specs["gate_init_norope50"]
    assert not [o for o in specs["gate_init_norope50"] if o.startswith("attention.row_mass")]
    assert "sparsity50" not in specs and "+exp=yarn32k_sparsity50" in specs["norope50"]
    assert "attention.density=0.5" in specs["norope50"] and "attention.density=0.05" in specs["norope95"]
    # A variant that names its own gates (fresh ones here) has no initialisation run and waits for none.
    assert [o for o in specs["fresh90"] if o.startswith("attention.gates_path=")] == ["attention.gates_path=null"]
    assert compose_config(specs["fresh90"]).attention.gates_path is None
    assert "fresh90" not in bench_quality.gate_inits(specs)
    init_of = {run: next(o for o in spec if o.startswith("attention.gates_path=")).rsplit("/", 2)[-2]
               for run, spec in specs.items() if not run.startswith(("gate_init", "dense", "fresh"))}
    assert bench_quality.gate_inits(specs) == init_of
    assert init_of == {"sparsity90": "gate_init_sparsity90", "norope50": "gate_init_norope50",
                       "norope95": "gate_init_norope95", "mass50": "gate_init", "wide50": "gate_init_wide50",
                       "tokenmax50": "gate_init_tokenmax50", "bound50": "gate_init_sparsity90",
                       "uniform90": "gate_init_uniform90", "mass90": "gate_init_sparsity90"}
    args.variant = [["odd", "dense", "attention.row_mass=0.3"]]
    with pytest.raises(SystemExit, match="base run must be sparsity<NN>"):
        bench_quality.run_specs(args, folders)


def test_each_joint_experiment_has_the_gate_of_the_initialisation_it_starts_from():
    """A joint experiment's gates_path names a gate initialisation experiment's output; loading gates of another
    shape is refused at run time, so the two experiments must agree on every gate field."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    outputs = {compose_config([f"+exp={name}"]).trainer.output_dir: name for name in available("exp")}
    checked = 0
    for name in available("exp"):
        attention = compose_config([f"+exp={name}"]).attention
        if attention.mode != "joint" or not attention.gates_path:
            continue
        init = outputs[str(Path(attention.gates_path).parent)]
        assert bench_quality.gate_fields([f"+exp={name}"]) == bench_quality.gate_fields([f"+exp={init}"]), (name, init)
        checked += 1
    assert checked >= 5  # yarn32k_sparsity50/90/95 and yarn128k_sparsity50/90


def test_oracle_layer_ranges_parse_and_refuse_with_one_line():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    assert bench_quality.layer_range("0-3") == (0, 1, 2, 3) and bench_quality.layer_range("7") == (7,)
    for bad in ("3-1", "1-", "-1", "a-b", ""):
        with pytest.raises(ValueError, match="--oracle-layers"):
            bench_quality.layer_range(bad)
    with pytest.raises(SystemExit):
        bench_quality.main(["--model", "m", "--corpora", ".", "--out", "o", "--oracle-layers", "9-2"])
