"""The lm-eval-harness adapter on a trained smoke_seer run: lm-eval's own scoring and generation paths, its
evaluator on a task defined offline, and the `lm-eval` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seer_finetune.generation import generate_texts
from seer_finetune.seer.loading import load_for_generation

from generation_helpers import play_prompts

from lm_eval.api.instance import Instance  # lm-eval is in the [test] extra

from seer_finetune.seer.lm_eval_adapter import SeerLM


@pytest.fixture(scope="module")
def trained(trained_smoke_seer):
    return trained_smoke_seer


@pytest.fixture(scope="module")
def pairs(trained):
    tokenizer = load_for_generation(trained).tokenizer
    texts = play_prompts(tokenizer, [300, 420, 260])  # 8-14 blocks of 32: sparsity bites
    return [(t[: len(t) // 2], t[len(t) // 2 :]) for t in texts]


def _reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(continuation tokens | context tokens) from one forward of the loaded model."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return float(logp[positions, torch.tensor(cont)].sum())


def test_loglikelihood_and_generation_match_the_loaded_model(trained, pairs):
    """lm-eval's scoring of the seer model at density 0.5 equals the log-likelihood from the model
    `load_for_generation` gives, and its greedy generation equals `generate`'s."""
    lm = SeerLM(pretrained=str(trained), density=0.5, device="cpu", batch_size=1)
    assert lm.seer_runtime is not None and lm.seer_runtime.settings.density == 0.5
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    ref = load_for_generation(trained, density=0.5)
    for (context, continuation), (logl, _greedy) in zip(pairs, scores):
        # lm-eval's own split of the text into context and continuation tokens.
        ctx, cont = lm._encode_pair(context, continuation)
        want = _reference_loglikelihood(ref.model, ctx, cont)
        assert logl == pytest.approx(want, abs=1e-3)
    # Another density gives other scores: the setting reaches the model.
    dense = SeerLM(pretrained=str(trained), dense=True, device="cpu")
    assert [s for s, _ in dense.loglikelihood(requests)] != [s for s, _ in scores]

    prompt = pairs[0][0]
    gen = [Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), 0)]
    (text,) = lm.generate_until(gen)
    want = generate_texts(ref.model, ref.tokenizer, [prompt], max_new_tokens=6)[0]
    assert text == want.split("\n\n")[0]


def _task_folder(tmp_path, pairs):
    data = tmp_path / "plays.jsonl"
    # Each document's choices: its own continuation and the next document's.
    others = [t for _, t in pairs[1:] + pairs[:1]]
    data.write_text("".join(json.dumps({"context": c, "continuation": t, "other": o}) + "\n" for (c, t), o in zip(pairs, others)))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "seer_plays.yaml").write_text(
        "task: seer_plays\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{[continuation, other]}}"\n'
        "doc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


def test_evaluator_and_command_run_a_task_offline(trained, pairs, tmp_path):
    """lm-eval's evaluator runs a task (defined from a local file) on `--model seer`, from Python and from the
    `python -m seer_finetune lm-eval` command, with the same result."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = _task_folder(tmp_path, pairs)
    out = tmp_path / "out"
    # The command runs beside the in-process evaluation (its start alone imports lm-eval, transformers and torch):
    # the two share only the read-only run and task folders (the command has a datasets cache of its own), and its
    # output goes to a file, which never fills up as a pipe would while this process is busy.
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    log = tmp_path / "lm_eval.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "seer_finetune", "lm-eval", "--model", "seer",
             "--model_args", f"pretrained={trained},density=0.5", "--device", "cpu", "--tasks", "seer_plays",
             "--include_path", str(folder), "--output_path", str(out)],
            stdout=subprocess.DEVNULL, stderr=log_file, text=True, env=env,
        )
    results = simple_evaluate(
        model="seer",
        model_args=f"pretrained={trained},density=0.5,device=cpu",
        tasks=["seer_plays"],
        task_manager=TaskManager(include_path=str(folder)),
    )
    metrics = results["results"]["seer_plays"]
    assert results["config"]["model"] == "seer" and 0.0 <= metrics["acc,none"] <= 1.0
    # The accuracy is lm-eval's comparison of the two choices' log-likelihoods under the seer model.
    lm = SeerLM(pretrained=str(trained), density=0.5, device="cpu")
    others = [t for _, t in pairs[1:] + pairs[:1]]
    right = [lm.loglikelihood([Instance("loglikelihood", {}, (c, t), 0), Instance("loglikelihood", {}, (c, o), 1)])
             for (c, t), o in zip(pairs, others)]
    assert metrics["acc,none"] == pytest.approx(sum(a[0] > b[0] for a, b in right) / len(right))

    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert written["results"]["seer_plays"]["acc_norm,none"] == pytest.approx(metrics["acc_norm,none"])
    assert written["results"]["seer_plays"]["acc,none"] == pytest.approx(metrics["acc,none"])


def test_bad_model_args_fail_in_one_line(trained, tmp_path):
    from seer_finetune.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size=4 with a sparse seer setting"):
        SeerLM(pretrained=str(trained), density=0.5, batch_size=4, device="cpu")
    assert SeerLM(pretrained=str(trained), dense=True, batch_size=4, device="cpu").batch_size == 4
    with pytest.raises(ConfigError, match="density=1.5 must be in"):
        SeerLM(pretrained=str(trained), density=1.5, device="cpu")
    with pytest.raises(ConfigError, match="dtype='half-ish' is not a torch dtype"):
        SeerLM(pretrained=str(trained), dtype="half-ish", device="cpu")
    with pytest.raises(ConfigError, match="holds no model"):
        SeerLM(pretrained=str(tmp_path), device="cpu")
