"""Load an ONNX network as a plain JAX function.

The file is only parsed, with the `onnx` package; every operator is re-implemented here in
`jax.numpy`/`jax.lax`, so the result traces, jits and bounds like any hand-written JAX function,
and nothing from the file runs beyond the operators in `OPS`.

Example:

    fn, input_shape = load("acasxu/ACASXU_run2a_1_1_batch_2000.onnx")
    fn(jnp.zeros(input_shape))        # shape (1, 5)
    fn(jnp.zeros((8, 1, 1, 5)))       # shape (8, 5): any batch where the file's batch dim is 1
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from jax import lax
from onnx import external_data_helper, helper, numpy_helper

MIN_OPSET = 7  # older opsets broadcast binary ops differently


def _unary(op: Callable) -> Callable:
    """A handler applying `op` to the node's only input."""
    return lambda inputs, attrs, opset: op(inputs[0])


def _binary(op: Callable) -> Callable:
    """A handler applying `op` to the node's two inputs (numpy broadcasting, as ONNX >= 7)."""
    return lambda inputs, attrs, opset: op(inputs[0], inputs[1])


def _optional(inputs: list, index: int):
    """The `index`-th input, or None where the node leaves it out."""
    return inputs[index] if index < len(inputs) else None


def _static(value, what: str) -> np.ndarray:
    """`value` as a numpy array; shape-like inputs must be constants, not computed from x."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{what} must be a constant, not computed from the input") from None


def _axis(axis: int, ndim: int) -> int:
    """A possibly negative axis in [-ndim, ndim] as a non-negative one."""
    return axis + ndim if axis < 0 else axis


def _gemm(inputs, attrs, opset):
    """Y = alpha * A' @ B' + beta * C, with A', B' optionally transposed (A and B are 2-D)."""
    a, b, c = inputs[0], inputs[1], _optional(inputs, 2)
    a = jnp.transpose(a) if attrs.get("transA", 0) else a
    b = jnp.transpose(b) if attrs.get("transB", 0) else b
    y = jnp.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    y = y if alpha == 1.0 else alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


def _flatten(inputs, attrs, opset):
    """Reshape to 2-D: the dims before `axis` form the rows, the rest the columns."""
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.ndim)
    return jnp.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


def _reshape(inputs, attrs, opset):
    """Reshape to a constant shape; 0 copies the input's dim (unless allowzero), -1 is inferred."""
    x, shape = inputs[0], [int(s) for s in _static(inputs[1], "Reshape's shape")]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return jnp.reshape(x, shape)


def _constant(inputs, attrs, opset):
    """The tensor or number held in the node's one value attribute."""
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise ValueError(f"only 'value' and numeric 'value_*' are supported, got {sorted(attrs)}")


def _padding(attrs, spatial_shape, window, strides, dilations) -> list[tuple[int, int]]:
    """(low, high) padding per spatial dim from `pads` or `auto_pad`, as lax expects."""
    auto_pad, n = attrs.get("auto_pad", "NOTSET"), len(window)
    if auto_pad == "NOTSET":
        pads = attrs.get("pads", [0] * 2 * n)
        return list(zip(pads[:n], pads[n:]))
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        extent = [(k - 1) * d + 1 for k, d in zip(window, dilations)]
        padtype = "SAME" if auto_pad == "SAME_UPPER" else "SAME_LOWER"
        return lax.padtype_to_pads(spatial_shape, extent, strides, padtype)
    raise ValueError(f"unknown auto_pad {auto_pad!r}")


def _conv(inputs, attrs, opset):
    """N-d convolution, NCHW input and OIHW kernel, with groups, strides, pads and dilations."""
    x, w, b = inputs[0], inputs[1], _optional(inputs, 2)
    n = x.ndim - 2
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    padding = _padding(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    y = lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilations,
                                 feature_group_count=attrs.get("group", 1))
    return y if b is None else y + jnp.reshape(b, (-1,) + (1,) * n)


def _window(attrs, x):
    """reduce_window arguments (dims, strides, padding, dilation) of a pooling node over NC..."""
    if attrs.get("ceil_mode", 0):
        raise ValueError("ceil_mode=1 is not supported")
    kernel = attrs["kernel_shape"]
    strides = attrs.get("strides", [1] * len(kernel))
    dilations = attrs.get("dilations", [1] * len(kernel))
    padding = _padding(attrs, x.shape[2:], kernel, strides, dilations)
    return (1, 1, *kernel), (1, 1, *strides), [(0, 0), (0, 0), *padding], (1, 1, *dilations)


