"""The public entry point: validation, tracing, compilation cache, batching."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa import graph as graph_lib
from jaxlirpa.methods import METHODS, AlphaOptions, bound_flat
from jaxlirpa.methods.alpha_crown import first_bounds, static_size
from jaxlirpa.methods.context import Context, compile_bounds, xla_options
from jaxlirpa.methods.staged import is_concrete, stage
from jaxlirpa.rules.base import lookup
from jaxlirpa.sets import Region, as_set, sets_per_leaf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bounds:
    """Sound elementwise bounds: ``lower <= fn(x') <= upper`` for every x' in the set.

    Shaped like ``fn(x)`` (pytrees of arrays when ``fn`` returns a pytree), or
    ``(batch, rows)`` when a spec was given. A pytree, so it crosses ``jax.jit`` and ``jax.grad``.
    """

    lower: jax.Array
    upper: jax.Array
    alphas: Any = None
    """alpha-CROWN's optimised slopes (per example), to warm-start a later call."""


def _check_method(method: str) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return method.lower()


def compiler_options(method: str = "crown") -> dict | None:
    """XLA options for your ``jax.jit(..., compiler_options=...)`` around a function that
    bounds by ``method``; jaxlirpa compiles its own programs with them. On CPU, for every
    method but ``"ibp"``: no YNNPACK library fusions. XLA:CPU hands the row sums of ``A * y``
    that backward bounds make everywhere (biases, intercepts, concretisation) to YNNPACK,
    which first writes out both factors and repeats the elementwise work feeding them:
    without, CROWN on CNN-B at batch 1 takes 173 instead of 215 ms, on the MLP at batch 32
    4.0 instead of 4.9 s, in two thirds of the memory (``benchmarks/README.md``). IBP's few
    large products are faster with them. On other backends None (XLA's defaults). JAX
    accepts these options on the outermost ``jax.jit`` only.

    Example: ``jax.jit(f, compiler_options=jaxlirpa.compiler_options("crown-ibp"))``."""
    return xla_options(_check_method(method))


def _check_input(x) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}; cast it, e.g. x.astype(jnp.float32).")
    if x.ndim < 1:
        raise ValueError("x must have a leading batch axis; for a single example use x[None].")
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError("x contains NaN or infinite values; bounds around it would be meaningless.")
    return jnp.asarray(x)


def _check_spec(spec, batch: int, out_size: int, dtype):
    if spec is None:
        return None
    C = jnp.asarray(spec, dtype=dtype)
    allowed = (2,) if batch is None else (2, 3)
    if C.ndim not in allowed or C.shape[-1] != out_size or (C.ndim == 3 and C.shape[0] != batch):
        expected = f"(rows, {out_size})" + ("" if batch is None else f" or ({batch}, rows, {out_size})")
        raise ValueError(
            f"spec has shape {C.shape}; expected {expected}, where {out_size} is the size of "
            + ("fn's whole output (a pytree x has no batch axis)." if batch is None else "one example's output.")
        )
    return C


def margin_spec(labels, num_classes: int) -> jax.Array:
    """Rows ``e_y - e_j`` for every ``j != y``: ``C @ logits`` are the margins whose
    positive lower bounds prove that the prediction stays ``y``.

    Returns shape ``(batch, num_classes - 1, num_classes)``.
    Example: ``bound(model, x, 0.1, spec=margin_spec(y, 10))``.
    """
    labels = jnp.asarray(labels)
    k = jnp.arange(num_classes - 1)
    others = k[None, :] + (k[None, :] >= labels[:, None])
    eye = jnp.eye(num_classes)
    return eye[labels][:, None, :] - eye[others]


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64


