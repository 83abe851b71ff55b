"""`SeerExtension`: SeerAttention behind the trainer's `TrainingExtension` seam, registered for
`attention.backend=seer` (see `seer_finetune.extensions`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..config import AttentionConfig, ConfigError, SeerConfig
from ..extensions import TrainingExtension, register_extension
from ..metrics import layer_key
from .attach import attach_seer_gates, seer_gates
from .runtime import SeerRuntime, SeerSettings
from .saving import gates_state_dict, load_gates, load_gates_state_dict, save_gates


def runtime_from_config(a: AttentionConfig) -> SeerRuntime:
    """A runtime for the gates of one model, with the settings of an attention config section."""
    try:
        return SeerRuntime(SeerSettings.from_config(a))
    except ValueError as exc:
        raise ConfigError(f"attention: {exc}") from None


class SeerExtension(TrainingExtension):
    """Gates, gate loss and density metrics for one model.

    Args:
        model: The loaded causal LM (before LoRA wrapping; wrapping afterwards is fine).
        cfg: The run configuration; `cfg.attention` selects mode, block size, density, ...

    Attributes:
        lm_loss_weight: 0 in `gate_distill` (only the gate loss trains), else 1.
        freeze_base: True in `gate_distill`.
        runtime: The `SeerRuntime` shared by all gates.
        gates: The gates in layer order.
    """

    def __init__(self, model: nn.Module, cfg: SeerConfig):
        a = cfg.attention
        self.cfg = cfg
        self.model = model
        self.runtime = runtime_from_config(a)
        try:
            self.gates = attach_seer_gates(
                model,
                self.runtime,
                gate_hidden_size=int(a.gate_hidden_size),
                q_pooling=tuple(a.q_pooling),
                k_pooling=tuple(a.k_pooling),
                rope_units=a.gate_rope_units,
                rope_fraction=float(a.gate_rope_fraction),
                gate_query=a.gate_query,
                weight_init=a.gate_weight_init,
            )
        except (NotImplementedError, ValueError) as exc:
            raise ConfigError(f"attention.backend=seer: {exc}") from None
        if a.gates_path:
            try:
                load_gates(model, a.gates_path)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"attention.gates_path={a.gates_path}: {exc}") from None
        self.lm_loss_weight = 0.0 if a.mode == "gate_distill" else 1.0
        self.freeze_base = a.mode == "gate_distill"
        if self.freeze_base:
            _disable_activation_checkpointing(model)
        if a.mode == "dense":
            # The dense baseline never runs the gates: keep them out of the optimizer.
            for gate in self.gates:
                gate.requires_grad_(False)

    def parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates for p in gate.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """One group, `gates`, at `optim.gate_lr` (or `optim.lr`) without weight decay; none in `dense` mode."""
        if self.runtime.settings.mode == "dense":
            return []
        o = self.cfg.optim
        lr = o.gate_lr if o.gate_lr is not None else o.lr
        return [{"name": "gates", "params": self.parameters(), "lr": lr, "weight_decay": 0.0}]

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """`{"gate_loss": gate_loss_scale * sum over layers}` of the last forward (empty in `dense` mode)."""
        losses = self.runtime.take_losses()
        if not losses:
            return {}
        total = torch.stack([losses[i] for i in sorted(losses)]).sum()
        return {"gate_loss": total * float(self.cfg.attention.gate_loss_scale)}

    def metrics(self) -> dict[str, float | list[float]]:
        """The gates' statistics averaged since the last call, named by dashboard section (`metrics.py`).

        Per layer, each kind in its own section, `seer_<kind>/layer_NN`: `gate_loss` (unweighted), `recall` (the
        share of the ground truth inside the kept blocks, on the rows that have one), `oracle_recall` (the same for
        the best blocks of the same count), `density` (realised) and `density_heads` (one realised density per
        head: a histogram in W&B, for choosing a threshold). Over layers, in the `seer` section: `seer/gate_loss`
        (the sum, as the loss adds them), the means `seer/recall`, `seer/oracle_recall`, `seer/density`, and the
        10th and 90th percentiles of all heads' densities `seer/density_heads_p10` / `_p90`.

        Returns:
            name -> float, or list of floats for `density_heads`.
        """
        stats = self.runtime.take_stats()
        per_layer: dict[str, dict[int, Any]] = {}
        for key, value in stats.items():
            name, layer = key.rsplit("/", 1)
            per_layer.setdefault(name, {})[int(layer)] = value
        out: dict[str, float | list[float]] = {}
        for name, values in sorted(per_layer.items()):
            for layer, value in sorted(values.items()):
                out[layer_key(f"seer_{name}", layer)] = value
            if name == "density_heads":
                heads = torch.tensor([v for layer_values in values.values() for v in layer_values], dtype=torch.float64)
                low, high = torch.quantile(heads, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
                out["seer/density_heads_p10"], out["seer/density_heads_p90"] = low, high
                continue
            total = sum(values.values())
            out[f"seer/{name}"] = total if name == "gate_loss" else total / len(values)
        return out

    def begin_graph_records(self) -> int:
        return self.runtime.stats_marker()

    def end_graph_records(self, marker: int) -> tuple[dict[str, torch.Tensor], tuple]:
        """(the capture's statistics, what the captured kernels read that a later forward would drop: the
        capture's `ForwardState` with its candidates and selection plan, and the gates' kept RoPE angles)."""
        stats = self.runtime.pop_stats_since(marker)
        angles = tuple({id(g.rotary): getattr(g.rotary, "seer_block_angles", None) for g in self.gates}.values())
        return stats, (self.runtime.forward, angles)

    def replay_graph_records(self, records: tuple[dict[str, torch.Tensor], tuple]) -> None:
        self.runtime.add_forward_stats(records[0])

    def eval_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """Other settings an evaluation measures besides the trained ones, by name.

        When the trained evaluation is sparse (a density below 1 or a threshold, in `joint` or `gate_distill`
        mode): `dense`, every candidate block through the same kernels (as `eval.densities=[1.0]` does), so the
        cost of sparsity is the gap between the two. None otherwise.

        Returns:
            name -> a function returning a context manager under which the model runs that setting.
        """
        s = self.runtime.settings
        sparse = s.mode in ("joint", "gate_distill") and (s.threshold is not None or (s.density is not None and s.density < 1.0))
        if not sparse:
            return {}
        return {"dense": lambda: self.runtime.using(mode="dense", density=None, threshold=None, compute_loss=False, oracle=False)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"seer_gates.{k}": v for k, v in gates_state_dict(self.model).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "seer_gates."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            load_gates_state_dict(self.model, own)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write `seer_gates.safetensors` + `seer_gates.json` (naming the base model) into `out_dir`."""
        a = self.cfg.attention
        save_gates(
            self.model,
            out_dir,
            base_model=self.cfg.model.name_or_path,
            extra={
                "trained_mode": a.mode, "density": a.density, "threshold": a.threshold, "sink_blocks": a.sink_blocks,
                "local_blocks": a.local_blocks, "budget": a.budget, "row_mass": a.row_mass,
                "bound_blocks": a.bound_blocks, "probe_blocks": a.probe_blocks, "probe_tokens": a.probe_tokens,
                "selection_temperature": float(a.gate_selection_temperature),
            },
        )

    def set_training(self, training: bool) -> None:
        self.runtime.training = training


