"""`export` of a plain checkpoint writes the same folder as the run's final save (the DeepSpeed counterpart is in
tests/distributed/test_deepspeed.py)."""

import json
import subprocess
import sys

import pytest

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.jobs import export_job
from seer_finetune.trainer import Trainer

from helpers import assert_same_folder

SHORT = [
    "data.seq_len=256",
    "data.max_eval_sequences=1",
    "trainer.max_steps=2",
    "trainer.save_every=2",
    "trainer.micro_batch_size=1",
    "trainer.eval_before=false",
    "trainer.progress_bar=false",
]
SEER = ["+exp=smoke_seer", "attention.init_steps=0", "attention.sink_blocks=0", "attention.local_blocks=1"]
VARIANTS = {
    # LoRA with trainable embeddings and norms over a built-in base (embedded in the folder), gates, merged copy
    "seer_lora": [*SEER, "peft.merge_on_save=true"],
    # the frozen base: the folder is the gates alone
    "gate_distill": [*SEER, "attention.mode=gate_distill"],
    "full": ["+exp=smoke", "peft=full"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_of_the_last_plain_checkpoint_equals_the_final_save(tmp_path, variant):
    run = tmp_path / "run"
    args = [*VARIANTS[variant], *SHORT, f"trainer.output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    summary = Trainer(compose_config(args)).fit()
    assert summary["final_dir"] == str(run / "final")
    assert (run / "checkpoints" / "step_000002").is_dir()
    exported = export_job(compose_config([*args, f"export.output={tmp_path / 'exported'}"]))
    assert exported == tmp_path / "exported"
    assert_same_folder(run / "final", exported)
    names = {p.name for p in exported.iterdir()}
    if variant == "gate_distill":
        assert names == {"seer_gates.json", "seer_gates.safetensors"}
    else:
        assert {"config.json", "seer_run.json", "tokenizer.json"} <= names
        assert ("seer_gates.json" in names) == (variant != "full")
    if variant == "seer_lora":
        # the adapter names its built-in base, whose weights sit beside it: no path of the run is recorded
        adapter = json.loads((exported / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "builtin:tiny_llama" and "merged" in names
        assert str(tmp_path) not in "".join(p.read_text() for p in exported.rglob("*.json"))
        # an explicit step folder is the same checkpoint
        again = export_job(compose_config([*args, f"export.checkpoint={run / 'checkpoints' / 'step_000002'}", f"export.output={tmp_path / 'again'}"]))
        assert_same_folder(exported, again)


def test_export_without_a_checkpoint_is_a_one_line_error(tmp_path):
    args = ["+exp=smoke", f"trainer.output_dir={tmp_path / 'nothing'}"]
    with pytest.raises(ConfigError, match="no checkpoint in"):
        export_job(compose_config(args))
    with pytest.raises(ConfigError, match="no DeepSpeed checkpoint"):
        export_job(compose_config([*args, "deepspeed=zero2"]))
    with pytest.raises(ConfigError, match="not a checkpoint"):
        export_job(compose_config([*args, f"export.checkpoint={tmp_path}"]))
    result = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "export", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no checkpoint in") and "Traceback" not in result.stderr