def _cached(key, build, method: str = "crown"):
    """The jitted function for ``key``, built once (least recently used evicted), a bound
    computation by ``method`` (which picks its XLA options)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    _CACHE[key] = run = compile_bounds(build(), method)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return run


def _sized(key):
    """``key``, whose last entry is alpha-CROWN's static sizes, or a cached key that differs
    only in sizes covering these: from as many to twice as many rows and kept columns, from
    as many to half as many shared columns. Such a program gives the same bounds (its spare
    rows re-bound stable neurons, its spare kept columns are zero), so a batch whose counts
    moved a little reuses a compiled program instead of compiling one more."""
    if key[-1] is None or key in _CACHE:
        return key
    need = dict(key[-1])

    def covers(sizes) -> bool:
        have = dict(sizes)
        return have.keys() == need.keys() and all(
            (n // 2 <= have[k] <= n) if k[0] == "shared" else (n <= have[k] <= 2 * n) for k, n in need.items())

    found = [k for k in _CACHE if k[:-1] == key[:-1] and k[-1] is not None and covers(k[-1])]
    return min(found, key=lambda k: sum(n for (kind, _, _), n in k[-1] if kind != "shared"), default=key)


def _compiled(graph, method: str, spec_batched: bool | None, alpha: AlphaOptions | None, warm: bool,
              batch_size: int | None, sizes: tuple | None = None):
    """A jitted bound computation for this graph structure, vmapped over the
    batch, or over chunks of ``batch_size`` examples one chunk at a time.
    ``sizes``: alpha-CROWN's static row counts (then it takes CROWN's first bounds)."""

    def build():
        def one(consts, region: Region, C, slopes, first):
            ctx = Context(graph, consts, [region.center], {graph.perturbed_inputs[0]: region}, EXAMPLES)
            b, slopes = bound_flat(ctx, method, C, alpha, slopes, first, None if sizes is None else dict(sizes))
            return b.lower, b.upper, slopes

        def run(consts, region, C, slopes, first):
            per_example = (region, C if spec_batched else None, slopes if warm else None, first)
            f = lambda ex: one(consts, ex[0], C if not spec_batched else ex[1], ex[2], ex[3])
            return _per_example(f, per_example, batch_size)

        return run

    return _cached(_sized((graph.signature, method, spec_batched, alpha, warm, batch_size, sizes)), build, method)


EXAMPLES = "jaxlirpa_examples"
"""The name of the vmapped axis over a batch's examples (``Context.batch_axis``)."""


def _per_example(f, per_example, batch_size):
    """``f`` vmapped over the examples (axis :data:`EXAMPLES`): all at once, or
    ``batch_size`` at a time in a loop (``jax.lax.map``'s chunks, with the axis named)."""
    batched = jax.vmap(f, axis_name=EXAMPLES)
    n = jax.tree_util.tree_leaves(per_example)[0].shape[0]
    if batch_size is None or batch_size >= n:
        return batched(per_example)
    full = n - n % batch_size
    chunks = jax.tree_util.tree_map(lambda a: a[:full].reshape(-1, batch_size, *a.shape[1:]), per_example)
    out = jax.tree_util.tree_map(lambda a: a.reshape(full, *a.shape[2:]), jax.lax.map(batched, chunks))
    if full == n:
        return out
    rest = batched(jax.tree_util.tree_map(lambda a: a[full:], per_example))
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def _compiled_first(graph, batch_size: int | None):
    """A jitted CROWN pass giving alpha-CROWN's first bounds and unstable counts per example."""

    def build():
        def run(consts, region):
            one = lambda r: first_bounds(Context(graph, consts, [r.center], {graph.perturbed_inputs[0]: r}, EXAMPLES))
            return _per_example(one, region, batch_size)

        return run

    return _cached((graph.signature, "first", batch_size), build)


def _compiled_joint(graph, method: str, alpha: AlphaOptions | None, warm: bool, sizes: tuple | None = None):
    """A jitted bound computation of a pytree's graph: one joint set, no batch axis."""

    def build():
        def run(consts, leaves, regions, C, slopes, first):
            ctx = Context(graph, consts, leaves, dict(zip(graph.perturbed_inputs, regions)))
            b, slopes = bound_flat(ctx, method, C, alpha, slopes if warm else None, first,
                                   None if sizes is None else dict(sizes))
            return b.lower, b.upper, slopes

        return run

    key = ("joint", graph.signature, tuple(graph.perturbed_inputs), method, alpha, warm, sizes)
    return _cached(_sized(key), build, method)


def _compiled_joint_first(graph):
    """:func:`_compiled_first` for a pytree's graph (one joint set, no batch axis)."""

    def build():
        return lambda consts, leaves, regions: first_bounds(
            Context(graph, consts, leaves, dict(zip(graph.perturbed_inputs, regions))))

    return _cached(("joint-first", graph.signature, tuple(graph.perturbed_inputs)), build)


