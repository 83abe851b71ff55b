"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Every field a user can set lives here with its default and its meaning. Hydra checks types when it
composes (`trainer.max_steps=abc` fails there); `validate()` checks values and cross-field rules
(`rope.factor` against the lengths, say) and raises `ConfigError` with one readable line.

Config groups under `conf/` hold named values for each section (`model/tiny_llama.yaml`, ...);
experiments under `conf/exp/` are `# @package _global_` files that state only their differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Which causal LM to load and how.

    Attributes:
        name_or_path: Hub name, local folder, or `builtin:<name>` for a config shipped in the repo
            (random weights; `builtin:tiny_llama` is the embedded default).
        dtype: `auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16` or `float16`.
        trust_remote_code: Passed to transformers; off unless asked for.
        gradient_checkpointing: Recompute activations in backward to save memory.
        tokenizer: Tokenizer name or path; defaults to `name_or_path`.
    """

    name_or_path: str = MISSING
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    tokenizer: Optional[str] = None


@dataclass
class RopeConfig:
    """RoPE scaling. `type: yarn` extends the context through transformers' own `rope_type: yarn`.

    Attributes:
        type: `none` (keep the model's RoPE) or `yarn`.
        factor: Context extension factor; must equal max_position_embeddings / original_max_position_embeddings.
        original_max_position_embeddings: The length the base model was trained at (required for yarn;
            never inferred, since transformers would silently default it to the target length).
        max_position_embeddings: The target context length after extension.
        beta_fast, beta_slow: YaRN's interpolation ramp boundaries (in rotations).
        attention_factor: YaRN's attention temperature; `null` lets transformers use 0.1 * ln(factor) + 1.
    """

    type: str = "none"
    factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None


@dataclass
class DataConfig:
    """Training and evaluation text.

    Attributes:
        source: Hub dataset name, a local file (.txt, .jsonl, .json, .parquet) or a directory of them
            (each .txt file one document), or `builtin:<name>` for the corpus shipped in the repo.
        eval_source: Held-out text in the same forms; if null, `eval_documents` documents are held out
            from `source` (whole documents, never split).
        split: Split name for hub datasets.
        text_field: Column holding the text in jsonl/parquet/hub data.
        seq_len: Tokens per training sequence (documents packed, EOS between them).
        eval_seq_len: Tokens per evaluation sequence (defaults to seq_len).
        eval_documents: Documents held out from `source` when no eval_source is given.
        max_eval_sequences: Cap on evaluation sequences (0 = all).
        cache_dir: Where tokenised data is cached; default `~/.cache/seer-finetune/data`.
        num_proc: Processes for tokenisation.
        file_glob: Pattern for files inside a directory source.
        attend_within_documents: Restart position ids at every packed document so attention stays inside
            documents (transformers then masks across boundaries; the seer backend does it blockwise).
        invalid_files: What happens to files of a source that are not text (NUL bytes, as in binaries; or more
            than 0.1% of bytes invalid UTF-8, as in another encoding) and to table rows whose text field is not a
            string: `skip` (left out with a warning naming them, counted in the run's summary) or `error`
            (the run stops with one line naming the first).
    """

    source: str = MISSING
    eval_source: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = MISSING
    eval_seq_len: Optional[int] = None
    eval_documents: int = 1
    max_eval_sequences: int = 0
    cache_dir: Optional[str] = None
    num_proc: int = 2
    file_glob: str = "**/*"
    attend_within_documents: bool = False
    invalid_files: str = "skip"


@dataclass
class AttentionConfig:
    """Attention backend and SeerAttention settings.

    Attributes:
        backend: `sdpa`, `eager` (transformers' own) or `seer` (gates + block-sparse attention).
        mode: For `seer`: `gate_distill` (base frozen, gates learn from the dense attention),
            `joint` (model and gates train; attention runs block-sparse), `dense` (gates off: the
            YaRN baseline through the same code path).
        block_size: Tokens per block for gates and sparse attention (64 or 128).
        gate_hidden_size: Per-head projection width of the gate.
        gate_rope_units: How the gate's RoPE at block positions reads the model's scaling lengths: `tokens`
            (as they are, the SeerAttention reference) or `blocks` (divided by the block size, so YaRN
            interpolates the gate's positions as it does the model's).
        q_pooling: Pooling of Q over a block, one or more of avg|max|min.
        k_pooling: Pooling of K over a block, one or more of avg|max|min.
        detach_gate_inputs: Stop gate gradients from flowing into the model's Q/K projections.
        density: Target fraction of causal key blocks kept per query block (0, 1].
        threshold: Alternative to density: keep key blocks whose gate score is at least this.
        sink_blocks: Leading key blocks always kept (the attention sink; 1 keeps the first block).
        local_blocks: Key blocks ending at the diagonal always kept (1: the diagonal only; 2 adds the block
            before it, so every query sees at least its previous block_size tokens).
        budget: How a density is shared out: `row` (every query-block row keeps that fraction of its key
            blocks) or `layer` (the layer's total goes to the blocks of highest gate probability across heads
            and rows, so heads with concentrated attention leave blocks to heads with spread attention). A
            threshold needs no sharing out and ignores it.
        gate_loss: `kl` (KL(ground truth || gate)) or `mse`.
        gate_loss_scale: Weight of the gate loss in the total loss.
        ground_truth_query_fraction: Fraction of query blocks (random each step) on which the
            ground truth and the gate loss are computed.
        kernel: `seer_kernels` implementation: `auto` (Triton on CUDA, the chunked PyTorch one elsewhere),
            `pytorch` or `triton`.
        gates_path: Folder of saved gates to start from (a `gate_distill` run's output).
        init_steps: With `mode: joint` and no `gates_path`: first distil the gates for this many steps (base
            frozen, output in `<output_dir>/gate_init`), then train jointly from them, in one command
            (`seer_finetune.jobs.train_job`, with the stage configs of `seer_finetune.seer.stages`). 0: a single
            stage.
    """

    backend: str = "sdpa"
    mode: str = "dense"
    block_size: int = 64
    gate_hidden_size: int = 128
    gate_rope_units: str = "tokens"
    q_pooling: list[str] = field(default_factory=lambda: ["avg"])
    k_pooling: list[str] = field(default_factory=lambda: ["max", "min"])
    detach_gate_inputs: bool = True
    density: Optional[float] = None
    threshold: Optional[float] = None
    sink_blocks: int = 0
    local_blocks: int = 1
    budget: str = "row"
    gate_loss: str = "kl"
    gate_loss_scale: float = 1.0
    ground_truth_query_fraction: float = 1.0
    kernel: str = "auto"
    gates_path: Optional[str] = None
    init_steps: int = 0


@dataclass
class PeftConfig:
    """Full fine-tuning or LoRA.

    Attributes:
        method: `full` or `lora`.
        r, alpha, dropout: LoRA rank, scaling numerator and dropout.
        target_modules: Module names LoRA wraps.
        trainable_embeddings: Also train the input/output embeddings (LongLoRA's finding for long context).
        trainable_norms: Also train normalisation layers.
        merge_on_save: Also write merged full weights next to the adapter in the final save.
    """

    method: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable_embeddings: bool = False
    trainable_norms: bool = False
    merge_on_save: bool = False


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Attributes:
        lr: Peak learning rate of the model parameters.
        gate_lr: Learning rate of the gate parameters (null: same as lr).
        weight_decay: Decoupled weight decay (not applied to biases, norms, gates' biases).
        betas, eps: AdamW moments.
        warmup_steps: Linear warmup from 0.
        schedule: `cosine`, `linear` or `constant` after warmup.
        min_lr_ratio: Final lr as a fraction of the peak (cosine/linear).
        max_grad_norm: Gradient clipping (0 disables).
    """

    lr: float = 2e-5
    gate_lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class TrainerConfig:
    """The training loop.

    Attributes:
        max_steps: Optimizer steps.
        micro_batch_size: Sequences per forward pass.
        grad_accum_steps: Micro-batches per optimizer step.
        seed: Seeds model init, data order and dropout.
        output_dir: Run folder: checkpoints, final model, metrics.jsonl.
        save_every: Checkpoint every N steps (0: only the final save).
        keep_checkpoints: Checkpoints kept on disk (oldest deleted first).
        eval_every: Evaluate every N steps (0: only before and after training).
        eval_before: Evaluate once before the first step.
        log_every: Log metrics every N steps.
        resume: Resume from the newest checkpoint in output_dir if one exists. The run folder's `config.json`
            is the run's contract: a resume may change only the settings that can apply to a running job
            (`run_folder.MUTABLE_FIELDS`: max_steps, learning rates and schedule, clipping, weight decay,
            eval/save/log cadence, keep_checkpoints, logger, device, progress bar, ...); they take effect at
            the resumed step and are recorded in the `history` of `config.json`. Any other change (model,
            tokenizer, rope, peft, attention, data, seq_len, seed, batch shape, DeepSpeed layout, number of
            processes, and every field not listed) stops the run with one line before anything is loaded.
        overwrite: With `resume: false` in a folder that already holds a run (checkpoints, metrics.jsonl,
            config.json, summary.json or final/), move that run into `<output_dir>/previous_N/` first
            (nothing is deleted). Without it such a folder is refused. Needs `resume: false`.
        max_nonfinite_steps: A step whose loss or gradient norm is NaN or inf skips its update (gradients
            dropped, weights, optimizer and schedule unchanged; the batch is consumed) and writes no
            checkpoint; this many such steps in a row stop the run with one line, leaving the checkpoints
            written before them.
        device: `auto`, `cpu` or `cuda`.
        progress_bar: Show a tqdm bar with loss, lr, tokens/s and ETA.
        save_final: Write the final Hugging Face folder.
    """

    max_steps: int = 100
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_before: bool = True
    log_every: int = 1
    resume: bool = True
    overwrite: bool = False
    max_nonfinite_steps: int = 5
    device: str = "auto"
    progress_bar: bool = True
    save_final: bool = True


@dataclass
class LoggerConfig:
    """Metrics sinks. metrics.jsonl is always written; W&B is optional.

    Attributes:
        wandb: `disabled`, `offline` or `online`.
        project: W&B project.
        run_name: W&B run name (default: the output folder's name).
        wandb_dir: Where W&B writes its files (default: the run folder).
    """

    wandb: str = "disabled"
    project: str = "seer-finetune"
    run_name: Optional[str] = None
    wandb_dir: Optional[str] = None


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings (rendered to DeepSpeed's JSON; see conf/deepspeed/).

    Attributes:
        enabled: Train through DeepSpeed.
        zero_stage: ZeRO stage 0-3.
        offload_optimizer: Keep optimizer states on the CPU.
        offload_params: Keep parameters on the CPU (ZeRO-3 only).
        sequence_parallel_size: DeepSpeed-Ulysses degree (1 = off).
    """

    enabled: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    sequence_parallel_size: int = 1


@dataclass
class EvalConfig:
    """`python -m seer_finetune eval`: perplexity over long documents.

    Attributes:
        lengths: Sequence lengths to evaluate at.
        densities: Densities to evaluate with seer gates (1.0 = dense through the seer path).
        thresholds: Gate-score thresholds to evaluate (instead of or besides densities).
        output: JSON file for the results (default: <trainer.output_dir>/eval.json).
        model_path: A saved run folder to evaluate (default: the configured model).
        oracle: Also evaluate every sparse setting with oracle selection: blocks ranked by each layer's true
            pooled attention instead of the gates, the bound a perfect gate would reach.
        recall: Report, for every sparse setting, the gates' recall per layer (the share of the true pooled
            attention inside the kept blocks) next to the best selection of the same size. It costs a
            ground-truth pass per layer (about one dense attention forward).
    """

    lengths: list[int] = field(default_factory=list)
    densities: list[float] = field(default_factory=lambda: [1.0])
    thresholds: list[float] = field(default_factory=list)
    output: Optional[str] = None
    model_path: Optional[str] = None
    oracle: bool = False
    recall: bool = True


@dataclass
class ExportConfig:
    """`python -m seer_finetune export`: a training checkpoint to the folder the run's final save writes.

    Attributes:
        checkpoint: A one-process checkpoint (`<run>/checkpoints/step_NNNNNN`), a DeepSpeed checkpoint folder
            (`<run>/checkpoints/deepspeed`) or one tag inside it (default: the newest checkpoint of
            `trainer.output_dir`, of the kind `deepspeed.enabled` says the run wrote).
        output: Where to write the folder (default: `<trainer.output_dir>/exported`).
    """

    checkpoint: Optional[str] = None
    output: Optional[str] = None


@dataclass
class SeerConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_configs() -> None:
    """Register the schemas so every group file is type-checked against its dataclass."""
    cs = ConfigStore.instance()
    cs.store(name="seer_schema", node=SeerConfig)
    for group, node in [
        ("model", ModelConfig),
        ("rope", RopeConfig),
        ("data", DataConfig),
        ("attention", AttentionConfig),
        ("peft", PeftConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("deepspeed", DeepSpeedConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


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
        True for `backend=seer` with `init_steps > 0` (and `mode=joint`, no `gates_path`).

    Raises:
        ConfigError: for negative `init_steps`, or `init_steps` with another mode than `joint` or with a
            `gates_path`.
    """
    if a.init_steps < 0:
        raise ConfigError(f"attention.init_steps={a.init_steps} must be >= 0")
    if a.backend != "seer" or a.init_steps == 0:
        return False
    if a.mode != "joint":
        raise ConfigError(f"attention.init_steps needs attention.mode=joint (got {a.mode}): it distils gates before joint training")
    if a.gates_path:
        raise ConfigError("attention.init_steps and attention.gates_path both set: the gates would come from two places")
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


def validate(cfg: SeerConfig) -> SeerConfig:
    """Check values and cross-field rules; raise ConfigError naming the field on the first problem."""
    m, r, d, a, p, o, t = cfg.model, cfg.rope, cfg.data, cfg.attention, cfg.peft, cfg.optim, cfg.trainer
    _choice("model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
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
            raise ConfigError(f"{name} must name at least one of avg, max, min")
        for pool in pools:
            _choice(name, pool, ("avg", "max", "min"))
    _positive("attention.gate_hidden_size", a.gate_hidden_size)
    _choice("attention.gate_rope_units", a.gate_rope_units, ("tokens", "blocks"))
    _positive("attention.gate_loss_scale", a.gate_loss_scale, allow_zero=True)
    _positive("attention.sink_blocks", a.sink_blocks, allow_zero=True)
    _positive("attention.local_blocks", a.local_blocks)
    _choice("attention.budget", a.budget, ("row", "layer"))
    _fraction("attention.ground_truth_query_fraction", a.ground_truth_query_fraction, open_low=True)
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
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"peft.dropout={p.dropout} must be in [0, 1)")

    _positive("optim.lr", o.lr, allow_zero=True)
    if o.gate_lr is not None:
        _positive("optim.gate_lr", o.gate_lr, allow_zero=True)
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
    if t.overwrite and t.resume:
        raise ConfigError(
            "trainer.overwrite=true needs trainer.resume=false: it moves the folder's run to previous_N to start "
            "a new one (drop it to resume the run instead)"
        )
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
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
    return cfg
