"""Save and restore a train state with ``flax.serialization`` (msgpack): no extra dependency."""
from __future__ import annotations

import os
from pathlib import Path

from flax import serialization

__all__ = ["save_checkpoint", "restore_checkpoint"]


def save_checkpoint(path, state) -> Path:
    """Write ``state`` (a ``TrainState`` or any pytree of arrays) to ``path``; return the path.

    The file is written beside ``path`` and renamed over it, so an interrupted save
    never leaves a truncated checkpoint. Only array leaves are stored (a
    ``TrainState``'s ``apply_fn`` and ``tx`` are code, rebuilt by the caller).

    Example: ``save_checkpoint("ckpt/mnist.msgpack", state)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(serialization.to_bytes(state))
    os.replace(partial, path)
    return path


def restore_checkpoint(path, target):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``target``
    (a state built the same way, e.g. a fresh ``TrainState.create(...)``) and return it.

    Example::

        state = restore_checkpoint("ckpt/mnist.msgpack", TrainState.create(apply_fn=model.apply,
                                                                         params=params, tx=tx))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}.")
    return serialization.from_bytes(target, path.read_bytes())
