"""One rule for every linear primitive, derived from JAX's own transformations.

With its constant operands closed over, a linear primitive is an affine map
``f(x) = L x + f(0)``. Then

- CROWN pulls ``A`` back through ``L^T``: ``jax.vjp`` of ``f``, vmapped over rows;
- forward mode pushes linear bounds through ``L``: ``jax.jvp``, vmapped over rows;
- IBP and forward mode also need ``|L|`` (the map with absolute coefficients):
  the same primitive with ``|constant|`` operands for scalings (``mul``,
  ``div``, ``dot_general``, ``conv``), ``add`` for ``sub``, identity for ``neg``,
  and ``L`` itself for the structural primitives (reshape, slice, pad, ...),
  whose coefficients are 0 or 1.

No primitive needs hand-written bound code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa._compat import lax_primitives as P, stack_p
from jaxlirpa.rules.base import Interval, LinearBounds, Perturbed, Rule, register

_SCALINGS = {P.mul_p, P.div_p, P.dot_general_p, P.conv_general_dilated_p}


def _narrows(eqn) -> bool:
    """A float cast to a type with fewer mantissa bits (e.g. float32 to bfloat16)."""
    if eqn.prim is not P.convert_element_type_p:
        return False
    src, dst = eqn.in_avals[0].dtype, eqn.out_avals[0].dtype
    return (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating)
            and jnp.finfo(dst).nmant < jnp.finfo(src).nmant)


def exact_precision():
    """The precision of every matrix product in a bound, decided while tracing: full float32
    (``HIGHEST``) where the default rounds, a GPU's TF32 or a TPU's bfloat16 passes, by ~1e-3,
    enough to cut off reachable outputs; None (the model's own) on a CPU, whose float32
    products are exact anyway and where HIGHEST only slowed compilation (one test file of
    the suite took 28 s instead of 23)."""
    return None if jax.default_backend() == "cpu" else (jax.lax.Precision.HIGHEST,) * 2


def _apply(prim, eqn, args):
    if prim is P.conv_general_dilated_p:
        return channels_last_conv(*args, **eqn.params)
    exact = exact_precision()
    params = eqn.params | {"precision": exact} if prim is P.dot_general_p and exact else eqn.params
    out = prim.bind(*args, **params)
    return out[0] if prim.multiple_results else out


def channels_last_numbers(nd: int, transposed: bool = False) -> jax.lax.ConvDimensionNumbers:
    """The dimension numbers of an ``nd``-d channels-last convolution: NHWC, HWIO (HWOI when
    ``transposed``), NHWC."""
    last = (0, nd + 1, *range(1, nd + 1))
    kernel = (nd, nd + 1) if transposed else (nd + 1, nd)
    return jax.lax.ConvDimensionNumbers(last, (*kernel, *range(nd)), last)


def channels_last_conv(lhs, rhs, *, dimension_numbers, transposed=False, **params):
    """``conv_general_dilated`` computed in the channels-last layout (NHWC, HWIO),
    transposing in and out. XLA's CPU backend turns other layouts (torch's NCHW) into
    this one outside loops, but not inside a ``while`` body (``lax.map`` chunks,
    alpha-CROWN's ``lax.scan``), where they ran up to 15x slower. At full precision
    (:func:`exact_precision`), whatever the traced convolution asked for. ``transposed``: lay
    the kernel out HWOI, for a convolution that is only ever transposed: JAX's
    transpose rule swaps it into the fast path's HWIO."""
    params = params | {"precision": exact_precision() or params.get("precision")}
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    canonical = channels_last_numbers(len(lhs_spec) - 2, transposed)
    if tuple(dimension_numbers) == tuple(canonical):
        return P.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
    order = (*rhs_spec[2:], *((rhs_spec[0], rhs_spec[1]) if transposed else (rhs_spec[1], rhs_spec[0])))
    out = P.conv_general_dilated_p.bind(jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
                                        jnp.transpose(rhs, order), dimension_numbers=canonical, **params)
    return jnp.transpose(out, np.argsort((out_spec[0], *out_spec[2:], out_spec[1])))


def conv_pullback(params: dict, x_aval, kernel):
    """``A -> A`` pulled back through a convolution of its input (its transpose), with a
    kernel layout that keeps both this map and its own transpose (the gradient alpha-CROWN
    takes through it) on XLA:CPU's fast path inside loops: one kernel layout cannot serve
    both there (the slow one cost 8x on CNN-B's first layer)."""
    x = jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype)

    def transpose(A, w, transposed):
        conv = lambda z: channels_last_conv(z, w, **params, transposed=transposed)  # noqa: E731
        return jax.linear_transpose(conv, x)(A)[0]

    @jax.custom_vjp
    def pull(A, w):
        return transpose(A, w, True)

    def pull_fwd(A, w):
        return pull(A, w), (A, w)

    def pull_bwd(res, g):
        A, w = res
        return channels_last_conv(g, w, **params), jax.vjp(lambda v: transpose(A, v, False), w)[1](g)[0]

    pull.defvjp(pull_fwd, pull_bwd)
    return lambda A: (pull(A, kernel),)


