"""Value and cross-field checks of a composed configuration (`validate`), each failure one `ConfigError` line.

Hydra checks types while composing; these rules check what types cannot: ranges, choices, and fields that must
agree (`rope.factor` against the lengths, a sequence against the model's context, the seer stages).
"""

from __future__ import annotations

import math
from typing import Any

from .config import (
    CAUSAL_WITHOUT_MASK,
    FUSED_KERNEL_CHOICES,
    GROUND_TRUTHS,
    LM_LOSS_CHOICES,
    LORA_COMPUTE_CHOICES,
    NEEDLE_TASKS,
    AttentionConfig,
    ConfigError,
    DataConfig,
    RopeConfig,
    SeerConfig,
)

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _fraction(name: str, value: float, *, open_low: bool) -> None:
    """`value` in (0, 1] (`open_low`) or [0, 1]; NaN fails both."""
    inside = (0.0 < value <= 1.0) if open_low else (0.0 <= value <= 1.0)
    if not inside:
        raise ConfigError(f"{name}={value!r} must be in {'(0, 1]' if open_low else '[0, 1]'}")


def check_sequence_lengths(d: DataConfig, limit: int, limit_name: str, fix: str) -> None:
    """Refuse a training or evaluation sequence longer than a context, naming the field that is too long.

    Args:
        d: The data section (`seq_len`, `eval_seq_len`).
        limit: The longest sequence the model takes.
        limit_name: What the limit is, for the message (e.g. "the model's context (256 tokens)").
        fix: How to proceed, for the message.

    Raises:
        ConfigError: `data.seq_len=N exceeds <limit_name>; <fix>` (or `data.eval_seq_len=...`).
    """
    for name, value in (("data.seq_len", d.seq_len), ("data.eval_seq_len", d.eval_seq_len)):
        if value is not None and value > limit:
            raise ConfigError(f"{name}={value} exceeds {limit_name}; {fix}")


def gate_init_stage(a: AttentionConfig) -> bool:
    """Whether an attention section asks for a gate-distillation stage before its own (`init_steps > 0`).

    Args:
        a: The attention section.

    Returns:
        True for `backend=seer` with `init_steps > 0` (and `mode=joint`). With a `gates_path` the stage
        continues distilling those gates (e.g. gates distilled at the native length, distilled again at the
        target length after YaRN); without one it starts from fresh gates.

    Raises:
        ConfigError: for negative `init_steps`, or `init_steps` with another mode than `joint`.
    """
    if a.init_steps < 0:
        raise ConfigError(f"attention.init_steps={a.init_steps} must be >= 0")
    if a.backend != "seer" or a.init_steps == 0:
        return False
    if a.mode != "joint":
        raise ConfigError(f"attention.init_steps needs attention.mode=joint (got {a.mode}): it distils gates before joint training")
    return True


def validate_rope(r: RopeConfig) -> RopeConfig:
    """Check a rope section and fill in whichever of `factor` / `max_position_embeddings` is missing (in place).

    Raises:
        ConfigError: naming the field, for a missing original length, a factor not above 1, or a factor that
            disagrees with the two lengths.
    """
    _choice("rope.type", r.type, ("none", "yarn"))
    if r.type != "yarn":
        return r
    if r.original_max_position_embeddings is None:
        raise ConfigError(
            "rope.original_max_position_embeddings is required for YaRN (the length the base model was "
            "trained at); transformers would otherwise silently take the target length"
        )
    _positive("rope.original_max_position_embeddings", r.original_max_position_embeddings)
    if r.factor is None and r.max_position_embeddings is None:
        raise ConfigError("rope: set rope.factor or rope.max_position_embeddings for YaRN")
    if r.factor is not None:
        _positive("rope.factor", r.factor)
    if r.max_position_embeddings is not None:
        _positive("rope.max_position_embeddings", r.max_position_embeddings)
    if r.factor is None:
        r.factor = r.max_position_embeddings / r.original_max_position_embeddings
    if r.max_position_embeddings is None:
        r.max_position_embeddings = int(round(r.factor * r.original_max_position_embeddings))
    _positive("rope.factor", r.factor)
    if r.factor <= 1.0:
        raise ConfigError(f"rope.factor={r.factor} must be > 1 to extend the context")
    expected = r.factor * r.original_max_position_embeddings
    if not math.isclose(expected, r.max_position_embeddings, rel_tol=1e-6):
        raise ConfigError(
            f"rope.factor={r.factor} disagrees with the lengths: original_max_position_embeddings="
            f"{r.original_max_position_embeddings} x factor = {expected:g}, but max_position_embeddings="
            f"{r.max_position_embeddings}"
        )
    return r