def _max_pool(inputs, attrs, opset):
    """Max over each window; padding counts as -inf, so it never wins."""
    dims, strides, padding, dilation = _window(attrs, inputs[0])
    return lax.reduce_window(inputs[0], -jnp.inf, lax.max, dims, strides, padding,
                             window_dilation=dilation)


def _average_pool(inputs, attrs, opset):
    """Mean over each window; padding is left out of the count unless count_include_pad=1."""
    x = inputs[0]
    dims, strides, padding, dilation = _window(attrs, x)
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, padding, window_dilation=dilation)
    if attrs.get("count_include_pad", 0):
        return total / math.prod(attrs["kernel_shape"])
    with jax.ensure_compile_time_eval():
        count = lax.reduce_window(jnp.ones((1, 1, *x.shape[2:]), x.dtype), 0.0, lax.add, dims,
                                  strides, padding, window_dilation=dilation)
    return total / count


def _batch_norm(inputs, attrs, opset):
    """Inference-mode batch norm, folded into one per-channel scale and shift."""
    if attrs.get("training_mode", 0) or not attrs.get("spatial", 1):
        raise ValueError("only inference mode with per-channel statistics is supported")
    x, scale, bias, mean, var = inputs[:5]
    with jax.ensure_compile_time_eval():
        factor = scale / jnp.sqrt(var + attrs.get("epsilon", 1e-5))
        shift = bias - mean * factor
    channel = (-1,) + (1,) * (x.ndim - 2)
    return x * jnp.reshape(factor, channel) + jnp.reshape(shift, channel)


def _softmax_along(x, axis: int):
    """Softmax along one axis, shifted by the max for stability."""
    e = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _softmax(inputs, attrs, opset):
    """Softmax; before opset 13 it runs over all dims from `axis` on, as one flattened axis."""
    x = inputs[0]
    if opset >= 13:
        return _softmax_along(x, attrs.get("axis", -1))
    rows = math.prod(x.shape[:_axis(attrs.get("axis", 1), x.ndim)])
    return jnp.reshape(_softmax_along(jnp.reshape(x, (rows, -1)), 1), x.shape)


OPS: dict[str, Callable] = {
    "Add": _binary(jnp.add),
    "Sub": _binary(jnp.subtract),
    "Mul": _binary(jnp.multiply),
    "Div": _binary(jnp.divide),
    "MatMul": _binary(jnp.matmul),
    "Relu": _unary(lambda x: jnp.maximum(x, 0)),
    "Sigmoid": _unary(lax.logistic),
    "Tanh": _unary(jnp.tanh),
    "Identity": _unary(lambda x: x),
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Constant": _constant,
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Softmax": _softmax,
    "Transpose": lambda inputs, attrs, opset: jnp.transpose(inputs[0], attrs.get("perm")),
    "Concat": lambda inputs, attrs, opset: jnp.concatenate(inputs, axis=attrs["axis"]),
}
"""ONNX op type -> handler(inputs, attrs, opset) returning the node's (first) output."""


class _Node(NamedTuple):
    """A graph node as `run` needs it: its label for errors, op, tensor names and attributes."""

    label: str
    op_type: str
    inputs: list[str]
    output: str
    attrs: dict


def _array(tensor: onnx.TensorProto, path: Path) -> np.ndarray:
    """A tensor stored inside the file as numpy; data in other files is refused, never read."""
    if external_data_helper.uses_external_data(tensor):
        raise ValueError(f"{path}: tensor {tensor.name!r} keeps its data in an external file")
    return numpy_helper.to_array(tensor)


def _parse(path: Path) -> onnx.ModelProto:
    """The ModelProto of the file, or ValueError saying why it is not an ONNX model."""
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{path}: not a valid ONNX model: {error}") from error
    if not model.ir_version or not model.graph.output:
        raise ValueError(f"{path}: not a valid ONNX model: no IR version or no graph output")
    return model