def _row_dot(A, y):
    """``<A_r, y>`` for every row ``r`` of ``A`` (zeros for ``y`` None), as a matrix-vector
    product: summing ``A * y`` made XLA:CPU materialise ``y`` broadcast to ``A``'s shape."""
    if y is None:
        return jnp.zeros(A.shape[:1], A.dtype)
    return A.reshape(A.shape[0], -1) @ y.reshape(-1)


def _substitute(ops, values):
    values = iter(values)
    return [next(values) if isinstance(o, Perturbed) else o for o in ops]


def _perturbed_avals(eqn, ops):
    return [a for a, o in zip(eqn.in_avals, ops) if isinstance(o, Perturbed)]


class LinearRule(Rule):
    """The generic rule. It is linear only when ``single`` (a product) has one
    perturbed operand, when only the positions in ``only`` (if given) are
    perturbed, and when the positions in ``constant`` are not."""

    needs_bounds = False

    def __init__(self, *, single: bool = False, only: tuple[int, ...] | None = None, constant: tuple[int, ...] = ()):
        self.single, self.only, self.constant = single, only, constant

    def accepts(self, eqn, perturbed):
        if self.single and sum(perturbed) != 1:
            return False
        if self.only is not None and any(p and i not in self.only for i, p in enumerate(perturbed)):
            return False
        if any(perturbed[i] for i in self.constant if i < len(perturbed)):
            return False
        return jnp.issubdtype(eqn.out_avals[0].dtype, jnp.floating) and not _narrows(eqn)

    def why_not(self, eqn, perturbed):
        if _narrows(eqn):
            return (f"casting {eqn.in_avals[0].dtype} to {eqn.out_avals[0].dtype} rounds to fewer bits, which a "
                    f"linear bound cannot follow soundly; bound the model in float32 (or float64)")
        return super().why_not(eqn, perturbed)

    def affine(self, eqn, ops):
        """``f(*perturbed operands)`` with the constant operands closed over."""
        return lambda *xs: _apply(eqn.prim, eqn, _substitute(ops, xs))

    def linear_abs(self, eqn, ops):
        """``|L|``: the linear part with absolute coefficients."""
        if eqn.prim is P.neg_p:
            return lambda r: r
        if eqn.prim in _SCALINGS:
            abs_ops = [o if isinstance(o, Perturbed) else jnp.abs(o) for o in ops]
            return lambda *rs: _apply(eqn.prim, eqn, _substitute(abs_ops, rs))
        prim = P.add_p if eqn.prim is P.sub_p else eqn.prim
        f = lambda *xs: _apply(prim, eqn, _substitute(ops, xs))
        return lambda *rs: jax.jvp(f, rs, rs)[1]

    def linear(self, eqn, ops):
        """``L``: the linear part (the JVP of the affine map)."""
        f = self.affine(eqn, ops)
        return lambda *ts: jax.jvp(f, ts, ts)[1]

    def interval(self, eqn, ops):
        """``f(mid) -+ |L| rad``. Inputs with an infinite bound enter as 0 and mark, through
        ``|L|``, the outputs they reach, which become unbounded (``(l + u) / 2`` would be NaN)."""
        bounds = [o.interval for o in ops if isinstance(o, Perturbed)]
        finite = [jnp.isfinite(l) & jnp.isfinite(u) for l, u in bounds]
        mids = [jnp.where(ok, (l + u) / 2, 0) for (l, u), ok in zip(bounds, finite)]
        rads = [jnp.where(ok, (u - l) / 2, 0) for (l, u), ok in zip(bounds, finite)]
        absL = self.linear_abs(eqn, ops)
        mid, rad = self.affine(eqn, ops)(*mids), absL(*rads)
        reached = absL(*[(~ok).astype(m.dtype) for ok, m in zip(finite, mids)]) > 0
        return Interval(jnp.where(reached, -jnp.inf, mid - rad), jnp.where(reached, jnp.inf, mid + rad))

    def backward(self, eqn, ops, lA, uA):
        zeros = [jnp.zeros(a.shape, a.dtype) for a in _perturbed_avals(eqn, ops)]
        if eqn.prim is P.conv_general_dilated_p and isinstance(ops[0], Perturbed):
            y0, pullback = jnp.zeros(eqn.out_avals[0].shape, eqn.out_avals[0].dtype), conv_pullback(eqn.params, eqn.in_avals[0], ops[1])
        else:
            y0, pullback = jax.vjp(self.affine(eqn, ops), *zeros)
        # A scaling of its one perturbed operand is 0 at 0: no bias (written out, XLA:CPU,
        # jaxlib 0.10.2, turned sum(A * dot(x, zeros)) into garbage or NaN under jit).
        offset = None if eqn.prim in _SCALINGS else y0

        def pull(A):  # each side on its own: stacking them first cost a copy of both
            if A is None:
                return [None] * len(ops), None
            pulled = iter(jax.vmap(pullback)(A))
            return [next(pulled) if isinstance(o, Perturbed) else None for o in ops], _row_dot(A, offset)

        (l_grads, lbias), (u_grads, ubias) = pull(lA), ((None, None) if lA is uA else pull(uA))
        if lA is uA:  # identical lower and upper rows (an identity start): pull once
            u_grads, ubias = l_grads, lbias
        grads = [(gl, gu) if isinstance(o, Perturbed) else None for o, gl, gu in zip(ops, l_grads, u_grads)]
        return grads, (0.0 if lbias is None else lbias), (0.0 if ubias is None else ubias)

    def pull_identity(self, eqn, ops):
        """Pull the identity rows of the output back without materialising them.

        Returns ``(A, bias)`` for the one perturbed operand (``A`` is None when it
        is still the identity), or None when there is no shortcut.
        ``dot_general`` with a constant right operand gives its weight directly:
        pulling an identity through it would be a wasted matmul with ``eye``.
        (A convolution's identity rows become patches: ``methods/patches.py``.)
        """
        perturbed = [i for i, o in enumerate(ops) if isinstance(o, Perturbed)]
        if len(perturbed) != 1:
            return None
        i, out = perturbed[0], eqn.out_avals[0]
        if eqn.prim in (P.add_p, P.convert_element_type_p) or (eqn.prim is P.sub_p and i == 0):
            if tuple(eqn.in_avals[i].shape) != tuple(out.shape):
                return None
            zero = jnp.zeros(eqn.in_avals[i].shape, eqn.in_avals[i].dtype)
            return None, self.affine(eqn, ops)(zero).reshape(-1)
        if eqn.prim is P.dot_general_p and i == 0:
            (contract, rhs_contract), (batch, _) = eqn.params["dimension_numbers"]
            if batch:
                return None
            W = ops[1]
            x_shape = eqn.in_avals[0].shape
            free = [d for d in range(len(x_shape)) if d not in contract]
            w_free = [d for d in range(W.ndim) if d not in rhs_contract]
            F = int(np.prod([x_shape[d] for d in free]))
            Wm = jnp.transpose(W, list(rhs_contract) + w_free).reshape(-1, int(np.prod([W.shape[d] for d in w_free])))
            J = jnp.einsum("fg,cj->fjgc", jnp.eye(F, dtype=Wm.dtype), Wm)  # rows (f, j), input (free, contract)
            J = J.reshape(-1, *[x_shape[d] for d in free], *[x_shape[d] for d in contract])
            A = jnp.transpose(J, [0] + [1 + k for k in np.argsort(free + list(contract))])
            return A, jnp.zeros((A.shape[0],), A.dtype)
        return None

    def forward(self, eqn, ops):
        xs = [o.linear for o in ops if isinstance(o, Perturbed)]
        mid_w = [(x.lw + x.uw) / 2 for x in xs]
        rad_w = [(x.uw - x.lw) / 2 for x in xs]
        mid_b = [(x.lb + x.ub) / 2 for x in xs]
        rad_b = [(x.ub - x.lb) / 2 for x in xs]
        L, absL = self.linear(eqn, ops), self.linear_abs(eqn, ops)
        w, dw = jax.vmap(L)(*mid_w), jax.vmap(absL)(*rad_w)
        b, db = self.affine(eqn, ops)(*mid_b), absL(*rad_b)
        return LinearBounds(lw=w - dw, lb=b - db, uw=w + dw, ub=b + db)


