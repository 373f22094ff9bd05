"""Test helper: load auto_LiRPA reference bounds from ``../shared/oracle``.

This is a helper module, not a test file.  It rebuilds each oracle model as a plain JAX
function (PyTorch layout: batch first, NCHW images, OIHW conv weights, ``linear`` is
``x @ W.T + b`` on the last axis) and loads the stored bounds.

API
---
``SHARED``, ``ORACLE``          paths (``<repo>/../shared`` and ``.../oracle``)
``available() -> bool``         whether the oracle data is present
``manifest() -> dict``          the parsed manifest.json (cached)
``case_names(include_perf=False) -> list[str]``  in manifest order; ``perf_*`` cases excluded
                                unless ``include_perf``
``load_case(name) -> OracleCase``  (cached; all numpy arrays are read-only)
``make_params_fn(name) -> (apply, params)``  ``apply(params, x)`` is the model as a pure
                                function of a flat params dict keyed by the manifest names
                                (``"fc1.weight"``, ``"bn1.running_mean"``, ...);
                                ``case.fn == partial(apply, params)``
``make_forward_all(name) -> forward_all(params, x) -> dict node_id -> value`` (every node)
``spec_output(C, y)``           ``C @ y`` per batch element (or ``y`` when ``C`` is None)

Format notes (discovered by reading the data; see also the oracle README)
-----------------------------------------------------------------------
* ``y0`` is what the stored bounds bound: for a case with ``C`` (only ``mlp_spec_C``) it is
  ``C @ f(x0)`` with shape ``(batch, rows)``, NOT the raw network output.  Use
  ``case.spec(case.fn(case.x0))`` to compare with ``y0``.
* ``OracleCase`` objects are cached and shared: their arrays are read-only; don't mutate
  ``case.params`` (``make_params_fn`` hands out a copy of the dict).
* Final bounds ``<set>/<method>/lb|ub`` are float64 of shape ``(batch, rows)``; rows = C.shape[1]
  when C is given, else the flattened output size.  Samples/PGD extrema have the same shape
  (for C cases they are extrema of ``C @ f``).
* ``interm`` bounds ``<set>/<method>/interm/<node>/lb|ub`` are keyed by the id of the
  NONLINEAR node (``relu1``, ``tanh1``, ``pool1``, ``attn``, ``exp1`` ...) and bound that
  node's INPUT, i.e. the value of ``interm_inputs[node]`` (``relu1`` -> ``fc1``/``conv1``/
  ``bn1``; ``pool1`` (maxpool) -> ``relu1`` i.e. post-ReLU values; ``attn`` (softmax) ->
  ``scaled``; ``exp1`` -> ``prod``).  Shape is ``(batch, *shape of that value)`` in the
  model's own layout (NCHW for conv activations, ``(batch, 4, 4)`` for attention scores).
  They exist only for IBP, CROWN, CROWN_pure, alpha-CROWN (and alpha-CROWN_convmatrix), never
  for perf cases, and ``mul`` nodes get no interm entry.
* Methods in a set are what the npz holds.  Methods that failed in auto_LiRPA are absent from
  the npz and listed in ``SetRef.failed`` (method -> error message from the manifest); also
  ``perf_mlp4_b32``'s alpha-CROWN is "ok" in the manifest but has no stored bounds.
* ``linf`` sets also store ``x_L``/``x_U`` (= x0 -+ eps, float32); ``l2`` sets do not.
  ``eps`` is a 0-d float64 in every case (loaded as a Python float; an array eps would be kept
  as an array).  ``norm`` is ``np.inf`` or ``2.0``.
* perf cases have no ``pgd_min|max`` (None here) and only IBP / CROWN / alpha-CROWN.
* The ``input`` node's ``attrs.shape`` says batch 1 even for batched perf cases; x0's shape
  is authoritative.

Attributes missing from the manifest are filled with PyTorch's defaults (none are missing in
the current manifest, but the reader does not rely on that): conv stride 1, padding 0 (kernel
size read from the weight shape); pooling stride = kernel_size, padding 0; batchnorm eps
1e-5; leaky_relu negative_slope 0.01; softmax dim -1; flatten start_dim 1.  ``linear``/``conv2d``
without a ``bias`` param have no bias.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ORACLE = SHARED / "oracle"

NONLINEAR_OPS = frozenset(
    {"relu", "leaky_relu", "tanh", "sigmoid", "exp", "maxpool2d", "softmax", "mul", "matmul"}
)


def available() -> bool:
    """True when ``../shared/oracle`` holds a manifest and the cases folder."""
    return (ORACLE / "manifest.json").is_file() and (ORACLE / "cases").is_dir()


@functools.lru_cache(maxsize=1)
def manifest() -> dict:
    with open(ORACLE / "manifest.json") as fh:
        return json.load(fh)


def case_names(include_perf: bool = False) -> list[str]:
    names = list(manifest()["cases"])
    if not include_perf:
        names = [n for n in names if not n.startswith("perf_")]
    return names


# ----------------------------------------------------------------------------------------
# data classes
# ----------------------------------------------------------------------------------------


@dataclass
class SetRef:
    """One perturbation set (``linf`` or ``l2``) of a case."""

    name: str
    eps: float | np.ndarray
    norm: float  # np.inf or 2.0
    methods: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (lb, ub), (batch, rows)
    interm: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # method -> node -> (lb, ub)
    sample_min: np.ndarray | None
    sample_max: np.ndarray | None
    pgd_min: np.ndarray | None
    pgd_max: np.ndarray | None
    x_L: np.ndarray | None = None  # linf only (float32, x0 - eps)
    x_U: np.ndarray | None = None
    n_samples: int | None = None
    failed: dict[str, str] = field(default_factory=dict)  # method -> auto_LiRPA error
    stats: dict[str, dict] = field(default_factory=dict)  # method -> manifest entry (timings...)

    def bounds(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        return self.methods[method]

    @property
    def emp_min(self) -> np.ndarray:
        """Tightest empirical minimum (samples and PGD)."""
        if self.pgd_min is None:
            return self.sample_min
        return np.minimum(self.sample_min, self.pgd_min)

    @property
    def emp_max(self) -> np.ndarray:
        if self.pgd_max is None:
            return self.sample_max
        return np.maximum(self.sample_max, self.pgd_max)


@dataclass
class OracleCase:
    name: str
    fn: Callable  # batched x -> raw network output (batch, ...)
    x0: np.ndarray  # float32, batch first
    y0: np.ndarray  # stored clean output: C @ f(x0) when C is given, shape (batch, rows)
    C: np.ndarray | None  # (batch, rows, n_out) or None
    sets: dict[str, SetRef]
    nodes: list[dict]
    interm_inputs: dict[str, str]  # single-input node id -> id of the node feeding it
    params: dict[str, Any] = field(default_factory=dict)  # manifest name -> jnp array
    apply: Callable | None = None  # apply(params, x)
    forward_all: Callable | None = None  # forward_all(params, x) -> {node_id: value}
    buffers: tuple[str, ...] = ()  # params that are BN buffers (not trainable)
    meta: dict = field(default_factory=dict)  # the manifest entry of the case

    @property
    def is_perf(self) -> bool:
        return self.name.startswith("perf_")

    @property
    def description(self) -> str:
        return self.meta.get("description", "")

    def spec(self, y):
        """Map raw outputs to spec rows: ``C @ flatten(y)`` (or ``flatten(y)`` without C)."""
        return spec_output(self.C, y)

    def activations(self, x) -> dict:
        """All node values at ``x`` (node id -> array), in the model's own layout."""
        return self.forward_all(self.params, x)

    def interm_value(self, node: str, x):
        """The value bounded by ``interm/<node>`` (the input of ``node``) at ``x``."""
        return self.activations(x)[self.interm_inputs[node]]


