"""Run under torchrun: one forward/backward with DeepSpeed-Ulysses, write the averaged gradients (rank 0).

Usage: torchrun --nproc_per_node 2 ulysses_gradients.py OUT.safetensors [overrides...]
"""

import sys

from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from seer_finetune.__main__ import leave
from seer_finetune.compose import compose_config
from seer_finetune.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(compose_config(overrides))
loss, parts = trainer._forward_loss(trainer._next_batch())
# DeepSpeed's own backward only: the trainer's engine would also step the optimizer, which clears the gradients.
ds_engine = trainer.engine.ds_engine
ds_engine.backward(loss)
# ZeRO keeps gradients in its own partitioned buffers; this gathers each one in full (a collective).
grads = {name: safe_get_full_grad(p) for name, p in ds_engine.module.named_parameters() if p.requires_grad}
if trainer.ctx.is_main:
    grads = {name: g.detach().clone() for name, g in grads.items() if g is not None}
    grads["__lm_loss__"] = parts["lm_loss"].reshape(1).cpu()
    save_file(grads, out)
# Every rank leaves together and tears the comm layer down (as `Trainer.fit` does): a rank exiting while rank 0 still
# writes, or with the process group alive, can abort in gloo's teardown ("terminate called without an active
# exception", SIGABRT).
trainer.engine.close()
# Past this point only the interpreter's teardown is left, where the comm libraries' threads can still abort a
# finished run; leave as `python -m seer_finetune` does.
leave(0)
