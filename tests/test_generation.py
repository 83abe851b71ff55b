"""Generation on the seer path with transformers' KV cache: prefill through the gates and the block-sparse
kernels, decode attending densely to the cache; batches with left padding; one call loading every folder kind."""

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from seer_finetune.config import ConfigError
from seer_finetune.generation import generate_ids, generate_texts, load_generation_tokenizer
from seer_finetune.seer.loading import load_for_generation
from seer_finetune.seer import SeerRuntime, attach_seer_gates

from generation_helpers import play_prompts

GREEDY = dict(max_new_tokens=12, do_sample=False, top_k=None)


@pytest.fixture(scope="module")
def trained(trained_smoke_seer):
    return trained_smoke_seer


def _generate(model, tokenizer, prompt: str, **kwargs) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")
    return model.generate(**ids, pad_token_id=tokenizer.pad_token_id, **GREEDY, **kwargs)[0, ids.input_ids.shape[1] :]


def test_random_tiny_llama_at_density_1_matches_sdpa_token_for_token():
    """Untrained gates on the built-in tiny Llama, joint mode at density 1.0 (the gates run and keep every
    candidate block): greedy generation with the cache equals the dense SDPA model's."""
    dense = load_for_generation("builtin:tiny_llama").model
    assert dense.config._attn_implementation == "sdpa"
    seer = copy.deepcopy(dense)
    runtime = SeerRuntime(mode="joint", block_size=32, density=1.0, sink_blocks=1, local_blocks=2, compute_loss=False)
    runtime.training = False
    attach_seer_gates(seer, runtime, gate_hidden_size=16)
    tokenizer = load_generation_tokenizer("builtin:tiny_llama")
    for prompt in play_prompts(tokenizer, [37, 200, 301]):
        want = _generate(dense, tokenizer, prompt)
        got = _generate(seer, tokenizer, prompt)
        assert got.tolist() == want.tolist()


def test_trained_model_at_density_1_matches_the_dense_model(trained):
    """The smoke_seer model's merged export: through its gates at density 1.0 it generates the tokens of the same
    weights loaded by a plain `from_pretrained` (SDPA, no gates)."""
    merged = trained / "merged"
    seer = load_for_generation(merged, density=1.0)
    dense = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert dense.config._attn_implementation == "sdpa" and not any("seer_gate" in n for n, _ in dense.named_modules())
    for prompt in play_prompts(seer.tokenizer, [150, 700]):
        assert _generate(seer.model, seer.tokenizer, prompt).tolist() == _generate(dense, seer.tokenizer, prompt).tolist()


def test_cache_equals_no_cache_at_density_half(trained):
    """Sparse prefill + dense decode with the cache gives the tokens of recomputing every step without it."""
    loaded = load_for_generation(trained, density=0.5)
    assert loaded.runtime.settings.mode == "joint" and loaded.runtime.settings.density == 0.5
    for prompt in play_prompts(loaded.tokenizer, [250, 600]):
        with_cache = _generate(loaded.model, loaded.tokenizer, prompt)
        without = _generate(loaded.model, loaded.tokenizer, prompt, use_cache=False)
        assert with_cache.tolist() == without.tolist()
    # Generation keeps no per-forward statistics: nothing takes them, and they would grow with every prompt.
    assert not loaded.runtime.record_stats and loaded.runtime.stats == {}
    loaded.runtime.record_stats = True
    ids = loaded.tokenizer(play_prompts(loaded.tokenizer, [250])[0], return_tensors="pt")
    loaded.model.generate(**ids, pad_token_id=loaded.tokenizer.pad_token_id, max_new_tokens=1, do_sample=False, top_k=None)
    assert any(key.startswith("density/") for entry in loaded.runtime.stats.values() for key in entry)


@pytest.mark.parametrize("setting", [dict(density=0.5), dict(density=0.1), dict(threshold=0.05), dict(density=1.0)])
def test_left_padded_batch_equals_one_prompt_at_a_time(trained, setting):
    """Prompts of different lengths in one left-padded batch: the same new tokens as each prompt alone, and the
    prefill's last logits equal to float precision (the padding never shifts a prompt's blocks)."""
    loaded = load_for_generation(trained / "merged", **setting)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = play_prompts(tokenizer, [611, 140, 333, 47])
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    batched = generate_ids(model, encoded, pad_token_id=tokenizer.pad_token_id, max_new_tokens=10, batch_size=4)
    alone = [generate_ids(model, [ids], pad_token_id=tokenizer.pad_token_id, max_new_tokens=10)[0] for ids in encoded]
    assert batched == alone
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        for i, ids in enumerate(encoded):
            single = model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(last[i], single, atol=1e-4, rtol=1e-4)