def _sparse_rows(graph, method: str, alpha: AlphaOptions | None, first_run, *args):
    """alpha-CROWN's first CROWN bounds and the static sizes of its sparse passes (``(key,
    size)`` pairs, see ``alpha_crown.first_bounds``), the largest over the examples (one host
    read per call, before the optimisation), or ``(None, None)`` when that cannot or need not
    be done: another method, options that re-bound nothing, or traced arguments (under an
    outer jit)."""
    opts = alpha or AlphaOptions()
    if method != "alpha-crown" or not (opts.optimize_intermediate and opts.sparse_intermediate):
        return None, None
    if not is_concrete(args):
        return None, None
    first, counts = first_run(*args)
    sizes = tuple(sorted((key, static_size(key, np.asarray(c))) for key, c in counts.items()))
    return first, sizes


def _compiled_stage(graph, sizes: tuple):
    """A jitted stage of staged CROWN (``methods/staged.py``), vmapped, sized by ``sizes``."""

    def build():
        def run(consts, region, known):
            def one(r, k):
                return stage(Context(graph, consts, [r.center], {graph.perturbed_inputs[0]: r}, EXAMPLES), k,
                             dict(sizes))
            return jax.vmap(one, axis_name=EXAMPLES)(region, known)

        return run

    return _cached(_sized((graph.signature, "stage", sizes)), build)


def _crown_stages(graph, consts, region):
    """CROWN's bounds from its stages and the column sizes they read (one host read per
    stage, see ``methods/staged.py``), or ``(None, None)`` with no ReLU worth sizing."""
    known, sizes, later = {}, {}, 1
    while later:
        fresh, counts, later = _compiled_stage(graph, tuple(sorted(sizes.items())))(consts, region, known)
        if not counts:
            break
        known |= fresh
        sizes |= {key: static_size(key, np.asarray(n)) for key, n in counts.items()}
        later = int(np.max(later))
    return (known, tuple(sorted(sizes.items()))) if sizes else (None, None)


def _staged_crown(graph, spec_batched, batch_size: int | None, consts, region, C):
    """CROWN's ``(lower, upper, None)`` in stages (``methods/staged.py``), ``batch_size``
    examples at a time (each chunk sized by its own counts), or None when there is nothing
    to stage: traced arguments (under an outer jit), or no ReLU worth sizing."""
    n = jax.tree_util.tree_leaves(region)[0].shape[0]
    if not is_concrete(consts, region, C) or n == 0:
        return None
    step, lower, upper = batch_size or n, [], []
    for start in range(0, n, step):
        part = jax.tree_util.tree_map(lambda a: a[start:start + step], region)
        first, sizes = _crown_stages(graph, consts, part)
        if sizes is None:
            return None
        run = _compiled(graph, "crown", spec_batched, None, False, None, sizes)
        lo, hi, _ = run(consts, part, C[start:start + step] if spec_batched else C, None, first)
        lower.append(lo)
        upper.append(hi)
    return jnp.concatenate(lower), jnp.concatenate(upper), None


def _check_rules(graph) -> None:
    """Fail at trace time, naming the user's line, on any equation no rule can bound."""
    for eqn in graph.eqns:
        if any(graph.is_perturbed(v) for v in eqn.inputs):
            lookup(eqn, tuple(graph.is_perturbed(v) for v in eqn.inputs))


def trace_per_example(fn: Callable, x):
    """Trace ``fn`` on one example (``x[0]``-shaped), checking it maps batches to batches:
    an array, or a pytree of arrays (several outputs), each with ``x``'s leading axis."""
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves or any(o.ndim < 1 or o.shape[0] != x.shape[0] for o in leaves):
        raise ValueError(
            f"fn must map a batch of inputs to a batch of outputs (an array, or a pytree of arrays, with the "
            f"same leading axis); got {jax.tree_util.tree_map(lambda o: o.shape, out)} for input shape {x.shape}."
        )
    one = lambda xi: tuple(o[0] for o in jax.tree_util.tree_leaves(fn(xi[None])))  # noqa: E731
    graph, consts = graph_lib.trace(one, [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)], [True])
    _check_rules(graph)
    return graph, consts, out


