"""The one module that touches JAX internals.

JAX moves its internal names between releases; everything jaxlirpa needs from
them (jaxpr types, call primitives, source locations) is gathered here so a
JAX upgrade changes this file only.
"""
from __future__ import annotations

import hashlib
import itertools
import os

import jax
import jax.extend.core as jcore
import numpy as np
from jax._src import core as _core
from jax._src import source_info_util

Primitive = jcore.Primitive
Var = jcore.Var
Literal = jcore.Literal
ClosedJaxpr = jcore.ClosedJaxpr
Jaxpr = jcore.Jaxpr
JaxprEqn = jcore.JaxprEqn
DropVar = jcore.DropVar

# Primitives whose body is a sub-jaxpr that computes the result: inlined when traced.
# name -> parameter holding the (closed) jaxpr.
CALL_JAXPR_PARAMS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


def top_level() -> bool:
    """Whether no JAX transformation (jit, vmap, grad) is tracing the caller."""
    return _core.trace_state_clean()


def define_primitive(name: str, impl) -> Primitive:
    """A new primitive computing ``impl`` (shape-preserving), usable eagerly, under
    jit, vmap (branch and bound evaluates graphs over batches of domains) and grad."""
    from jax.interpreters import ad, batching, mlir

    prim = Primitive(name)
    prim.def_impl(impl)
    prim.def_abstract_eval(lambda x, *_, **__: x)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))

    def batch(args, dims, **params):
        return jax.vmap(lambda *a: impl(*a, **params), in_axes=dims)(*args), 0

    def jvp(primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(lambda *a: impl(*a, **params), tuple(primals), tangents)

    batching.primitive_batchers[prim] = batch
    ad.primitive_jvps[prim] = jvp
    return prim


_UNIQUE = itertools.count()


def signature(closed: ClosedJaxpr) -> str:
    """A cache key for a traced function: its jaxpr's text, plus a digest of the
    constants of inner jaxprs (jitted closures, scan bodies), whose values the text
    omits although they are part of the function. A traced inner constant makes the
    key unique (never shared)."""
    digest = hashlib.sha1()

    def visit(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, ClosedJaxpr):
                        for c in sub.consts:
                            if isinstance(c, jax.core.Tracer):
                                return False
                            a = np.asarray(c)
                            digest.update(f"{a.shape}{a.dtype}".encode())
                            digest.update(a.tobytes())
                        sub = sub.jaxpr
                    if isinstance(sub, Jaxpr) and not visit(sub):
                        return False
        return True

    text = str(closed.jaxpr)
    return f"{text}\n{digest.hexdigest()}" if visit(closed.jaxpr) else f"{text}\nunique {next(_UNIQUE)}"


def call_body(eqn) -> tuple[Jaxpr, list] | None:
    """The (jaxpr, consts) that an inlinable call equation evaluates, else None."""
    key = CALL_JAXPR_PARAMS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    body = eqn.params[key]
    if isinstance(body, ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    return body, []


def make_jaxpr(fn, *avals) -> ClosedJaxpr:
    """Trace ``fn`` on abstract values; closed-over tracers become consts."""
    return jax.make_jaxpr(fn)(*avals)


_LIBRARY_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (jax, __import__("jaxlib"))
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _library_dirs():
    dirs = list(_LIBRARY_DIRS)
    for name in ("flax", "equinox", "optax"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        dirs.append(os.path.dirname(mod.__file__) + os.sep)
    return tuple(dirs)


def user_location(eqn) -> str:
    """'file:line (function)' of the user's code that emitted ``eqn``.

    The innermost frame outside JAX, flax, equinox, optax and jaxlirpa itself,
    so that an error names the line a researcher wrote, not a library line.
    JAX keeps only the innermost frames of each traceback, so for an equation deep
    inside library code (a jitted ``jnp`` function called from a flax module) the
    enclosing calls' tracebacks (``eqn.callers``) are searched next.
    """
    infos = [i for i in (eqn.source_info, *getattr(eqn, "callers", ())) if getattr(i, "traceback", None) is not None]
    if not infos:
        return "<unknown location>"
    skip = _library_dirs()
    for info in infos:
        for frame in info.traceback.frames:
            if not frame.file_name.startswith(skip) and "<frozen" not in frame.file_name:
                return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return source_info_util.summarize(infos[0]) or "<unknown location>"


from jax.extend.core import primitives as lax_primitives  # noqa: E402  (re-exported table of lax primitives)


def _primitive_of(fn, *args):
    """The primitive JAX emits for ``fn`` (for primitives not exported by name)."""
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns[-1].primitive


# ``jnp.stack`` lowers to its own primitive from JAX 0.10 on (None before).
stack_p = _primitive_of(lambda a, b: jax.numpy.stack([a, b]), 1.0, 1.0)
stack_p = stack_p if stack_p.name == "stack" else None
