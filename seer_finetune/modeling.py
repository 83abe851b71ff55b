"""Loading the causal LM and its tokenizer; full fine-tuning or LoRA through peft.

`builtin:NAME` names a config (and tokenizer) shipped in `seer_finetune/assets/NAME`: the model is built with
random weights from the run's seed. Anything else is a local folder or a hub name, loaded with
`AutoModelForCausalLM.from_pretrained` (remote code only when `model.trust_remote_code` is set).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import ConfigError, ModelConfig, PeftConfig, RopeConfig
from .fused_kernels import apply_fused_kernels
from .rope import apply_rope_scaling

ASSETS = Path(__file__).resolve().parent / "assets"
NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm")
EMBEDDING_SUFFIXES = ("embed_tokens", "lm_head")


def resolve_model_path(name_or_path: str) -> tuple[str, bool]:
    """Returns (path or hub name, is_builtin). A path-like name that does not exist is an error."""
    if name_or_path.startswith("builtin:"):
        path = ASSETS / name_or_path.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no such built-in model")
        return str(path), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model path {name_or_path} has no config.json: not a Hugging Face model folder")
        return str(path), False
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"model path does not exist: {name_or_path}")
    return name_or_path, False


def portable_model_name(name_or_path: str) -> str:
    """How a saved folder names the model it was trained from, valid from any working directory.

    Args:
        name_or_path: `model.name_or_path` as configured.

    Returns:
        A `builtin:` or hub name as it is; a local folder as its absolute path (a relative path would be read
        against the loader's working directory, not against the saved folder).
    """
    if name_or_path.startswith("builtin:"):
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def resolve_device(device: str) -> torch.device:
    """`trainer.device` as a device: `auto` is CUDA when available, else the CPU; `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`model.dtype` as a torch dtype: `auto` is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer (or `model.tokenizer`), with a pad token (EOS when it has none)."""
    path, _ = resolve_model_path(cfg.tokenizer or cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg: ModelConfig, rope_cfg: RopeConfig):
    """The model config with YaRN written in (before any weights are built)."""
    path, _ = resolve_model_path(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model config of {path}: {str(exc).splitlines()[0]}") from None
    return apply_rope_scaling(config, rope_cfg)


def load_model(
    cfg: ModelConfig,
    rope_cfg: RopeConfig,
    *,
    device: torch.device,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """Load (or, for `builtin:`, build from `seed`) the causal LM with its rope scaling, on `device`.

    Args:
        cfg: The model section.
        rope_cfg: The rope section; YaRN is written into the config before weights load.
        device: Where the model lives.
        attn_implementation: transformers' attention implementation to start with.
        seed: Seed for the random weights of a built-in model.
    """
    path, builtin = resolve_model_path(cfg.name_or_path)
    config = load_model_config(cfg, rope_cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    if builtin:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None
    model.to(device)
    # What the model runs outside attention (`liger` or `none`), for the run's start line and its records.
    model.seer_fused_kernels = apply_fused_kernels(model, cfg.fused_kernels, device)
    if cfg.gradient_checkpointing:
        # Newer transformers name it activation_checkpointing_enable (the old name warns as deprecated).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _matching_modules(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [s for s in suffixes if s in names]


def apply_peft(model: PreTrainedModel, cfg: PeftConfig) -> torch.nn.Module:
    """Full fine-tuning (every parameter trains) or LoRA via peft, with optional trainable embeddings/norms."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ConfigError(f"peft.target_modules: the model has no module named {', '.join(missing)}")
    extra = []
    if cfg.trainable_embeddings:
        extra += _matching_modules(model, EMBEDDING_SUFFIXES)
    if cfg.trainable_norms:
        extra += _matching_modules(model, NORM_SUFFIXES)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=extra or None,
        task_type="CAUSAL_LM",
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False) and cfg.trainable_embeddings),
    )
    peft_model = get_peft_model(model, lora)
    if model.config.use_cache is False and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        # Checkpointed blocks need an input that requires grad, or no gradient reaches the adapters.
        peft_model.enable_input_require_grads()
    return peft_model


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    # ZeRO-3 leaves empty placeholders in the module; the real size is in `ds_numel`.
    size = lambda p: getattr(p, "ds_numel", p.numel())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def save_final(
    model: torch.nn.Module,
    tokenizer,
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write the trained model as a Hugging Face folder that `from_pretrained` loads with its YaRN config.

    Full fine-tuning: `out_dir` is a complete model folder. LoRA: `out_dir` is a peft adapter folder whose base
    is the original model path, or, for a built-in randomly initialised model (whose weights exist nowhere
    else), the unadapted base written into the same folder (`config.json` + weights beside the adapter, which
    transformers loads as the adapter's base). The folder records no path of its own, so it can move and
    two saves of the same weights are identical; a local base is named by its absolute path. With
    `peft.merge_on_save`, `out_dir/merged` holds merged full weights, with the extension's files too, so it loads
    on its own wherever it is moved. The folder is written under a temporary name and renamed into place.

    Args:
        model: The trained model (peft-wrapped for LoRA).
        tokenizer: Saved next to the weights.
        out_dir: The folder to (re)create.
        model_cfg: The model section (which base the adapter names).
        peft_cfg: The peft section (full or LoRA, merged copy or not).
        write_extra: Writes more files into the folder before it takes its final name (the extension's).

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    base_path, builtin = resolve_model_path(model_cfg.name_or_path)
    if peft_cfg.method == "full":
        base_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    else:
        base = base_model(model)
        adapter_kwargs = {}
        if builtin:
            _save_unadapted_base(model, tmp)
            model.peft_config["default"].base_model_name_or_path = model_cfg.name_or_path
            # peft would open the base by that name to see whether the vocabulary grew (it never does here);
            # a built-in name is no folder.
            adapter_kwargs["save_embedding_layers"] = False
        else:
            model.peft_config["default"].base_model_name_or_path = portable_model_name(base_path)
        _save_adapter(model, tmp, **adapter_kwargs)
        tokenizer.save_pretrained(tmp)
        # The adapter folder also records the YaRN-extended config so loaders can restore it for any base.
        base.config.save_pretrained(tmp / "extended_config")
        if peft_cfg.merge_on_save:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
            if write_extra is not None:
                write_extra(tmp / "merged")
    (tmp / "seer_run.json").write_text(
        json.dumps({"base_model": portable_model_name(model_cfg.name_or_path), "method": peft_cfg.method}, indent=2) + "\n"
    )
    if write_extra is not None:
        write_extra(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _save_adapter(peft_model, out_dir: Path, **kwargs) -> None:
    """peft's adapter save, with the config's set-valued fields (target modules) written sorted: peft lists a set
    in its iteration order, which changes with each process's string hashing, so two saves would differ."""
    config = peft_model.peft_config["default"]
    unordered = {k: v for k, v in vars(config).items() if isinstance(v, set)}
    for k, v in unordered.items():
        setattr(config, k, sorted(v))
    try:
        peft_model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    finally:
        for k, v in unordered.items():
            setattr(config, k, v)


def _save_unadapted_base(peft_model, out_dir: Path) -> None:
    """Save the base weights without LoRA deltas or trainable-copy modules (the originals)."""
    clone = copy.deepcopy(peft_model)
    base = clone.unload()  # removes LoRA layers without merging; modules_to_save return to the originals
    base.save_pretrained(out_dir, safe_serialization=True)


def load_trained(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load what `save_final` wrote (full folder, or adapter + base) with its YaRN config, ready to evaluate.

    Args:
        path: The run's `final` folder.
        device: Where to put the model. Default CPU.
        dtype: Weights dtype; default as saved.

    Returns:
        The model in eval mode: a transformers model for a full folder, a peft model for an adapter over a
        named base, and for an adapter folder holding its own base (a built-in model) the transformers model
        with the adapter loaded into it by transformers.
    """
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        hint = " (it holds seer gates alone: load it with seer_finetune.seer.load_seer_model)" if (path / "seer_gates.json").is_file() else ""
        raise ConfigError(f"{path} is not a saved model folder (no config.json or adapter_config.json){hint}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import PeftConfig as LoadedPeftConfig
        from peft import PeftModel

        base_path = LoadedPeftConfig.from_pretrained(path).base_model_name_or_path
        config = AutoConfig.from_pretrained(path / "extended_config")
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, config=config, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load {base_path}, the base model the adapter in {path} was trained on "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); if it moved, write its new place "
                f"into {path / 'adapter_config.json'} (base_model_name_or_path)"
            ) from None
        model = PeftModel.from_pretrained(base, path)
    else:
        # A full folder, or an adapter beside its own base: transformers then loads the base from the folder
        # (its config.json is the YaRN-extended one) and the adapter into it.
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()
