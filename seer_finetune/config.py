"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Every field a user can set lives here with its default and its meaning. Hydra checks types when it
composes (`trainer.max_steps=abc` fails there); `validation.validate()` checks values and cross-field rules
(`rope.factor` against the lengths, say) and raises `ConfigError` with one readable line.

Config groups under `conf/` hold named values for each section (`model/tiny_llama.yaml`, ...);
experiments under `conf/exp/` are `# @package _global_` files that state only their differences.
"""

from __future__ import annotations

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
        fused_kernels: Fused kernels for the work outside attention (`fused_kernels.py`): `auto` (default) gives
            the model Liger-Kernel's RMSNorm, SwiGLU and RoPE on CUDA where Liger is installed and patches the
            architecture, `liger` requires them (an error where they cannot run), `none` keeps transformers' own.
            Dense and seer runs get the same kernels.
    """

    name_or_path: str = MISSING
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    tokenizer: Optional[str] = None
    fused_kernels: str = "auto"


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
        eval_source: Held-out text in the same forms (read whole, also when `streaming`); if null,
            `eval_documents` documents (conversations) are held out from `source`: its last ones (whole documents,
            never split), or the first ones of a streamed hub dataset, whose end is not known in advance.
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
            string (or, with `format: chat`, rows that are not a conversation): `skip` (left out with a warning
            naming them, counted in the run's summary) or `error` (the run stops with one line naming the first).
        format: `text` (documents; every token is a target) or `chat` (conversations rendered through the
            tokenizer's chat template; only the assistant's tokens are targets, see `seer_finetune.chat`).
        messages_field: With `format: chat`, the column holding a conversation: a list of `{role, content}`.
        prompt_field: With `format: chat`, read one user prompt and one assistant answer per row from this column
            and `response_field` instead of `messages_field`.
        response_field: The answer's column, with `prompt_field`.
        chat_overflow: A conversation longer than `seq_len`: `truncate` (tokens are cut from the middle of its
            longest user message until it fits; assistant turns are never cut) or `drop` (left out, counted).
        hub_config: Configuration name of a hub dataset (`load_dataset(source, hub_config)`).
        data_files: Files for a hub dataset or a `datasets` builder (`source: json` with `data_files: a.jsonl`):
            one path or pattern, or a list of them.
        streaming: Read, tokenise and pack the training source on the fly in bounded memory (files of a folder in
            a seeded order per epoch; hub datasets with `streaming=True`); the stream position is checkpointed,
            so a resume is exact. Evaluation text is read whole.
        shuffle_buffer: With `streaming`, how many packed sequences are drawn at a time and shuffled together
            (memory: this many sequences; 1 keeps the stream's order).
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
    format: str = "text"
    messages_field: str = "messages"
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    chat_overflow: str = "truncate"
    hub_config: Optional[str] = None
    data_files: Optional[Any] = None
    streaming: bool = False
    shuffle_buffer: int = 64


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
            interpolates the gate's positions as it does the model's), or `none` (no positional encoding in the
            gate: scores from the pooled content alone).
        gate_rope_fraction: Share of the gate's per-head hidden features that carry RoPE, in (0, 1]: the first
            `gate_hidden_size * gate_rope_fraction` of them (rounded down to an even count, at least 2) score
            positions and content, the rest content alone (partial rotary embeddings). 1.0 (default): every
            feature. Must be 1.0 with `gate_rope_units: none`.
        gate_query: How the gate scores a query block: `pooled` (its pooled query, default), `token_logit_max`
            (every token's query against the key blocks, the max over the block's tokens) or `token_prob_max` (the
            max over the block's tokens of each token's log-probability over its candidate key blocks, as the
            block-max-pooled ground truth is built). The token modes read each token's query: q_pooling stays
            [avg].
        gate_weight_init: How fresh gates start: `uniform` (nn.Linear's, default) or `logit_bound`: as the
            sign-aware bound on each block's logits (`AttnGate.init_logit_bound`; needs q_pooling [avg, abs_avg],
            k_pooling [max, min] and 2 * head_dim features without RoPE). Gates loaded from `gates_path` keep
            their trained weights.
        q_pooling: Pooling of Q over a block, one or more of avg|max|min|abs_avg (`abs_avg`: the magnitude of
            the block mean; with `avg` beside it the gate can score the sign-aware bound on a block's logits,
            see `gate.POOLINGS`).
        k_pooling: Pooling of K over a block, one or more of avg|max|min|abs_avg.
        detach_gate_inputs: Stop gate gradients from flowing into the model's Q/K projections.
        density: Target fraction of causal key blocks kept per query block (0, 1].
        threshold: Alternative to density: keep key blocks whose gate score is at least this.
        sink_blocks: Leading key blocks always kept (the attention sink; 1 keeps the first block).
        local_blocks: Key blocks ending at the diagonal always kept (1: the diagonal only; 2 adds the block
            before it, so every query sees at least its previous block_size tokens).
        budget: How a density is shared out: `row` (every query-block row keeps that fraction of its key
            blocks), `layer` (the layer's total goes to the blocks of highest gate probability across heads and
            rows, so heads with concentrated attention leave blocks to heads with spread attention) or `head`
            (the same within each head: every head keeps its share, spread over its rows by probability). A
            threshold needs no sharing out and ignores it.
        row_mass: With `budget: layer` or `head`: every query-block row first keeps its most probable key blocks
            until they hold this share of its gate probability (never more than its own share of the density);
            the rest of the budget goes by rank. 0 (default): off.
        bound_blocks: Every query-block row (per head) also keeps this many key blocks of highest logit bound,
            ahead of the gate's picks and within the same density: the bound is the largest logit the block's
            mean pre-RoPE query can reach against the block's per-feature max and min pre-RoPE keys
            (`selection.logit_bound_scores`). A trained gate ranks by attention mass and misses a block whose
            mass is one rare high logit (a passkey's needle); the bound finds it. Not used by oracle selection.
            0 (default): off. Saved with the gates.
        probe_blocks: Every query-block row (per head) also keeps this many key blocks of highest probe score,
            in the same tier as `bound_blocks`' picks (ahead of the gate's, within the same density): the probe
            score is the exact block-max-pooled attention of `probe_tokens` of the row's query tokens
            (`probe.probe_scores`), the ground truth the gate learns from a sample of the block's queries. It
            costs about `probe_tokens / block_size` of a ground-truth pass per layer. Where a row's room is
            smaller than the bound's and the probe's picks together, they are taken alternately, bound first.
            Not used by oracle selection. 0 (default): off. Saved with the gates.
        probe_tokens: Probe tokens per query block for `probe_blocks`: evenly strided, ending at the block's last
            token; in [1, block_size] and dividing it. Default 1 (the last token). Saved with the gates.
        gate_loss: `kl` (KL(ground truth || gate)) or `mse`.
        gate_loss_scale: Weight of the gate loss in the total loss.
        gate_target_temperature: Temperature of the ground truth the gate loss compares with: below 1 each
            row's distribution is sharpened (`p ** (1 / T)`, renormalised), so the blocks a top-k selection keeps
            weigh more than the tail it drops. Default 1.0 (as it is).
        gate_selection_temperature: Selection compares the gate's probabilities raised to this power and
            renormalised per row, which changes how the layer budget, the row mass floor or a threshold weigh
            rows and heads against each other, not the order within a row. Default 1.0: the gate's
            probabilities as they are. Set to the `gate_target_temperature`, it undoes the sharpening a gate
            trained at that temperature learnt; measured at 0.5 and 0.75, that lost (quality.md, seventh
            invocation). Saved with the gates.
        ground_truth_query_fraction: Fraction of query blocks (random each step) on which the
            ground truth and the gate loss are computed.
        ground_truth: What the gate learns in sparse (joint) training: `exact` (default), the block-pooled
            attention of every token of the `ground_truth_query_fraction` sample of query blocks, a pass of its
            own per layer; or `probe`, the probe scores (`probe_tokens` tokens per block) of every query block,
            the ones `probe_blocks` computes for the selection anyway (computed for the loss alone when
            `probe_blocks` is 0): no ground-truth pass. The training statistics of the selection are then
            against the probe scores and named `probe_recall`, `probe_oracle_recall`. Gate distillation (a dense
            output, whose forward gives the exact ground truth) and evaluation keep `exact`.
        kernel: `seer_kernels` implementation: `auto` (Triton on CUDA, the chunked PyTorch one elsewhere),
            `pytorch` or `triton`. The token gates (`gate_query: token_*`) train on the fused kernel's backward
            only with an explicit `triton`: faster, but it holds every layer's projected queries until the
            backward (9.4 GiB peak against 3.8 at 32k on SmolLM2); `auto` keeps their chunked PyTorch path in
            training. An explicit `triton` also ranks the layer budget's blocks in one fused kernel
            (`seer_kernels.selection_ranking_keys`; PyTorch's top-k and sorts otherwise), opt-in until timed in
            the training step on a GPU.
        compile_gate: Run each layer's gate path (pooling, projections, block RoPE, log-softmax, gate loss)
            under `torch.compile`: a few fused kernels instead of dozens of launches per layer. The first step
            pays the compilation. None (default): in training steps on CUDA, eager in evaluation, generation
            and on CPU; true / false force it.
        gates_path: Folder of saved gates to start from (a `gate_distill` run's output).
        init_steps: With `mode: joint`: first distil the gates for this many steps at the run's own length and
            RoPE scaling (base frozen, output in `<output_dir>/gate_init`; starting from `gates_path` when set,
            else from fresh gates), then train jointly from them, in one command (`seer_finetune.jobs.train_job`,
            with the stage configs of `seer_finetune.seer.stages`). 0: a single stage.
    """

    backend: str = "sdpa"
    mode: str = "dense"
    block_size: int = 64
    gate_hidden_size: int = 128
    gate_rope_units: str = "tokens"
    gate_rope_fraction: float = 1.0
    gate_query: str = "pooled"
    gate_weight_init: str = "uniform"
    q_pooling: list[str] = field(default_factory=lambda: ["avg"])
    k_pooling: list[str] = field(default_factory=lambda: ["max", "min"])
    detach_gate_inputs: bool = True
    density: Optional[float] = None
    threshold: Optional[float] = None
    sink_blocks: int = 0
    local_blocks: int = 1
    budget: str = "row"
    row_mass: float = 0.0
    bound_blocks: int = 0
    probe_blocks: int = 0
    probe_tokens: int = 1
    gate_loss: str = "kl"
    gate_loss_scale: float = 1.0
    gate_target_temperature: float = 1.0
    gate_selection_temperature: float = 1.0
    ground_truth_query_fraction: float = 1.0
    ground_truth: str = "exact"
    kernel: str = "auto"
    compile_gate: Optional[bool] = None
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
        lora_compute: Where the LoRA products run (`lora_precision.py`). `model_dtype` (default): in the model's
            dtype from the float32 adapter weights, as bfloat16 autocast runs peft's layer under Hugging Face
            Trainer, the scaled adapter added to the base output in place by its second product; the weights,
            gradients and optimizer state stay float32. `float32`: peft's float32
            products, with the input kept for backward in the model's dtype. `peft`: peft's layer as it is
            (float32 products and a float32 copy of every adapted layer's input). ZeRO-3 runs always keep peft's.
    """

    method: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable_embeddings: bool = False
    trainable_norms: bool = False
    merge_on_save: bool = False
    lora_compute: str = "model_dtype"


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


# Fused kernels outside attention (`ModelConfig.fused_kernels`, `fused_kernels.py`).
# Where LoRA products run (`PeftConfig.lora_compute`; `lora_precision.py`).
LORA_COMPUTE_CHOICES = ("model_dtype", "float32", "peft")
FUSED_KERNEL_CHOICES = ("auto", "liger", "none")

# How the next-token loss may be computed (`TrainerConfig.lm_loss`, `lm_loss.py`).
LM_LOSS_CHOICES = ("auto", "full_logits", "chunked", "liger")

# Attention backends whose function does plain causal attention when it gets no mask: the ones a CUDA graph can
# capture under a causal-only name (`TrainerConfig.cuda_graphs`, `graphed_step.causal_only_attention`).
CAUSAL_WITHOUT_MASK = ("sdpa", "seer")

# What the gates learn in sparse training (`AttentionConfig.ground_truth`).
GROUND_TRUTHS = ("exact", "probe")


@dataclass
class TrainerConfig:
    """The training loop.

    Attributes:
        max_steps: Optimizer steps.
        micro_batch_size: Sequences per forward pass.
        grad_accum_steps: Micro-batches per optimizer step.
        seed: Seeds model init, data order and dropout (`transformers.set_seed`), in [0, 2**32).
        output_dir: Run folder: checkpoints, final model, metrics.jsonl.
        save_every: Checkpoint every N steps (0: only the final save).
        keep_checkpoints: Checkpoints kept on disk (oldest deleted first).
        eval_every: Evaluate every N steps (0: only before and after training). For a sparse seer run an
            evaluation measures perplexity at the trained density or threshold and at density 1.0 (dense, through
            the same kernels), and the gates' recall on the evaluation rows; the long-context experiments set it.
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
        plots: At the end of the run, draw PNG plots of `metrics.jsonl` into `<output_dir>/plots/` (losses,
            evaluation perplexity sparse vs dense, the gates' recall, loss and density per layer; `plots.py`).
            Needs matplotlib (`pip install seer-finetune[plots]`); without it one warning line and no plots.
        lm_loss: How the next-token loss is computed (`lm_loss.py`). `full_logits`: transformers' own loss over
            the model's logits ([tokens, vocabulary] in float32: 77 GB for 128k tokens over a 151k vocabulary).
            `chunked`: the head and cross entropy on chunks of rows under activation checkpointing (PyTorch, any
            device, any head). `liger`: Liger-Kernel's fused linear cross entropy (CUDA; a plain linear head; not
            under ZeRO-3). `auto`: `full_logits` up to 2**28 logits per forward, above that `liger` on CUDA where
            it applies, else `chunked`. All give the same loss and gradients up to float rounding.
        cuda_graphs: From the third step on, replay each micro-batch's forward and backward from one CUDA graph
            captured once (`graphed_step.py`): a step whose wall time is the host launching kernels (the 32k seer
            step) then runs at the GPU's pace. The optimizer step stays eager. Needs one CUDA process without
            DeepSpeed, text data without per-document attention, `attention.backend` sdpa or seer, and a loss
            that reads nothing back from the device: `auto` and `chunked` then take the capturable loss
            (`lm_loss.linear_cross_entropy_sum`, its gradients computed in the forward), never `liger`.
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
    plots: bool = True
    lm_loss: str = "auto"
    cuda_graphs: bool = False


@dataclass
class LoggerConfig:
    """Metrics sinks. metrics.jsonl is always written; W&B is optional. Both get the same names, in sections
    (`train/...`, `eval/...`, `seer/...`, one section per per-layer kind: see `metrics.py`).

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


NEEDLE_TASKS = ("single", "multikey", "multivalue", "multiquery")


@dataclass
class EvalConfig:
    """`python -m seer_finetune eval`: perplexity over long documents and needle retrieval by generation.

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
        perplexity: Measure perplexity at `lengths` (false: needle tasks only).
        needle_tasks: Needle-in-a-haystack tasks scored by greedy generation with the KV cache, at every
            density and threshold: any of `single`, `multikey`, `multivalue`, `multiquery`
            (`seer_finetune.needles`). Empty: none.
        needle_lengths: Context lengths of the needle tasks (default: `lengths`, else the data's eval length).
        needle_depths: Depths of the (first) needle, fractions of the haystack from 0 (start) to 1 (end).
        needle_trials: Trials per task, length, depth and setting.
        needle_batch_size: Prompts per generate call (left-padded batches).
    """

    lengths: list[int] = field(default_factory=list)
    densities: list[float] = field(default_factory=lambda: [1.0])
    thresholds: list[float] = field(default_factory=list)
    output: Optional[str] = None
    model_path: Optional[str] = None
    oracle: bool = False
    recall: bool = True
    perplexity: bool = True
    needle_tasks: list[str] = field(default_factory=list)
    needle_lengths: list[int] = field(default_factory=list)
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle_trials: int = 20
    needle_batch_size: int = 4


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
