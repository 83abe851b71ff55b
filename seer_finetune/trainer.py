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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, SeerConfig
from .data import EpochSampler, build_data, collate
from .evaluation import perplexity
from .extension import TrainingExtension
from .metrics import MetricsLogger
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


class Trainer:
    """Holds the pieces of one run; `fit()` trains, evaluates and saves.

    Args:
        cfg: The validated configuration.
    """

    def __init__(self, cfg: SeerConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.output_dir)
        self.device = resolve_device(t.device)
        seed_everything(t.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = build_data(cfg.data, self.tokenizer)
        attn = cfg.attention.backend if cfg.attention.backend in ("sdpa", "eager") else "sdpa"
        model = load_model(cfg.model, cfg.rope, device=self.device, attn_implementation=attn, seed=t.seed)
        context = model.config.max_position_embeddings
        if max(cfg.data.seq_len, cfg.data.eval_seq_len or 0) > context:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} is longer than the model's context ({context} tokens); "
                "extend it with rope=yarn (see +exp=smoke) or shorten the sequences"
            )
        self.extension = _build_extension(model, cfg)
        if self.extension.freeze_base:
            model.requires_grad_(False)
        else:
            model = apply_peft(model, cfg.peft)
        for group in self.extension.param_groups():
            for p in group["params"]:
                p.requires_grad_(True)
        self.model = model
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.extension, cfg)
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_lambda(step, warmup=o.warmup_steps, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio),
        )
        self.sampler = EpochSampler(len(self.data.train), t.seed)
        self.step = 0
        self.tokens_seen = 0
        self.history: dict[str, Any] = {}

    # -- pieces of a step -------------------------------------------------------------------------

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        input_ids = batch["input_ids"].to(self.device)
        kwargs = {}
        if self.cfg.data.attend_within_documents:
            kwargs["position_ids"] = batch["position_ids"].to(self.device)
        out = self.model(input_ids=input_ids, labels=input_ids, use_cache=False, **kwargs)
        extra = self.extension.extra_losses()
        loss = out.loss * self.extension.lm_loss_weight
        for value in extra.values():
            loss = loss + value
        parts = {"lm_loss": float(out.loss.detach())}
        parts.update({name: float(v.detach()) for name, v in extra.items()})
        return loss, parts

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the step's metrics."""
        t = self.cfg.trainer
        started = time.perf_counter()
        sums: dict[str, float] = {}
        total = 0.0
        tokens = 0
        for _ in range(t.grad_accum_steps):
            batch = collate([self.data.train[i] for i in self.sampler.next_indices(t.micro_batch_size)])
            loss, parts = self._forward_loss(batch)
            (loss / t.grad_accum_steps).backward()
            total += float(loss.detach()) / t.grad_accum_steps
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum_steps
            tokens += batch["input_ids"].numel()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.optim.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        metrics = {"loss": total, **sums, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed, "step_time_s": elapsed}
        metrics.update(lrs)
        metrics.update(self.extension.metrics())
        return metrics

    def evaluate(self) -> dict[str, float]:
        if self.data.eval is None:
            return {}
        self.extension.set_training(False)
        try:
            result = perplexity(self.model, self.data.eval, device=self.device, batch_size=self.cfg.trainer.micro_batch_size)
        finally:
            self.extension.set_training(True)
        result.update({f"eval_{k}": v for k, v in self.extension.metrics().items()})
        return result

    # -- state ------------------------------------------------------------------------------------

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extension_state=self.extension.state_dict(),
            trainer_state={"tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(), "history": self.history},
            keep=self.cfg.trainer.keep_checkpoints,
        )

    def maybe_resume(self) -> bool:
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

    # -- the run ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        (self.run_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        logger = MetricsLogger(self.run_dir, cfg.logger, run_config, resume_step=self.step if resumed else None)
        trainable, total = count_parameters(self.model)
        print(
            f"[seer-finetune] {cfg.model.name_or_path}: {trainable:,} of {total:,} parameters train "
            f"({cfg.peft.method if not self.extension.freeze_base else 'extension only'}), "
            f"{len(self.data.train)} training sequences of {cfg.data.seq_len} tokens, device {self.device}"
            + (f", resumed at step {self.step}" if resumed else ""),
            flush=True,
        )
        if not resumed and t.eval_before and self.data.eval is not None:
            before = self.evaluate()
            self.history["eval_before"] = before
            logger.log({f"eval/{k}": v for k, v in before.items()}, step=0)
            print(f"[seer-finetune] eval before training: loss {before['loss']:.4f}, perplexity {before['ppl']:.2f}", flush=True)
        bar = _progress(t, initial=self.step)
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
            print(line, flush=True)
        if t.save_final:
            final = save_final(self.model, self.tokenizer, self.run_dir / "final", model_cfg=cfg.model, peft_cfg=cfg.peft)
            self.extension.save_pretrained(final)
            summary["final_dir"] = str(final)
            print(f"[seer-finetune] saved {final}", flush=True)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        logger.close()
        return summary


def _progress(t, initial: int):
    if not t.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: SeerConfig) -> dict[str, Any]:
    """Run one training stage described by `cfg`; returns the run summary (also written to summary.json)."""
    return Trainer(cfg).fit()