def validate_data_sources(d: DataConfig) -> None:
    """Rules of the data section's format, chat fields, hub fields and streaming.

    Args:
        d: The data section.

    Raises:
        ConfigError: one line naming the field.
    """
    _choice("data.format", d.format, ("text", "chat"))
    _choice("data.chat_overflow", d.chat_overflow, ("truncate", "drop"))
    if not d.messages_field:
        raise ConfigError("data.messages_field must not be empty")
    for name in ("prompt_field", "response_field", "hub_config"):
        value = getattr(d, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"data.{name}={value!r} must be a non-empty name (or null)")
    if (d.prompt_field is None) != (d.response_field is None):
        raise ConfigError("data.prompt_field and data.response_field go together: set both (or neither, to read data.messages_field)")
    if d.prompt_field is not None and d.prompt_field == d.response_field:
        raise ConfigError(f"data.prompt_field and data.response_field are both {d.prompt_field!r}; name two columns")
    if d.format != "chat" and d.prompt_field is not None:
        raise ConfigError("data.prompt_field and data.response_field need data.format=chat")
    files = d.data_files
    if files is not None:
        listed = [files] if isinstance(files, str) else list(files) if isinstance(files, (list, tuple)) else None
        if not listed or not all(isinstance(f, str) and f for f in listed):
            raise ConfigError(f"data.data_files={files!r} must be a path or pattern, or a non-empty list of them")
    _positive("data.shuffle_buffer", d.shuffle_buffer)


def check_cuda_graphs(cfg: SeerConfig) -> None:
    """What `trainer.cuda_graphs=true` cannot replay, refused by name: a graph replays fixed kernels on fixed
    buffers, so nothing in the step may depend on reading the device or on per-batch document layouts. (A device
    that is not CUDA is refused by the trainer, once `trainer.device` has been resolved.)"""
    why = None
    if cfg.deepspeed.enabled:
        why = "DeepSpeed's engine runs its own communication and bookkeeping around backward"
    elif cfg.data.format != "text":
        why = "chat data has targets on some rows only, which the loss would have to find on the device"
    elif cfg.data.attend_within_documents:
        why = "per-document attention takes each batch's document layout from the device"
    elif cfg.attention.backend not in CAUSAL_WITHOUT_MASK:
        why = (f"attention.backend={cfg.attention.backend} has no causal-only form registered for capture "
               f"({', '.join(CAUSAL_WITHOUT_MASK)})")
    elif cfg.trainer.lm_loss == "liger":
        why = "Liger's fused loss reads the target count back from the device: use trainer.lm_loss=chunked or auto"
    if why is not None:
        raise ConfigError(f"trainer.cuda_graphs=true: {why}")


