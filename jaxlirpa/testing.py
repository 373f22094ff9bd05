"""Empirical soundness checks for bounds: sample and attack the set, assert containment.

A bound is sound when ``lower <= fn(x') <= upper`` for *every* ``x'`` in the
set. No finite check proves that, but a violation found at any point proves
the bounds wrong. :func:`assert_sound` looks for one at

- points sampled by :func:`sample_points` (uniform in the set, plus its
  vertices or sphere, plus the centre), and
- points found by gradient ascent and descent on output coordinates.

Example::

    from jaxlirpa.testing import assert_sound
    assert_sound(lambda x: jax.nn.relu(x @ W), x, jaxlirpa.LinfBall(0.1), method="crown")
"""
from __future__ import annotations

import collections
import functools
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa import _compat, api
from jaxlirpa.attacks import pgd
from jaxlirpa.sets import Region, as_set

__all__ = ["sample_points", "assert_sound"]


def _region(region_or_set, x) -> Region:
    if isinstance(region_or_set, Region):
        return region_or_set
    return as_set(region_or_set).region(jnp.asarray(x))


def _host_rng(key) -> np.random.Generator:
    """A numpy generator seeded by a (concrete) JAX PRNG key, a raw uint32 key or an int."""
    key = jax.random.key(0 if key is None else key) if key is None or isinstance(key, int) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _uniforms(rng: np.random.Generator, n: int, shape) -> np.ndarray:
    """The randomness of :func:`_points`: ``(n, shape[0], 2 * dim + 1)`` uniforms in (0, 1).

    Drawn on the host: a JAX PRNG kernel would cost XLA's CPU compiler about a
    second for every new shape, far more than the checks themselves."""
    dim = math.prod(shape[1:])
    return rng.uniform(1e-7, 1.0 - 1e-7, (n, shape[0], 2 * dim + 1)).astype(np.float32)


def _points(region: Region, u):
    """Points of ``region`` from uniforms ``u`` (see :func:`_uniforms`), shape ``(n, *centre.shape)``."""
    lo, hi = region.lo, region.hi
    shape = lo.shape
    dim = math.prod(shape[1:])
    n = u.shape[0]
    u = u.astype(lo.dtype)
    n_in = (n + 1) // 2  # interior points; the rest lie on the boundary
    body = lambda t: t.reshape(t.shape[0], *shape)
    main, signs = u[..., :dim], jnp.where(u[..., dim:2 * dim] < 0.5, -1.0, 1.0).astype(lo.dtype)
    last = u[..., 2 * dim]
    interior = (jnp.arange(n) < n_in)[:, None, None]
    if region.p == np.inf:
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        pts = mid + rad * body(jnp.where(interior, 2 * main - 1, signs))
    else:
        if region.p == 2:
            g = jax.scipy.special.ndtri(main)
            g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), jnp.finfo(lo.dtype).tiny)
            d = g * jnp.where(interior[..., 0], last ** (1.0 / dim), 1.0)[..., None]
        else:  # p == 1: uniform in the cross-polytope (exponential spacings), or one of its vertices
            e = -jnp.log(main)
            inner = e / (jnp.sum(e, -1, keepdims=True) - jnp.log(last)[..., None])
            vertex = jax.nn.one_hot(jnp.minimum((last * dim).astype(jnp.int32), dim - 1), dim, dtype=lo.dtype)
            d = jnp.where(interior, inner, vertex) * signs
        # Clipping to the domain moves every coordinate towards the centre, so
        # the point stays in the ball (when the centre lies in the domain).
        pts = region.center + region.eps * body(d)
    pts = jnp.clip(pts, lo, hi)
    return pts.at[0].set(jnp.clip(region.center, lo, hi))


_points_jit = jax.jit(_points)


