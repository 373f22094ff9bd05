"""Convolutions of a traced graph rewritten channels-last, their layout changes cancelled.

A model in torch's layout (NCHW, as ONNX files and auto_LiRPA's models are) makes every
pull of CROWN's rows through a convolution transpose them to the layout XLA:CPU convolves
fast (NHWC) and back (``rules.linear.channels_last_conv``): on CNN-B those transposes, of
hundreds of rows per step, cost a quarter of alpha-CROWN's time. Here each such convolution
becomes ``transpose -> channels-last convolution -> transpose`` in the graph itself, and
every transpose of a perturbed value is moved past the elementwise steps after it (a bias,
a ReLU) until it meets the next convolution's, with which it cancels. The bound methods
then see channels-last convolutions joined by elementwise steps, as in a flax model: the
same function, so the same bounds, with a layout change left only where the model's own
layout shows (its input, a flatten).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.graph import Const, Eqn, Graph, _Builder, _expand, _mark_perturbed, leaky_relu_p
from jaxlirpa.rules.linear import channels_last_conv, channels_last_numbers

# Pointwise in every operand (size-1 axes broadcast): a transpose commutes with them.
_POINTWISE = {P.add_p, P.sub_p, P.mul_p, P.div_p, P.max_p, P.min_p, P.neg_p, P.abs_p, P.exp_p, P.log_p,
              P.tanh_p, P.logistic_p, P.sin_p, P.cos_p, P.sqrt_p, P.rsqrt_p, P.integer_pow_p, P.erf_p,
              P.convert_element_type_p, P.copy_p, P.stop_gradient_p, leaky_relu_p}


def channels_last(graph: Graph, branch_of: dict[int, int]) -> None:
    """Rewrite the graph's convolutions of a perturbed input by a constant kernel channels-last,
    and cancel the transposes this puts between them (in place; dead equations stay for the
    caller's dead-code pass)."""
    eqns = []
    for e in graph.eqns:
        p = e.params
        if (e.prim is P.conv_general_dilated_p and graph.is_perturbed(e.inputs[0])
                and not graph.is_perturbed(e.inputs[1])
                and tuple(p["dimension_numbers"]) != tuple(channels_last_numbers(len(e.in_avals[0].shape) - 2))):
            eqns += _expand(graph, e, lambda x, w, p=p: channels_last_conv(x, w, **p), branch_of)
        else:
            eqns.append(e)
    graph.eqns = eqns
    _mark_perturbed(graph)
    _sink_transposes(graph, branch_of)


def _sink_transposes(graph: Graph, branch_of: dict[int, int]) -> None:
    """Move each transpose of a perturbed value past the pointwise equations that read it,
    composing it with the transposes it meets (dropping the pairs that cancel). A value made
    in a branch chosen at run time (``branch_of``) stays marked so in its new layout."""
    moved: dict[int, tuple[int, tuple[int, ...]]] = {}  # v == transpose(a, perm): v -> (a, perm)
    rename: dict[int, int] = {}
    builder = _Builder(graph.avals)
    eqns = []
    for e in graph.eqns:
        e = dataclasses.replace(e, inputs=tuple(rename.get(v, v) if isinstance(v, int) else v for v in e.inputs))
        source = e.inputs[0] if e.inputs and isinstance(e.inputs[0], int) else None
        if e.prim is P.transpose_p and graph.is_perturbed(source):
            perm = tuple(e.params["permutation"])
            if source in moved:  # a transpose of a transpose: one, or none
                source, first = moved[source]
                perm = tuple(first[i] for i in perm)
                if perm == tuple(range(len(perm))):
                    rename[e.outputs[0]] = source
                    continue
                e = dataclasses.replace(e, inputs=(source,), params=e.params | {"permutation": perm},
                                        in_avals=(graph.avals[source],))
            moved[e.outputs[0]] = (source, perm)
        elif e.prim in _POINTWISE:
            sunk = _sunk(graph, builder, e, moved)
            if sunk is not None:
                builder.eqns, glue = [], builder.eqns
                eqns += glue + sunk[0]
                moved[e.outputs[0]] = sunk[1]
                if e.outputs[0] in branch_of:
                    branch_of[sunk[1][0]] = branch_of[e.outputs[0]]
                continue
        eqns.append(e)
    graph.eqns = eqns
    graph.outputs = [rename.get(v, v) if isinstance(v, int) else v for v in graph.outputs]


def _sunk(graph: Graph, builder: _Builder, e: Eqn, moved):
    """``e`` on the untransposed operands, then the transpose: ``([equations], (its result,
    perm))``, or None when its perturbed operands are not all transposed alike."""
    perturbed = [v for v in e.inputs if isinstance(v, int) and graph.is_perturbed(v)]
    perms = {moved[v][1] if v in moved else None for v in perturbed}
    if not perturbed or len(perms) != 1 or None in perms:
        return None
    perm = perms.pop()
    inverse = tuple(int(i) for i in np.argsort(perm))
    rank = len(perm)
    inputs, in_avals = [], []
    for v, aval in zip(e.inputs, e.in_avals):
        rank_v = np.ndim(v.value) if isinstance(v, Const) else len(graph.avals[v].shape)
        if isinstance(v, int) and v in moved:
            v = moved[v][0]
        elif rank_v == 0:
            pass
        elif rank_v != rank:
            return None
        elif isinstance(v, Const):
            v = Const(np.transpose(v.value, inverse))
        else:
            v = builder.call(lambda t: lax.transpose(t, inverse), [v], e.source_info)[0]
        inputs.append(v)
        in_avals.append(graph.avals[v] if isinstance(v, int) else aval.update(shape=np.shape(v.value)))
    out = e.out_avals[0]
    inner = out.update(shape=tuple(out.shape[i] for i in inverse))
    result = builder.fresh(inner)
    graph.perturbed.add(result)
    body = dataclasses.replace(e, inputs=tuple(inputs), outputs=(result,), in_avals=tuple(in_avals),
                               out_avals=(inner,))
    back = Eqn(P.transpose_p, (result,), e.outputs, {"permutation": perm}, (inner,), (out,), e.source_info, e.callers)
    return [body, back], (result, perm)
