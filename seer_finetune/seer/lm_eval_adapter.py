"""lm-eval-harness adapter: run lm-eval's tasks on any model this project trains or loads, seer or dense.

Importing this module registers the model type `seer` with lm-eval. Its `pretrained` is whatever
`load_for_generation` takes (a run folder, its `final/` or `merged/`, an export, a Hugging Face folder or hub name,
`builtin:NAME`); `density`, `threshold` or `dense` set the prefill's sparsity (default: what the gates trained
with). Scoring (loglikelihood) runs the whole sequence through the gates and the block-sparse kernels; generation
prefills sparse and decodes densely from the KV cache, as `generate` does.

    python -m seer_finetune lm-eval --model seer \\
        --model_args pretrained=runs/yarn32k_sparsity90,density=0.1 --tasks <tasks> --device cuda:0

or, in Python, `import seer_finetune.seer.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="seer", ...)`.
lm-eval is an optional dependency (`pip install seer-finetune[lm-eval]`).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ..config import ConfigError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:
    raise ConfigError("the lm-eval adapter needs lm-eval-harness: pip install 'seer-finetune[lm-eval]'") from exc

from ..generation import use_cached_sdpa
from .loading import load_for_generation

MODEL_NAME = "seer"


def _dtype(value) -> Optional[torch.dtype]:
    """A torch dtype from lm-eval's model_args (None for `auto` or nothing: as saved)."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or value == "auto":
        return None
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"lm-eval model_args: dtype={value!r} is not a torch dtype (e.g. bfloat16, float32, auto)")
    return dtype


@register_model(MODEL_NAME)
class SeerLM(HFLM):
    """lm-eval's Hugging Face model class over a model loaded by `load_for_generation`.

    Args:
        pretrained: What `load_for_generation` loads (see the module docstring).
        density: Fraction of causal key blocks the gates keep, in (0, 1]. Default: the trained setting.
        threshold: Instead of a density: minimum gate probability of a kept block.
        dense: Ignore the gates (dense attention through the seer kernels). Default False.
        device: Where the model runs. Default `cuda` when available, else `cpu`.
        dtype: Weights dtype (`bfloat16`, `float32`, ... or `auto`: as saved). Default `auto`.
        kernel: `seer_kernels` implementation (`auto`, `pytorch`, `triton`). Default `auto`.
        batch_size: Requests per forward (lm-eval's). Default 1, and 1 is the only choice for a sparse seer
            setting: lm-eval right-pads a scoring batch without a mask, and the padded positions would take blocks
            of the layer budget and change the real tokens' selection.
        max_length: Longest context lm-eval feeds the model (default: the model config's positions, which YaRN
            runs extend).
        kwargs: Other arguments of lm-eval's `HFLM` (e.g. `add_bos_token`).
    """

    def __init__(
        self,
        pretrained: str,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        dense: bool = False,
        device: Optional[str] = None,
        dtype=None,
        kernel: Optional[str] = None,
        batch_size: int | str = 1,
        max_length: Optional[int] = None,
        **kwargs,
    ):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_for_generation(
            str(pretrained),
            density=None if density is None else float(density),
            threshold=None if threshold is None else float(threshold),
            dense=bool(dense),
            device=device,
            dtype=_dtype(dtype),
            kernel=kernel,
        )
        runtime = loaded.runtime
        settings = runtime.settings if runtime is not None else None
        sparse = runtime is not None and runtime.sparse and (settings.threshold is not None or settings.density < 1.0)
        if sparse and str(batch_size) != "1":
            raise ConfigError(
                f"lm-eval model_args: batch_size={batch_size} with a sparse seer setting; use batch_size=1 (lm-eval "
                "pads scoring batches without a mask, and padding would change the blocks the gates keep)"
            )
        super().__init__(
            pretrained=loaded.model,
            tokenizer=loaded.tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            **kwargs,
        )
        self.seer_runtime = runtime

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        # A dense model decodes on SDPA without cuDNN, as `generate` does (`generation.use_cached_sdpa`).
        with use_cached_sdpa(self.model):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main(argv: list[str]) -> int:
    """lm-eval's command line with the `seer` model type registered (`python -m seer_finetune lm-eval ...`)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
