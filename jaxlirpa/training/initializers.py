"""IBP initialisation (Shi et al. 2021, "Fast certified robust training with short warmup")."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["ibp_init"]


def ibp_init(params, key, *, skip: tuple[str, ...] | None = None):
    """Redraw every kernel from ``N(0, 2 pi / fan_in**2)`` but the output layer's.

    Why: with the usual He/LeCun initialisation, the width of IBP bounds grows by
    a constant factor per layer, so the first certified steps see huge bounds and
    unstable gradients. This variance keeps the expected width constant through
    each (linear, ReLU) pair, which makes a short eps warm-up work. ``fan_in`` is
    the product of a kernel's shape but its last axis (flax's ``Dense`` and
    ``Conv`` layouts); biases are kept.

    **Arguments:**
    - ``params``: a flax ``params`` dict, e.g. ``model.init(key, x)["params"]``.
    - ``key``: a PRNG key.
    - ``skip``: names of the top-level layers to keep as they are. By default the
      last layer in the dict, which for ``model.init``'s output is the last one
      created (pass it by name if the dict was rebuilt, e.g. by ``jax.tree.map``,
      which sorts keys).

    Example::

        params = ibp_init(model.init(key, x)["params"], jax.random.key(1))
    """
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty flax params dict, e.g. model.init(key, x)['params'].")
    if skip is None:
        skip = (list(params)[-1],)
    unknown = set(skip) - set(params)
    if unknown:
        raise ValueError(f"skip names layers not in params: {sorted(unknown)}; layers are {list(params)}.")
    flat = traverse_util.flatten_dict(params)
    kernels = [path for path, w in flat.items() if path[-1] == "kernel" and w.ndim >= 2 and path[0] not in skip]
    sizes = [flat[path].size for path in kernels]
    normals = np.asarray(jax.random.normal(key, (sum(sizes),)))  # one draw: XLA:CPU compiles a kernel per shape
    for path, chunk in zip(kernels, np.split(normals, np.cumsum(sizes)[:-1])):
        w = flat[path]
        fan_in = math.prod(w.shape[:-1])
        flat[path] = jnp.asarray(chunk.reshape(w.shape) * (math.sqrt(2 * math.pi) / fan_in), w.dtype)
    return traverse_util.unflatten_dict(flat)