def _unflatten_outputs(flat, out):
    """Split flat per-example bounds ``(batch, total)`` into arrays shaped like ``out``'s leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(out)
    sizes = np.cumsum([int(np.prod(o.shape[1:])) for o in leaves])[:-1]
    parts = jnp.split(flat, sizes, axis=1)
    return jax.tree_util.tree_unflatten(treedef, [p.reshape(o.shape) for p, o in zip(parts, leaves)])


def bound(fn: Callable, x, eps_or_set, *, method: str = "crown", spec=None,
          alpha: AlphaOptions | None = None, alpha_init=None, batch_size: int | None = None) -> Bounds:
    """Sound bounds on ``fn(x')`` (or ``spec @ fn(x')``) for all ``x'`` in the set around ``x``.

    **Arguments:**
    - ``fn``: any JAX-traceable function of a batch (closures over flax params welcome),
      returning an array or a pytree of arrays (bounded together, sharing intermediate
      bounds; the bounds are then that pytree, and ``spec`` does not apply).
    - ``x``: the centre, batch axis first; each example is bounded on its own. Or any
      pytree (model parameters, ``(params, inputs)``, ...): then all its perturbed leaves
      move jointly, there is no batch axis, and the bounds are shaped like ``fn(x)``.
    - ``eps_or_set``: a radius (L-inf ball) or ``LinfBall``/``L2Ball``/``L1Ball``/``Box``.
      For a pytree ``x``: one set for every leaf, or a pytree of sets matching a prefix of
      ``x`` with ``None`` for leaves that stay constant (see :func:`perturb_leaves`).
    - ``method``: ``"ibp"``, ``"crown"``, ``"crown-ibp"``, ``"forward"`` or ``"alpha-crown"``.
    - ``spec``: ``C`` of shape ``(rows, out)`` or ``(batch, rows, out)``: bound ``C @ fn(x)``
      directly, tighter than bounding ``fn(x)`` first (see :func:`margin_spec`); for a
      pytree ``x``, ``(rows, out)`` with ``out`` the size of the whole of ``fn(x)``.
    - ``alpha``: :class:`AlphaOptions` for ``"alpha-crown"``; ``alpha_init``: the
      ``alphas`` of an earlier result on the same model and shapes (warm start).
    - ``batch_size``: bound this many examples at a time (``jax.lax.map``), to cap
      memory; by default the whole batch at once (``jax.vmap``).

    Called outside ``jax.jit``, ``"crown"`` runs in stages whose products skip the columns
    each ReLU layer zeroes, sized by host reads of their counts (``methods/staged.py``; the
    same bounds, 1.7x faster on a 784-1024x3-10 MLP); its ``batch_size`` chunks then run one
    after another, each sized by its own counts.

    Example::

        b = jaxlirpa.bound(lambda x: model.apply(params, x), x, 0.1, method="crown")
        b.lower, b.upper
        w = jaxlirpa.bound(lambda p: model.apply(p, x), params, jaxlirpa.LinfBall(0.01))
    """
    method = _check_method(method)
    if alpha is not None and not isinstance(alpha, AlphaOptions):
        raise TypeError("alpha must be a jaxlirpa.AlphaOptions.")
    if (alpha is not None or alpha_init is not None) and method != "alpha-crown":
        raise ValueError(f"alpha options apply to method='alpha-crown' only, not {method!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
        if batch_size is not None:
            raise ValueError("batch_size applies to a batched array x, not to a pytree (which has no batch axis).")
        return _bound_pytree(fn, x, eps_or_set, method, spec, alpha, alpha_init)
    x = _check_input(x)
    region = as_set(eps_or_set).region(x)
    graph, consts, out = trace_per_example(fn, x)
    if not hasattr(out, "shape"):
        if spec is not None:
            raise ValueError("spec applies to a single output; fn returned a pytree "
                             f"{jax.tree_util.tree_map(lambda o: o.shape, out)}. Bound each output on its own.")
        if alpha_init is not None and not isinstance(alpha_init, list):
            raise TypeError("alpha_init for a pytree of outputs is the list of alphas an earlier result returned.")
    C = _check_spec(spec, x.shape[0], int(np.prod(out.shape[1:])), out.dtype) if hasattr(out, "shape") else None
    try:
        spec_batched = None if C is None else C.ndim == 3
        found = _staged_crown(graph, spec_batched, batch_size, consts, region, C) if method == "crown" else None
        if found is None:
            first, sizes = _sparse_rows(graph, method, alpha, _compiled_first(graph, batch_size), consts, region)
            run = _compiled(graph, method, spec_batched, alpha, alpha_init is not None, batch_size, sizes)
            found = run(consts, region, C, alpha_init, first)
        lower, upper, slopes = found
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        chunk = max(1, (batch_size or x.shape[0]) // 4)
        raise MemoryError(
            f"Bounding {x.shape[0]} examples at once by {method!r} ran out of memory ({str(err).splitlines()[0]}). "
            f"Memory grows linearly with the examples bounded together: pass batch_size={chunk} (or smaller) "
            f"to bound them a chunk at a time, or use a cheaper method (\"crown-ibp\", \"ibp\")."
        ) from err
    if C is None:
        lower = None if lower is None else _unflatten_outputs(lower.reshape(x.shape[0], -1), out)
        upper = None if upper is None else _unflatten_outputs(upper.reshape(x.shape[0], -1), out)
    return Bounds(lower, upper, slopes)


def _bound_pytree(fn, tree, eps_or_set, method, spec, alpha, alpha_init) -> Bounds:
    """:func:`bound` over a pytree whose perturbed leaves move jointly (weight perturbation)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    sets = sets_per_leaf(eps_or_set, tree)
    paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    if all(s is None for s in sets):
        raise ValueError("No leaf of x is perturbed: every set is None. Give a set for at least one leaf.")
    regions = []
    for path, leaf, s in zip(paths, leaves, sets):
        if s is None:
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"Perturbed leaf {path!r} has dtype {leaf.dtype}; only floating-point leaves can move.")
        if not isinstance(leaf, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"Perturbed leaf {path!r} contains NaN or infinite values.")
        regions.append(s.region(leaf))
    flat_fn = lambda *ls: fn(jax.tree_util.tree_unflatten(treedef, ls))
    out = jax.eval_shape(flat_fn, *leaves)
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"fn must return one floating-point array; got {jax.tree_util.tree_map(lambda o: o.shape, out)}.")
    graph, consts = graph_lib.trace(flat_fn, leaves, [s is not None for s in sets])
    _check_rules(graph)
    C = _check_spec(spec, None, int(np.prod(out.shape)), out.dtype)
    first, sizes = _sparse_rows(graph, method, alpha, _compiled_joint_first(graph), consts, leaves, regions)
    run = _compiled_joint(graph, method, alpha, alpha_init is not None, sizes)
    lower, upper, slopes = run(consts, leaves, regions, C, alpha_init, first)
    if C is None:
        lower, upper = lower.reshape(out.shape), upper.reshape(out.shape)
    return Bounds(lower, upper, slopes)


def verified(fn: Callable, x, labels, eps_or_set, *, method: str = "crown", **kwargs) -> jax.Array:
    """Per example, whether the prediction provably stays ``labels`` over the whole set:
    every margin ``logit_y - logit_j`` has a positive lower bound (see :func:`margin_spec`).

    ``kwargs`` go to :func:`bound` (``batch_size``, ``alpha``, ...); alpha-CROWN
    optimises the lower bounds only unless told otherwise.
    Example: ``jaxlirpa.verified(model, x, y, 0.1, method="alpha-crown")``.
    """
    num_classes = jax.eval_shape(fn, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))).shape[-1]
    if _check_method(method) == "alpha-crown" and kwargs.get("alpha") is None:
        kwargs["alpha"] = AlphaOptions(bound="lower")
    b = bound(fn, x, eps_or_set, method=method, spec=margin_spec(labels, num_classes), **kwargs)
    return jnp.all(b.lower > 0, axis=1)


def verified_accuracy(fn: Callable, x, labels, eps_or_set, *, method: str = "crown", **kwargs) -> jax.Array:
    """The fraction of examples :func:`verified` proves robust (verified accuracy)."""
    return jnp.mean(verified(fn, x, labels, eps_or_set, method=method, **kwargs))