def test_one_call_loads_every_folder_kind(trained, tmp_path):
    """Run folder, LoRA final folder (adapter over the built-in base, with gates), merged export with gates, and a
    plain dense folder all load in one call and generate; the gates alone over a built-in base are refused in
    one line, as is a density for a model without gates."""
    prompt = play_prompts(load_generation_tokenizer(trained), [300])[0]
    import seer_finetune

    assert seer_finetune.load_for_generation is load_for_generation
    outputs = {}
    for name, path in {"run": trained.parent, "final": trained, "merged": trained / "merged"}.items():
        loaded = load_for_generation(path)
        assert loaded.runtime is not None
        # Without a setting, the gates run at the density they were trained with.
        assert loaded.runtime.settings.density == 0.5 and loaded.runtime.settings.mode == "joint"
        outputs[name] = _generate(loaded.model, loaded.tokenizer, prompt).tolist()
    assert outputs["run"] == outputs["final"] == outputs["merged"]

    dense_folder = tmp_path / "dense_copy"
    AutoModelForCausalLM.from_pretrained(trained / "merged").save_pretrained(dense_folder)
    load_generation_tokenizer(trained).save_pretrained(dense_folder)
    dense = load_for_generation(dense_folder)
    assert dense.runtime is None
    with_gates_dense = load_for_generation(trained / "merged", dense=True)
    assert with_gates_dense.runtime.settings.mode == "dense"
    assert _generate(dense.model, dense.tokenizer, prompt).tolist() == _generate(
        with_gates_dense.model, with_gates_dense.tokenizer, prompt
    ).tolist()
    with pytest.raises(ConfigError, match="has no seer gates"):
        load_for_generation(dense_folder, density=0.5)
    with pytest.raises(ConfigError, match="built-in model with random weights"):
        load_for_generation(trained.parent / "gate_init" / "gates")
    with pytest.raises(ConfigError, match="holds no model"):
        load_for_generation(trained.parent / "checkpoints")
    with pytest.raises(ConfigError, match="not both"):
        load_for_generation(trained, density=0.5, threshold=0.1)


