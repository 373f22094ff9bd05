"""jaxlirpa.onnx against onnxruntime, on hand-built graphs (every op) and the shared networks."""

from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from jaxlirpa.onnx import OPS, load

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "vnncomp"
RNG = np.random.default_rng(0)


def _random(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _save(tmp_path, nodes, input_shape, initializers=None, opset=14, name="model"):
    """Write a one-input, one-output model whose last node writes "y"; return its path."""
    initializers = initializers or {}
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(value), key) for key, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _runtime(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _assert_matches_runtime(path):
    """fn(x) == onnxruntime on a random x; where the batch dim is 1, also on a jitted batch of 3."""
    fn, input_shape = load(path)
    x = _random(*input_shape)
    np.testing.assert_allclose(fn(x), _runtime(path, x), rtol=1e-5, atol=1e-5)
    if input_shape[0] == 1:
        batch = _random(3, *input_shape[1:])
        expected = np.stack([_runtime(path, example[None])[0] for example in batch])
        np.testing.assert_allclose(jax.jit(fn)(batch), expected, rtol=1e-5, atol=1e-5)
    return fn, input_shape


def _node(op, inputs, output="y", **attrs):
    return helper.make_node(op, inputs, [output], name=f"{op}_{output}", **attrs)


CASES = {
    "gemm_transB_alpha_beta": (
        [_node("Gemm", ["x", "w", "c"], transB=1, alpha=0.5, beta=2.0)],
        [3, 4], {"w": _random(5, 4), "c": _random(5)}, 14),
    "gemm_transA_no_bias": (
        [_node("Gemm", ["x", "w"], transA=1)], [4, 3], {"w": _random(4, 5)}, 14),
    "matmul_arithmetic_activations": (
        [_node("MatMul", ["x", "w"], "a"), _node("Add", ["a", "b"], "s"),
         _node("Sub", ["s", "c"], "t"), _node("Mul", ["t", "c"], "m"),
         _node("Div", ["m", "d"], "q"), _node("Relu", ["q"], "r"), _node("Sigmoid", ["r"], "g"),
         _node("Tanh", ["g"], "h"), _node("Identity", ["h"])],
        [2, 4], {"w": _random(4, 3), "b": _random(3), "c": _random(1, 3),
                 "d": np.float32(1.5) + np.abs(_random(3))}, 8),
    "conv_groups_stride_pads_dilation_bias": (
        [_node("Conv", ["x", "w", "b"], group=2, strides=[2, 1], pads=[1, 0, 2, 1],
               dilations=[1, 2])],
        [2, 4, 9, 8], {"w": _random(6, 2, 3, 3), "b": _random(6)}, 14),
    "conv_same_upper_then_pools": (
        [_node("Conv", ["x", "w"], "c", auto_pad="SAME_UPPER", strides=[2, 2]),
         _node("MaxPool", ["c"], "p", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0]),
         _node("AveragePool", ["p"], "a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         _node("AveragePool", ["a"], kernel_shape=[2, 2], pads=[1, 0, 1, 0],
               count_include_pad=1)],
        [1, 3, 11, 10], {"w": _random(4, 3, 3, 3)}, 9),
    "batch_norm_flatten_gemm": (
        [_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], "n", epsilon=1e-3),
         _node("Flatten", ["n"], "f"), _node("Gemm", ["f", "w", "b"], transB=1)],
        [2, 3, 4, 4], {"scale": _random(3), "bias": _random(3), "mean": _random(3),
                       "var": np.abs(_random(3)) + 0.1, "w": _random(5, 48), "b": _random(5)}, 9),
    "reshape_constant_transpose_concat": (
        [_node("Reshape", ["x", "shape_zero"], "r"),
         helper.make_node("Constant", [], ["shape"], name="shape_constant",
                          value=numpy_helper.from_array(np.array([2, 3, -1], np.int64))),
         _node("Reshape", ["r", "shape"], "s"), _node("Transpose", ["s"], "t", perm=[0, 2, 1]),
         _node("Concat", ["t", "extra"], axis=-1)],
        [2, 3, 4], {"shape_zero": np.array([0, -1], np.int64), "extra": _random(2, 4, 2)}, 14),
    "flatten_axis_2": ([_node("Flatten", ["x"], axis=2)], [2, 3, 4, 5], {}, 14),
    "softmax_opset8_coerced_2d": ([_node("Softmax", ["x"], axis=1)], [2, 3, 4], {}, 8),
    "softmax_opset14_last_axis": ([_node("Softmax", ["x"])], [2, 3, 4], {}, 14),
}


