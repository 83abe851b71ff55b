"""Gates as their own small adapter: `seer_gates.safetensors` + `seer_gates.json`, and composing at load time.

The adapter names the base model it was trained on and every setting needed to rebuild the gates (block
size, hidden size, poolings, head layout). `load_seer_model` composes base + gates (+ LoRA) from a run's
final folder, or from a base model and a separate gates folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import attach_seer_gates, seer_gates
from .runtime import SeerRuntime

WEIGHTS_NAME = "seer_gates.safetensors"
CONFIG_NAME = "seer_gates.json"
FORMAT = "seer-gates"
VERSION = 1


def gates_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gate weights of `model`, keyed `layers.<layer>.q_weight` / `.k_weight` (detached CPU copies)."""
    state = {}
    for gate in seer_gates(model):
        for name, tensor in gate.state_dict().items():
            state[f"layers.{gate.layer_idx}.{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def load_gates_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy weights from `gates_state_dict` output into the attached gates; every gate must be covered exactly."""
    gates = {g.layer_idx: g for g in seer_gates(model)}
    if not gates:
        raise ValueError("the model has no seer gates to load into: attach them first")
    expected = {f"layers.{i}.{n}" for i, g in gates.items() for n in g.state_dict()}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"gate weights do not match the model's gates: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for i, gate in gates.items():
        own = {n: state[f"layers.{i}.{n}"] for n in gate.state_dict()}
        for n, tensor in own.items():
            current = gate.state_dict()[n]
            if tensor.shape != current.shape:
                raise ValueError(f"gate {i} {n}: saved shape {tuple(tensor.shape)} != model's {tuple(current.shape)}")
        gate.load_state_dict(own)


def gates_config(model: nn.Module, *, base_model: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The `seer_gates.json` content describing the attached gates.

    Args:
        model: A model with gates attached.
        base_model: The model the gates were trained on; a local folder is recorded by its absolute path, so
            the json means the same from any working directory (see `modeling.portable_model_name`).
        extra: More json fields.

    Returns:
        The json content.
    """
    from ..modeling import portable_model_name

    gates = seer_gates(model)
    if not gates:
        raise ValueError("the model has no seer gates to describe")
    g = gates[0]
    return {
        "format": FORMAT,
        "version": VERSION,
        "base_model": portable_model_name(base_model),
        "layers": [gate.layer_idx for gate in gates],
        "num_heads": g.num_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "block_size": g.block_size,
        "gate_hidden_size": g.hidden_size,
        "q_pooling": list(g.q_pooling),
        "k_pooling": list(g.k_pooling),
        "use_rope": g.rotary is not None,
        "rope_units": getattr(g, "rope_units", "tokens") if g.rotary is not None else "none",
        "rope_fraction": float(getattr(g, "rope_fraction", 1.0)),
        "gate_query": g.gate_query,
        **(extra or {}),
    }


def save_gates(model: nn.Module, out_dir: str | Path, *, base_model: str, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write `seer_gates.safetensors` and `seer_gates.json` into `out_dir` (created if needed).

    Args:
        model: A model with gates attached.
        out_dir: Target folder (e.g. a run's `final` folder, next to the model or LoRA adapter).
        base_model: Name or path of the base model the gates were trained on (recorded in the json).
        extra: More json fields (e.g. the training mode and density).

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = gates_config(model, base_model=base_model, extra=extra)
    save_file(gates_state_dict(model), str(out_dir / WEIGHTS_NAME), metadata={"format": FORMAT})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_gates_config(path: str | Path) -> dict[str, Any]:
    """The json of a gates folder; a clear error when `path` holds no gates."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no seer gates ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} is not a seer gates config (format={config.get('format')!r})")
    return config


def load_gates(model: nn.Module, path: str | Path, *, runtime: Optional[SeerRuntime] = None) -> SeerRuntime:
    """Load saved gates onto `model`, attaching gates first if it has none.

    Args:
        model: A transformers causal LM (optionally peft-wrapped) of the architecture the gates were trained on.
        path: Folder with `seer_gates.safetensors` and `seer_gates.json`.
        runtime: Settings for newly attached gates (default: `joint` mode without a density, i.e. set one
            before a sparse forward, keeping the sink and local blocks, the budget, its row mass, the bound and
            probe blocks and the selection temperature the gates were trained with). Its block size is replaced
            by the saved one.

    Returns:
        The runtime shared by the model's gates.
    """
    config = read_gates_config(path)
    gates = seer_gates(model)
    if not gates:
        if runtime is None:
            runtime = SeerRuntime(
                mode="joint",
                # The saved block size from the start: the probe tokens are checked against it.
                block_size=int(config["block_size"]),
                sink_blocks=int(config.get("sink_blocks", 0)),
                local_blocks=int(config.get("local_blocks", 1)),
                budget=str(config.get("budget", "row")),
                row_mass=float(config.get("row_mass", 0.0)),
                bound_blocks=int(config.get("bound_blocks", 0)),
                probe_blocks=int(config.get("probe_blocks", 0)),
                probe_tokens=int(config.get("probe_tokens", 1)),
                selection_temperature=float(config.get("selection_temperature", 1.0)),
            )
        runtime.configure(block_size=int(config["block_size"]))
        gates = attach_seer_gates(
            model,
            runtime,
            gate_hidden_size=int(config["gate_hidden_size"]),
            q_pooling=tuple(config["q_pooling"]),
            k_pooling=tuple(config["k_pooling"]),
            use_rope=bool(config.get("use_rope", True)),
            rope_units=str(config.get("rope_units", "tokens")),
            rope_fraction=float(config.get("rope_fraction", 1.0)),
            gate_query=str(config.get("gate_query", "pooled")),
        )
    g = gates[0]
    # Files from before a field was saved hold gates built as that field's default then.
    defaults = {"rope_units": "tokens", "rope_fraction": 1.0, "gate_query": "pooled"}
    for key, have in (
        ("block_size", g.block_size),
        ("gate_hidden_size", g.hidden_size),
        ("q_pooling", list(g.q_pooling)),
        ("k_pooling", list(g.k_pooling)),
        ("num_heads", g.num_heads),
        ("num_kv_heads", g.num_kv_heads),
        ("head_dim", g.head_dim),
        # Scores of gates trained with other block positions, or with RoPE on other features, would be silently
        # different: the weights fit either way.
        ("rope_units", getattr(g, "rope_units", "tokens")),
        ("rope_fraction", float(getattr(g, "rope_fraction", 1.0))),
        # A pooled and a token-mode gate have weights of the same shape but score different things.
        ("gate_query", g.gate_query),
    ):
        saved = config[key] if key in config else defaults.get(key)
        if key == "rope_units" and not config.get("use_rope", True):
            saved = "none"
        if saved != have:
            raise ValueError(f"gates in {path} have {key}={saved!r} but the model's gates have {have!r}")
    load_gates_state_dict(model, load_file(str(Path(path) / WEIGHTS_NAME)))
    return g.runtime


def load_seer_model(
    path: str | Path,
    *,
    gates_path: Optional[str | Path] = None,
    runtime: Optional[SeerRuntime] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
):
    """Compose base model + gates (+ LoRA) for evaluation or inference.

    Args:
        path: A run's final folder (full model or LoRA adapter, as `modeling.save_final` writes it), or a folder
            holding only gates, whose json names the base model to load.
        gates_path: Gates folder when they are not in `path`. Default: `path` itself.
        runtime: Settings for the gates (mode, density, ...). Default: `joint` without a density (set
            a density or threshold with `runtime.configure` before running sparse).
        device: Where the model goes. Default CPU.
        dtype: Weights dtype. Default as saved.

    Returns:
        `(model, runtime)`: the model in eval mode with gates attached and loaded, and their shared runtime.
    """
    from transformers import AutoModelForCausalLM

    from ..config import ConfigError
    from ..modeling import load_trained, resolve_model_path

    path = Path(path)
    gates_dir = Path(gates_path) if gates_path is not None else path
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        model = load_trained(path, device=device, dtype=dtype)
    else:
        name = read_gates_config(gates_dir)["base_model"]
        if name.startswith("builtin:"):
            raise ConfigError(
                f"the gates in {gates_dir} were trained on {name}, a built-in model with random weights that no "
                "folder holds: gates alone cannot be loaded; load the final folder of a run that trained the model "
                "with them (e.g. the joint stage's), which holds its weights"
            )
        try:
            base, _ = resolve_model_path(name)
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load {name}, the base model the gates in {gates_dir} were trained on "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); if it moved, write its new place "
                f"into {Path(gates_dir) / CONFIG_NAME} (base_model)"
            ) from None
    runtime = load_gates(model, gates_dir, runtime=runtime)
    return model, runtime