def sample_points(region_or_set, x, key, n: int) -> jax.Array:
    """``n`` points of the set around ``x`` (batch axis first), shape ``(n, *x.shape)``.

    Point 0 is the centre; about half the rest are uniform in the set and half on
    its boundary: box vertices (``LinfBall``, ``Box``), sphere points (``L2Ball``)
    or cross-polytope vertices (``L1Ball``). All are clipped to the set's domain
    ``[lower, upper]``. ``region_or_set`` is a set, a radius, or a ``Region``;
    ``key`` a concrete PRNG key that seeds the draw (``None`` means ``jax.random.key(0)``);
    the points themselves are computed by a jitted function.

    Example::

        pts = sample_points(jaxlirpa.L2Ball(0.5), x, jax.random.key(0), 128)
        ys = jax.vmap(fn)(pts)  # (128, *fn(x).shape)
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    region = _region(region_or_set, x)
    return _points_jit(region, _uniforms(_host_rng(key), int(n), region.lo.shape))


# ------------------------------------------------------------------ attacks


def _frank_wolfe_l1(objective, d0, steps: int):
    """Conditional-gradient ascent in the unit L1 ball: each step moves towards the
    vertex ``sign(g_i) e_i`` of the largest gradient entry, so iterates stay inside
    without a projection. Returns the best iterate per example."""
    batch = d0.shape[0]

    def total(d):
        v = objective(d)
        return jnp.sum(v), v

    def step(carry, t):
        d, best_v, best_d = carry
        (_, v), g = jax.value_and_grad(total, has_aux=True)(d)
        better = v > best_v
        best_v = jnp.where(better, v, best_v)
        best_d = jnp.where(better.reshape((-1,) + (1,) * (d.ndim - 1)), d, best_d)
        gf = g.reshape(batch, -1)
        i = jnp.argmax(jnp.abs(gf), axis=1)
        s = jnp.sign(jnp.take_along_axis(gf, i[:, None], 1))
        vertex = (jax.nn.one_hot(i, gf.shape[1], dtype=d.dtype) * s).reshape(d.shape)
        gamma = 2.0 / (t + 2.0)
        return (d + gamma * (vertex - d), best_v, best_d), None

    init = (d0, jnp.full((batch,), -jnp.inf, d0.dtype), d0)
    (d, best_v, best_d), _ = lax.scan(step, init, jnp.arange(steps, dtype=d0.dtype))
    v = objective(d)
    return jnp.where((v > best_v).reshape((-1,) + (1,) * (d.ndim - 1)), d, best_d)


def _attack(run, region: Region, dirs, keys, steps: int):
    """For each direction ``c`` (rows of ``dirs``), a point of the set with a large
    ``c @ run(x')`` per example. Shape ``(len(dirs), *x.shape)``."""
    to_x = lambda d: jnp.clip(region.center + region.eps * d, region.lo, region.hi)

    def one(c, k):
        if region.p == np.inf:  # clipped L-inf balls and boxes are boxes: PGD around their middle
            mid, rad = (region.lo + region.hi) / 2, (region.hi - region.lo) / 2
            return pgd(lambda z: run(z) @ c, mid, rad, norm="inf", steps=steps, key=k)
        objective = lambda d: run(to_x(d)) @ c  # unit ball in d = (x' - x) / eps
        zeros = jnp.zeros_like(region.center)
        if region.p == 2:
            # From the centre: a random start on the sphere barely moves along it in
            # ``steps`` steps of 2.5 / steps (the angle to the optimum shrinks by e^-2.5).
            return to_x(pgd(objective, zeros, 1.0, norm=2, steps=steps, random_start=False))
        return to_x(_frank_wolfe_l1(objective, zeros, steps))

    return jax.vmap(one)(dirs, keys)


def _check(jaxpr, consts, region, C, lower, upper, u, idx, keys, atol, *, steps):
    closed = jax.extend.core.ClosedJaxpr(jaxpr, consts)
    fn = jax.extend.core.jaxpr_as_fun(closed)

    def run(z):  # (batch, ...) -> (batch, rows)
        y = fn(z)[0].reshape(z.shape[0], -1)
        if C is None:
            return y
        return y @ C.T if C.ndim == 2 else jnp.einsum("bro,bo->br", C, y)

    pts = _points(region, u)
    if steps > 0:
        eye = jax.nn.one_hot(idx, lower.shape[1], dtype=lower.dtype)
        ones = jnp.ones((1, lower.shape[1]), lower.dtype)
        dirs = jnp.concatenate([eye, -eye, ones, -ones])  # ascent/descent per coordinate and on the sum
        pts = jnp.concatenate([pts, _attack(run, region, dirs, keys, steps)])
    vals = jax.vmap(run)(pts)  # (points, batch, rows)
    inside = jax.vmap(jax.vmap(lambda r, z: r.contains(z, 1e-5)), in_axes=(None, 0))(region, pts)
    finite = jnp.isfinite(lower) & jnp.isfinite(upper)
    scale = 1.0 + jnp.where(finite, jnp.maximum(jnp.abs(lower), jnp.abs(upper)), 0.0)
    tol = atol * scale
    excess = jnp.maximum(lower - vals, vals - upper)
    counted = inside[..., None] & jnp.isfinite(vals)
    over = jnp.where(counted, excess - tol, -jnp.inf)
    bad_bounds = jnp.isnan(lower) | jnp.isnan(upper) | (lower == jnp.inf) | (upper == -jnp.inf)
    flat = jnp.argmax(over.reshape(-1))
    p, b, r = jnp.unravel_index(flat, over.shape)
    return dict(worst=over[p, b, r], point=p, example=b, coord=r, value=vals[p, b, r],
                lower=lower[b, r], upper=upper[b, r], excess=excess[p, b, r], tol=tol[b, r],
                count=jnp.sum(over > 0), bad_bounds=jnp.sum(bad_bounds), inside=jnp.sum(inside),
                points=pts.shape[0])


_CACHE: collections.OrderedDict = collections.OrderedDict()


def _checker(closed):
    """One jitted checker per function structure (keyed like jaxlirpa's own cache),
    taking the function's constants as arguments: repeated checks of one function
    (other methods, other sets of the same kind) compile once."""
    key = _compat.signature(closed)
    if key not in _CACHE:
        # The checker runs little arithmetic: on CPU, spare LLVM's optimisations
        # (about half the compile time of these small programs).
        opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        _CACHE[key] = jax.jit(functools.partial(_check, closed.jaxpr), static_argnames=("steps",),
                              compiler_options=opts)
        if len(_CACHE) > 64:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def _describe(s) -> str:
    if isinstance(s, (int, float)):
        return f"LinfBall({s})"
    fields = getattr(s, "__dataclass_fields__", {})
    short = lambda v: repr(v) if v is None or np.ndim(v) == 0 else f"array{tuple(np.shape(v))}"
    return f"{type(s).__name__}(" + ", ".join(f"{k}={short(getattr(s, k))}" for k in fields) + ")"


def assert_sound(fn, x, eps_or_set, *, method: str = "crown", spec=None, n_samples: int = 256,
                 attack_steps: int = 20, key=None, atol: float = 1e-5, max_coords: int = 16,
                 bounds: api.Bounds | None = None) -> api.Bounds:
    """Compute ``jaxlirpa.bound(fn, x, eps_or_set, method=method, spec=spec)`` and
    check it: raise ``AssertionError`` naming the worst violation if ``fn(x')``
    (or ``spec @ fn(x')``) leaves ``[lower - atol * scale, upper + atol * scale]``,
    ``scale = 1 + max(|lower|, |upper|)`` per output, at any checked ``x'``:

    - ``n_samples`` points of :func:`sample_points`;
    - per example, the best point of a gradient ascent and of a descent of
      ``attack_steps`` steps on each output coordinate (a random subset of
      ``max_coords`` of them when there are more) and on their sum.
      ``LinfBall`` and ``Box`` (boxes, the clipped ball included) use
      :func:`jaxlirpa.attacks.pgd` from a random start; ``L2Ball`` runs ``pgd``
      on ``(x' - x) / eps`` in the unit ball from the centre; ``L1Ball`` uses
      Frank-Wolfe steps (towards the best vertex of the cross-polytope), which
      never leave it. Points are clipped to the domain of a clipped ball.

    Points that fall outside the set (possible only when ``x`` lies outside
    ``[lower, upper]`` of a clipped ball) and non-finite values of ``fn`` are
    skipped; NaN bounds (or ``lower = +inf``) always fail. Pass ``bounds`` to
    check bounds computed elsewhere (e.g. inside a jitted step) instead.
    Returns the ``Bounds``. Call it eagerly (it reads the result on the host).

    Example::

        b = assert_sound(model_fn, x, jaxlirpa.L2Ball(0.5), method="crown-ibp", n_samples=128)
    """
    x = api._check_input(x)
    if bounds is None:
        bounds = api.bound(fn, x, eps_or_set, method=method, spec=spec)
    region = _region(eps_or_set, x)
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
    batch = x.shape[0]
    if bounds.lower is None and bounds.upper is None:
        raise ValueError("bounds has neither a lower nor an upper bound.")
    one_side = bounds.upper if bounds.lower is None else bounds.lower
    # A one-sided result (e.g. alpha-CROWN with bound="lower") checks that side only.
    lower, upper = (jnp.reshape(jnp.full_like(one_side, fill) if b is None else b, (batch, -1))
                    for b, fill in ((bounds.lower, -jnp.inf), (bounds.upper, jnp.inf)))
    C = None if spec is None else jnp.asarray(spec, lower.dtype)
    out_size = lower.shape[1]
    # All randomness is drawn on the host from the key (see _uniforms): the sample
    # points, the attacked coordinates and the keys of PGD's random starts.
    rng = _host_rng(key)
    u = _uniforms(rng, int(n_samples), x.shape)
    idx = np.sort(rng.permutation(out_size)[:max_coords]) if out_size > max_coords else np.arange(out_size)
    keys = jax.random.wrap_key_data(rng.integers(0, 2**32, (2 * len(idx) + 2, 4), dtype=np.uint32),
                                    impl="unsafe_rbg")
    r = _checker(closed)(closed.consts, region, C, lower, upper, u, idx, keys, jnp.asarray(atol, lower.dtype),
                         steps=int(attack_steps))
    r = jax.device_get(r)
    if r["bad_bounds"] > 0:
        raise AssertionError(f"{r['bad_bounds']} bounds are NaN or empty (lower = +inf or upper = -inf); "
                             f"method={method!r}, set={_describe(eps_or_set)}.")
    if r["worst"] > 0:
        p = int(r["point"])
        where = "the centre" if p == 0 else f"sampled point {p}"
        if p >= n_samples:  # directions: ascent on each idx, descent on each, ascent and descent on the sum
            a, k = divmod(p - n_samples, len(idx)) if p - n_samples < 2 * len(idx) else (2, p - n_samples - 2 * len(idx))
            where = (f"the end of a gradient {('ascent', 'descent')[a]} on output {int(idx[k])}" if a < 2 else
                     f"the end of a gradient {('ascent', 'descent')[k]} on the sum of the outputs")
        side = "below lower" if r["value"] < r["lower"] else "above upper"
        raise AssertionError(
            f"Unsound bounds (method={method!r}, set={_describe(eps_or_set)}): output {int(r['coord'])} of example "
            f"{int(r['example'])} is {r['value']:.7g} at {where}, {side} bound of "
            f"[{r['lower']:.7g}, {r['upper']:.7g}] by {r['excess']:.3g} (tolerance {r['tol']:.3g}); "
            f"{int(r['count'])} violating (point, output) pairs among {int(r['points'])} points x {batch} examples."
        )
    return bounds
