"""Composites fused into one primitive each, so that a dedicated rule bounds them as a whole.

``fuse_composites`` rewrites, in a traced :class:`~jaxlirpa.graph.Graph`:

- softmax (``jax.nn.softmax`` over any axes, or ``e = exp(x - s); e / sum(e)`` with any
  shift ``s`` constant along the summed axes) into ``softmax_p(x)``: softmax is shift
  invariant, so the max that ``jax.nn.softmax`` subtracts is never bounded;
- layer and RMS normalisation (flax ``nn.LayerNorm``'s ``E[x^2] - E[x]^2`` form,
  ``z / sqrt(mean(z^2) + eps)``, ``z * rsqrt(...)``) into ``normalize_p(z, var)`` followed
  by the scale (a ``mul`` by a constant), ``z`` being the centred vector (its centring stays
  linear and exact) and ``var`` the graph's own variance node, kept so that the methods bound
  it from the input;
- ``jax.nn.gelu`` (erf and tanh forms), ``0.5 x (1 + erf(x / sqrt 2))`` and ``x * sigmoid(x)``
  (silu) into ``gelu_p`` / ``silu_p``.

Only composites of a perturbed input are fused; everything else, and every composite the
matchers do not recognise, keeps the primitive-by-primitive path, which stays sound.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa import _compat
from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.graph import Const, Eqn, Graph

softmax_p = _compat.define_primitive("jaxlirpa_softmax", lambda x, *, axes: jax.nn.softmax(x, axis=axes))
"""``softmax(x)`` over ``axes``."""

normalize_p = _compat.define_primitive("jaxlirpa_normalize", lambda z, var, *, axes, eps: z * lax.rsqrt(var + eps))
"""``z / sqrt(var + eps)`` with ``var = mean(z^2 over axes)`` (size 1 on ``axes``): layer norm of
a centred ``z``, or RMS norm. The rule relies on ``var`` being that mean."""

gelu_p = _compat.define_primitive("jaxlirpa_gelu", lambda x, *, approximate: jax.nn.gelu(x, approximate=approximate))
"""``x * Phi(x)`` (``approximate=True``: the tanh form)."""

silu_p = _compat.define_primitive("jaxlirpa_silu", lambda x: x * jax.nn.sigmoid(x))
"""``x * sigmoid(x)``."""

_SQRT_HALF = math.sqrt(0.5)
_TANH_GELU = (math.sqrt(2 / math.pi), 0.044715)


def fuse_composites(graph: Graph) -> None:
    """Replace every recognised composite of a perturbed input by its fused equations, in place
    (the equations it no longer needs are left for the dead-code pass)."""
    producer = graph.producer()
    eqns = []
    for e in graph.eqns:
        fused = _softmax(graph, producer, e) or _gelu(graph, producer, e) or _normalize(graph, producer, e)
        eqns += fused or [e]
        producer.update({v: f for f in fused or () for v in f.outputs})
    graph.eqns = eqns


def _isclose(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _literal(producer, operand, depth: int = 4):
    """The value of ``operand`` when it is computed from literals alone (``jnp.sqrt(2.0)``), else None."""
    if isinstance(operand, Const):
        return np.asarray(operand.value)
    e = producer.get(operand) if depth else None
    if e is None or e.prim.multiple_results:
        return None
    args = [_literal(producer, o, depth - 1) for o in e.inputs]
    if any(a is None for a in args):
        return None
    with jax.ensure_compile_time_eval():
        return np.asarray(e.prim.bind(*args, **e.params))


def _scalar(producer, operand):
    """The value of a scalar computed from literals, else None."""
    value = _literal(producer, operand)
    return float(value) if value is not None and value.ndim == 0 else None


def _made_by(producer, v, *prims):
    e = producer.get(v) if isinstance(v, int) else None
    return e if e is not None and e.prim in prims else None


def _scale_chain(producer, v):
    """``[(v, 1), (base, c), ...]``: ``v = c * base`` for each base met peeling ``neg`` and
    ``mul``/``div`` by scalar literals, innermost last."""
    chain, c = [(v, 1.0)], 1.0
    while True:
        e = _made_by(producer, v, P.neg_p, P.mul_p, P.div_p)
        if e is None:
            return chain
        a, b = (e.inputs[0], None) if e.prim is P.neg_p else e.inputs
        if e.prim is P.neg_p:
            v, c = a, -c
        elif _scalar(producer, b) is not None and _scalar(producer, b) != 0:
            v, c = a, c * _scalar(producer, b) if e.prim is P.mul_p else c / _scalar(producer, b)
        elif e.prim is P.mul_p and _scalar(producer, a) is not None:
            v, c = b, c * _scalar(producer, a)
        else:
            return chain
        chain.append((v, c))


def _scaled(producer, v):
    """``(base, c)`` with ``v = c * base``, peeling every scaling by a scalar literal."""
    return _scale_chain(producer, v)[-1]


def _scale_of(producer, v, x):
    """``c`` when ``v = c * x`` by scalings with literals, else None."""
    return next((c for base, c in _scale_chain(producer, v) if base == x), None)


def _same_value(producer, a, b, depth: int = 12) -> bool:
    """Whether ``a`` and ``b`` are computed alike from the same variables (a composite
    written twice, as in ``exp(x - max(x)) / sum(exp(x - max(x)))``)."""
    if isinstance(a, Const) and isinstance(b, Const):
        return np.shape(a.value) == np.shape(b.value) and bool(np.all(np.asarray(a.value) == np.asarray(b.value)))
    if a == b:
        return True
    ea, eb = (producer.get(v) if isinstance(v, int) else None for v in (a, b))
    if depth == 0 or ea is None or eb is None or ea.prim is not eb.prim or len(ea.inputs) != len(eb.inputs):
        return False
    if ea.outputs.index(a) != eb.outputs.index(b) or repr(ea.params) != repr(eb.params):
        return False
    return all(_same_value(producer, x, y, depth - 1) for x, y in zip(ea.inputs, eb.inputs))


def _shape(graph, operand):
    return tuple(np.shape(operand.value)) if isinstance(operand, Const) else tuple(graph.avals[operand].shape)


def _aval(graph, operand):
    if isinstance(operand, Const):
        return jax.ShapeDtypeStruct(np.shape(operand.value), jnp.result_type(operand.value))
    return graph.avals[operand]


def _constant_along(graph, producer, s, axes, rank) -> bool:
    """Whether ``s`` (broadcast against a rank-``rank`` array) is constant along ``axes``."""
    shape = (1,) * (rank - len(_shape(graph, s))) + _shape(graph, s)
    if all(shape[a] == 1 for a in axes):
        return True
    e = _made_by(producer, s, P.broadcast_in_dim_p, P.stop_gradient_p)
    if e is None:
        return False
    if e.prim is P.stop_gradient_p:
        return _constant_along(graph, producer, e.inputs[0], axes, rank)
    in_shape = _shape(graph, e.inputs[0])
    return all(d not in axes or in_shape[i] == 1 for i, d in enumerate(e.params["broadcast_dimensions"]))


def _sum_over(graph, producer, v, rank):
    """``(t, axes, c)`` when ``v`` is ``c * sum(t, axes)`` broadcast back to rank ``rank``
    (``keepdims``), scaled by literals before or after the broadcast; else None."""
    v, c = _scaled(producer, v)
    b = _made_by(producer, v, P.broadcast_in_dim_p)
    if b is None:
        return None
    inner, c2 = _scaled(producer, b.inputs[0])
    r = _made_by(producer, inner, P.reduce_sum_p)
    if r is None or len(_shape(graph, b.outputs[0])) != rank:
        return None
    axes = tuple(sorted(r.params["axes"]))
    kept = tuple(d for d in range(rank) if d not in axes)
    if tuple(b.params["broadcast_dimensions"]) != kept:
        return None
    return r.inputs[0], axes, c * c2


def _fused(prim, x, graph, e, **params) -> list[Eqn]:
    return [Eqn(prim, (x,), e.outputs, params, (graph.avals[x],), e.out_avals, e.source_info)]


# ----------------------------------------------------------------------------- softmax


def _softmax(graph: Graph, producer, e):
    """``exp(a) / sum(exp(b), axes)`` with ``a`` computed like ``b``; ``a = x - s`` with ``s``
    constant along ``axes`` gives ``softmax(x)`` (the shift cancels)."""
    if e.prim is not P.div_p:
        return None
    top = _made_by(producer, e.inputs[0], P.exp_p)
    rank = len(e.out_avals[0].shape)
    total = _sum_over(graph, producer, e.inputs[1], rank)
    if top is None or total is None or total[2] != 1.0:
        return None
    summed, axes, _ = total
    bottom = _made_by(producer, summed, P.exp_p)
    a = top.inputs[0]
    if bottom is None or not _same_value(producer, a, bottom.inputs[0]):
        return None
    shift = _made_by(producer, a, P.sub_p)
    if shift is not None and _constant_along(graph, producer, shift.inputs[1], axes, rank):
        a = shift.inputs[0]
    if not graph.is_perturbed(a) or _shape(graph, a) != tuple(e.out_avals[0].shape):
        return None
    return _fused(softmax_p, a, graph, e, axes=axes)


# -------------------------------------------------------------------------- gelu, silu


def _gate(producer, g, x):
    """``(kind, m)`` when ``g`` is ``m`` times the gate of ``x``: ``Phi(x)`` for gelu, ``sigmoid(x)`` for silu."""
    g, m = _scaled(producer, g)
    e = producer.get(g) if isinstance(g, int) else None
    if e is None:
        return None
    if e.prim is P.logistic_p and e.inputs[0] == x:
        return "silu", m
    if e.prim is P.erfc_p:  # Phi(x) = erfc(-x / sqrt 2) / 2
        c = _scale_of(producer, e.inputs[0], x)
        return ("erf", 2 * m) if c is not None and _isclose(c, -_SQRT_HALF) else None
    if e.prim is not P.add_p:
        return None
    one, inner = e.inputs if _scalar(producer, e.inputs[0]) == 1.0 else e.inputs[::-1]
    f = _made_by(producer, inner, P.erf_p, P.tanh_p)
    if _scalar(producer, one) != 1.0 or f is None:
        return None
    if f.prim is P.erf_p:  # Phi(x) = (1 + erf(x / sqrt 2)) / 2
        c = _scale_of(producer, f.inputs[0], x)
        return ("erf", 2 * m) if c is not None and _isclose(c, _SQRT_HALF) else None
    base, c = _scaled(producer, f.inputs[0])
    cube = _tanh_gelu_argument(producer, base, x)  # tanh form: (1 + tanh(k (x + a x^3))) / 2
    return ("tanh", 2 * m) if cube is not None and _isclose(c, _TANH_GELU[0]) and _isclose(cube, _TANH_GELU[1]) else None


def _tanh_gelu_argument(producer, v, x):
    """``a`` when ``v = x + a * x ** 3``."""
    e = _made_by(producer, v, P.add_p)
    if e is None or x not in e.inputs:
        return None
    for pw, a in _scale_chain(producer, e.inputs[1] if e.inputs[0] == x else e.inputs[0]):
        p = _made_by(producer, pw, P.integer_pow_p)
        if p is not None and p.inputs[0] == x and p.params["y"] == 3:
            return a
    return None


def _gelu(graph: Graph, producer, e):
    """``(c1 x) * (c2 gate(x))`` with ``c1 c2 m = 1``: gelu (erf or tanh form) or silu."""
    if e.prim is not P.mul_p:
        return None
    for left, right in (e.inputs, e.inputs[::-1]):
        x, c, found = next(((x, c, _gate(producer, right, x)) for x, c in _scale_chain(producer, left)
                            if graph.is_perturbed(x) and _gate(producer, right, x)), (None, None, None))
        if found is None:
            continue
        kind, m = found
        if not _isclose(c * m, 1.0) or _shape(graph, x) != tuple(e.out_avals[0].shape):
            continue
        if kind == "silu":
            return _fused(silu_p, x, graph, e)
        return _fused(gelu_p, x, graph, e, approximate=kind == "tanh")
    return None


# ---------------------------------------------------------------------- normalisation


def _normalize(graph: Graph, producer, e):
    """``z * (rsqrt(var + eps) [* scale])`` or ``z / sqrt(var + eps)`` with ``var`` the mean of
    ``z^2`` over some axes (or ``E[x^2] - E[x]^2`` of ``z = x - E[x]``)."""
    rank = len(e.out_avals[0].shape)
    candidates = []
    if e.prim is P.mul_p:
        candidates = [(e.inputs[0], e.inputs[1]), (e.inputs[1], e.inputs[0])]
    elif e.prim is P.div_p:
        candidates = [(e.inputs[0], None)]
    for z, factor in candidates:
        if not graph.is_perturbed(z) or _shape(graph, z) != tuple(e.out_avals[0].shape):
            continue
        if factor is None:
            root, scale = _made_by(producer, e.inputs[1], P.sqrt_p), None
        else:
            root, scale = _rsqrt_times_constant(graph, producer, factor)
        shifted = _made_by(producer, root.inputs[0], P.add_p) if root is not None else None
        if shifted is None:
            continue
        var, eps = shifted.inputs if _scalar(producer, shifted.inputs[1]) is not None else shifted.inputs[::-1]
        axes = _mean_square_axes(graph, producer, var, z, rank)
        if axes is None or _scalar(producer, eps) is None or not _scalar(producer, eps) > 0:
            continue
        kept = tuple(1 if d in axes else n for d, n in enumerate(_shape(graph, z)))
        if _shape(graph, var) != kept:  # the variance broadcast back over the axes: not fused
            continue
        params, in_avals = dict(axes=axes, eps=_scalar(producer, eps)), (graph.avals[z], graph.avals[var])
        if scale is None:
            return [Eqn(normalize_p, (z, var), e.outputs, params, in_avals, e.out_avals, e.source_info)]
        y = max(graph.avals) + 1
        graph.avals[y] = graph.avals[z]
        return [Eqn(normalize_p, (z, var), (y,), params, in_avals, (graph.avals[y],), e.source_info),
                Eqn(P.mul_p, (y, scale), e.outputs, dict(e.params), (graph.avals[y], _aval(graph, scale)), e.out_avals,
                    e.source_info)]
    return None


def _rsqrt_times_constant(graph, producer, v):
    """``(rsqrt equation, c)`` for ``v = rsqrt(.) * c`` with ``c`` unperturbed (None: no factor)."""
    r = _made_by(producer, v, P.rsqrt_p)
    if r is not None:
        return r, None
    m = _made_by(producer, v, P.mul_p)
    if m is None:
        return None, None
    for a, c in (m.inputs, m.inputs[::-1]):
        r = _made_by(producer, a, P.rsqrt_p)
        if r is not None and not graph.is_perturbed(c):
            return r, c
    return None, None


def _mean_square_axes(graph, producer, var, z, rank):
    """The axes of ``var = mean(z^2, axes)`` (kept as size-1 axes), or of flax's
    ``max(0, E[x^2] - E[x]^2)`` with ``z = x - E[x]``; else None."""
    total = _sum_over(graph, producer, var, rank)
    if total is None:
        return _flax_variance_axes(graph, producer, var, z, rank)
    squared, axes, c = total
    size = math.prod(_shape(graph, z)[a] for a in axes)
    square_of_z = _is_square(producer, squared, z) or _is_square(producer, squared, _minus_zero(producer, z))
    return axes if square_of_z and _isclose(c * size, 1.0) else None


def _minus_zero(producer, z):
    """``x`` when ``z = x - 0`` (flax's ``RMSNorm`` subtracts a zero mean), else ``z``."""
    e = _made_by(producer, z, P.sub_p)
    zero = _literal(producer, e.inputs[1]) if e is not None else None
    return e.inputs[0] if zero is not None and not zero.any() else z


def _flax_variance_axes(graph, producer, var, z, rank):
    b = _made_by(producer, var, P.broadcast_in_dim_p)
    centred = _made_by(producer, z, P.sub_p)
    if b is None or centred is None:
        return None
    v = b.inputs[0]
    clipped = _made_by(producer, v, P.max_p)
    if clipped is not None and 0.0 in [_scalar(producer, o) for o in clipped.inputs]:
        v = clipped.inputs[1] if _scalar(producer, clipped.inputs[0]) == 0.0 else clipped.inputs[0]
    difference = _made_by(producer, v, P.sub_p)
    centre = _made_by(producer, centred.inputs[1], P.broadcast_in_dim_p)
    if difference is None or centre is None:
        return None
    x = centred.inputs[0]
    mean_square = _mean_of(graph, producer, difference.inputs[0])
    squared_mean = _made_by(producer, difference.inputs[1], P.square_p, P.integer_pow_p)
    if mean_square is None or squared_mean is None or not _is_square(producer, difference.inputs[1], squared_mean.inputs[0]):
        return None
    squares, axes = mean_square
    kept = tuple(d for d in range(rank) if d not in axes)
    ok = (_is_square(producer, squares, x) and _mean_of(graph, producer, squared_mean.inputs[0]) == (x, axes)
          and _same_value(producer, centre.inputs[0], squared_mean.inputs[0])
          and tuple(b.params["broadcast_dimensions"]) == kept == tuple(centre.params["broadcast_dimensions"]))
    return axes if ok else None


def _mean_of(graph, producer, v):
    """``(t, axes)`` when ``v = sum(t, axes) / size`` (not broadcast), else None."""
    v, c = _scaled(producer, v)
    r = _made_by(producer, v, P.reduce_sum_p)
    if r is None:
        return None
    axes = tuple(sorted(r.params["axes"]))
    size = math.prod(_shape(graph, r.inputs[0])[a] for a in axes)
    return (r.inputs[0], axes) if _isclose(c * size, 1.0) else None


def _is_square(producer, v, z) -> bool:
    e = _made_by(producer, v, P.square_p, P.integer_pow_p, P.mul_p)
    if e is None:
        return False
    if e.prim is P.mul_p:
        return e.inputs[0] == e.inputs[1] == z
    return e.inputs[0] == z and (e.prim is P.square_p or e.params["y"] == 2)
