"""Using a trained model: one call loads any folder the project writes, ready for `model.generate`.

`load_for_generation(path, density=..., threshold=...)` takes a run folder, its `final/` (full model, LoRA
adapter, gates alone over a named base), `final/merged/`, an `export` folder, any Hugging Face model folder or hub
name, or `builtin:NAME` (random weights). A folder with `seer_gates.json` loads with its gates on the seer
attention: the prompt (prefill) runs the gates and the block-sparse kernels at the given density or threshold
(default: what the gates were trained with), and every generated token attends densely to the KV cache
(`decode.py`). A folder without gates loads as the dense model on SDPA. Batches are left-padded; on the seer path
a padded prompt gets the same blocks and selection as alone (`masking.compaction_order`). A LoRA run's adapter is
merged into the weights on load (`merge_adapters`): generation runs the plain model, which other tools (e.g.
lm-eval-harness, `seer_finetune.seer.lm_eval_adapter`) can take as any transformers model.
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


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model with the peft adapters of `model` merged into its weights.

    Takes a `PeftModel` (an adapter over a named base) or a transformers model that loaded the adapter beside its
    own base: its LoRA layers are merged and replaced by their base layers, and modules trained whole
    (`modules_to_save`: embeddings, norms) by their trained copies. Tied embeddings stay tied when the trained
    input and output embeddings are equal (they are when training kept them tied), else the config says untied.
    Gates stay attached: their capture hooks follow replaced projections (`attach`). Other models pass through.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)  # LoRA layers; modules_to_save copies
    tuner_names = [name for name, module in model.named_modules() if isinstance(module, wrappers)]
    # Outermost tuner layers only: what sits inside one (lora_A, the wrapped base) goes with it.
    outer = [n for n in tuner_names if not any(n.startswith(o + ".") for o in tuner_names if o != n)]
    for name in outer:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if hasattr(layer, "unload_and_optionally_merge_module"):
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            layer.merge()
            plain = layer.get_base_layer()
        setattr(parent, child, plain)
    if outer:
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(model, attr):
                delattr(model, attr)
        _settle_tied_embeddings(model)
    return model


def _settle_tied_embeddings(model: torch.nn.Module) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or inputs is None or outputs is None:
        return
    if inputs.weight is outputs.weight:
        return
    if inputs.weight.shape == outputs.weight.shape and torch.equal(inputs.weight, outputs.weight):
        outputs.weight = inputs.weight
    else:
        config.tie_word_embeddings = False


class GenerationModel(NamedTuple):
    """What `load_for_generation` returns.

    Attributes:
        model: The causal LM in eval mode, a transformers model (LoRA adapters merged into its weights).
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
        model = merge_adapters(load_trained(folder, device=device, dtype=dtype))
        return GenerationModel(prepare_for_generation(model, tokenizer), tokenizer, None)
    try:
        model, runtime = load_seer_model(folder, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"cannot load the gates in {folder}: {exc}") from None
    model = merge_adapters(model)
    gates = json.loads((folder / GATES_CONFIG).read_text())
    if not dense and density is None and threshold is None:
        density, threshold = gates.get("density"), gates.get("threshold")
    configure_sparsity(runtime, density=None if dense else density, threshold=None if dense else threshold, kernel=kernel)
    # Nothing takes per-forward statistics during generation: kept, they would grow with every prompt.
    runtime.record_stats = False
    return GenerationModel(prepare_for_generation(model, tokenizer), tokenizer, runtime)


