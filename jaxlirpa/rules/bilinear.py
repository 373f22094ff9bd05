"""Products of two perturbed tensors: ``x * y`` (``mul``), ``dot_general``
(attention's ``Q K^T``, ``softmax(.) V``, Gram matrices) and ``conv`` (a
perturbed input through perturbed weights).

Both are bilinear maps ``z = D(x, y)``: every output element is a sum of
products ``x_i * y_j``. Each product gets auto_LiRPA's ``BoundMul`` relaxation
(McCormick, the planes of ``MulHelper.interpolated_relaxation`` without alphas)
on ``x in [xl, xu]``, ``y in [yl, yu]``::

    yl * x + xl * y - xl * yl  <=  x * y  <=  yu * x + xl * y - xl * yu

and since ``D`` is bilinear, summing these planes over the products of one
output element gives planes of ``z`` that are ``D`` itself again::

    D(x, yl) + D(xl, y) - D(xl, yl)  <=  z  <=  D(x, yu) + D(xl, y) - D(xl, yu)

So CROWN pulls ``A`` back through the primitive's VJP and forward mode applies
the primitive to the operands' linear weights, never materialising the
``(rows, out, K)`` tensor of single products. For the same
variable twice (``x * x``) both planes stay valid (tangent at ``xl`` below,
chord above), as in auto_LiRPA. IBP takes the exact range of every single
product (min/max of its four corners; ``[0 or min(l^2, u^2), max(l^2, u^2)]``
for ``x * x``), summed over the contraction for ``dot_general``. For ``conv``,
whose products do not line up as an array, IBP takes the centre-radius form
``D(xc, yc) +- (D(|xc|, yr) + D(xr, |yc|) + D(xr, yr))``: sound, as every
coefficient of ``D`` is 0 or 1, but looser than the corners when an interval
excludes 0.

Each McCormick plane is the tangent plane of ``D`` at a corner of the box:
the lower ones at ``(xl, yl)`` and ``(xu, yu)``, the upper ones at ``(xl, yu)``
and ``(xu, yl)``. alpha-CROWN optimises, per (start node, row, single product),
one weight in ``[0, 1]`` for each side: the convex combination ``w * (first
corner's plane) + (1 - w) * (second's)``, as auto_LiRPA's
``MulHelper.interpolated_relaxation``. ``w = 1`` gives CROWN's planes. For
``dot_general`` that takes the ``(rows, batch..., F, G, K)`` array of single
products (as auto_LiRPA's ``BoundMatMul``; one weight per output element, shared
by its ``K`` products, was 5 % of the width looser on the oracle's attention),
up to ``Product.max_products`` products per row: a layer's perturbed weights
(784 x 1024 of them) would need that many per row and re-bounded neuron. Beyond
it, and for ``conv``, whose products do not line up as an array, the products
share their output element's weight (sound, as each product is still bounded by
a combination of its own planes) and stay in the VJP form. For ``x * x`` the
lower combination is raised to the tangent at ``t = w xl + (1 - w) xu`` (by
``w (1 - w) (xu - xl)^2``, what convexity leaves between them); the upper
planes are both the chord.

:class:`Product` is registered as an alternative: ``mul`` and ``dot_general``
with one perturbed operand keep the generic linear rule.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import Interval, LinearBounds, Rule, _pos_neg, _rowsum, register_alternative


def _bind(eqn, a, b):
    out = eqn.prim.bind(a, b, **eqn.params)
    return out.astype(eqn.out_avals[0].dtype)


def _pull(f, aval, A):
    """``A @ L`` for the linear map ``f`` on ``aval``-shaped inputs: its VJP, vmapped over rows."""
    _, vjp = jax.vjp(f, jnp.zeros(aval.shape, aval.dtype))
    return jax.vmap(lambda a: vjp(a)[0])(A)


def _push(f, W):
    """``f`` (linear) applied to each row of ``W`` (shape ``(n, *input shape)``)."""
    return jax.vmap(f)(W)


class Product(Rule):
    """``z = D(x, y)`` for the bilinear ``mul`` or ``dot_general``, both operands perturbed."""

    needs_bounds = True

    def accepts(self, eqn, perturbed):
        return (len(perturbed) == 2 and all(perturbed)
                and jnp.issubdtype(eqn.out_avals[0].dtype, jnp.floating))

    # ------------------------------------------------------------------ IBP

    def interval(self, eqn, ops):
        (xl, xu), (yl, yu) = ops[0].interval, ops[1].interval
        shape, dtype = eqn.out_avals[0].shape, eqn.out_avals[0].dtype
        if eqn.prim is P.conv_general_dilated_p:
            return _centre_radius_interval(eqn, xl, xu, yl, yu)
        if eqn.prim is P.dot_general_p:
            xl, xu, yl, yu = _product_layout(eqn, xl, xu, yl, yu)
        if eqn.prim is P.mul_p and _same_variable(eqn):
            lo = jnp.clip(0, xl, xu)  # the point of [xl, xu] nearest to 0
            lo, hi = lo * lo, jnp.maximum(xl * xl, xu * xu)
        else:
            corners = (xl * yl, xl * yu, xu * yl, xu * yu)
            lo = jnp.minimum(jnp.minimum(corners[0], corners[1]), jnp.minimum(corners[2], corners[3]))
            hi = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
        if eqn.prim is P.dot_general_p:
            lo, hi = jnp.sum(lo, -1), jnp.sum(hi, -1)
        lo, hi = (jnp.broadcast_to(t, shape) if eqn.prim is P.mul_p else t.reshape(shape) for t in (lo, hi))
        return Interval(lo.astype(dtype), hi.astype(dtype))

    # ----------------------------------------------------------------- CROWN

    def _planes(self, eqn, ops):
        (xl, _), (yl, yu) = ops[0].interval, ops[1].interval
        D = lambda a, b: _bind(eqn, a, b)
        return D, xl, yl, yu

    def backward(self, eqn, ops, lA, uA, alpha=None):
        """``alpha``: optional ``(lower-pass, upper-pass)`` weights, each ``(rows, 2, *output
        shape)``: of the lower and the upper planes' first corners (alpha-CROWN)."""
        D, xl, yl, yu = self._planes(eqn, ops)
        x_aval, y_aval = eqn.in_avals
        present = [A for A in (lA, uA) if A is not None]
        n = present[0].shape[0] if lA is not None else 0
        pos = jnp.concatenate([jnp.maximum(A, 0) for A in present])
        neg = jnp.concatenate([jnp.minimum(A, 0) for A in present])
        # Rows of lA: A+ takes the lower plane (slope yl on x), A- the upper (yu);
        # rows of uA the reverse. Both planes have slope xl on y: no sign split there.
        first = (jnp.arange(pos.shape[0]) < n).reshape((-1,) + (1,) * (pos.ndim - 1))
        on_yl = jnp.where(first, pos, neg)  # the rows that meet the lower plane
        on_yu = jnp.where(first, neg, pos)  # ... and the upper one
        if alpha is None:
            A_x = _pull(lambda x: D(x, yl), x_aval, on_yl) + _pull(lambda x: D(x, yu), x_aval, on_yu)
            A_y = _pull(lambda y: D(xl, y), y_aval, pos + neg)
            bias = -(_rowsum(on_yl * D(xl, yl)) + _rowsum(on_yu * D(xl, yu)))
        else:
            interpolated = self._interpolated_products if self._per_product(eqn) else self._interpolated
            A_x, A_y, bias = interpolated(eqn, ops, on_yl, on_yu, _present_weights(alpha, lA, uA))
        split = lambda t: (t[:n] if lA is not None else None, t[n:] if uA is not None else None)
        lbias, ubias = split(bias)
        return [split(A_x), split(A_y)], (0.0 if lbias is None else lbias), (0.0 if ubias is None else ubias)

    def _interpolated(self, eqn, ops, lower_rows, upper_rows, weights):
        """``backward`` through ``w``-combinations of the two planes of each side;
        ``weights`` ``(rows, 2, *output shape)`` are clipped to ``[0, 1]``, so any is sound."""
        D, xl, yl, yu = self._planes(eqn, ops)
        xu = ops[0].interval.upper
        w = jnp.clip(weights, 0.0, 1.0)
        lo1, lo2, up1, up2 = _corner_rows(lower_rows, upper_rows, w)
        x_aval, y_aval = eqn.in_avals
        A_x = _pull(lambda x: D(x, yl), x_aval, lo1 + up2) + _pull(lambda x: D(x, yu), x_aval, lo2 + up1)
        A_y = _pull(lambda y: D(xl, y), y_aval, lo1 + up1) + _pull(lambda y: D(xu, y), y_aval, lo2 + up2)
        bias = -(_rowsum(lo1 * D(xl, yl)) + _rowsum(lo2 * D(xu, yu))
                 + _rowsum(up1 * D(xl, yu)) + _rowsum(up2 * D(xu, yl)))
        if eqn.prim is P.mul_p and _same_variable(eqn):
            bias = bias + _rowsum(lower_rows * (w[:, 0] * (1 - w[:, 0]) * (xu - xl) ** 2))
        return A_x, A_y, bias

    def _interpolated_products(self, eqn, ops, lower_rows, upper_rows, weights):
        """:meth:`_interpolated` for ``dot_general`` with one weight per single product,
        ``weights`` ``(rows, 2, batch..., F, G, K)`` (see :func:`_product_layout`)."""
        (xl, xu), (yl, yu) = ops[0].interval, ops[1].interval
        xl, xu, yl, yu = _product_layout(eqn, xl, xu, yl, yu)
        w = jnp.clip(weights, 0.0, 1.0)
        per_output = lambda t: t.reshape(t.shape[0], *w.shape[2:-1], 1)  # noqa: E731
        lower_rows, upper_rows = per_output(lower_rows), per_output(upper_rows)
        lo1, lo2, up1, up2 = _corner_rows(lower_rows, upper_rows, w)
        A_x = jnp.sum((lo1 + up2) * yl + (lo2 + up1) * yu, -2)
        A_y = jnp.sum((lo1 + up1) * xl + (lo2 + up2) * xu, -3)
        bias = -_rowsum(lo1 * (xl * yl) + lo2 * (xu * yu) + up1 * (xl * yu) + up2 * (xu * yl))
        return _operand_from_layout(eqn, 0, A_x), _operand_from_layout(eqn, 1, A_y), bias

    # ----------------------------------------------------------- alpha-CROWN

    optimizable = True
    max_products = 2**14  # per row; above it a dot_general's products share their output's weight

    def _per_product(self, eqn) -> bool:
        """Whether alpha-CROWN weighs ``eqn``'s single products one by one."""
        return eqn.prim is P.dot_general_p and math.prod(_layout_shape(eqn)) <= self.max_products

    def alpha_start(self, eqn, ops):
        """CROWN's weights (1: the planes at ``(xl, yl)`` and ``(xl, yu)``) and their range:
        per single product for a small ``dot_general``, per output element otherwise."""
        shape = (2, *(_layout_shape(eqn) if self._per_product(eqn) else eqn.out_avals[0].shape))
        dtype = eqn.out_avals[0].dtype
        return jnp.ones(shape, dtype), jnp.zeros(shape, dtype), jnp.ones(shape, dtype)

    # --------------------------------------------------------------- forward

    def forward(self, eqn, ops):
        D, xl, yl, yu = self._planes(eqn, ops)
        x, y = ops[0].linear, ops[1].linear
        ylp, yln = _pos_neg(yl)
        yup, yun = _pos_neg(yu)
        xlp, xln = _pos_neg(xl)
        on_x = lambda W, c: _push(lambda w: D(w, c), W)
        on_y = lambda c, W: _push(lambda w: D(c, w), W)
        # z >= D(x, yl) + D(xl, y) - D(xl, yl), each term bounded below by the
        # sign of its coefficients; z <= D(x, yu) + D(xl, y) - D(xl, yu) likewise.
        lw = on_x(x.lw, ylp) + on_x(x.uw, yln) + on_y(xlp, y.lw) + on_y(xln, y.uw)
        uw = on_x(x.uw, yup) + on_x(x.lw, yun) + on_y(xlp, y.uw) + on_y(xln, y.lw)
        lb = D(x.lb, ylp) + D(x.ub, yln) + D(xlp, y.lb) + D(xln, y.ub) - D(xl, yl)
        ub = D(x.ub, yup) + D(x.lb, yun) + D(xlp, y.ub) + D(xln, y.lb) - D(xl, yu)
        return LinearBounds(lw, lb, uw, ub)


