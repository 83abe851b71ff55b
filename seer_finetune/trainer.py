"""The training loop: one stage of fine-tuning from a composed configuration.

Steps: load tokenizer, data and the model (`assembly.build_model`: YaRN, the attention extension, LoRA or full
training), then AdamW with parameter groups (model decay / no-decay / extension groups with their own learning
rate), warmup + cosine or linear decay, gradient accumulation and clipping. The loop is written once; an
`engine.Engine` applies the gradients (one process, or DeepSpeed). Checkpoints every `trainer.save_every`
steps resume exactly after a kill; the final model goes to `<output_dir>/final` (`final_save`).

Before anything is loaded the run folder is checked against the run's contract (`run_folder`): a resume may
change only the settings that can apply to a running job, and `trainer.resume=false` does not start over in a
folder that holds a run unless `trainer.overwrite=true` moves it away. A step whose loss or gradient norm is not
finite skips its update (the engine decides, see `engine.Engine.step`); `trainer.max_nonfinite_steps` of them in
a row stop the run with one line. No checkpoint is written from such a step or from non-finite weights, and
`summary.json`, `config.json` and `metrics.jsonl` are strict JSON (NaN and infinities written as null).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import set_seed

from .assembly import build_model
from .checkpoint import list_checkpoints
from .config import ConfigError, SeerConfig
from .data import build_data, collate
from .deepspeed_engine import DeepSpeedEngine, checkpoint_root
from .distributed import DistributedContext, all_reduce_sum, env_is_main, init_distributed
from .engine import Engine, PlainEngine, build_optimizer, configured_settings, lr_lambda, restore_configured_settings
from .final_save import save_final_model
from .graphed_step import GraphedForwardBackward
from .lm_loss import CausalLMLoss, next_token_targets
from .metrics import MetricsLogger, eval_key, is_distribution, require_wandb, split_layer_key
from .modeling import base_model, count_parameters, load_tokenizer, resolve_device
from .perplexity import perplexity
from .plots import write_plots
from .run_folder import (
    check_run_folder,
    claim_run_folder,
    describe_changes,
    finish_pending_move,
    run_config,
    run_folder_lock,
    write_json,
    write_run_config,
)

# Eager steps of a process before `trainer.cuda_graphs` captures: the first compiles and autotunes, the second
# runs with every cache filled, as the capture will.
GRAPH_AFTER_STEPS = 2


class TrainingDiverged(ConfigError):
    """The run stopped because its loss, gradients or weights stopped being finite (one line, like a ConfigError:
    the remedy is a setting, usually `optim.lr`)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (model init, data order, dropout): `transformers.set_seed`.

    Args:
        seed: In [0, 2**32) (NumPy's range; `validation` checks `trainer.seed`).
    """
    set_seed(seed)


def create_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: SeerConfig,
    ctx: DistributedContext,
) -> Engine:
    """The engine `cfg.deepspeed.enabled` asks for, taking over the optimizer and schedule.

    Args:
        model: The model built by `assembly.build_model`.
        optimizer: AdamW over its parameter groups (`build_optimizer`).
        scheduler: The learning-rate schedule over `optimizer`.
        cfg: The run configuration.
        ctx: This process's place (from `distributed.init_distributed`).

    Returns:
        A `DeepSpeedEngine` under DeepSpeed, else a `PlainEngine`.
    """
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(model, optimizer, scheduler, cfg, ctx)
    return PlainEngine(model, optimizer, scheduler, cfg)


class Trainer:
    """Holds the pieces of one run; `fit()` trains, evaluates and saves.

    Runs in one process, or in several through DeepSpeed (`deepspeed.enabled=true`, launched by `deepspeed`,
    `torchrun` or `launch/*.sh`) with ZeRO 0-3, CPU offload and Ulysses sequence parallelism.

    Args:
        cfg: The validated configuration.
        final_dir: Where the final save goes. Default `<trainer.output_dir>/final`.
    """

    def __init__(self, cfg: SeerConfig, final_dir: Optional[Path] = None):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.output_dir)
        self.final_dir = Path(final_dir) if final_dir is not None else self.run_dir / "final"
        self.device = resolve_device(t.device)
        if t.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"trainer.cuda_graphs=true needs a CUDA device (trainer.device={t.device} gives {self.device})")
        self.ctx = init_distributed(cfg, self.device)
        if self.device.type == "cuda" and self.ctx.distributed:
            torch.cuda.set_device(self.ctx.local_rank)
            self.device = torch.device("cuda", self.ctx.local_rank)
        seed_everything(t.seed)
        # The folder's contract is checked before anything is loaded; every process reads the same files.
        self.start = check_run_folder(cfg, self.ctx.world_size)
        claim_run_folder(self.start, self.ctx.is_main)
        finish_pending_move(self.run_dir, self.ctx.is_main)
        if self.ctx.is_main:
            require_wandb(cfg.logger)
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = build_data(cfg.data, self.tokenizer)
        self.model, self.extension = build_model(self.cfg, self.device)
        self.model.train()
        ds = cfg.deepspeed
        self.lm_loss = CausalLMLoss(
            self.model, t.lm_loss, self.device, zero3=ds.enabled and ds.zero_stage == 3, capturable=t.cuda_graphs
        )
        optimizer = build_optimizer(self.model, self.extension, cfg, fused=not ds.enabled)
        o = cfg.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(step, warmup=o.warmup_steps, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio),
        )
        self.engine = create_engine(self.model, optimizer, scheduler, cfg, self.ctx)
        # The order of the training sequences (in memory, or the stream); its position goes into checkpoints.
        self.sampler = self.data.training_order(t.seed)
        self.step = 0
        self.tokens_seen = 0
        self.history: dict[str, Any] = {}
        self.nonfinite_in_row = 0  # steps in a row whose loss or gradient norm was not finite
        self.skipped_updates = 0  # updates skipped for that over the whole run
        # trainer.cuda_graphs: the micro-batches' forward and backward from a CUDA graph after GRAPH_AFTER_STEPS
        # eager steps in this process (they compile the gate path and fill the caches the capture reads).
        self.graphed: Optional[GraphedForwardBackward] = None
        self.steps_in_process = 0

    # -- pieces of a step -------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's micro-batch: its data-parallel share of the global batch, its sequence shard under SP."""
        mb, ctx = self.cfg.trainer.micro_batch_size, self.ctx
        return collate(self.sampler.next_items(mb * ctx.dp_size, keep=slice(ctx.dp_rank * mb, (ctx.dp_rank + 1) * mb)))

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of the batch over its targets (the batch's `labels`: every token for text, the
        assistant's for chat; -100 is no target), by `trainer.lm_loss` (`lm_loss.CausalLMLoss`). Under sequence
        parallelism, this rank's share of it (its tokens' summed loss over the whole sequence's target count):
        the shares add up to the mean, and DeepSpeed adds the sequence-parallel ranks' gradients (measured:
        tests/distributed)."""
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device) if "labels" in batch else input_ids
        position_ids = batch["position_ids"].to(self.device)
        if not self.cfg.data.attend_within_documents:
            position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        if self.ctx.sp_size == 1:
            kwargs = {"position_ids": position_ids} if self.cfg.data.attend_within_documents else {}
            return self.lm_loss.mean(input_ids, labels, **kwargs)
        # Labels are shifted on the full sequence, then every tensor is cut to this rank's shard.
        shift_labels = next_token_targets(labels)
        total_targets = (shift_labels != -100).sum()
        chunk = input_ids.shape[1] // self.ctx.sp_size
        part = slice(self.ctx.sp_rank * chunk, (self.ctx.sp_rank + 1) * chunk)
        shard_labels = shift_labels[:, part].contiguous()
        kind = self.lm_loss.kind(input_ids[:, part].numel())
        if kind != "full_logits":
            summed = self.lm_loss.summed(kind, shard_labels, input_ids=input_ids[:, part], position_ids=position_ids[:, part])
            return summed / total_targets
        out = self.model(
            input_ids=input_ids[:, part],
            position_ids=position_ids[:, part],
            labels=shard_labels,
            shift_labels=shard_labels,
            num_items_in_batch=total_targets,
            use_cache=False,
        )
        return out.loss

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate, the full sequence's loss terms as detached 0-dim tensors for logging)."""
        sp = self.ctx.sp_size
        lm_loss = self._lm_loss(batch)
        extra = self.extension.extra_losses()
        loss = lm_loss * self.extension.lm_loss_weight
        for value in extra.values():
            # Extension losses are means over this rank's heads; gradients add over sequence-parallel ranks.
            loss = loss + value / sp
        values = torch.stack([lm_loss.detach(), *(v.detach() for v in extra.values())]).double()
        if sp > 1:
            # Logged values are the full sequence's: LM shares add up, per-head means average.
            all_reduce_sum(values, self.ctx.sp_group)
            values[1:] /= sp
        return loss, dict(zip(["lm_loss", *extra], values.unbind()))

    def _sequence_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The full sequence's mean LM loss (sequence-parallel shares summed), for evaluation."""
        loss = self._lm_loss(batch).detach()
        return all_reduce_sum(loss.clone(), self.ctx.sp_group) if self.ctx.sp_size > 1 else loss

    def _forward_scaled_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's loss and loss terms, after its backward (what a CUDA graph captures)."""
        loss, parts = self._forward_loss(batch)
        self.engine.scaled_backward(loss)
        return loss.detach(), parts

    def _graphed_forward_backward(self) -> Optional[GraphedForwardBackward]:
        """The CUDA-graph runner of this step's micro-batches, or None for an eager step."""
        if not self.cfg.trainer.cuda_graphs or self.steps_in_process < GRAPH_AFTER_STEPS:
            return None
        if self.graphed is None:
            self.engine.keep_gradients = True
            params = [p for g in self.engine.optimizer.param_groups for p in g["params"]]
            self.graphed = GraphedForwardBackward(
                self._forward_scaled_backward, base_model(self.model), params, self.extension
            )
        return self.graphed

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the step's metrics.

        Loss terms stay on the device until the end of the step, read in one transfer.

        Returns:
            The metrics by their logged names (`metrics.py`): `train/loss`, `train/lm_loss`, the extension's
            weighted losses (`train/gate_loss`), `train/grad_norm`, `train/tokens_per_s`, `train/step_time_s`,
            `train/lr/<group>`, `train/skipped_update` (non-finite steps), `train/peak_memory_gib` (CUDA), then
            the extension's own (`extensions.TrainingExtension.metrics`).
        """
        t = self.cfg.trainer
        started = time.perf_counter()
        lrs = self.engine.learning_rates()  # this step's
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        graphed = self._graphed_forward_backward()
        for _ in range(t.grad_accum_steps):
            batch = self._next_batch()
            if graphed is not None:
                loss, parts = graphed(batch)
                self.engine.note_loss(loss)
            else:
                loss, parts = self._forward_loss(batch)
                self.engine.backward(loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum_steps
            tokens += batch["input_ids"].numel() * self.ctx.dp_size
        grad_norm, applied = self.engine.step()
        names = list(sums)
        values = torch.stack([sums[k] for k in names])
        if self.ctx.dp_size > 1:
            all_reduce_sum(values, None)
            values /= self.ctx.world_size
        values = values.tolist()
        parts = dict(zip(names, values))
        total = parts["lm_loss"] * self.extension.lm_loss_weight + sum(v for k, v in parts.items() if k != "lm_loss")
        self.step += 1
        self.steps_in_process += 1
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        own = {"loss": total, **parts, "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed, "step_time_s": elapsed}
        # The engine skipped the update for a non-finite loss or gradient; a non-finite logged loss counts too.
        if not math.isfinite(total) or not (applied or self.engine.loss_scaling):
            self.nonfinite_in_row += 1
            self.skipped_updates += int(not applied)
            own["skipped_update"] = float(not applied)
        else:
            self.nonfinite_in_row = 0
        own.update(lrs)
        if self.device.type == "cuda":
            own["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics: dict[str, Any] = {f"train/{k}": v for k, v in own.items()}
        # The extension names its own sections (e.g. `seer/recall`, `seer_recall/layer_03`: metrics.py).
        metrics.update(self.extension.metrics())
        return metrics

    def evaluate(self) -> dict[str, Any]:
        """Perplexity on the evaluation windows (every rank takes part: ZeRO-3 gathers parameters collectively).

        For an extension that evaluates other settings too (`eval_variants`; a sparse seer run: `dense`, every
        block through the same kernels) each one's loss and perplexity follow, as `loss_<name>` / `ppl_<name>`,
        and `sparsity_cost` = ppl / ppl_dense - 1. The extension's statistics of the trained setting on the
        evaluation rows (the gates' recall, ...) come under its own names. The random generators are left as
        they were, so evaluating (at any cadence) never changes the training that follows.

        Returns:
            `loss`, `ppl`, `tokens`, the variants' values and the extension's statistics (named for `eval_key`),
            or {} without evaluation data.
        """
        if self.data.eval is None:
            return {}
        variants_of = getattr(self.extension, "eval_variants", None)
        variants = variants_of() if variants_of is not None else {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.extension.set_training(False)
            try:
                self.extension.metrics()  # whatever was recorded outside a training step is not the evaluation's
                result: dict[str, Any] = self._perplexity()
                result.update(self.extension.metrics())
                for name, settings in variants.items():
                    with settings():
                        other = self._perplexity()
                    self.extension.metrics()
                    result[f"loss_{name}"], result[f"ppl_{name}"] = other["loss"], other["ppl"]
            finally:
                self.extension.set_training(True)
        if "ppl_dense" in result:
            result["sparsity_cost"] = result["ppl"] / result["ppl_dense"] - 1.0
        return result

    def _perplexity(self) -> dict[str, float]:
        return perplexity(
            self.model, self.data.eval, device=self.device, batch_size=self.cfg.trainer.micro_batch_size,
            loss_fn=self._sequence_lm_loss,
        )

    def _log_eval(self, logger: MetricsLogger, result: dict[str, Any]) -> None:
        """Log an evaluation at the current step (the window count is a constant: summary.json has it)."""
        logger.log({eval_key(k): v for k, v in result.items() if k != "tokens"}, step=self.step)

    # -- state ------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        # The model's dtype lets `export` rebuild a plain checkpoint's model exactly as training held it.
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "history": self.history,
            "model_dtype": dtype,
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped_updates": self.skipped_updates,
        }

    def _newest_checkpoint(self) -> str:
        """Words naming the newest checkpoint on disk, for the one-line stop messages."""
        found = list_checkpoints(self.run_dir)
        if found:
            return f"the newest checkpoint is {found[-1]}"
        latest = checkpoint_root(self.run_dir) / "latest"
        if latest.is_file():
            return f"the newest checkpoint is {checkpoint_root(self.run_dir) / latest.read_text().strip()}"
        return "no checkpoint was written (trainer.save_every)"

    def _check_weights(self) -> None:
        """Raise `TrainingDiverged` when a trainable weight is NaN or inf (collective under DeepSpeed)."""
        if not self.engine.weights_finite():
            raise TrainingDiverged(
                f"the weights became NaN or inf by step {self.step} (an update overflowed); nothing was saved from "
                f"them and {self._newest_checkpoint()}; lower optim.lr (now {self.cfg.optim.lr:g}) and resume, or "
                "start a new run"
            )

    def save(self) -> Path:
        """Checkpoint the current step under `<output_dir>/checkpoints` (collective under DeepSpeed).

        Raises:
            TrainingDiverged: when a trainable weight is not finite; nothing is written then.
        """
        self._check_weights()
        return self.engine.save_checkpoint(self.run_dir, self.step, self._trainer_state(), self.extension, keep=self.cfg.trainer.keep_checkpoints)

    def maybe_resume(self) -> bool:
        """Restore the newest checkpoint when `trainer.resume` is set and one exists; True if it did.

        The optimizer and schedule come back as saved, then the configured learning rates, weight decay, betas
        and eps are put back into their groups (and the schedule's base rates), so settings changed for the
        resume apply from its first step.
        """
        configured = configured_settings(self.engine.scheduler)
        state = self.engine.load_checkpoint(self.run_dir, self.extension, resume=self.cfg.trainer.resume)
        if state is None:
            return False
        restore_configured_settings(self.engine.scheduler, configured)
        self.step = state["step"]
        trainer_state = state["trainer"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.sampler.load_state_dict(trainer_state["sampler"])
        self.history = trainer_state.get("history", {})
        self.nonfinite_in_row = trainer_state.get("nonfinite_in_row", 0)
        self.skipped_updates = trainer_state.get("skipped_updates", 0)
        return True

    def save_final_model(self) -> Path | None:
        """Write the final folder (`final_save.save_final_model`) to `final_dir`; None on ranks that do not write.

        Collective under DeepSpeed: the weights are gathered into a plain copy on rank 0.
        """
        trained = self.engine.final_model(self.extension)
        if trained is None:
            return None
        model, extension = trained
        return save_final_model(model, extension, self.tokenizer, self.cfg, self.final_dir)

    # -- the run ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Resume if asked, train to `trainer.max_steps` with evaluation, checkpoints and the final save.

        Returns:
            The run summary (steps, tokens, final loss, skipped updates, evaluations, final folder), also written
            to `summary.json`.

        Raises:
            TrainingDiverged: after `trainer.max_nonfinite_steps` non-finite steps in a row, or when the weights
                stop being finite; the checkpoints written before stay, `summary.json` is not written.
        """
        cfg, t, main = self.cfg, self.cfg.trainer, self.ctx.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        config = run_config(cfg, self.ctx.world_size)
        logger = MetricsLogger(self.run_dir, cfg.logger, config, resume_step=self.step if resumed else None, enabled=main)
        if main:
            write_run_config(self.start, config, self.step, resumed)
        say = (lambda text: print(text, flush=True)) if main else (lambda text: None)
        trainable, total = count_parameters(self.model)
        say(
            f"[seer-finetune] {cfg.model.name_or_path}: {trainable:,} of {total:,} parameters train "
            f"({cfg.peft.method if not self.extension.freeze_base else 'extension only'}), "
            f"{self.data.describe()}, device {self.device}{self.engine.layout}, "
            f"LM loss {self.lm_loss.kind(t.micro_batch_size * cfg.data.seq_len // self.ctx.sp_size)}, "
            f"fused kernels {getattr(base_model(self.model), 'seer_fused_kernels', 'none')}"
            + (f", resumed at step {self.step}" if resumed else "")
        )
        if resumed and self.start.changes:
            say(f"[seer-finetune] resumed at step {self.step}; changed: {describe_changes(self.start.changes)} (in force from step {self.step + 1})")
        if resumed and self.start.saved is None:
            say(f"[seer-finetune] warning: {self.run_dir / 'config.json'} is missing: resuming without checking that the configuration is the run's")
        if not resumed and t.eval_before and self.data.eval is not None:
            before = self.evaluate()
            self.history["eval_before"] = _overview(before)
            self._log_eval(logger, before)
            say(f"[seer-finetune] eval before training: {_describe_eval(before)}")
        try:
            self._train_loop(logger, say)
            self._check_weights()
        except TrainingDiverged:
            # Every process stops at the same step (its values are reduced over the processes): leave together.
            logger.close()
            self.engine.close()
            raise
        summary: dict[str, Any] = {
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "final_loss": self.history.get("last_loss"),
            "skipped_updates": self.skipped_updates,
            # Files and rows of the data sources that were not text and were left out (data.invalid_files).
            "data": self.data.summary(),
        }
        if self.data.eval is not None:
            after = self.evaluate()
            self._log_eval(logger, after)
            summary["eval_after"] = _overview(after)
            summary["eval_before"] = self.history.get("eval_before")
            before = summary["eval_before"]
            line = f"[seer-finetune] eval after training: {_describe_eval(after)}"
            if before:
                line += f" (before: {before['ppl']:.2f})"
            say(line)
        if t.save_final:
            final = self.save_final_model()
            if final is not None:
                summary["final_dir"] = str(final)
                say(f"[seer-finetune] saved {final}")
        if main and t.plots:
            # After the last evaluation is in metrics.jsonl; a rerun of a finished run draws them again.
            written = write_plots(self.run_dir)
            if written:
                summary["plots"] = [str(path) for path in written]
                say(f"[seer-finetune] plots: {written[0].parent}")
        if main:
            write_json(self.run_dir / "summary.json", summary)
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        logger.close()
        self.engine.close()
        return summary

    def _train_loop(self, logger: MetricsLogger, say) -> None:
        """Steps to `trainer.max_steps` with logging, evaluation and checkpoints; stops a diverged run."""
        t, main = self.cfg.trainer, self.ctx.is_main
        bar = _progress(t, initial=self.step) if main else None
        try:
            while self.step < t.max_steps:
                metrics = self.train_step()
                # A non-finite step is always logged, whatever the cadence: it is what a diverged run is read from.
                if self.step % t.log_every == 0 or self.step == t.max_steps or self.nonfinite_in_row:
                    logger.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{self.engine.last_lr():.2e}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
                self.history["last_loss"] = metrics["train/loss"]
                if self.nonfinite_in_row:
                    self._report_nonfinite(metrics, say)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    result = self.evaluate()
                    self._log_eval(logger, result)
                    if result:
                        (bar.write if bar is not None else say)(f"[seer-finetune] eval at step {self.step}: {_describe_eval(result)}")
                # A step that skipped its update writes no checkpoint: the last one before it stays the newest.
                if t.save_every and self.step % t.save_every == 0 and not self.nonfinite_in_row:
                    self.save()
        finally:
            if bar is not None:
                bar.close()

    def _report_nonfinite(self, metrics: dict[str, float], say) -> None:
        """Warn about a non-finite step; raise `TrainingDiverged` at `trainer.max_nonfinite_steps` in a row."""
        t, n = self.cfg.trainer, self.nonfinite_in_row
        what = "update skipped" if metrics.get("train/skipped_update") else "update applied"
        say(
            f"[seer-finetune] warning: step {self.step}: loss {metrics['train/loss']:.6g}, gradient norm {metrics['train/grad_norm']:.6g}: "
            f"{what} ({n} in a row; trainer.max_nonfinite_steps={t.max_nonfinite_steps} stops the run)"
        )
        if n >= t.max_nonfinite_steps:
            raise TrainingDiverged(
                f"training diverged: the loss or gradient norm was NaN or inf at {n} steps in a row (steps "
                f"{self.step - n + 1}-{self.step}, trainer.max_nonfinite_steps={t.max_nonfinite_steps}) and their "
                f"updates were skipped; {self._newest_checkpoint()}; lower optim.lr (now {self.cfg.optim.lr:g}) or "
                "raise optim.warmup_steps and resume (both may change on resume), or start a new run"
            )


def _overview(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's result without its per-layer values and distributions (for summary.json)."""
    return {k: v for k, v in result.items() if split_layer_key(k) is None and not is_distribution(v)}


def _describe_eval(result: dict[str, Any]) -> str:
    """`loss 2.3456, perplexity 10.44` and, for a sparse run, `, dense 10.21 (sparsity costs +2.25%)`."""
    text = f"loss {result['loss']:.4f}, perplexity {result['ppl']:.2f}"
    if "ppl_dense" in result:
        text += f", dense {result['ppl_dense']:.2f} (sparsity costs {100 * result['sparsity_cost']:+.2f}%)"
    return text


def _progress(t, initial: int):
    if not t.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: SeerConfig) -> dict[str, Any]:
    """Run one training stage described by `cfg`; returns the run summary (also written to summary.json).

    The main process holds `trainer.output_dir`'s lock while it runs (`run_folder.run_folder_lock`).
    """
    with run_folder_lock(cfg.trainer.output_dir, is_main=env_is_main()):
        return Trainer(cfg).fit()
