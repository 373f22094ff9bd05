"""Maxima over windows: ``reduce_window_max`` (max pooling) and ``reduce_max``.

Both are "max over K groups of input elements". :class:`Windows` lists the K
members of every output's group as K strided slices of the (padded) input,
and puts values back with K strided pads: no gather or scatter, which XLA on
CPU runs slowly. Any window shape, stride, window dilation, padding or overlap
is handled by one rule.

Relaxation (auto_LiRPA's): below, the input with the largest lower bound;
above, that same input when its lower bound beats every other upper bound
(the max is then exactly it), otherwise the constant largest upper bound.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import Interval, LinearBounds, Perturbed, Rule, register


class Windows:
    """The groups of one ``reduce_window_max`` / ``reduce_max`` equation."""

    def __init__(self, eqn):
        self.in_shape = tuple(eqn.in_avals[0].shape)
        self.out_shape = tuple(eqn.out_avals[0].shape)
        if eqn.prim is P.reduce_max_p:
            axes = tuple(eqn.params["axes"])
            self.kept = [d for d in range(len(self.in_shape)) if d not in axes]
            self.perm = list(axes) + self.kept
            self.offsets = None
        else:
            p = eqn.params
            self.strides, self.dilation = p["window_strides"], p["window_dilation"]
            self.padding = p["padding"]
            self.offsets = list(itertools.product(*[range(w) for w in p["window_dimensions"]]))

    def stack(self, v, fill):
        """``(K, *out_shape)``: the k-th member of every group."""
        if self.offsets is None:
            return jnp.transpose(v, self.perm).reshape(-1, *self.out_shape)
        padded = lax.pad(v, jnp.asarray(fill, v.dtype), [(lo, hi, 0) for lo, hi in self.padding])
        return jnp.stack([
            lax.slice(padded, [k * d for k, d in zip(ks, self.dilation)],
                      [k * d + (o - 1) * s + 1 for k, d, o, s in zip(ks, self.dilation, self.out_shape, self.strides)],
                      self.strides)
            for ks in self.offsets])

    def place(self, parts):
        """Transpose of :meth:`stack` on arrays ``(K, rows, *out_shape)``: ``(rows, *in_shape)``."""
        rows = parts.shape[1]
        if self.offsets is None:
            n_axes = len(self.perm) - len(self.kept)
            reduced = [self.in_shape[d] for d in self.perm[:n_axes]]
            t = jnp.moveaxis(parts.reshape(*reduced, rows, *self.out_shape), n_axes, 0)
            return jnp.transpose(t, [0] + [1 + i for i in np.argsort(self.perm)])
        total = 0.0
        zero = jnp.zeros((), parts.dtype)
        for part, ks in zip(parts, self.offsets):
            config = [(0, 0, 0)]
            for k, d, o, s, (lo, hi), n in zip(ks, self.dilation, self.out_shape, self.strides, self.padding,
                                              self.in_shape):
                start = k * d - lo  # input coordinate of this member in the first group
                config.append((start, n - (start + (o - 1) * s + 1), s - 1))
            total = total + lax.pad(part, zero, config)
        return total


class WindowMax(Rule):
    def accepts(self, eqn, perturbed):
        dilated = eqn.prim is P.reduce_window_max_p and any(b != 1 for b in eqn.params["base_dilation"])
        return perturbed[0] and not dilated

    def _relax(self, eqn, x: Perturbed):
        """(one-hot choice ``(K, *out)`` of the lower line, exact mask, constant upper bound)."""
        w = Windows(eqn)
        lw = w.stack(x.interval.lower, -jnp.inf)
        uw = w.stack(x.interval.upper, -jnp.inf)
        best = jnp.max(lw, axis=0)
        j = jnp.argmax(jnp.where(lw == best, uw, -jnp.inf), axis=0)  # ties: the larger upper bound
        choice = (jnp.arange(lw.shape[0]).reshape(-1, *[1] * best.ndim) == j).astype(lw.dtype)
        others_upper = jnp.max(jnp.where(choice > 0, -jnp.inf, uw), axis=0)
        exact = (best >= others_upper).astype(lw.dtype)
        return w, choice, exact, jnp.max(uw, axis=0)

    def interval(self, eqn, ops):
        w = Windows(eqn)
        return Interval(jnp.max(w.stack(ops[0].interval.lower, -jnp.inf), axis=0),
                        jnp.max(w.stack(ops[0].interval.upper, -jnp.inf), axis=0))

    def backward(self, eqn, ops, lA, uA):
        w, choice, exact, top = self._relax(eqn, ops[0])

        def pull(A, sign):
            pos, neg = jnp.maximum(A, 0), jnp.minimum(A, 0)
            # lower pass (sign -1): positive rows take the lower line, negative the upper
            toward_lower, toward_upper = (pos, neg) if sign < 0 else (neg, pos)
            coef = toward_lower + toward_upper * exact
            bias = jnp.sum((toward_upper * (1 - exact) * top).reshape(A.shape[0], -1), axis=1)
            return w.place(choice[:, None] * coef[None]), bias

        lres = pull(lA, -1) if lA is not None else (None, 0.0)
        ures = pull(uA, +1) if uA is not None else (None, 0.0)
        return [(lres[0], ures[0])], lres[1], ures[1]

    def forward(self, eqn, ops):
        w, choice, exact, top = self._relax(eqn, ops[0])
        lw, lb, uw, ub = ops[0].linear
        pick = lambda v: jnp.sum(choice * w.stack(v, 0.0), axis=0)
        pick_rows = jax.vmap(pick)
        return LinearBounds(lw=pick_rows(lw), lb=pick(lb), uw=exact * pick_rows(uw),
                            ub=exact * pick(ub) + (1 - exact) * top)


register(WindowMax(), P.reduce_window_max_p, P.reduce_max_p)
