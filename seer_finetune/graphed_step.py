"""One micro-batch's forward and backward replayed from a CUDA graph (`trainer.cuda_graphs=true`).

A step whose wall time is the host launching kernels (the 32k seer step: `benchmarks/results/training_step.md`)
runs at the GPU's pace once its forward and backward are captured in a graph and replayed as one launch. What
capture needs, and how each need is met:
- fixed buffers: the batch is copied into tensors made at capture, and the gradients are zeroed in place after
  each step (`PlainEngine.keep_gradients`) instead of freed, so the replayed backward accumulates into them;
- nothing read back from the device inside the forward or backward: the loss is built `capturable`
  (`lm_loss.CausalLMLoss`), and the seer path reads nothing per layer or per forward;
- no mask built from the batch: transformers cannot check for packed sequences while a graph is captured and
  would build a dense mask, so the capture runs the model's attention under a causal-only name
  (`causal_only_attention`), with no mask function: plain causal attention over unpadded text, which
  `validation.check_cuda_graphs` makes sure the run trains on;
- the extension's statistics, recorded by Python that a replay does not run again, are recorded again from the
  captured tensors after each replay (`TrainingExtension.begin_graph_records` / `end_graph_records` /
  `replay_graph_records`).
The optimizer step, clipping and the finiteness check stay eager, queued behind the replay before the host reads
anything back (`engine.PlainEngine.step`). Random draws inside the graph (the ground truth's query rows) advance
with every replay, as CUDA graphs do for the default generator.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import AttentionInterface

from .config import CAUSAL_WITHOUT_MASK
from .extensions import TrainingExtension

LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]


@contextlib.contextmanager
def causal_only_attention(model: torch.nn.Module) -> Iterator[str]:
    """Run `model` (a transformers model) with its attention function registered under `<name>_causal` without a
    mask function, so transformers builds no mask and the function does plain causal attention.

    Args:
        model: The transformers model (not a peft wrapper) whose `config._attn_implementation` is `sdpa` or
            `seer`.

    Yields:
        The causal-only name in use.
    """
    name = model.config._attn_implementation
    if name not in CAUSAL_WITHOUT_MASK:
        raise ValueError(f"attention {name!r} has no causal-only form (one of {', '.join(CAUSAL_WITHOUT_MASK)})")
    causal = f"{name}_causal"
    AttentionInterface.register(causal, AttentionInterface._global_mapping[name])
    model.set_attn_implementation(causal)
    try:
        yield causal
    finally:
        model.set_attn_implementation(name)


class GraphedForwardBackward:
    """Replays `forward_backward` on a micro-batch from a CUDA graph captured at its first call.

    Args:
        forward_backward: `batch -> (loss, loss terms)`: the trainer's forward, loss and scaled backward of one
            micro-batch on device tensors; its outputs are 0-dim tensors.
        model: The transformers model (for `causal_only_attention`).
        params: The trainable parameters (their gradients become fixed tensors).
        extension: The run's extension (its statistics are recorded again after each replay).
        warmup: Eager passes on a side stream before the capture (their gradients are discarded). Default 1.

    Calling it with a batch whose shapes differ from the captured one captures again.
    """

    def __init__(
        self,
        forward_backward: Callable[[dict[str, torch.Tensor]], LossParts],
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        extension: TrainingExtension,
        *,
        warmup: int = 1,
    ):
        self.forward_backward, self.model, self.extension = forward_backward, model, extension
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.captures = 0
        self._signature: Any = None
        self._batch: dict[str, torch.Tensor] = {}
        self._out: Optional[LossParts] = None
        self._records: Any = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> LossParts:
        """Copy `batch` into the graph's inputs, replay, and return copies of the loss and its terms."""
        device = torch.device("cuda", torch.cuda.current_device())
        signature = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        if signature != self._signature:
            self._capture(batch, device, signature)
        for key, value in batch.items():
            self._batch[key].copy_(value, non_blocking=True)
        self.graph.replay()
        self.extension.replay_graph_records(self._records)
        loss, parts = self._out
        return loss.clone(), {k: v.clone() for k, v in parts.items()}

    def _capture(self, batch: dict[str, torch.Tensor], device: torch.device, signature: Any) -> None:
        self.graph, self._out = None, None
        self._batch = {k: v.to(device).clone() for k, v in batch.items()}
        # The gradients the step has accumulated so far (earlier micro-batches) are kept through the warm-up.
        before = {p: None if p.grad is None else p.grad.clone() for p in self.params}
        marker = self.extension.begin_graph_records()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with causal_only_attention(self.model), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward_backward(self._batch)
        torch.cuda.current_stream().wait_stream(side)
        # Fixed gradient tensors for the replayed backward to accumulate into: those the warm-up made, holding
        # what was there before it.
        for p in self.params:
            if p.grad is None:
                continue
            if before[p] is None:
                p.grad.zero_()
            else:
                p.grad.copy_(before[p])
        # The warm-up's activations went back to the allocator's cache; the graph allocates from a pool of its own.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with causal_only_attention(self.model), torch.cuda.graph(graph):
            self._out = self.forward_backward(self._batch)
        # What the warm-up and the capture recorded: the capture's tensors are filled by each replay and recorded
        # again after it; the warm-up's are dropped.
        self._records = self.extension.end_graph_records(marker)
        self.graph, self._signature = graph, signature
        self.captures += 1