def spec_output(C, y):
    import jax.numpy as jnp

    y = jnp.reshape(y, (y.shape[0], -1))
    if C is None:
        return y
    return jnp.einsum("bro,bo->br", jnp.asarray(C, y.dtype), y)


# ----------------------------------------------------------------------------------------
# model builder
# ----------------------------------------------------------------------------------------


def _pair(v, default) -> tuple[int, int]:
    if v is None:
        v = default
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    v = tuple(int(t) for t in v)
    if len(v) == 1:
        return (v[0], v[0])
    return v  # type: ignore[return-value]


def _build_forward_all(nodes: list[dict]) -> Callable:
    """Returns forward_all(params, x) -> dict node_id -> value."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def run(params: dict, x) -> dict:
        vals: dict[str, Any] = {}
        for node in nodes:
            op = node["op"]
            nid = node["id"]
            attrs = node.get("attrs") or {}
            pn = node.get("params") or {}
            ins = [vals[i] for i in node.get("inputs", [])]
            P = {k: params[v] for k, v in pn.items()}
            if op == "input":
                out = x
            elif op == "linear":
                out = ins[0] @ P["weight"].T
                if "bias" in P:
                    out = out + P["bias"]
            elif op == "conv2d":
                W = P["weight"]
                stride = _pair(attrs.get("stride"), 1)
                pad = _pair(attrs.get("padding"), 0)
                out = lax.conv_general_dilated(
                    ins[0],
                    W,
                    window_strides=stride,
                    padding=[(pad[0], pad[0]), (pad[1], pad[1])],
                    dimension_numbers=("NCHW", "OIHW", "NCHW"),
                )
                if "bias" in P:
                    out = out + P["bias"][None, :, None, None]
            elif op == "batchnorm2d":
                eps = float(attrs.get("eps", 1e-5))
                shp = (1, -1) + (1,) * (ins[0].ndim - 2)
                scale = P["weight"] / jnp.sqrt(P["running_var"] + eps)
                out = (ins[0] - P["running_mean"].reshape(shp)) * scale.reshape(shp) + P[
                    "bias"
                ].reshape(shp)
            elif op == "relu":
                out = jax.nn.relu(ins[0])
            elif op == "leaky_relu":
                out = jax.nn.leaky_relu(ins[0], negative_slope=float(attrs.get("negative_slope", 0.01)))
            elif op == "tanh":
                out = jnp.tanh(ins[0])
            elif op == "sigmoid":
                out = jax.nn.sigmoid(ins[0])
            elif op == "exp":
                out = jnp.exp(ins[0])
            elif op in ("avgpool2d", "maxpool2d"):
                k = _pair(attrs.get("kernel_size"), None)
                s = _pair(attrs.get("stride"), k)
                p = _pair(attrs.get("padding"), 0)
                window = (1, 1) + k
                strides = (1, 1) + s
                padding = ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1]))
                if op == "avgpool2d":
                    # count_include_pad=True: zero padding, divide by the full window size
                    out = lax.reduce_window(ins[0], 0.0, lax.add, window, strides, padding)
                    out = out / (k[0] * k[1])
                else:
                    out = lax.reduce_window(ins[0], -jnp.inf, lax.max, window, strides, padding)
            elif op == "flatten":
                start = int(attrs.get("start_dim", 1))
                out = jnp.reshape(ins[0], ins[0].shape[:start] + (-1,))
            elif op == "add":
                out = ins[0] + ins[1]
            elif op == "mul":
                out = ins[0] * ins[1]
            elif op == "scale":
                out = ins[0] * float(attrs["value"])
            elif op == "matmul":
                out = jnp.matmul(ins[0], ins[1])
            elif op == "transpose":
                out = jnp.swapaxes(ins[0], int(attrs["dim0"]), int(attrs["dim1"]))
            elif op == "softmax":
                out = jax.nn.softmax(ins[0], axis=int(attrs.get("dim", -1)))
            else:
                raise NotImplementedError(f"oracle op {op!r} (node {nid})")
            vals[nid] = out
        return vals

    return run


def _build_apply(nodes: list[dict]) -> Callable:
    forward_all = _build_forward_all(nodes)
    out_id = nodes[-1]["id"]

    def apply(params: dict, x):
        return forward_all(params, x)[out_id]

    return apply


def _load_params(data) -> dict:
    import jax.numpy as jnp

    return {k[len("param/") :]: jnp.asarray(data[k]) for k in data.files if k.startswith("param/")}


def make_params_fn(name: str) -> tuple[Callable, dict]:
    """``(apply, params)``: ``apply(params, x)`` is the model; params keyed by manifest names."""
    case = load_case(name)
    return case.apply, dict(case.params)


def make_forward_all(name: str) -> Callable:
    return load_case(name).forward_all


# ----------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


def _norm_value(v) -> float:
    if isinstance(v, str):
        return float(np.inf) if v.lower() in ("inf", "linf") else float(v)
    return float(v)


def _load_set(data, files: set[str], sname: str, spec_meta: dict) -> SetRef:
    eps_arr = np.asarray(data[f"{sname}/eps"])
    eps: float | np.ndarray = float(eps_arr) if eps_arr.ndim == 0 else _ro(eps_arr)
    if f"{sname}/norm" in files:
        norm = float(np.asarray(data[f"{sname}/norm"]))
    else:
        norm = _norm_value(spec_meta.get("norm", "inf"))

    methods: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    interm: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    prefix = sname + "/"
    for key in sorted(files):
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == "lb":
            m = parts[0]
            methods[m] = (_ro(data[key]), _ro(data[f"{prefix}{m}/ub"]))
        elif len(parts) == 4 and parts[1] == "interm" and parts[3] == "lb":
            m, node = parts[0], parts[2]
            interm.setdefault(m, {})[node] = (
                _ro(data[key]),
                _ro(data[f"{prefix}{m}/interm/{node}/ub"]),
            )
    # keep the manifest's method order where possible
    order = list(spec_meta.get("methods", {}))
    methods = dict(sorted(methods.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    def opt(k):
        key = prefix + k
        return _ro(data[key]) if key in files else None

    mmeta = spec_meta.get("methods", {})
    failed = {
        m: (v.get("error") or "status ok in manifest but no bounds stored in the npz")
        for m, v in mmeta.items()
        if m not in methods
    }
    return SetRef(
        name=sname,
        eps=eps,
        norm=norm,
        methods=methods,
        interm=interm,
        sample_min=opt("sample_min"),
        sample_max=opt("sample_max"),
        pgd_min=opt("pgd_min"),
        pgd_max=opt("pgd_max"),
        x_L=opt("x_L"),
        x_U=opt("x_U"),
        n_samples=spec_meta.get("n_samples"),
        failed=failed,
        stats={m: v for m, v in mmeta.items() if m in methods},
    )


def _check_attrs(name: str, nodes: list[dict], params: dict) -> None:
    """Manifest attrs that duplicate param shapes must agree with them."""
    for n in nodes:
        a = n.get("attrs") or {}
        pn = n.get("params") or {}
        if n["op"] == "linear":
            o, i = params[pn["weight"]].shape
            assert a.get("out_features", o) == o and a.get("in_features", i) == i, (name, n)
        elif n["op"] == "conv2d":
            W = params[pn["weight"]].shape
            assert a.get("out_channels", W[0]) == W[0] and a.get("in_channels", W[1]) == W[1], (name, n)
            assert _pair(a.get("kernel_size"), W[2:]) == tuple(W[2:]), (name, n)
            assert a.get("groups", 1) == 1 and _pair(a.get("dilation"), 1) == (1, 1), (name, n)
        elif n["op"] in ("avgpool2d", "maxpool2d"):
            if a.get("kernel_size") is None:
                raise KeyError(f"{name}: {n['id']} has no kernel_size")
            assert not a.get("ceil_mode", False) and _pair(a.get("dilation"), 1) == (1, 1), (name, n)
        elif n["op"] == "batchnorm2d":
            assert a.get("num_features", params[pn["weight"]].shape[0]) == params[pn["weight"]].shape[0]


@functools.lru_cache(maxsize=None)
def load_case(name: str) -> OracleCase:
    meta = manifest()["cases"][name]
    nodes = meta["nodes"]
    npz_path = ORACLE / meta.get("npz", f"cases/{name}.npz")
    with np.load(npz_path) as data:
        files = set(data.files)
        params = _load_params(data)
        x0 = _ro(data["x0"])
        y0 = _ro(data["y0"])
        C = _ro(data["C"]) if "C" in files else None
        set_names = [s for s in meta.get("specs", {}) if f"{s}/eps" in files]
        # sets present in the npz but not in the manifest
        for k in sorted(files):
            if k.endswith("/eps") and k.count("/") == 1 and k.split("/")[0] not in set_names:
                set_names.append(k.split("/")[0])
        sets = {s: _load_set(data, files, s, meta.get("specs", {}).get(s, {})) for s in set_names}

    missing = {v for n in nodes for v in (n.get("params") or {}).values()} - set(params)
    if missing:
        raise KeyError(f"{name}: params missing from npz: {sorted(missing)}")

    _check_attrs(name, nodes, params)
    forward_all = _build_forward_all(nodes)
    apply = _build_apply(nodes)
    fn = functools.partial(apply, dict(params))
    interm_inputs = {n["id"]: n["inputs"][0] for n in nodes if len(n.get("inputs", [])) == 1}
    return OracleCase(
        name=name,
        fn=fn,
        x0=x0,
        y0=y0,
        C=C,
        sets=sets,
        nodes=nodes,
        interm_inputs=interm_inputs,
        params=params,
        apply=apply,
        forward_all=forward_all,
        buffers=tuple(meta.get("buffers_not_trainable", ())),
        meta=meta,
    )