def _corner_rows(lower_rows, upper_rows, w):
    """The rows meeting each corner's plane at weights ``w`` (in [0, 1]): of the lower side at
    ``(xl, yl)`` and ``(xu, yu)``, of the upper side at ``(xl, yu)`` and ``(xu, yl)``."""
    return lower_rows * w[:, 0], lower_rows * (1 - w[:, 0]), upper_rows * w[:, 1], upper_rows * (1 - w[:, 1])


def _present_weights(alpha, lA, uA):
    """The weights of the passes present, stacked like ``backward``'s rows (lower pass first)."""
    return jnp.concatenate([a for a, A in zip(alpha, (lA, uA)) if A is not None])


def _centre_radius_interval(eqn, xl, xu, yl, yu) -> Interval:
    D = lambda a, b: _bind(eqn, a, b)
    xc, xr, yc, yr = (xu + xl) / 2, (xu - xl) / 2, (yu + yl) / 2, (yu - yl) / 2
    mid = D(xc, yc)
    rad = D(jnp.abs(xc), yr) + D(xr, jnp.abs(yc)) + D(xr, yr)
    return Interval(mid - rad, mid + rad)


def _same_variable(eqn) -> bool:
    a, b = eqn.inputs
    return isinstance(a, int) and a == b


def _operand_order(eqn, i):
    """The axes of ``dot_general``'s operand ``i`` in the order batch, free, contracted."""
    contracted, batch = (dims[i] for dims in eqn.params["dimension_numbers"])
    free = [d for d in range(len(eqn.in_avals[i].shape)) if d not in contracted and d not in batch]
    return [*batch, *free, *contracted]


