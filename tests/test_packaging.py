"""The distribution ships every package and the Hydra configs, and runs from a wheel outside the checkout."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(meta["tool"]["setuptools"]["packages"])


def _source_packages() -> set[str]:
    found = set()
    for top, name in ((ROOT / "seer_finetune", "seer_finetune"), (ROOT / "kernels" / "seer_kernels", "seer_kernels")):
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found | {"seer_finetune.conf"}


def test_pyproject_lists_every_package():
    assert _source_packages() == _declared_packages()


def test_no_importable_top_level_kernels_package():
    # Hugging Face's `kernels` package owns that import name and transformers imports it.
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_wheel_contains_configs_and_assets(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("seer_finetune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in (ROOT / "conf").rglob("*.yaml"):
        assert f"seer_finetune/conf/{conf.relative_to(ROOT / 'conf').as_posix()}" in names
    assert "seer_finetune/assets/tiny_llama/tokenizer.json" in names
    assert any(n.startswith("seer_finetune/assets/corpus/shakespeare/") for n in names)
    assert "seer_kernels/__init__.py" in names
    # Installed from the wheel alone, the CLI composes its configs from any directory.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = "import seer_finetune.compose as c; cfg = c.compose_config(['+exp=smoke']); print(c.config_dir(), cfg.rope.factor)"
    shown = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    assert shown.stdout.split() == [str(target / "seer_finetune" / "conf"), "4.0"]
