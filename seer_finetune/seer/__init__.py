"""SeerAttention for any Hugging Face decoder: learned block-sparse attention trained with the model.

- `gate.AttnGate`: the per-layer block predictor (pooled pre-RoPE Q/K, per-head projections, block RoPE).
- `selection`: candidate blocks (causal + documents), gate probabilities, block selection, realised density,
  gate loss.
- `probe`: probe scores, the exact block-pooled attention of a few query tokens per block (`probe_blocks`).
- `runtime`: `SeerSettings` (frozen, from `AttentionConfig`) and `SeerRuntime` (settings, train/eval switch,
  per-forward state, gate losses and statistics), shared by all gates of a model.
- `masking`: the `seer` mask function (per-token document ids instead of an L x L mask).
- `attention`: the `seer` attention function (inputs, gate scores, selection, kernel, loss) and its registration.
- `attach`: attaching gates to a loaded model (capture hooks on the Q/K projections).
- `saving`: gates as a small safetensors adapter, composing base + gates (+ LoRA) at load time.
- `loading`: `load_for_generation`, one call loading any folder a run writes (with or without gates) to generate.
- `decode`: attention of new tokens to a filled KV cache (dense decode).
- `plugin`: `build_extension(model, cfg)`, the trainer seam, registered for `attention.backend=seer`.
- `density_sweep`: `run_eval(cfg)`, the `eval` job: perplexity at several lengths and densities/thresholds.
- `stages`: the gate-distillation stage derived from a joint configuration (`attention.init_steps`), run
  before the joint stage by the `train` job.

Gate inputs are the pre-RoPE queries/keys, captured by forward hooks and detached by default
(`attention.detach_gate_inputs`): the gate loss trains the gates only, the LM loss reaches the model only through
the block-sparse attention output (selection runs under no_grad).
"""

from .attach import attach_seer_gates, seer_gates
from .attention import register_seer, seer_attention_forward
from .plugin import SeerExtension, build_extension
from .gate import AttnGate
from .runtime import SeerRuntime, SeerSettings
from .saving import load_gates, load_seer_model, save_gates
from .loading import GenerationModel, load_for_generation

__all__ = [
    "AttnGate",
    "GenerationModel",
    "SeerExtension",
    "SeerRuntime",
    "SeerSettings",
    "attach_seer_gates",
    "build_extension",
    "load_for_generation",
    "load_gates",
    "load_seer_model",
    "register_seer",
    "save_gates",
    "seer_attention_forward",
    "seer_gates",
]
