"""Generation with any causal LM, with or without seer gates: batches, prompts, tokenizer and model-folder helpers.

`seer_finetune.seer.loading.load_for_generation` (also `seer_finetune.load_for_generation`) loads any folder the
project writes and uses these helpers; this module itself knows nothing of gates, so the core of the package never
reaches the seer plug-in. `generate_ids` / `generate_texts` run greedy or sampled generation over a list of
prompts in left-padded batches with the KV cache; `sparsity_settings` / `configure_sparsity` set a gates' runtime
up for inference; `read_prompts` reads the prompts of the `generate` command.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .config import ConfigError

GATES_CONFIG = "seer_gates.json"


def model_folder(path: str | Path) -> Path:
    """The folder to load for `path`: a run folder means its `final/`; anything else is itself."""
    path = Path(path).expanduser()
    if not (path / "final").is_dir():
        return path
    config = path / "config.json"
    # A run folder's config.json is the run's configuration (no `model_type`), not a model's.
    is_model = (path / "adapter_config.json").is_file() or (path / GATES_CONFIG).is_file() or (
        config.is_file() and "model_type" in json.loads(config.read_text())
    )
    return path if is_model else path / "final"


def base_model_name(folder: Path) -> Optional[str]:
    """The model a folder was trained from, as its own files name it (None when they name none)."""
    for name, key in (("seer_run.json", "base_model"), (GATES_CONFIG, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if value:
                return str(value)
    return None


def load_generation_tokenizer(folder_or_name: str | Path, *, fallback: Optional[str] = None):
    """The tokenizer saved in a folder (or of a hub/builtin model), set up for batched generation.

    Args:
        folder_or_name: A model folder, a hub name or `builtin:NAME`.
        fallback: A model whose tokenizer to use when the folder holds none (its base model).

    Returns:
        A tokenizer padding on the left, with a pad token (its EOS when it has none).
    """
    from transformers import AutoTokenizer

    from .modeling import resolve_model_path

    source = str(folder_or_name)
    folder = Path(source)
    if folder.is_dir() and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        if fallback is None:
            raise ConfigError(f"{folder} holds no tokenizer and names no base model to take one from")
        source = fallback
    if source.startswith("builtin:") or Path(source).expanduser().exists():
        source, _ = resolve_model_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {source}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sparsity_settings(*, density: Optional[float], threshold: Optional[float]) -> dict:
    """`SeerSettings` changes for inference at `density` or `threshold`: neither, or density 1, is exact dense
    attention without consulting the gates; no gate loss, no oracle."""
    dense = threshold is None and (density is None or density >= 1.0)
    return dict(
        mode="dense" if dense else "joint",
        density=None if dense else density,
        threshold=None if dense else threshold,
        compute_loss=False,
        oracle=False,
    )


def configure_sparsity(runtime, *, density: Optional[float], threshold: Optional[float], kernel: Optional[str] = None) -> None:
    """Set a gates' runtime up for inference (`sparsity_settings`) and switch it to evaluation mode.

    Args:
        runtime: The model's `SeerRuntime`.
        density, threshold: At most one; see `load_for_generation`.
        kernel: `seer_kernels` implementation, or None to keep the runtime's.
    """
    changes = sparsity_settings(density=density, threshold=threshold)
    if kernel is not None:
        changes["kernel"] = kernel
    try:
        runtime.configure(**changes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    runtime.training = False


def refuse_sparse_settings(what: str, density: Optional[float], threshold: Optional[float]) -> None:
    if threshold is not None or (density is not None and density < 1.0):
        setting = f"threshold={threshold}" if threshold is not None else f"density={density}"
        raise ConfigError(f"{what} has no seer gates ({GATES_CONFIG}): it runs dense only, {setting} cannot apply")


def load_named_model(name: str, *, device, dtype: Optional[torch.dtype], seed: int):
    """A hub model, or a `builtin:` one built with random weights from `seed`, on SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import resolve_model_path

    source, builtin = resolve_model_path(name)
    try:
        if builtin:
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(source)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype or torch.float32)
        else:
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return model.to(device).eval()


CACHED_SDPA = "sdpa_cached"


