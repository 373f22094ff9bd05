"""Patches: CROWN coefficients of a convolution's output neurons, kept to their receptive fields.

Intermediate bounds of a convolution's output start from one identity row per output
neuron. As dense arrays ``(rows, *shape)`` those rows are mostly zero: a neuron of a conv
output depends on a window of its input only. Here they are :class:`Patches` (auto_LiRPA's
"patches" mode): ``A`` of shape ``(O, *Y, C, *K)`` whose row ``(o, *y)`` has coefficient
``A[o, *y, c, *k]`` on the element at ``(c, *(y * stride - offset + k))`` of the variable,
seen through a static index map as a ``(C, *S)`` array; positions outside it are ignored.

Patches pass through elementwise relaxations (times the unfolded lines), convolutions
(kernels composed by a transposed convolution), diagonal affine maps (bias, scaling), zero
padding and re-layouts (reshape, transpose, ...), and are concretised against the unfolded
input set. :func:`pull` returns None anywhere else, and CROWN continues with the dense form.

One array of patches pulled through a ReLU gives two (lower and upper bound) that differ
only at its unstable neurons, a few of each window's entries. The upper side then keeps
that difference on those entries (:class:`WindowDiff`), and the next convolution composes
the lower side and the difference instead of both sides, where an eighth of each window
holds it (else both sides in full): on CNN-B, a window-matrix product of 6272 x 512 rows by
363 columns and one of 6272 x 64 instead of two of the first.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import ElementwiseRule, Perturbed, Relaxation, through_lines
from jaxlirpa.rules.linear import LinearRule, channels_last_conv

_DIAGONAL = {P.add_p, P.sub_p, P.neg_p, P.mul_p, P.div_p}
_RELABEL = {P.reshape_p, P.transpose_p, P.squeeze_p, P.broadcast_in_dim_p, P.rev_p, P.pad_p}
_UNCHANGED = {P.copy_p, P.stop_gradient_p, P.convert_element_type_p}
_MATRIX_LIMIT = 2**22  # entries of the largest window matrix a convolution is composed with
_DIFF_MIN_ENTRIES = 2**20  # patch entries (rows x window) from which a ReLU keeps a WindowDiff
_DIFF_SHARE = 8  # a WindowDiff keeps this fraction (1 / _DIFF_SHARE) of each window's entries


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """Where the entries of patches sit (static, but for ``selected``). Canonical row
    ``(o, *y)`` is dense row ``rows[o, *y]``; entry ``(c, *k)`` of it is the variable's flat
    element ``index[c, *(y * stride - offset + k)]``, or nothing outside ``index``.

    ``selected`` (traced, shape ``(R,)``): only these canonical rows (flat over ``(O, *Y)``),
    in this order, as patches ``(R, C, *K)``: alpha-CROWN re-bounds just a convolution's
    unstable neurons (auto_LiRPA's ``unstable_idx``)."""

    index: np.ndarray  # (C, *S)
    rows: np.ndarray  # (O, *Y)
    stride: tuple[int, ...]
    offset: tuple[int, ...]
    kernel: tuple[int, ...]
    selected: jax.Array | None = None

    @property
    def lead(self) -> int:
        """Leading row axes of the patches: ``O, *Y``, or ``R`` when rows are selected."""
        return 1 if self.selected is not None else 1 + len(self.kernel)

    def per_row(self, t):
        """A ``(*Y, ...)`` array (per position) at each selected row's position: ``(R, ...)``."""
        if self.selected is None:
            return t
        n = len(self.kernel)
        flat = jnp.reshape(t, (-1, *np.shape(t)[n:]))
        return jnp.take(flat, self.selected % flat.shape[0], axis=0)

    def positions(self, d: int) -> np.ndarray:
        """``(Y_d, K_d)``: the coordinate along spatial axis ``d`` of each entry."""
        y, k = np.arange(self.rows.shape[1 + d]), np.arange(self.kernel[d])
        return y[:, None] * self.stride[d] - self.offset[d] + k[None, :]

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """``(*Y, C, *K)``: each entry's flat element of the variable, and whether it exists
        (per position; :meth:`per_row` takes the selected rows' ones)."""
        n, (C, *S) = len(self.kernel), self.index.shape
        coords, inside = [], np.ones((), bool)
        for d in range(n):
            h = self.positions(d)
            shape = [1] * (2 * n + 1)
            shape[d], shape[n + 1 + d] = h.shape
            coords.append(np.clip(h, 0, S[d] - 1).reshape(shape))
            inside = inside & ((h >= 0) & (h < S[d])).reshape(shape)
        flat = self.index[(np.arange(C).reshape([1] * n + [C] + [1] * n), *coords)]
        return flat, np.broadcast_to(inside, flat.shape)

    def unfold(self, x: jax.Array) -> jax.Array:
        """A variable-shaped ``x`` as ``(*Y, C, *K)`` (``(R, C, *K)`` for selected rows): its
        value at every entry, 0 outside."""
        flat, inside = self.window()
        return self.per_row(jnp.where(inside, jnp.reshape(x, -1)[flat], 0))

    def inside(self):
        """Whether each entry exists, per position (or per selected row)."""
        return self.per_row(self.window()[1])

    def row_sums(self, terms: jax.Array) -> jax.Array:
        """``(O, *Y, C, *K)`` terms summed per row, in dense row order (selected: in order)."""
        sums = jnp.sum(terms, tuple(range(self.lead, terms.ndim)))
        return sums if self.selected is not None else self.dense_rows(jnp.broadcast_to(sums, self.rows.shape))

    def dense_rows(self, t: jax.Array) -> jax.Array:
        """``(O, *Y, ...)`` per canonical row as ``(rows, ...)`` in dense row order."""
        if self.selected is not None:
            return t
        flat = t.reshape(self.rows.size, *t.shape[1 + len(self.kernel):])
        return flat[np.argsort(self.rows.reshape(-1))]


@dataclasses.dataclass(frozen=True, eq=False)
class WindowDiff:
    """Patches equal to ``base`` except at the window entries ``entries`` (``(P, k)``, flat
    over ``(C, *K)``, per position flat over ``Y``), where they add ``values`` (``(O, P, k)``).
    That holds where ``fits`` (a traced bool, the same for every example of a batch): no
    position had more than ``k`` entries that differ. ``rebuild()`` gives the patches' array
    (traced where it is called, so that it runs only on the branch that needs it)."""

    base: "Patches"
    entries: jax.Array
    values: jax.Array
    fits: jax.Array
    rebuild: Callable[[], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Patches:
    """Coefficients ``A`` of shape ``(O, *Y, C, *K)`` placed by ``frame`` (a ``Y`` axis of
    size 1: the same patch at every position along it); ``diff``, when known, says that
    they differ from other patches at a few entries only (kept by rules that pass the
    patches on unchanged, dropped by any rule that makes new ones)."""

    A: jax.Array
    frame: Frame
    diff: WindowDiff | None = None

    def dot(self, x: jax.Array) -> jax.Array:
        """``<row, x>`` for every row (dense order) and a variable-shaped ``x``."""
        return self.frame.row_sums(self.A * self.frame.unfold(x))

    def dense(self, shape) -> jax.Array:
        """The same rows as a dense ``(rows, *shape)`` array."""
        f, n = self.frame, len(self.frame.kernel)
        if f.selected is not None:  # each row's entries added at its own window
            flat, inside = map(f.per_row, f.window())
            R = self.A.shape[0]
            D = jnp.zeros((R, int(np.prod(shape))), self.A.dtype)
            D = D.at[jnp.arange(R)[:, None], flat.reshape(R, -1)].add(jnp.where(inside, self.A, 0).reshape(R, -1))
            return D.reshape(R, *shape)
        D, axes = self.A, list(range(2 * n + 2))  # labels: o, y_1..y_n, c, k_1..k_n; s_d = 2n + 2 + d
        for d in range(n):
            onehot = (f.positions(d)[:, :, None] == np.arange(f.index.shape[1 + d])).astype(D.dtype)  # (Y_d, K_d, S_d)
            if D.shape[axes.index(1 + d)] == 1:  # the same patch at every position: a plain product
                D = jnp.squeeze(D, axes.index(1 + d))
                axes.remove(1 + d)
            out = [0, *range(1, n + 1), n + 1] + [2 * n + 2 + e if e <= d else n + 2 + e for e in range(n)]
            D = jnp.einsum(D, axes, onehot, [1 + d, n + 2 + d, 2 * n + 2 + d], out)
            axes = out
        D = D.reshape(f.rows.size, -1)[:, np.argsort(f.index.reshape(-1))]
        return f.dense_rows(D.reshape(f.rows.shape + D.shape[1:])).reshape(-1, *shape)

    def concretize(self, region, sign: int) -> jax.Array:
        """``region.concretize`` of the dense rows, one window of the input at a time
        (a box: each entry against the box unfolded, as one elementwise pass; XLA:CPU
        transposed the rows to map over the windows)."""
        f, n = self.frame, len(self.frame.kernel)
        if region.p == np.inf:
            mid, rad = f.unfold((region.hi + region.lo) / 2), f.unfold((region.hi - region.lo) / 2)
            return f.row_sums(self.A * mid + sign * jnp.abs(self.A) * rad)
        per_window = lambda x: f.unfold(x).reshape(-1, *f.index.shape[:1], *f.kernel)
        local = dataclasses.replace(region, **{k: per_window(getattr(region, k)) for k in ("center", "eps", "lo", "hi")})
        if f.selected is not None:  # one window per row
            return jax.vmap(lambda a, r: r.concretize(a[None], sign)[0])(self.A, local)
        A = jnp.broadcast_to(self.A, f.rows.shape + self.A.shape[1 + n:])
        A = A.reshape(A.shape[0], -1, *A.shape[1 + n:])
        values = jax.vmap(lambda a, r: r.concretize(a, sign), in_axes=(1, 0))(A, local)  # (windows, O)
        return f.dense_rows(values.T.reshape(f.rows.shape))


def _canonical(shape, spec) -> np.ndarray:
    """Flat element indices of a one-example conv operand as ``(C, *S)`` (``spec``: its dimension numbers)."""
    return np.transpose(np.arange(int(np.prod(shape))).reshape(shape), spec)[0]


def plain_conv(ctx, eqn, ops) -> bool:
    """A convolution of the perturbed example (batch 1) with a constant kernel, no input dilation."""
    p = eqn.params
    return (eqn.prim is P.conv_general_dilated_p and isinstance(ops[0], Perturbed)
            and not isinstance(ops[1], Perturbed) and isinstance(ctx.rule(eqn), LinearRule)
            and p["batch_group_count"] == 1 and all(d == 1 for d in p["lhs_dilation"])
            and eqn.in_avals[0].shape[p["dimension_numbers"].lhs_spec[0]] == 1)


def _composed_size(kernel, eqn, W) -> tuple[int, ...]:
    """The window on a convolution's input read by a window ``kernel`` of its output."""
    p = eqn.params
    k0 = [W.shape[a] for a in p["dimension_numbers"].rhs_spec[2:]]
    return tuple((k1 - 1) * s + (k - 1) * d + 1 for k1, k, s, d in zip(kernel, k0, p["window_strides"], p["rhs_dilation"]))


def _window_matrix(eqn, W, kernel) -> jax.Array:
    """``(C1 * prod(kernel), C0, *K')``: each entry of a window ``kernel`` on a convolution's
    output as coefficients on the window of its input that it reads."""
    p = eqn.params
    n, groups = len(kernel), p["feature_group_count"]
    w = jnp.transpose(W, p["dimension_numbers"].rhs_spec)  # (C1, C0 / groups, *K0)
    out_c, in_c = w.shape[0], w.shape[1] * groups
    member = np.arange(out_c)[:, None] // (out_c // groups) == np.arange(groups)[None, :]  # (C1, groups)
    w = (w[:, None] * member.reshape(out_c, groups, *[1] * (n + 1)).astype(w.dtype)).reshape(out_c, in_c, *w.shape[2:])
    size = _composed_size(kernel, eqn, W)
    operands = [w, [0, 1, *range(2, 2 + n)]]  # labels: C1, C0, K0_d = 2 + d, K1_d = 2 + n + d, K'_d = 2 + 2n + d
    for d in range(n):
        k1, k0 = np.arange(kernel[d])[:, None, None], np.arange(w.shape[2 + d])[None, :, None]
        lands = np.arange(size[d])[None, None, :] == p["window_strides"][d] * k1 + p["rhs_dilation"][d] * k0
        operands += [lands.astype(w.dtype), [2 + n + d, 2 + d, 2 + 2 * n + d]]
    M = jnp.einsum(*operands, [0, *range(2 + n, 2 + 2 * n), 1, *range(2 + 2 * n, 2 + 3 * n)])
    return M.reshape(-1, in_c, *size)


def _by_matrix(eqn, W, window) -> bool:
    """Whether patches with windows ``(C1, *K1)`` compose through a convolution as a product
    with its window matrix (:func:`_window_matrix`), which is then small enough."""
    p = eqn.params
    in_c = W.shape[p["dimension_numbers"].rhs_spec[1]] * p["feature_group_count"]
    return np.prod(window) * in_c * np.prod(_composed_size(window[1:], eqn, W)) <= _MATRIX_LIMIT


def _compose(A, eqn, W) -> jax.Array:
    """Patches ``(B, C1, *K1)`` over a convolution's output as patches ``(B, C0, *K')`` over
    its input: one matrix product with :func:`_window_matrix` while that matrix is small
    (XLA:CPU runs the transposed convolution several times slower per flop, on top of
    input dilation's zeros), else the transpose of the same convolution, unpadded."""
    p = eqn.params
    n = A.ndim - 2
    kernel = jnp.transpose(W, p["dimension_numbers"].rhs_spec)  # (C1, C0 / groups, *K0)
    in_c, size = kernel.shape[1] * p["feature_group_count"], _composed_size(A.shape[2:], eqn, W)
    if _by_matrix(eqn, W, A.shape[1:]):
        M = _window_matrix(eqn, W, A.shape[2:])
        return (A.reshape(A.shape[0], -1) @ M.reshape(M.shape[0], -1)).reshape(A.shape[0], in_c, *size)
    dims = lax.ConvDimensionNumbers(*[tuple(range(n + 2))] * 3)
    conv = lambda z: channels_last_conv(
        z, kernel, window_strides=p["window_strides"], padding=((0, 0),) * n, lhs_dilation=(1,) * n,
        rhs_dilation=p["rhs_dilation"], dimension_numbers=dims, feature_group_count=p["feature_group_count"],
        batch_group_count=1, precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    (out,) = jax.linear_transpose(conv, jax.ShapeDtypeStruct((A.shape[0], in_c, *size), A.dtype))(A)
    return out


def start(ctx, eqn, ops, selected: jax.Array | None = None):
    """The identity rows of a convolution's output pulled onto its input, as patches:
    ``(per-operand (lA, uA) or None, lower bias, upper bias)``, or None. ``selected``:
    only the rows of these flat output elements (in this order)."""
    if not plain_conv(ctx, eqn, ops):
        return None
    p = eqn.params
    lhs_spec, _, out_spec = p["dimension_numbers"]
    rows = _canonical(eqn.out_avals[0].shape, out_spec)
    O, n = rows.shape[0], rows.ndim - 1
    kernel = _window_matrix(eqn, ops[1], (1,) * n)  # (O, C, *K): every output position has the same patch
    if selected is None:
        A = kernel.reshape(O, *[1] * n, *kernel.shape[1:])  # broadcast over positions where used
    else:
        selected = jnp.asarray(np.argsort(rows.reshape(-1)))[selected]  # flat element -> canonical row
        A = kernel[selected // (rows.size // O)]
    frame = Frame(_canonical(eqn.in_avals[0].shape, lhs_spec), rows, tuple(p["window_strides"]),
                  tuple(lo for lo, _ in p["padding"]), kernel.shape[2:], selected)
    patches = Patches(A, frame)
    return [(patches, patches), None], 0.0, 0.0


def _through_conv(eqn, W, frame: Frame):
    """The frame on a convolution's input and the map of coefficients onto it, or None when
    the patches do not sit on the convolution's output as it lays it out."""
    lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
    if not np.array_equal(frame.index, _canonical(eqn.out_avals[0].shape, out_spec)):
        return None
    inside, lead = frame.inside(), frame.lead
    stride, low = eqn.params["window_strides"], [lo for lo, _ in eqn.params["padding"]]
    new = Frame(_canonical(eqn.in_avals[0].shape, lhs_spec), frame.rows,
                tuple(s * s0 for s, s0 in zip(frame.stride, stride)),
                tuple(o * s0 + lo for o, s0, lo in zip(frame.offset, stride, low)),
                _composed_size(frame.kernel, eqn, W), frame.selected)

    def composed(A):  # entries outside the output would land inside the input: zero them first
        A = jnp.where(inside, A, 0)
        out = _compose(A.reshape(-1, *A.shape[lead:]), eqn, W)
        return out.reshape(*A.shape[:lead], *out.shape[1:])

    return new, composed


def _relabelled(eqn, frame: Frame) -> Frame | None:
    """The frame on the operand of a re-layout (reshape, transpose, ...) or of a zero-free
    spatial ``pad``, found by applying the primitive to the operand's element indices;
    None where the result is not the operand's elements in a shifted window."""
    shape = eqn.in_avals[0].shape
    size = int(np.prod(shape))
    with jax.ensure_compile_time_eval():
        iota = np.arange(size, dtype=np.int32).reshape(shape)
        moved = (lax.pad(iota, np.int32(-1), eqn.params["padding_config"]) if eqn.prim is P.pad_p
                 else eqn.prim.bind(iota, **eqn.params))
    source = np.asarray(moved).reshape(-1)[frame.index]  # (C, *S): the operand's element there, or -1
    present, window = source >= 0, [slice(None)]
    for d in range(1, source.ndim):
        along = present.any(axis=tuple(a for a in range(source.ndim) if a != d))
        window.append(slice(int(np.argmax(along)), int(np.argmax(along)) + int(along.sum())))
    index = source[tuple(window)]
    if index.size != size or present.sum() != size or not np.array_equal(np.sort(index.reshape(-1)), np.arange(size)):
        return None
    offset = tuple(o + w.start for o, w in zip(frame.offset, window[1:]))
    return dataclasses.replace(frame, index=index, offset=offset)


def _nonzero(value) -> bool:
    return isinstance(value, jax.core.Tracer) or bool(np.any(np.asarray(value)))


def _map(pl, pu, fn, frame):
    """``fn`` on the coefficients of both bounds (once when they are the same patches)."""
    if pl is pu:
        both = Patches(fn(pl.A), frame)
        return both, both
    return tuple(None if q is None else Patches(fn(q.A), frame) for q in (pl, pu))


def _optimised_lines(rule, eqn, ops, frame: Frame, fixed: Relaxation, slope) -> Relaxation:
    """The lines of a ``lower_line`` rule in the window layout at slopes ``slope`` of shape
    ``(O, *Y, C, *K)`` (or ``(R, C, *K)``): one per patch entry, alpha-CROWN's free parameters for patches
    (a slope per row and neuron of the window it reads, not per row and every neuron);
    ``fixed``: CROWN's lines unfolded, whose upper line stays."""
    x, params = rule.split(eqn, ops)
    shape, inside = eqn.out_avals[0].shape, frame.inside()
    unfold = lambda t: frame.unfold(jnp.broadcast_to(t, shape))  # noqa: E731
    lw, lb = rule.lower_line(*map(unfold, x.interval), *[unfold(p) if jnp.ndim(p) else p for p in params], slope=slope)
    return Relaxation(jnp.where(inside, lw, 0), jnp.where(inside, lb, 0), fixed.uw, fixed.ub)


def _bias(q, x):
    return 0.0 if q is None else q.dot(x)


def _with_diff(ctx, A, lines: Relaxation, lower: Patches, upper: jax.Array) -> Patches:
    """The upper side's patches ``upper`` (``A`` through ``lines``) with a :class:`WindowDiff`
    on ``lower``: at each position, the window entries whose two lines differ (a ReLU's
    unstable neurons), at most an eighth of the window (``_DIFF_SHARE``), and whether that
    held at every position of every example of the batch."""
    frame = lower.frame
    window, P = (frame.index.shape[0], *frame.kernel), int(np.prod(frame.rows.shape[1:]))
    size = int(np.prod(window))
    k = max(1, size // _DIFF_SHARE)
    moved = jnp.broadcast_to(lines.uw != lines.lw, (*frame.rows.shape[1:], *window)).reshape(P, size)
    entries = lax.top_k(moved.astype(jnp.float32), k)[1]  # the moved entries first
    most = jnp.max(jnp.sum(moved, axis=1))
    most = most if ctx.batch_axis is None else lax.pmax(most, ctx.batch_axis)
    At = jnp.take_along_axis(jnp.broadcast_to(A, frame.rows.shape + window).reshape(-1, P, size), entries[None], axis=2)
    pick = lambda t: jnp.take_along_axis(t.reshape(P, size), entries, axis=1)  # noqa: E731
    picked = Relaxation(pick(lines.lw), 0.0, pick(lines.uw), 0.0)
    values = through_lines(At, picked, True)[0] - through_lines(At, picked, False)[0]
    diff = WindowDiff(lower, entries, values, most <= k, lambda: through_lines(A, lines, True)[0])
    return Patches(upper, frame, diff)


def _diff_worth_keeping(ctx, pl, pu, lines, frame: Frame) -> bool:
    """Whether one array of patches (``pl is pu``) pulled through the same lines on both
    sides is large enough to keep the upper side as a :class:`WindowDiff`; only inside a
    batch whose examples can agree on it (``ctx.batch_axis``; under a vmap without one,
    ``lax.cond`` would run both of the next convolution's branches)."""
    return (pl is pu and lines[0] is lines[1] and frame.selected is None and ctx.batch_axis is not None
            and frame.rows.size * frame.index.shape[0] * np.prod(frame.kernel) >= _DIFF_MIN_ENTRIES)


def _compose_sides(eqn, W, lower: Patches, diff: WindowDiff, composed, new: Frame):
    """Both sides through a convolution when the upper one is ``lower`` plus ``diff``: the
    lower side composed as usual, the upper one as that plus the difference composed on its
    entries alone where ``diff.fits``, else composed in full."""
    low = composed(lower.A)
    M = _window_matrix(eqn, W, lower.frame.kernel)
    M = M.reshape(M.shape[0], -1)  # (C1 * prod(K1), C0 * prod(K'))

    def on_entries():
        return low + jnp.einsum("opk,pkz->opz", diff.values, M[diff.entries]).reshape(low.shape)

    up = lax.cond(diff.fits, on_entries, lambda: composed(diff.rebuild()))
    return Patches(low, new), Patches(up, new)


def pull(ctx, eqn, ops, pl: Patches | None, pu: Patches | None, target: int):
    """Patches on ``eqn``'s output pulled onto its one perturbed operand, in
    :meth:`Rule.backward`'s format, or None where the patches form does not apply.
    ``target``: the variable whose rows these are (it keys alpha-CROWN's slopes)."""
    perturbed = [i for i, o in enumerate(ops) if isinstance(o, Perturbed)]
    if len(perturbed) != 1:
        return None
    i, rule, frame = perturbed[0], ctx.rule(eqn), (pl or pu).frame
    same_shape = tuple(eqn.in_avals[i].shape) == tuple(eqn.out_avals[0].shape)
    grads = [None] * len(ops)
    if isinstance(rule, ElementwiseRule) and same_shape:
        if type(rule).backward is not ElementwiseRule.backward:
            return None  # a rule with its own backward: the dense form
        lines = Relaxation(*map(frame.unfold, rule._relaxation(eqn, ops)))
        lines = (lines, lines)
        if ctx.slopes is not None and rule.optimizable:
            if not hasattr(rule, "lower_line"):
                return None  # tangent points (S-shaped, convex functions): the dense form
            alpha = ctx.slopes.get(ctx.position[eqn], target, rule, eqn, ops, frame.rows.shape[0], frame)
            if alpha is not None:
                lines = tuple(_optimised_lines(rule, eqn, ops, frame, lines[0], a) for a in alpha)
        sides = [None if q is None else through_lines(q.A, r, upper)
                 for q, r, upper in ((pl, lines[0], False), (pu, lines[1], True))]
        grads[i] = tuple(None if s is None else Patches(s[0], frame) for s in sides)
        if _diff_worth_keeping(ctx, pl, pu, lines, frame):
            grads[i] = (grads[i][0], _with_diff(ctx, pl.A, lines[1], grads[i][0], sides[1][0]))
        lb, ub = (0.0 if s is None else frame.row_sums(s[1]) for s in sides)
        return grads, lb, ub
    if not isinstance(rule, LinearRule):
        return None
    if plain_conv(ctx, eqn, ops):
        found = _through_conv(eqn, ops[1], frame)
        if found is None:
            return None
        diff = None if pu is None else pu.diff
        if diff is not None and diff.base is pl and _by_matrix(eqn, ops[1], pl.A.shape[frame.lead:]):
            grads[i] = _compose_sides(eqn, ops[1], pl, diff, found[1], found[0])
        else:
            grads[i] = _map(pl, pu, found[1], found[0])
        return grads, 0.0, 0.0
    if eqn.prim in _DIAGONAL and same_shape:
        zeros = jnp.zeros(eqn.in_avals[i].shape, eqn.in_avals[i].dtype)
        shift = eqn.prim in (P.add_p, P.sub_p)
        if shift and (eqn.prim is P.add_p or i == 0):
            grads[i] = (pl, pu)
        else:
            scale = frame.unfold(rule.linear(eqn, ops)(jnp.ones_like(zeros)))
            grads[i] = _map(pl, pu, lambda A: A * scale, frame)
        if not shift:  # a scaling: 0 at 0
            return grads, 0.0, 0.0
        offset = rule.affine(eqn, ops)(zeros)
        return grads, _bias(pl, offset), _bias(pu, offset)
    if eqn.prim in _UNCHANGED and same_shape and eqn.in_avals[i].dtype == eqn.out_avals[0].dtype:
        grads[i] = (pl, pu)
        return grads, 0.0, 0.0
    if eqn.prim in _RELABEL and i == 0:
        new = _relabelled(eqn, frame)
        if new is None:
            return None
        grads[i] = _map(pl, pu, lambda A: A, new)
        if eqn.prim is P.pad_p and _nonzero(ops[1]):
            offset = rule.affine(eqn, ops)(jnp.zeros(eqn.in_avals[0].shape, eqn.in_avals[0].dtype))
            return grads, _bias(pl, offset), _bias(pu, offset)
        return grads, 0.0, 0.0
    return None