def _layout_shape(eqn):
    """``(batch..., F, G, K)``: the single products of ``dot_general`` (:func:`_product_layout`)."""
    (contracted, _), (batch, _) = eqn.params["dimension_numbers"]
    nb, nc = len(batch), len(contracted)
    x, y = ([eqn.in_avals[i].shape[d] for d in _operand_order(eqn, i)] for i in (0, 1))
    free = lambda sizes: math.prod(sizes[nb:len(sizes) - nc])  # noqa: E731
    return (*x[:nb], free(x), free(y), math.prod(x[len(x) - nc:]))


def _product_layout(eqn, xl, xu, yl, yu):
    """``dot_general`` operands laid out as ``(batch..., F, 1, K)`` and ``(batch..., 1, G, K)``:
    their elementwise products are the single products, ``(batch..., F, G, K)``; summed
    over ``K`` and reshaped they give ``dot_general``'s ``(batch, lhs free, rhs free)`` output."""
    *bshape, F, G, K = _layout_shape(eqn)
    lhs = lambda t: jnp.transpose(t, _operand_order(eqn, 0)).reshape(*bshape, F, 1, K)  # noqa: E731
    rhs = lambda t: jnp.transpose(t, _operand_order(eqn, 1)).reshape(*bshape, 1, G, K)  # noqa: E731
    return lhs(xl), lhs(xu), rhs(yl), rhs(yu)


def _operand_from_layout(eqn, i, rows):
    """Rows ``(rows, batch..., F or G, K)`` of operand ``i`` in its own shape (the inverse of
    :func:`_product_layout`, a row axis in front)."""
    order, shape = _operand_order(eqn, i), eqn.in_avals[i].shape
    rows = rows.reshape(rows.shape[0], *(shape[d] for d in order))
    return jnp.transpose(rows, [0, *(1 + int(a) for a in np.argsort(order))])


PRODUCT = register_alternative(Product(), P.mul_p, P.dot_general_p, P.conv_general_dilated_p)
