"""The plain engine's optimizer step (`engine.PlainEngine.step`): PyTorch's fused AdamW, its update queued before
anything is read back from the device, and a non-finite step skipped on the device with the weights, Adam's state
and the schedule left as they were. A checkpoint written before the fused optimizer resumes on the unfused path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seer_finetune.compose import compose_config
from seer_finetune.trainer import Trainer

FUSED_UPDATE = "aten._fused_adamw_.default"
READ_BACK = "aten._local_scalar_dense.default"  # bool(tensor), tensor.item()


class _Ops(TorchDispatchMode):
    """The aten ops run inside it, in order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _trainer(tmp_path, *extra: str) -> Trainer:
    return Trainer(compose_config([
        "+exp=smoke", "data.seq_len=128", "trainer.micro_batch_size=1", "trainer.grad_accum_steps=1",
        "trainer.max_steps=4", "trainer.progress_bar=false", "trainer.eval_before=false", "trainer.save_every=0",
        "trainer.save_final=false", "data.max_eval_sequences=1", f"trainer.output_dir={tmp_path / 'run'}", *extra,
    ]))


def _backward(trainer: Trainer) -> None:
    loss, _ = trainer._forward_loss(trainer._next_batch())
    trainer.engine.backward(loss)


def _snapshot(trainer: Trainer) -> list[torch.Tensor]:
    optimizer = trainer.engine.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return [t.detach().clone() for t in [*params, *state]]


@pytest.mark.parametrize("extra", [[], ["attention=seer_joint", "attention.block_size=32", "attention.density=0.5"]],
                         ids=["dense", "seer"])
def test_the_update_is_queued_before_the_first_read_back(tmp_path, extra):
    trainer = _trainer(tmp_path, *extra)
    assert all(g["fused"] for g in trainer.engine.optimizer.param_groups)
    trainer.train_step()
    _backward(trainer)
    with _Ops() as ops:
        _, applied = trainer.engine.step()
    assert applied
    assert FUSED_UPDATE in ops.names and READ_BACK in ops.names
    assert ops.names.index(FUSED_UPDATE) < ops.names.index(READ_BACK)


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_step()
    before, epoch = _snapshot(trainer), trainer.engine.scheduler.last_epoch
    _backward(trainer)
    first = next(p for g in trainer.engine.optimizer.param_groups for p in g["params"] if p.grad is not None)
    first.grad.view(-1)[0] = float("nan")
    grad_norm, applied = trainer.engine.step()
    assert not applied and not torch.isfinite(grad_norm)
    after = _snapshot(trainer)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert trainer.engine.scheduler.last_epoch == epoch
    assert all(p.grad is None for g in trainer.engine.optimizer.param_groups for p in g["params"])
    # The next finite step applies, and the step count and schedule move by one.
    steps = [s["step"].item() for s in trainer.engine.optimizer.state.values()]
    _backward(trainer)
    assert trainer.engine.step()[1]
    assert [s["step"].item() for s in trainer.engine.optimizer.state.values()] == [s + 1 for s in steps]
    assert trainer.engine.scheduler.last_epoch == epoch + 1


def test_a_checkpoint_from_before_the_fused_optimizer_resumes_unfused(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_step()
    saved = trainer.engine.optimizer.state_dict()
    for group in saved["param_groups"]:
        group["fused"] = None  # what AdamW's default wrote
    trainer.engine.optimizer.load_state_dict(saved)
    before = _snapshot(trainer)
    _backward(trainer)
    with _Ops() as ops:
        assert trainer.engine.step()[1]
    assert FUSED_UPDATE not in ops.names
    assert any(not torch.equal(old, new) for old, new in zip(before, _snapshot(trainer)))
