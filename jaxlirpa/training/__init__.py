"""Certified training with flax and optax: losses that bound the worst-case cross-entropy
(IBP, CROWN-IBP, loss fusion), eps/beta schedules, IBP initialisation, jitted (and data
parallel) train and evaluation steps, and checkpoints. See ``examples/certified_training.py``.

Example::

    from jaxlirpa import training
    step = training.make_train_step("crown-ibp", eps=training.smoothed_schedule(0.0, 0.2, 2000, 200))
    state, metrics = step(state, x, y)
"""
from jaxlirpa.training.checkpoints import restore_checkpoint, save_checkpoint
from jaxlirpa.training.initializers import ibp_init
from jaxlirpa.training.losses import crown_ibp_loss, fused_loss, ibp_loss, robust_cross_entropy
from jaxlirpa.training.schedules import crown_ibp_beta, smoothed_schedule
from jaxlirpa.training.steps import LOSSES, batch_mesh, evaluate, make_eval_step, make_train_step, train_epoch

__all__ = [
    "LOSSES", "batch_mesh", "crown_ibp_beta", "crown_ibp_loss", "evaluate", "fused_loss", "ibp_init", "ibp_loss",
    "make_eval_step", "make_train_step", "restore_checkpoint", "robust_cross_entropy", "save_checkpoint",
    "smoothed_schedule", "train_epoch",
]