@pytest.mark.parametrize("name", CASES)
def test_hand_built_graph_matches_onnxruntime(tmp_path, name):
    nodes, input_shape, initializers, opset = CASES[name]
    _assert_matches_runtime(_save(tmp_path, nodes, input_shape, initializers, opset))


def test_cases_cover_every_supported_op():
    used = {node.op_type for nodes, *_ in CASES.values() for node in nodes}
    assert used == set(OPS)


def test_batch_of_one_graph_takes_any_batch_and_jits(tmp_path):
    # Reshape to a hard-coded batch of 1: batching must run each example on its own.
    nodes = [_node("Reshape", ["x", "shape"], "r"), _node("Gemm", ["r", "w"], transB=1)]
    path = _save(tmp_path, nodes, [1, 2, 3], {"shape": np.array([1, 6], np.int64),
                                              "w": _random(4, 6)})
    fn, input_shape = _assert_matches_runtime(path)
    assert input_shape == (1, 2, 3)
    batch = _random(5, 2, 3)
    expected = np.concatenate([_runtime(path, example[None]) for example in batch])
    np.testing.assert_allclose(fn(batch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected input shape"):
        fn(_random(5, 3, 2))


def test_symbolic_batch_dim_reads_as_one(tmp_path):
    path = _save(tmp_path, [_node("Relu", ["x"])], ["batch", 3])
    fn, input_shape = load(path)
    assert input_shape == (1, 3)
    x = _random(4, 3)
    np.testing.assert_allclose(fn(x), _runtime(path, x))


def _shared_networks():
    picks = ["test/*.onnx", "acasxu/ACASXU_run2a_1_1_*.onnx", "acasxu/ACASXU_run2a_4_7_*.onnx",
             "mnistfc/mnist-net_256x2.onnx", "mnistfc/mnist-net_256x4.onnx", "eran/nets/*.onnx"]
    return sorted(str(p.relative_to(SHARED)) for pattern in picks for p in SHARED.glob(pattern))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/vnncomp is absent")
@pytest.mark.parametrize("relative", _shared_networks() or ["none"])
def test_shared_network_matches_onnxruntime(relative):
    _assert_matches_runtime(SHARED / relative)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/vnncomp is absent")
def test_acasxu_input_shape():
    fn, input_shape = load(SHARED / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx")
    assert input_shape == (1, 1, 1, 5)
    assert fn(np.zeros(input_shape, np.float32)).shape == (1, 5)


@pytest.mark.parametrize("content", [b"", b"not an onnx model\n", "truncated"])
def test_malformed_file_raises_value_error_naming_it(tmp_path, content):
    if content == "truncated":
        model = _save(tmp_path, [_node("Gemm", ["x", "w"])], [2, 3], {"w": _random(3, 64)})
        content = model.read_bytes()[:-100]
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.onnx.*not a valid ONNX model"):
        load(path)


def test_unsupported_op_names_file_node_and_op(tmp_path):
    path = _save(tmp_path, [_node("Relu", ["x"], "r"), _node("Cos", ["r"])], [2, 3], name="cosine")
    with pytest.raises(ValueError, match=r"cosine.onnx: node 'Cos_y': unsupported op type 'Cos'"):
        load(path)


def test_bad_attribute_is_reported_at_load(tmp_path):
    nodes = [_node("MaxPool", ["x"], kernel_shape=[2, 2], ceil_mode=1)]
    with pytest.raises(ValueError, match=r"pool.onnx: node 'MaxPool_y' \(MaxPool\): ceil_mode"):
        load(_save(tmp_path, nodes, [1, 1, 5, 5], name="pool"))


def test_reshape_to_computed_shape_is_refused(tmp_path):
    nodes = [_node("Reshape", ["x", "x"])]
    with pytest.raises(ValueError, match="Reshape's shape must be a constant"):
        load(_save(tmp_path, nodes, [2], name="computed"))