def cache_sdpa_backends():
    """Context restricting SDPA to the flash, memory-efficient and math backends: PyTorch builds a cuDNN graph
    per shape, so with cuDNN every decode step (one more cached key each time) paid a new graph, about 100 ms on
    an H100 (9 tokens/s for a 135M model at any length)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def cached_sdpa_forward(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, on `cache_sdpa_backends` when the queries are fewer than the keys (tokens
    appended to a cache); a prefill (as many queries as keys) runs unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] < key.shape[2]:
        with cache_sdpa_backends():
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_cached_sdpa() -> None:
    """Register `sdpa_cached` (attention and transformers' SDPA mask) with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CACHED_SDPA, cached_sdpa_forward)
    AttentionMaskInterface.register(CACHED_SDPA, sdpa_mask)


@contextlib.contextmanager
def use_cached_sdpa(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a model on transformers' `sdpa` attention runs `sdpa_cached` instead (other
    implementations, the seer one included, are left as they are)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "sdpa":
        yield
        return
    register_cached_sdpa()
    model.set_attn_implementation(CACHED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def prepare_for_generation(model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Generation defaults that do not depend on the call: the pad token, and no length warning from a
    `max_length` the saved generation config never meant as a limit."""
    config = model.generation_config
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    batch_size: int = 8,
    eos_token_id: Optional[int | list[int]] = None,
) -> list[list[int]]:
    """New tokens for each prompt, generated in left-padded batches with the KV cache.

    Args:
        model: A causal LM (with or without gates).
        prompts: Token ids per prompt (each at least one token).
        pad_token_id: Fills the left of shorter prompts (masked out).
        max_new_tokens: Tokens to generate at most per prompt.
        temperature: 0 for greedy decoding (default); above 0 samples at this temperature.
        top_p: Nucleus sampling mass when sampling. Default 1.0 (off).
        seed: Seeds torch's generator before each batch when sampling (same seed, same samples).
        batch_size: Prompts per batch. Default 8.
        eos_token_id: Stops a prompt's generation; default the model's generation config's.

    Returns:
        Per prompt, its new token ids, cut after the first end-of-sequence token.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    device = next(model.parameters()).device
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(map(int, p)) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        if temperature > 0 and seed is not None:
            torch.manual_seed(seed + start)
        with use_cached_sdpa(model):
            result = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=eos,
                # Sampling knobs a saved generation config may carry must not apply to greedy decoding.
                top_k=None,
                **sampling,
            )
        for row in result[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def generate_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    batch_size: int = 8,
) -> list[str]:
    """The continuation of each prompt as text (special tokens dropped); see `generate_ids` for the arguments."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    new = generate_ids(
        model,
        encoded,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def read_prompts(*, prompt: Optional[str], prompt_file: Optional[str], jsonl: Optional[str], stdin) -> tuple[list[str], bool]:
    """The prompts of a `generate` command line: one from `--prompt`, one from `--prompt-file` (the whole file),
    several from `--jsonl` (one per line: a string, or an object with a `prompt` field), else stdin (all of it).

    Args:
        prompt, prompt_file, jsonl: The options (at most one).
        stdin: The stream read when no option gives prompts.

    Returns:
        (prompts, whether they came from jsonl: then the output is jsonl too).
    """
    given = [name for name, value in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--jsonl", jsonl)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of --prompt, --prompt-file, --jsonl (got {' and '.join(given)})")
    if prompt is not None:
        prompts = [prompt]
    elif prompt_file is not None or jsonl is not None:
        file = Path(prompt_file or jsonl)
        if not file.is_file():
            raise ConfigError(f"no such prompt file: {file}")
        text = file.read_text(encoding="utf-8", errors="strict")
        prompts = [text] if prompt_file is not None else _jsonl_prompts(file, text)
    else:
        if stdin is None or stdin.isatty():
            raise ConfigError("no prompt: give --prompt, --prompt-file or --jsonl, or pipe the prompt into stdin")
        prompts = [stdin.read()]
    if not prompts or any(not p for p in prompts):
        raise ConfigError("empty prompt" + (f" in {jsonl}" if jsonl else ""))
    return prompts, jsonl is not None


def _jsonl_prompts(file: Path, text: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}:{number}: not JSON ({exc.msg})") from None
        value = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(value, str):
            raise ConfigError(f"{file}:{number}: expected a string or an object with a string 'prompt'")
        prompts.append(value)
    return prompts
