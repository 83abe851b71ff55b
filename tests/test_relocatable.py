"""Final folders move: after `mv final elsewhere` (and the run folder gone, and another working directory),
`load_trained` and `load_seer_model` load the same weights, or say in one line why a folder cannot stand alone.
No text file of a final folder holds the run folder's path."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.jobs import train_job
from seer_finetune.modeling import load_trained
from seer_finetune.seer import load_seer_model
from seer_finetune.seer.saving import gates_state_dict, read_gates_config

from helpers import save_tiny_model

SHORT = [
    "data.seq_len=256",
    "data.max_eval_sequences=1",
    "trainer.max_steps=1",
    "trainer.save_every=0",
    "trainer.micro_batch_size=1",
    "trainer.eval_before=false",
    "trainer.progress_bar=false",
]
SEER = ["+exp=smoke_seer", "attention.sink_blocks=0", "attention.local_blocks=1"]
# A local base is named relative to the working directory the run starts in (`base`, beside the run folder).
LOCAL = ["model.name_or_path=base", "rope.original_max_position_embeddings=256"]
KINDS = {
    "full": ["+exp=smoke", "peft=full"],
    # LoRA over a local base, with a merged copy
    "lora_local": ["+exp=smoke", *LOCAL, "peft.merge_on_save=true"],
    # LoRA over the built-in random base (its weights beside the adapter), gates, a merged copy
    "seer_lora": [*SEER, "attention.init_steps=0", "peft.merge_on_save=true"],
    # two stages: gates distilled on the built-in base (gate_init/gates), then joint training
    "seer_two_stage": [*SEER, "attention.init_steps=1"],
    # gates distilled on a local base: the folder is the gates alone
    "gates_local": [*SEER, "attention.init_steps=0", "attention.mode=gate_distill", *LOCAL],
}


def _text_files(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".safetensors"):
            yield path, path.read_bytes().decode("utf-8", errors="replace")


def _weights(loaded) -> dict[str, torch.Tensor]:
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"gates/{k}": v for k, v in gates_state_dict(model).items()})
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("kind", list(KINDS))
def test_moved_final_folders_load_the_same_weights(tmp_path, monkeypatch, kind):
    work = tmp_path / "work"
    save_tiny_model(work / "base", "llama")
    monkeypatch.chdir(work)
    run_dir = work / "run"
    train_job(compose_config([*KINDS[kind], *SHORT, f"trainer.output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]))

    folders = {"final": run_dir / "final"}
    if (run_dir / "final" / "merged").is_dir():
        folders["merged"] = run_dir / "final" / "merged"
    if kind == "seer_two_stage":
        folders["gates"] = run_dir / "gate_init" / "gates"
    assert (kind in ("lora_local", "seer_lora")) == ("merged" in folders)
    for folder in folders.values():
        for path, text in _text_files(folder):
            assert str(run_dir) not in text and str(run_dir.resolve()) not in text, path

    seer = kind != "full" and kind != "lora_local"
    loaders = [load_seer_model] if seer else [load_trained]
    if kind in ("full", "lora_local", "seer_lora", "seer_two_stage"):
        loaders.append(load_trained)
    gates_alone_of_builtin = {"gates"} if kind == "seer_two_stage" else set()
    before = {(name, f.__name__): _weights(f(folder)) for name, folder in folders.items() for f in loaders if name not in gates_alone_of_builtin}

    # Move each folder on its own (merged/ out of final/ first), drop the run, load from elsewhere.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in sorted(folders, key=lambda n: n != "merged"):
        shutil.move(str(folders[name]), str(moved / name))
    shutil.rmtree(run_dir)
    monkeypatch.chdir(tmp_path)
    for (name, loader_name), expected in before.items():
        loader = load_seer_model if loader_name == "load_seer_model" else load_trained
        _assert_same(expected, _weights(loader(moved / name)))
    if kind == "gates_local":
        assert read_gates_config(moved / "final")["base_model"] == str((work / "base").resolve())
        with pytest.raises(ConfigError, match="holds seer gates alone"):
            load_trained(moved / "final")
    if gates_alone_of_builtin:
        assert read_gates_config(moved / "gates")["base_model"] == "builtin:tiny_llama"
        with pytest.raises(ConfigError, match="built-in model with random weights"):
            load_seer_model(moved / "gates")


def test_an_adapter_whose_base_moved_is_one_line(tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "base", "llama")
    run_dir = tmp_path / "run"
    args = ["+exp=smoke", f"model.name_or_path={base}", "rope.original_max_position_embeddings=256", *SHORT]
    train_job(compose_config([*args, f"trainer.output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]))
    os.rename(base, tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"cannot load .*base.*, the base model the adapter in .* was trained on"):
        load_trained(run_dir / "final")