def validate(cfg: SeerConfig) -> SeerConfig:
    """Check values and cross-field rules; raise ConfigError naming the field on the first problem."""
    m, r, d, a, p, o, t = cfg.model, cfg.rope, cfg.data, cfg.attention, cfg.peft, cfg.optim, cfg.trainer
    _choice("model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice("model.fused_kernels", m.fused_kernels, FUSED_KERNEL_CHOICES)
    _positive("data.seq_len", d.seq_len)
    if d.eval_seq_len is not None:
        _positive("data.eval_seq_len", d.eval_seq_len)
    _positive("data.num_proc", d.num_proc)
    _positive("data.eval_documents", d.eval_documents, allow_zero=True)
    _positive("data.max_eval_sequences", d.max_eval_sequences, allow_zero=True)
    _choice("data.invalid_files", d.invalid_files, ("skip", "error"))
    for name in ("file_glob", "text_field"):
        if not getattr(d, name):
            raise ConfigError(f"data.{name} must not be empty")
    validate_data_sources(d)

    validate_rope(r)
    if r.type == "yarn":
        target = f"the YaRN target length rope.max_position_embeddings={r.max_position_embeddings}"
        check_sequence_lengths(d, r.max_position_embeddings, target, "raise rope.factor")
        _positive("rope.beta_fast", r.beta_fast)
        _positive("rope.beta_slow", r.beta_slow)
        if r.attention_factor is not None:
            _positive("rope.attention_factor", r.attention_factor)

    _choice("attention.backend", a.backend, ("sdpa", "eager", "seer"))
    _choice("attention.mode", a.mode, ("dense", "gate_distill", "joint"))
    _choice("attention.block_size", a.block_size, (16, 32, 64, 128))
    _choice("attention.gate_loss", a.gate_loss, ("kl", "mse"))
    _choice("attention.kernel", a.kernel, ("auto", "pytorch", "triton"))
    for name, pools in (("attention.q_pooling", a.q_pooling), ("attention.k_pooling", a.k_pooling)):
        if not pools:
            raise ConfigError(f"{name} must name at least one of avg, max, min, abs_avg")
        for pool in pools:
            _choice(name, pool, ("avg", "max", "min", "abs_avg"))
    _positive("attention.gate_hidden_size", a.gate_hidden_size)
    _choice("attention.gate_query", a.gate_query, ("pooled", "token_logit_max", "token_prob_max"))
    _choice("attention.gate_weight_init", a.gate_weight_init, ("uniform", "logit_bound"))
    if a.gate_query != "pooled" and list(a.q_pooling) != ["avg"]:
        raise ConfigError(
            f"attention.gate_query={a.gate_query} scores each token's own query, so attention.q_pooling="
            f"{list(a.q_pooling)} has nothing to pool: leave q_pooling at its default [avg]"
        )
    _choice("attention.gate_rope_units", a.gate_rope_units, ("tokens", "blocks", "none"))
    _fraction("attention.gate_rope_fraction", a.gate_rope_fraction, open_low=True)
    if a.gate_rope_units == "none" and a.gate_rope_fraction != 1.0:
        raise ConfigError(
            f"attention.gate_rope_fraction={a.gate_rope_fraction} splits the gate's RoPE, but "
            "attention.gate_rope_units=none gives it none: set gate_rope_units to tokens or blocks, or leave the "
            "fraction at 1.0"
        )
    _positive("attention.gate_loss_scale", a.gate_loss_scale, allow_zero=True)
    _positive("attention.gate_target_temperature", a.gate_target_temperature)
    _positive("attention.gate_selection_temperature", a.gate_selection_temperature)
    _positive("attention.sink_blocks", a.sink_blocks, allow_zero=True)
    _positive("attention.local_blocks", a.local_blocks)
    _choice("attention.budget", a.budget, ("row", "layer", "head"))
    if not 0.0 <= a.row_mass < 1.0:
        raise ConfigError(f"attention.row_mass={a.row_mass} must be in [0, 1)")
    if a.row_mass > 0.0 and a.budget == "row":
        raise ConfigError(f"attention.row_mass={a.row_mass} shares out a layer or head budget: it needs attention.budget=layer or head")
    _positive("attention.bound_blocks", a.bound_blocks, allow_zero=True)
    _positive("attention.probe_blocks", a.probe_blocks, allow_zero=True)
    if not 1 <= a.probe_tokens <= a.block_size or a.block_size % a.probe_tokens:
        raise ConfigError(
            f"attention.probe_tokens={a.probe_tokens} must be in [1, attention.block_size={a.block_size}] and divide "
            "it (the probe tokens are evenly strided over the block)"
        )
    _fraction("attention.ground_truth_query_fraction", a.ground_truth_query_fraction, open_low=True)
    _choice("attention.ground_truth", a.ground_truth, GROUND_TRUTHS)
    if a.density is not None:
        _fraction("attention.density", a.density, open_low=True)
    if a.threshold is not None:
        _fraction("attention.threshold", a.threshold, open_low=False)
    if a.density is not None and a.threshold is not None:
        raise ConfigError("attention: set either density or threshold, not both")
    if a.backend == "seer" and a.mode == "joint" and a.density is None and a.threshold is None:
        raise ConfigError("attention.mode=joint needs attention.density or attention.threshold")
    if a.backend != "seer" and a.mode != "dense":
        raise ConfigError(f"attention.mode={a.mode} needs attention.backend=seer")
    gate_init_stage(a)

    _choice("peft.method", p.method, ("full", "lora"))
    if p.method == "lora":
        _positive("peft.r", p.r)
        _positive("peft.alpha", p.alpha)
        if not p.target_modules:
            raise ConfigError("peft.target_modules must name at least one module for LoRA")
    _choice("peft.lora_compute", p.lora_compute, LORA_COMPUTE_CHOICES)
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"peft.dropout={p.dropout} must be in [0, 1)")

    for name, lr in (("optim.lr", o.lr), ("optim.gate_lr", o.gate_lr)):
        if lr is None:
            continue
        _positive(name, lr, allow_zero=True)
        # The optimizer keeps learning rates as float32 multipliers of the update: beyond that range AdamW fails.
        if lr > FLOAT32_MAX:
            raise ConfigError(f"{name}={lr!r} is beyond float32's range ({FLOAT32_MAX:.3g})")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.eps", o.eps, allow_zero=True)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _choice("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")

    _positive("trainer.max_steps", t.max_steps, allow_zero=True)
    _positive("trainer.micro_batch_size", t.micro_batch_size)
    _positive("trainer.grad_accum_steps", t.grad_accum_steps)
    _positive("trainer.save_every", t.save_every, allow_zero=True)
    _positive("trainer.keep_checkpoints", t.keep_checkpoints)
    _positive("trainer.eval_every", t.eval_every, allow_zero=True)
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.max_nonfinite_steps", t.max_nonfinite_steps)
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"trainer.seed={t.seed} must be in [0, 2**32) (the range NumPy's generator takes)")
    if t.overwrite and t.resume:
        raise ConfigError(
            "trainer.overwrite=true needs trainer.resume=false: it moves the folder's run to previous_N to start "
            "a new one (drop it to resume the run instead)"
        )
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.lm_loss", t.lm_loss, LM_LOSS_CHOICES)
    if t.cuda_graphs:
        check_cuda_graphs(cfg)
    if t.lm_loss == "liger" and cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("trainer.lm_loss=liger reads the head's whole weight, which ZeRO-3 partitions: use "
                          "trainer.lm_loss=chunked (or auto)")
    _choice("logger.wandb", cfg.logger.wandb, ("disabled", "offline", "online"))

    ds = cfg.deepspeed
    _choice("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    if not ds.enabled and (ds.offload_optimizer or ds.offload_params):
        raise ConfigError("CPU offload needs DeepSpeed: set deepspeed.enabled=true (e.g. deepspeed=zero3_offload)")
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
    _positive("deepspeed.sequence_parallel_size", ds.sequence_parallel_size)
    if ds.sequence_parallel_size > 1 and not ds.enabled:
        raise ConfigError("deepspeed.sequence_parallel_size > 1 needs deepspeed.enabled=true")

    for length in cfg.eval.lengths:
        if length <= 0:
            raise ConfigError(f"eval.lengths: {length} must be > 0")
    for density in cfg.eval.densities:
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"eval.densities: {density} must be in (0, 1]")
    for threshold in cfg.eval.thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"eval.thresholds: {threshold} must be in [0, 1]")
    _validate_needles(cfg)
    return cfg


def _validate_needles(cfg: SeerConfig) -> None:
    """The needle-task fields of `eval` (`seer_finetune.needles`)."""
    e = cfg.eval
    for task in e.needle_tasks:
        _choice("eval.needle_tasks", task, NEEDLE_TASKS)
    if len(set(e.needle_tasks)) != len(e.needle_tasks):
        raise ConfigError(f"eval.needle_tasks={list(e.needle_tasks)} names a task twice")
    for length in e.needle_lengths:
        if length <= 0:
            raise ConfigError(f"eval.needle_lengths: {length} must be > 0")
    if e.needle_tasks and not e.needle_depths:
        raise ConfigError("eval.needle_depths is empty: give at least one depth in [0, 1]")
    for depth in e.needle_depths:
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"eval.needle_depths: {depth} must be in [0, 1] (0 = start of the haystack, 1 = end)")
    _positive("eval.needle_trials", e.needle_trials)
    _positive("eval.needle_batch_size", e.needle_batch_size)
    if not e.perplexity and not e.needle_tasks:
        raise ConfigError("eval.perplexity=false and no eval.needle_tasks: nothing to evaluate")
