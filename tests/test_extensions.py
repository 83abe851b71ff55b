"""The extension registry: plain backends get the no-op extension, plug-ins are found by backend, the built-in
seer plug-in is imported on its first lookup only, and an unknown backend is a one-line error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seer_finetune import extensions
from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
from seer_finetune.extensions import TrainingExtension, build_extension, register_extension

ROOT = Path(__file__).resolve().parents[1]


def _cfg(backend: str, **attention) -> SeerConfig:
    return SeerConfig(model=ModelConfig(name_or_path="tiny"), attention=AttentionConfig(backend=backend, **attention))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_plain_backends_get_the_no_op_extension(backend):
    extension = build_extension(object(), _cfg(backend))
    assert type(extension) is TrainingExtension
    assert extension.param_groups() == [] and extension.extra_losses() == {} and not extension.freeze_base


def test_a_registered_factory_serves_its_backend(monkeypatch):
    monkeypatch.setattr(extensions, "_factories", dict(extensions._factories))
    built = []

    class Probe(TrainingExtension):
        freeze_base = True

    register_extension("probe", lambda model, cfg: built.append((model, cfg.attention.backend)) or Probe())
    model = object()
    assert isinstance(build_extension(model, _cfg("probe")), Probe)
    assert built == [(model, "probe")]


def test_an_unknown_backend_is_a_one_line_error():
    with pytest.raises(ConfigError) as error:
        build_extension(object(), _cfg("flash"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("attention.backend='flash' has no registered extension")
    assert "seer" in message and "sdpa" in message


def test_the_seer_plugin_is_imported_on_first_lookup():
    probe = "\n".join(
        [
            "import sys",
            "from transformers import AutoModelForCausalLM",
            "from helpers import tiny_config",
            "from seer_finetune.config import AttentionConfig, ModelConfig, SeerConfig",
            "from seer_finetune.extensions import build_extension",
            "before = any(m.startswith('seer_finetune.seer') for m in sys.modules)",
            "model = AutoModelForCausalLM.from_config(tiny_config('llama'))",
            "cfg = SeerConfig(model=ModelConfig(name_or_path='tiny'), attention=AttentionConfig(backend='seer', mode='gate_distill', block_size=16, gate_hidden_size=16))",
            "extension = build_extension(model, cfg)",
            "print(before, type(extension).__module__, type(extension).__name__, extension.freeze_base)",
        ]
    )
    paths = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.split()[-4:] == ["False", "seer_finetune.seer.plugin", "SeerExtension", "True"]