def _input_shape(path: Path, value: onnx.ValueInfoProto) -> tuple[int, ...]:
    """The static input shape; a symbolic leading (batch) dim reads as 1."""
    if not value.type.tensor_type.HasField("shape"):
        raise ValueError(f"{path}: input {value.name!r} has no declared shape")
    dims = [d.dim_value if d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim]
    dims[:1] = [dims[0] or 1] if dims else []
    if None in dims:
        raise ValueError(f"{path}: input {value.name!r} has a symbolic non-batch dim: {dims}")
    return tuple(dims)


def _attribute(attribute: onnx.AttributeProto, path: Path):
    """An attribute's value as Python: numbers and lists as is, tensors as numpy, bytes as str."""
    value = helper.get_attribute_value(attribute)
    if isinstance(value, onnx.TensorProto):
        return _array(value, path)
    return value.decode() if isinstance(value, bytes) else value


def _nodes(path: Path, graph: onnx.GraphProto, known: set[str]) -> list[_Node]:
    """The graph's nodes, checked: supported op, one output, inputs defined before use."""
    nodes = []
    for index, node in enumerate(graph.node):
        label = repr(node.name) if node.name else f"#{index} (outputs {list(node.output)})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise ValueError(f"{path}: node {label}: unsupported op type {op!r}")
        if not node.output or not node.output[0] or any(node.output[1:]):
            raise ValueError(f"{path}: node {label} ({node.op_type}): only one output is supported")
        missing = [name for name in node.input if name and name not in known]
        if missing:
            raise ValueError(f"{path}: node {label} ({node.op_type}) uses undefined {missing}")
        nodes.append(_Node(label, node.op_type, list(node.input), node.output[0],
                           {a.name: _attribute(a, path) for a in node.attribute}))
        known.add(node.output[0])
    return nodes


def _drop_batch(y: jax.Array) -> jax.Array:
    """One example's output without its leading batch dim of 1 (kept where there is none)."""
    return y[0] if y.shape[:1] == (1,) else y


def load(path: str | Path) -> tuple[Callable[[jax.Array], jax.Array], tuple[int, ...]]:
    """Parse an ONNX file into `(fn, input_shape)`, `fn` a pure, jittable JAX function.

    `fn(x)` takes x of `input_shape` (batch axis included) and returns the graph's one output.
    Where the file's batch dim is 1 or symbolic, `fn` also takes any leading batch size B and
    returns B stacked outputs (each example runs through the batch-1 graph under `jax.vmap`,
    so reshapes that hard-code batch 1 stay correct). Initializers are closed over as jnp
    constants. Raises ValueError naming the file for a file that is not valid ONNX, an
    unsupported op (with node name and op type), or a graph that fails shape checks; the graph
    is traced once with `jax.eval_shape` here so such errors appear at load time.
    """
    path = Path(path)
    model = _parse(path)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ValueError(f"{path}: opset {opset} is older than the supported {MIN_OPSET}")
    constants = {t.name: jnp.asarray(_array(t, path)) for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{path}: expected one input and one output, got {len(inputs)} and "
                         f"{len(graph.output)}")
    input_name, output_name = inputs[0].name, graph.output[0].name
    input_shape = _input_shape(path, inputs[0])
    nodes = _nodes(path, graph, set(constants) | {input_name})
    if output_name not in {input_name, *constants, *(node.output for node in nodes)}:
        raise ValueError(f"{path}: graph output {output_name!r} is never computed")

    def run(x):
        values = {**constants, input_name: x}
        for node in nodes:
            args = [values[name] if name else None for name in node.inputs]
            try:
                values[node.output] = OPS[node.op_type](args, node.attrs, opset)
            except Exception as error:
                raise ValueError(f"{path}: node {node.label} ({node.op_type}): {error}") from error
        return values[output_name]

    def fn(x):
        x = jnp.asarray(x)
        if x.shape == input_shape:
            return run(x)
        batchable = input_shape[:1] == (1,) and x.ndim == len(input_shape)
        if batchable and x.shape[1:] == input_shape[1:]:
            return jax.vmap(lambda example: _drop_batch(run(example[None])))(x)
        raise ValueError(f"{path}: expected input shape {input_shape} (or any batch size in "
                         f"place of a leading 1), got {x.shape}")

    jax.eval_shape(fn, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return fn, input_shape

