"""Compose a run's configuration from `conf/` and command-line overrides, with one-line errors.

`conf/` is found next to the package in a source checkout (editable installs included) and inside the
package (`seer_finetune/conf`) when installed from a wheel, so the CLI works from any working directory.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, SeerConfig, register_configs
from .validation import validate


def config_dir() -> Path:
    """The folder holding `config.yaml` and the config groups."""
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "config.yaml").is_file():
        return source_tree
    packaged = Path(str(resources.files("seer_finetune") / "conf"))
    if (packaged / "config.yaml").is_file():
        return packaged
    raise ConfigError("cannot find the seer-finetune config folder (conf/); is the package installed completely?")


def available(group: str) -> list[str]:
    """Names of the options of a config group (e.g. the experiments under `conf/exp/`)."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors carry multi-line context; keep the sentence that says what is wrong."""
    causes = []
    while exc is not None:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    # The OmegaConf error that carries the key (`full_key`) names the field and the bad value; inner ones
    # still hold unformatted templates.
    keyed = [c for c in causes if isinstance(c, OmegaConfBaseException) and getattr(c, "full_key", None)]
    for cause in keyed or [c for c in causes if isinstance(c, OmegaConfBaseException)]:
        msg = str(cause).strip().splitlines()[0]
        full_key = getattr(cause, "full_key", None)
        if full_key and full_key not in msg:
            msg = f"{full_key}: {msg}"
        return msg
    return str(causes[0]).strip().splitlines()[0]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> SeerConfig:
    """Compose `conf/config.yaml` with `overrides`, type-check it, validate it, and return the dataclass.

    Args:
        overrides: Hydra overrides such as `+exp=smoke` or `trainer.max_steps=10`.

    Raises:
        ConfigError: with a one-line message for an unknown experiment or group option, a value of the
            wrong type, an unknown field, or a value `validate` rejects.
    """
    overrides = list(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = compose(config_name="config", overrides=overrides)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option_message(str(exc), overrides)) from None
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as exc:
        message = _one_line(exc)
        if "Could not find" in message or "Could not load" in message:
            message = _missing_option_message(message, overrides)
        raise ConfigError(message) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        cfg = OmegaConf.to_object(raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    assert isinstance(cfg, SeerConfig)
    return validate(cfg)


def _missing_option_message(message: str, overrides: list[str]) -> str:
    """Turn Hydra's 'Could not find ...' into the option that was asked for and those that exist."""
    match = re.search(r"'([\w/]+)/([\w.\-]+)'", message)
    if match:
        group, name = match.group(1), match.group(2)
        options = ", ".join(available(group)) or "none"
        kind = "experiment" if group == "exp" else f"{group} option"
        return f"unknown {kind} {name!r} (available: {options})"
    return message.splitlines()[0]


def to_yaml(cfg: SeerConfig) -> str:
    """The resolved configuration as YAML (what a run records next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
