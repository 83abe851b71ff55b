"""Using a trained model: one call loads any folder the project writes, ready for `model.generate`.

`load_for_generation(path, density=..., threshold=...)` takes a run folder, its `final/` (full model, LoRA
adapter, gates alone over a named base), `final/merged/`, an `export` folder, any Hugging Face model folder or hub
name, or `builtin:NAME` (random weights). A folder with `seer_gates.json` loads with its gates on the seer
attention: the prompt (prefill) runs the gates and the block-sparse kernels at the given density or threshold
(default: what the gates were trained with), and every generated token attends densely to the KV cache
(`decode.py`). A folder without gates loads as the dense model on SDPA. Batches are left-padded; on the seer path
a padded prompt gets the same blocks and selection as alone (`masking.compaction_order`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from ..config import ConfigError
from ..generation import (
    GATES_CONFIG,
    base_model_name,
    configure_sparsity,
    load_generation_tokenizer,
    load_named_model,
    model_folder,
    prepare_for_generation,
    refuse_sparse_settings,
)
from .saving import load_seer_model


class GenerationModel(NamedTuple):
    """What `load_for_generation` returns.

    Attributes:
        model: The causal LM in eval mode (a peft model for a LoRA adapter over a named base).
        tokenizer: Its tokenizer, padding on the left, with a pad token.
        runtime: The gates' `SeerRuntime` (switch density or threshold with `runtime.configure` or
            `runtime.using`), or None for a dense model.
    """

    model: torch.nn.Module
    tokenizer: object
    runtime: Optional[object]


def load_for_generation(
    path: str | Path,
    *,
    density: Optional[float] = None,
    threshold: Optional[float] = None,
    dense: bool = False,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    kernel: Optional[str] = None,
    seed: int = 0,
) -> GenerationModel:
    """Load any model folder the project writes (or a hub name / `builtin:NAME`) ready to generate.

    Args:
        path: A run folder (its `final/` is loaded), a final or export folder (full model, LoRA adapter, merged
            copy, gates alone over a named base), a Hugging Face folder or hub name, or `builtin:NAME`.
        density: With gates: fraction of causal key blocks the prefill keeps, in (0, 1]; 1.0 runs exact dense
            attention through the same kernels.
        threshold: With gates, instead of a density: minimum gate probability of a kept block.
        dense: With gates: ignore them (dense prefill through the seer kernels). Default False.
            Without density, threshold or dense, a model with gates runs at the density (or threshold) it was
            trained with, or dense if its gates record neither.
        device: Where the model goes. Default CPU.
        dtype: Weights dtype. Default as saved (`builtin:` models: float32).
        kernel: `seer_kernels` implementation (`auto`, `pytorch`, `triton`). Default `auto`.
        seed: Seed of the random weights of a `builtin:` model.

    Returns:
        `GenerationModel(model, tokenizer, runtime)`; runtime is None for a model without gates.

    Raises:
        ConfigError: one line, for a path that holds no model, a density or threshold out of range, both given,
            or a density/threshold for a model without gates.
    """
    from ..modeling import load_trained

    if density is not None and threshold is not None:
        raise ConfigError("give a density or a threshold, not both")
    if density is not None and not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density} must be in (0, 1]")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold={threshold} must be in [0, 1]")
    name = str(path)
    if name.startswith("builtin:") or not Path(name).expanduser().exists():
        model = load_named_model(name, device=device, dtype=dtype, seed=seed)
        tokenizer = load_generation_tokenizer(name)
        refuse_sparse_settings(name, density, threshold)
        return GenerationModel(prepare_for_generation(model, tokenizer), tokenizer, None)
    folder = model_folder(name)
    has_model = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    if not has_model and not (folder / GATES_CONFIG).is_file():
        raise ConfigError(f"{folder} holds no model: expected config.json, adapter_config.json or {GATES_CONFIG}")
    tokenizer = load_generation_tokenizer(folder, fallback=base_model_name(folder))
    if not (folder / GATES_CONFIG).is_file():
        refuse_sparse_settings(str(folder), density, threshold)
        model = load_trained(folder, device=device, dtype=dtype)
        return GenerationModel(prepare_for_generation(model, tokenizer), tokenizer, None)
    try:
        model, runtime = load_seer_model(folder, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"cannot load the gates in {folder}: {exc}") from None
    gates = json.loads((folder / GATES_CONFIG).read_text())
    if not dense and density is None and threshold is None:
        density, threshold = gates.get("density"), gates.get("threshold")
    configure_sparsity(runtime, density=None if dense else density, threshold=None if dense else threshold, kernel=kernel)
    return GenerationModel(prepare_for_generation(model, tokenizer), tokenizer, runtime)


