"""Maxima over windows: ``reduce_window_max`` (max pooling) and ``reduce_max``.

Both are "max over groups of input elements". A static table ``(outputs, K)``
of flat input indices (-1 for padding) describes the groups, built with numpy
when the graph is traced, so any window shape, stride, dilation, padding or
overlap is handled by one rule.

Relaxation (auto_LiRPA's): below, the input with the largest lower bound;
above, that same input when its lower bound beats every other upper bound
(the max is then exactly it), otherwise the constant largest upper bound.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import Interval, LinearBounds, Perturbed, Rule, register


def _window_table(in_shape, params) -> np.ndarray:
    per_dim = []
    for n, w, s, (lo, hi), bd, wd in zip(in_shape, params["window_dimensions"], params["window_strides"],
                                         params["padding"], params["base_dilation"], params["window_dilation"]):
        padded = (n - 1) * bd + 1 + lo + hi
        outs = (padded - ((w - 1) * wd + 1)) // s + 1
        q = np.arange(outs)[:, None] * s + np.arange(w)[None, :] * wd - lo
        valid = (q >= 0) & (q % bd == 0) & (q // bd < n)
        per_dim.append(np.where(valid, q // bd, -1))
    nd = len(in_shape)
    flat = np.zeros([1] * (2 * nd), dtype=np.int64)
    invalid = np.zeros_like(flat, dtype=bool)
    strides = np.cumprod((list(in_shape[1:]) + [1])[::-1])[::-1]
    for d, (tab, st) in enumerate(zip(per_dim, strides)):
        shape = [1] * (2 * nd)
        shape[d], shape[nd + d] = tab.shape
        tab = tab.reshape(shape)
        flat = flat + np.maximum(tab, 0) * st
        invalid = invalid | (tab < 0)
    flat = np.where(invalid, -1, flat)
    outs = [t.shape[0] for t in per_dim]
    return flat.reshape(int(np.prod(outs)), -1)


def _reduce_table(in_shape, axes) -> np.ndarray:
    kept = [d for d in range(len(in_shape)) if d not in axes]
    idx = np.arange(int(np.prod(in_shape))).reshape(in_shape).transpose(kept + list(axes))
    return idx.reshape(int(np.prod([in_shape[d] for d in kept])), -1)


def _table(eqn) -> np.ndarray:
    in_shape = eqn.in_avals[0].shape
    if eqn.prim is P.reduce_max_p:
        return _reduce_table(in_shape, tuple(eqn.params["axes"]))
    return _window_table(in_shape, eqn.params)


def _windows(v, table, fill):
    flat = v.reshape(-1)
    return jnp.where(table >= 0, flat[np.maximum(table, 0)], fill)


class WindowMax(Rule):
    def accepts(self, eqn, perturbed):
        return perturbed[0]

    def _relax(self, eqn, x: Perturbed):
        """(selected flat input per output, exact mask, constant upper bound)."""
        table = _table(eqn)
        lw = _windows(x.interval.lower, table, -jnp.inf)
        uw = _windows(x.interval.upper, table, -jnp.inf)
        best = jnp.max(lw, axis=1, keepdims=True)
        j = jnp.argmax(jnp.where(lw == best, uw, -jnp.inf), axis=1)  # ties: the larger upper bound
        rows = np.arange(table.shape[0])
        best_lower = lw[rows, j]
        others_upper = jnp.max(uw.at[rows, j].set(-jnp.inf), axis=1)
        exact = (best_lower >= others_upper).astype(lw.dtype)
        return jnp.asarray(table)[rows, j], exact, jnp.max(uw, axis=1)

    def interval(self, eqn, ops):
        table, shape = _table(eqn), eqn.out_avals[0].shape
        lo = jnp.max(_windows(ops[0].interval.lower, table, -jnp.inf), axis=1)
        hi = jnp.max(_windows(ops[0].interval.upper, table, -jnp.inf), axis=1)
        return Interval(lo.reshape(shape), hi.reshape(shape))

    def backward(self, eqn, ops, lA, uA):
        sel, exact, top = self._relax(eqn, ops[0])
        in_shape = eqn.in_avals[0].shape

        def pull(A, sign):
            flat = A.reshape(A.shape[0], -1)
            pos, neg = jnp.maximum(flat, 0), jnp.minimum(flat, 0)
            # lower pass (sign -1): positive rows take the lower line, negative the upper
            toward_lower, toward_upper = (pos, neg) if sign < 0 else (neg, pos)
            coef = toward_lower + toward_upper * exact
            bias = jnp.sum(toward_upper * (1 - exact) * top, axis=1)
            out = jnp.zeros((A.shape[0], int(np.prod(in_shape))), A.dtype).at[:, sel].add(coef)
            return out.reshape(A.shape[0], *in_shape), bias

        lres = pull(lA, -1) if lA is not None else (None, 0.0)
        ures = pull(uA, +1) if uA is not None else (None, 0.0)
        return [(lres[0], ures[0])], lres[1], ures[1]

    def forward(self, eqn, ops):
        sel, exact, top = self._relax(eqn, ops[0])
        lw, lb, uw, ub = ops[0].linear
        shape = eqn.out_avals[0].shape
        n = lw.shape[0]
        pick_w = lambda w: w.reshape(n, -1)[:, sel].reshape(n, *shape)
        pick_b = lambda b: b.reshape(-1)[sel].reshape(shape)
        e = exact.reshape(shape)
        return LinearBounds(lw=pick_w(lw), lb=pick_b(lb), uw=e * pick_w(uw),
                            ub=e * pick_b(ub) + (1 - e) * top.reshape(shape))


register(WindowMax(), P.reduce_window_max_p, P.reduce_max_p)