def _disable_activation_checkpointing(model: nn.Module) -> None:
    """With the base frozen nothing of it is saved for backward, so recomputing its layers (to rebuild the
    small gate graphs inside them) would only repeat every dense forward: switch checkpointing off."""
    checking = getattr(model, "is_activation_checkpointing", None)
    if checking is None:
        checking = getattr(model, "is_gradient_checkpointing", False)
    if not checking:
        return
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    # Enabling checkpointing also hooked the embeddings to make their output require grad (so that checkpointed
    # blocks reach LoRA weights). Left on, the frozen base's every activation is kept and backpropagated through
    # for nothing: 46 GiB and a full backward at 32k on Qwen2.5-1.5B, where the gates need none of it.
    unhook = getattr(model, "disable_input_require_grads", None)
    if unhook is not None:
        unhook()
    print("[seer-finetune] gate_distill: the base is frozen, activation checkpointing switched off", flush=True)


def build_extension(model: nn.Module, cfg: SeerConfig) -> SeerExtension:
    """Attach SeerAttention gates to `model` as `cfg.attention` says and return the trainer extension.

    Args:
        model: The loaded transformers causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3, ...).
        cfg: The validated run configuration with `attention.backend == "seer"`.

    Returns:
        A `SeerExtension`; the model now runs `attn_implementation="seer"`.
    """
    if cfg.attention.backend != "seer":
        raise ValueError(f"build_extension needs attention.backend=seer, got {cfg.attention.backend!r}")
    return SeerExtension(model, cfg)


register_extension("seer", build_extension)

__all__ = ["SeerExtension", "build_extension", "runtime_from_config", "seer_gates"]