class IdentityRule(Rule):
    """Primitives whose value is their operand (``stop_gradient``, ``copy``):
    their JVP is not the identity, so the generic rule does not apply."""

    needs_bounds = False

    def interval(self, eqn, ops):
        return ops[0].interval

    def backward(self, eqn, ops, lA, uA):
        return [(lA, uA)], 0.0, 0.0

    def forward(self, eqn, ops):
        return ops[0].linear


LINEAR = LinearRule()
"""Register this for a user primitive that is linear in all its operands."""

register(LINEAR, P.add_p, P.sub_p, P.neg_p, P.reshape_p, P.broadcast_in_dim_p, P.transpose_p,
         P.squeeze_p, P.concatenate_p, P.slice_p, P.pad_p, P.reduce_sum_p, P.reduce_window_sum_p,
         P.convert_element_type_p, P.rev_p, P.cumsum_p, P.add_jaxvals_p)
register(LinearRule(single=True), P.mul_p, P.dot_general_p, P.conv_general_dilated_p)
register(LinearRule(only=(0,)), P.div_p, P.dynamic_slice_p, P.gather_p)
register(LinearRule(constant=(0,)), P.select_n_p)
register(LinearRule(only=(0, 1)), P.dynamic_update_slice_p)
register(LinearRule(only=(0, 2)), P.scatter_add_p)
register(IdentityRule(), P.stop_gradient_p, P.copy_p)
if stack_p is not None:
    register(LINEAR, stack_p)
