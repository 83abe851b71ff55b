"""The training loop: one stage of fine-tuning from a composed configuration.

Steps: load tokenizer, data and model (YaRN written into its config), attach the attention extension
(SeerAttention gates when `attention.backend=seer`), wrap with LoRA or train fully, then AdamW with parameter
groups (model decay / no-decay / extension groups with their own learning rate), warmup + cosine or linear
decay, gradient accumulation and clipping. Checkpoints every `trainer.save_every` steps resume exactly after a
kill; the final model is a Hugging Face folder under `<output_dir>/final`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, SeerConfig
from .data import EpochSampler, build_data, collate
from .deepspeed_engine import (
    consolidated_state_dict,
    load_deepspeed_checkpoint,
    load_full_state,
    register_ulysses,
    save_deepspeed_checkpoint,
)
from .distributed import all_reduce_sum, check_parallel_layout, deepspeed_config, init_distributed
from .evaluation import perplexity
from .extension import TrainingExtension
from .metrics import MetricsLogger, require_wandb
from .modeling import (
    apply_peft,
    base_model,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
    save_final,
)

NO_DECAY_HINTS = ("bias", "norm", "embed")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, extension: TrainingExtension, cfg: SeerConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (no decay on biases, norms, embeddings) and the extension's groups."""
    ext_groups = extension.param_groups()
    ext_ids = {id(p) for g in ext_groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in ext_ids:
            continue
        (no_decay if p.ndim < 2 or any(h in name.lower() for h in NO_DECAY_HINTS) else decay).append(p)
    o = cfg.optim
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"name": "model_decay", "params": decay, "lr": o.lr, "weight_decay": o.weight_decay})
    if no_decay:
        groups.append({"name": "model_no_decay", "params": no_decay, "lr": o.lr, "weight_decay": 0.0})
    for g in ext_groups:
        groups.append({"weight_decay": 0.0, **g, "lr": g.get("lr", o.gate_lr if o.gate_lr is not None else o.lr)})
    if not any(g["params"] for g in groups):
        raise RuntimeError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def _build_extension(model: torch.nn.Module, cfg: SeerConfig) -> TrainingExtension:
    if cfg.attention.backend != "seer":
        return TrainingExtension()
    from .seer import build_extension

    return build_extension(model, cfg)


def build_model(cfg: SeerConfig, device: torch.device) -> tuple[torch.nn.Module, TrainingExtension]:
    """Model with rope scaling, the attention extension and LoRA/full trainability, built the same way for
    training, for the plain copy that receives gathered DeepSpeed weights, and for `export`."""
    attn = cfg.attention.backend if cfg.attention.backend in ("sdpa", "eager") else "sdpa"
    model = load_model(cfg.model, cfg.rope, device=device, attn_implementation=attn, seed=cfg.trainer.seed)
    context = model.config.max_position_embeddings
    if max(cfg.data.seq_len, cfg.data.eval_seq_len or 0) > context:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's context ({context} tokens); "
            "extend it with rope=yarn (see +exp=smoke) or shorten the sequences"
        )
    extension = _build_extension(model, cfg)
    if extension.freeze_base:
        model.requires_grad_(False)
    else:
        model = apply_peft(model, cfg.peft)
    for group in extension.param_groups():
        for p in group["params"]:
            p.requires_grad_(True)
    return model, extension