def test_decode_reads_the_cache_densely_with_gqa_and_padding(trained):
    """A decode step over a left-padded batch's cache gives the logits of recomputing the whole sequence without
    a cache (dense prefill, so the cached keys and values are the same in both)."""
    loaded = load_for_generation(trained / "merged", density=1.0)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = play_prompts(tokenizer, [90, 33])
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        first = model(**batch, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch.attention_mask, torch.ones_like(nxt)], dim=1)
        step = model(input_ids=nxt, attention_mask=mask, cache=first.cache, use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([batch.input_ids, nxt], 1), attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def _cli(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "seer_finetune", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _cli_each(calls: list[tuple[list[str], dict]]) -> list[subprocess.CompletedProcess]:
    """`_cli(*args, **kwargs)` for each (args, kwargs) of `calls`, a few processes at a time: each launch spends
    seconds of one core importing torch and transformers, and the launches share nothing."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda call: _cli(*call[0], **call[1]), calls))


def test_generate_command_prompt_file_stdin_and_jsonl(trained, tmp_path):
    """The CLI prints what the same call in process generates, from a prompt file, stdin and a jsonl batch; the
    same sampling seed gives the same sample."""
    loaded = load_for_generation(trained, density=0.5)
    prompts = play_prompts(loaded.tokenizer, [200, 60])
    want = generate_texts(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8)
    (tmp_path / "prompt.txt").write_text(prompts[0])
    common = ["--max-new-tokens", "8", "--density", "0.5", "--device", "cpu"]
    (tmp_path / "batch.jsonl").write_text(json.dumps({"prompt": prompts[0]}) + "\n\n" + json.dumps(prompts[1]) + "\n")
    sample = ["builtin:tiny_llama", "--prompt", "To be", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3"]
    from_file, from_stdin, batch, *sampled = _cli_each([
        ([str(trained.parent), "--prompt-file", str(tmp_path / "prompt.txt"), *common], {}),
        ([str(trained / "merged"), *common], {"stdin": prompts[0]}),
        ([str(trained), "--jsonl", str(tmp_path / "batch.jsonl"), *common, "--output", str(tmp_path / "out.jsonl")], {}),
        (sample, {}),
        (sample, {}),
    ])
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == want[0] + "\n"
    assert "gates at density 0.5" in from_file.stderr
    assert from_stdin.returncode == 0 and from_stdin.stdout == want[0] + "\n"
    assert batch.returncode == 0, batch.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["completion"] for line in lines] == want and [line["prompt"] for line in lines] == prompts
    assert sampled[0].returncode == 0 and sampled[0].stdout == sampled[1].stdout and sampled[0].stdout.strip()


def test_generate_command_errors_are_one_line(trained, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    cases = (
        ([str(tmp_path / "missing"), "--prompt", "x"], "model path does not exist"),
        (["builtin:tiny_llama", "--prompt", "x", "--density", "0.5"], "has no seer gates"),
        ([str(trained), "--prompt", "x", "--density", "1.5"], "density=1.5 must be in (0, 1]"),
        ([str(trained), "--prompt", "x", "--jsonl", str(tmp_path / "bad.jsonl")], "give one of --prompt, --prompt-file, --jsonl"),
        ([str(trained), "--jsonl", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not JSON"),
        ([str(trained), "--prompt", "x", "--density", "0.5", "--dense"], "not allowed with argument"),
        (["builtin:tiny_llama", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens=0 must be at least 1"),
        ([], "the following arguments are required: model"),
    )
    results = _cli_each([(args, {"cwd": tmp_path}) for args, _ in cases])
    for (args, message), result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, (args, result.stderr)


def test_decode_runs_without_cudnn_and_dense_generation_is_unchanged(monkeypatch):
    """Tokens appended to a cache run on SDPA without its cuDNN backend (which rebuilds a graph for every cache
    length); a dense model generates through `sdpa_cached` the same tokens as on plain SDPA, with a padded batch
    too, and gets its own attention implementation back afterwards."""
    from seer_finetune.generation import cache_sdpa_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with cache_sdpa_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before

    loaded = load_for_generation("builtin:tiny_llama")
    model, tokenizer = loaded.model, loaded.tokenizer
    import transformers.integrations.sdpa_attention as hf_sdpa

    seen = []
    original = hf_sdpa.sdpa_attention_forward

    def spy(module, query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2], torch.backends.cuda.cudnn_sdp_enabled()))
        return original(module, query, key, *args, **kwargs)

    # cached_sdpa_forward looks transformers' SDPA attention up at each call.
    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", spy)
    prompts = [tokenizer(p)["input_ids"] for p in play_prompts(tokenizer, [37, 90])]
    got = generate_ids(model, prompts, pad_token_id=tokenizer.pad_token_id, max_new_tokens=6)
    monkeypatch.undo()
    assert model.config._attn_implementation == "sdpa"
    assert any(q < k for q, k, _ in seen) and any(q == k for q, k, _ in seen)
    # Decode steps ran without cuDNN; the prefill kept SDPA's own choice.
    assert not any(cudnn for q, k, cudnn in seen if q < k)
    assert all(cudnn == before for q, k, cudnn in seen if q == k)
    for prompt, tokens in zip(prompts, got):
        want = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, do_sample=False, top_k=None
        )[0, len(prompt) :]
        assert tokens == want.tolist()[: len(tokens)]


def test_lora_run_loads_merged_with_the_logits_of_the_adapter(trained):
    """`load_for_generation` merges a LoRA run's adapter (and its trained embeddings and norms) into a plain
    transformers model: no peft module is left, the tied embeddings stay tied, and the logits are the unmerged
    adapter's."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    from seer_finetune.seer.saving import load_seer_model

    loaded = load_for_generation(trained, density=0.5)
    model = loaded.model
    assert not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.tie_weights()  # what other tools call on a loaded model; it failed on the unmerged one
    unmerged, runtime = load_seer_model(trained)
    assert any(isinstance(m, BaseTunerLayer) for m in unmerged.modules())
    runtime.configure(density=0.5)
    ids = loaded.tokenizer(play_prompts(loaded.tokenizer, [300]), return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