class Trainer:
    """Holds the pieces of one run; `fit()` trains, evaluates and saves.

    Runs in one process, or in several through DeepSpeed (`deepspeed.enabled=true`, launched by `deepspeed`,
    `torchrun` or `launch/*.sh`) with ZeRO 0-3, CPU offload and Ulysses sequence parallelism.

    Args:
        cfg: The validated configuration.
    """

    def __init__(self, cfg: SeerConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.output_dir)
        self.device = resolve_device(t.device)
        self.ctx = init_distributed(cfg, self.device)
        if self.device.type == "cuda" and self.ctx.distributed:
            torch.cuda.set_device(self.ctx.local_rank)
            self.device = torch.device("cuda", self.ctx.local_rank)
        seed_everything(t.seed)
        if self.ctx.is_main:
            require_wandb(cfg.logger)
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = build_data(cfg.data, self.tokenizer)
        self.model, self.extension = build_model(self.cfg, self.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.extension, cfg)
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_lambda(step, warmup=o.warmup_steps, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio),
        )
        self.engine = None
        if cfg.deepspeed.enabled:
            self._init_deepspeed()
        self.sampler = EpochSampler(len(self.data.train), t.seed)
        self.step = 0
        self.tokens_seen = 0
        self.history: dict[str, Any] = {}

    def _init_deepspeed(self) -> None:
        import deepspeed

        cfg = self.cfg
        text = base_model(self.model).config.get_text_config()
        check_parallel_layout(cfg, self.ctx.world_size, text.num_attention_heads, text.num_key_value_heads)
        mpu = None
        if self.ctx.sp_size > 1:
            mpu = register_ulysses(self.model, cfg)
            self.ctx.sp_group = mpu.get_sequence_parallel_group()
            assert mpu.get_sequence_parallel_rank() == self.ctx.sp_rank
        dtype = next(self.model.parameters()).dtype
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, self.ctx, dtype),
            mpu=mpu,
        )

    # -- pieces of a step -------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's micro-batch: its data-parallel share of the global batch, its sequence shard under SP."""
        mb, ctx = self.cfg.trainer.micro_batch_size, self.ctx
        indices = self.sampler.next_indices(mb * ctx.dp_size)[ctx.dp_rank * mb : (ctx.dp_rank + 1) * mb]
        return collate([self.data.train[i] for i in indices])

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of the batch. Under sequence parallelism, this rank's share of it (its tokens'
        summed loss over the whole sequence's target count): the shares add up to the mean, and DeepSpeed adds
        the sequence-parallel ranks' gradients (measured: tests/distributed)."""
        input_ids = batch["input_ids"].to(self.device)
        position_ids = batch["position_ids"].to(self.device)
        if not self.cfg.data.attend_within_documents:
            position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        if self.ctx.sp_size == 1:
            kwargs = {"position_ids": position_ids} if self.cfg.data.attend_within_documents else {}
            return self.model(input_ids=input_ids, labels=input_ids, use_cache=False, **kwargs).loss
        # Labels are shifted on the full sequence, then every tensor is cut to this rank's shard.
        shift_labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
        total_targets = input_ids.shape[0] * (input_ids.shape[1] - 1)
        chunk = input_ids.shape[1] // self.ctx.sp_size
        part = slice(self.ctx.sp_rank * chunk, (self.ctx.sp_rank + 1) * chunk)
        shard_labels = shift_labels[:, part].contiguous()
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

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the step's metrics.

        Loss terms stay on the device until the end of the step, read in one transfer.
        """
        t = self.cfg.trainer
        started = time.perf_counter()
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g}  # this step's
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for _ in range(t.grad_accum_steps):
            batch = self._next_batch()
            loss, parts = self._forward_loss(batch)
            if self.engine is not None:
                self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                self.engine.step()  # steps optimizer and scheduler only at the accumulation boundary
            else:
                (loss / t.grad_accum_steps).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum_steps
            tokens += batch["input_ids"].numel() * self.ctx.dp_size
        if self.engine is not None:
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm), dtype=torch.float64)
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.cfg.optim.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        names = list(sums)
        values = torch.stack([sums[k] for k in names])
        if self.engine is not None and self.ctx.dp_size > 1:
            all_reduce_sum(values, None)
            values /= self.ctx.world_size
        values = values.tolist()
        parts = dict(zip(names, values))
        total = parts["lm_loss"] * self.extension.lm_loss_weight + sum(v for k, v in parts.items() if k != "lm_loss")
        self.step += 1
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        metrics = {"loss": total, **parts, "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed, "step_time_s": elapsed}
        metrics.update(lrs)
        metrics.update(self.extension.metrics())
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Perplexity on the evaluation windows (every rank takes part: ZeRO-3 gathers parameters collectively)."""
        if self.data.eval is None:
            return {}
        self.extension.set_training(False)
        try:
            result = perplexity(
                self.model, self.data.eval, device=self.device, batch_size=self.cfg.trainer.micro_batch_size,
                loss_fn=self._sequence_lm_loss,
            )
        finally:
            self.extension.set_training(True)
        result.update({f"eval_{k}": v for k, v in self.extension.metrics().items()})
        return result

    # -- state ------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(), "history": self.history}

    def save(self) -> Path:
        if self.engine is not None:
            return save_deepspeed_checkpoint(self.engine, self.run_dir, self.step, self._trainer_state(), self.ctx, keep=self.cfg.trainer.keep_checkpoints)
        return save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extension_state=self.extension.state_dict(),
            trainer_state=self._trainer_state(),
            keep=self.cfg.trainer.keep_checkpoints,
        )

    def maybe_resume(self) -> bool:
        if self.engine is not None:
            state = load_deepspeed_checkpoint(self.engine, self.run_dir, self.ctx) if self.cfg.trainer.resume else None
            if state is None:
                return False
            self.step = state["step"]
        else:
            if self.ctx.is_main:
                clean_partial(self.run_dir)
            if not self.cfg.trainer.resume:
                return False
            checkpoints = list_checkpoints(self.run_dir)
            if not checkpoints:
                return False
            state, extension_state = load_checkpoint(checkpoints[-1], model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            if extension_state:
                self.extension.load_state_dict(extension_state)
            self.step = state["step"]
        self.tokens_seen = state["trainer"]["tokens_seen"]
        self.sampler.load_state_dict(state["trainer"]["sampler"])
        self.history = state["trainer"].get("history", {})
        return True

    def save_final_model(self) -> Path | None:
        """The final Hugging Face folder. Under DeepSpeed the weights are gathered into a plain copy on rank 0."""
        cfg = self.cfg
        model, extension = self.model, self.extension
        if self.engine is not None:
            state = consolidated_state_dict(self.engine, cfg.deepspeed.zero_stage)
            if not self.ctx.is_main:
                return None
            model, extension = build_model(self.cfg, torch.device("cpu"))
            load_full_state(model, state)
        final = self.run_dir / "final"
        if extension.freeze_base:
            # Only the extension trained (gate distillation): the base is unchanged, so the folder holds just
            # the extension's adapter (SeerAttention gates, with the base model's name in their config).
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            extension.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            return final
        final = save_final(model, self.tokenizer, final, model_cfg=cfg.model, peft_cfg=cfg.peft)
        extension.save_pretrained(final)
        return final

    # -- the run ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, t, main = self.cfg, self.cfg.trainer, self.ctx.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        if main:
            (self.run_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        logger = MetricsLogger(self.run_dir, cfg.logger, run_config, resume_step=self.step if resumed else None, enabled=main)
        say = (lambda text: print(text, flush=True)) if main else (lambda text: None)
        trainable, total = count_parameters(self.model)
        layout = f", {self.ctx.world_size} processes (data x sequence parallel = {self.ctx.dp_size} x {self.ctx.sp_size}), ZeRO-{cfg.deepspeed.zero_stage}" if self.engine is not None else ""
        say(
            f"[seer-finetune] {cfg.model.name_or_path}: {trainable:,} of {total:,} parameters train "
            f"({cfg.peft.method if not self.extension.freeze_base else 'extension only'}), "
            f"{len(self.data.train)} training sequences of {cfg.data.seq_len} tokens, device {self.device}{layout}"
            + (f", resumed at step {self.step}" if resumed else "")
        )
        if not resumed and t.eval_before and self.data.eval is not None:
            before = self.evaluate()
            self.history["eval_before"] = before
            logger.log({f"eval/{k}": v for k, v in before.items()}, step=0)
            say(f"[seer-finetune] eval before training: loss {before['loss']:.4f}, perplexity {before['ppl']:.2f}")
        bar = _progress(t, initial=self.step) if main else None
        try:
            while self.step < t.max_steps:
                metrics = self.train_step()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    logger.log({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                self.history["last_loss"] = metrics["loss"]
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    logger.log({f"eval/{k}": v for k, v in self.evaluate().items()}, step=self.step)
                if t.save_every and self.step % t.save_every == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        summary: dict[str, Any] = {"steps": self.step, "tokens_seen": self.tokens_seen, "final_loss": self.history.get("last_loss")}
        if self.data.eval is not None:
            after = self.evaluate()
            logger.log({f"eval/{k}": v for k, v in after.items()}, step=self.step)
            summary["eval_after"] = after
            summary["eval_before"] = self.history.get("eval_before")
            before = summary["eval_before"]
            line = f"[seer-finetune] eval after training: loss {after['loss']:.4f}, perplexity {after['ppl']:.2f}"
            if before:
                line += f" (before: {before['ppl']:.2f})"
            say(line)
        if t.save_final:
            final = self.save_final_model()
            if final is not None:
                summary["final_dir"] = str(final)
                say(f"[seer-finetune] saved {final}")
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        logger.close()
        if self.ctx.distributed:
            # Every rank leaves together: a rank exiting while rank 0 still writes tears down the comm layer.
            torch.distributed.barrier()
            if self.engine is not None:
                self.engine.destroy()
            torch.distributed.destroy_process_group()
        return summary


def _progress(t, initial: int):
    if not t.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: SeerConfig) -> dict[str, Any]:
    """Run one training stage described by `cfg`; returns the run summary (also written to summary.json)."""
    return Trainer(cfg).fit()


