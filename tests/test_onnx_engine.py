"""The ONNX engine on hand-built graphs: every pattern folds exactly, every refusal says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.onnx_builders import GraphBuilder, bn_count, fold_proto, max_rel_diff, run

X4 = ("x", ["N", 4, 6, 6])


def _check(model, feeds, *, folded: int, tol: float = 1e-5):
    out, report = fold_proto(model)
    onnx.checker.check_model(out, full_check=True)
    assert len(report.folded) == folded, [(d.name, d.reason) for d in report.decisions]
    assert bn_count(out) == bn_count(model) - folded == len(report.left)
    assert max_rel_diff(run(model, feeds), run(out, feeds)) <= tol
    return out, report


def _x(*shape, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- into preceding


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 2], "dilations": [2, 2], "pads": [2, 1, 0, 2]},
        {"group": 2},
        {"group": 4, "auto_pad": "SAME_UPPER"},
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(attrs, bias):
    b = GraphBuilder()
    groups = attrs.get("group", 1)
    inputs = ["x", b.weight(8, 4 // groups, 3, 3)] + ([b.weight(8)] if bias else [])
    y = b.bn(b.node("Conv", inputs, kernel_shape=[3, 3], **attrs), 8)
    model = b.model([X4], [y])
    out, report = _check(model, {"x": _x(2, 4, 6, 6)}, folded=1)
    d = report.folded[0]
    assert (d.direction, d.kind) == ("preceding", "BatchNormalization")
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.output[0].name == y  # the model's output keeps its name


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_1d_and_3d(dims):
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 4, *[3] * dims)], pads=[1] * 2 * dims), 5)
    model = b.model([("x", [2, 4, *[5] * dims])], [y])
    _check(model, {"x": _x(2, 4, *[5] * dims)}, folded=1)


@pytest.mark.parametrize(
    "attrs", [{}, {"group": 2}, {"strides": [2, 2], "output_padding": [1, 1]}, {"pads": [1] * 4}]
)
def test_conv_transpose_bn(attrs):
    b = GraphBuilder()
    groups = attrs.get("group", 1)
    y = b.bn(b.node("ConvTranspose", ["x", b.weight(4, 6 // groups, 3, 3)], **attrs), 6)
    _check(b.model([X4], [y]), {"x": _x(1, 4, 6, 6)}, folded=1)


def test_conv_transpose_output_shape():
    b = GraphBuilder()
    t = b.node("ConvTranspose", ["x", b.weight(4, 6, 3, 3)], strides=[2, 2], output_shape=[12, 12])
    y = b.bn(t, 6)
    _check(b.model([X4], [y]), {"x": _x(1, 4, 6, 6)}, folded=1)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (7,), (1, 7), ()])
def test_gemm_bn(trans_b, bias_shape):
    b = GraphBuilder()
    w = b.weight(*((7, 5) if trans_b else (5, 7)))
    inputs = ["x", w] + ([b.const(_x(*bias_shape, seed=3))] if bias_shape is not None else [])
    y = b.bn(b.node("Gemm", inputs, transB=trans_b, alpha=0.7, beta=1.3), 7)
    _check(b.model([("x", ["N", 5])], [y]), {"x": _x(3, 5)}, folded=1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_bn_through_transpose(with_bias):
    """(B, T, K) @ (K, N) [+ b] -> Transpose(0, 2, 1) -> BN over N: the transformer/TF layout."""
    b = GraphBuilder()
    y = b.node("MatMul", ["x", b.weight(5, 6)])
    if with_bias:
        y = b.node("Add", [y, b.weight(6)])
    y = b.bn(b.node("Transpose", [y], perm=[0, 2, 1]), 6)
    model = b.model([("x", ["N", 3, 5])], [y])
    out, _ = _check(model, {"x": _x(2, 3, 5)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Transpose"]


def test_gemm_reshape_bn2d():
    """Linear -> Reshape(N, C, H, W) -> BN2d: each BN channel normalizes H*W linear outputs."""
    b = GraphBuilder()
    g = b.node("Gemm", ["x", b.weight(24, 5), b.weight(24)], transB=1)
    r = b.node("Reshape", [g, b.const(np.array([-1, 6, 2, 2], dtype=np.int64))])
    y = b.bn(r, 6)
    _check(b.model([("x", ["N", 5])], [y]), {"x": _x(3, 5)}, folded=1)


def test_through_identity_dropout_and_unsqueeze():
    b = GraphBuilder()
    g = b.node("Gemm", ["x", b.weight(6, 5)], transB=1)
    g = b.node("Identity", [g])
    g = b.node("Dropout", [g])
    g = b.node("Unsqueeze", [g, b.const(np.array([2], dtype=np.int64))])
    y = b.bn(g, 6)
    _check(b.model([("x", ["N", 5])], [y]), {"x": _x(3, 5)}, folded=1)


def test_conv_weight_from_constant_node():
    b = GraphBuilder()
    w = b.node("Constant", [], value=onnx.numpy_helper.from_array(_x(3, 4, 1, 1), "k"))
    y = b.bn(b.node("Conv", ["x", w]), 3)
    out, _ = _check(b.model([X4], [y]), {"x": _x(1, 4, 6, 6)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["Conv"]


# --------------------------------------------------------------------------- into following


def test_bn_flatten_gemm():
    """BN2d -> Flatten -> Gemm: each BN channel feeds H*W input features."""
    b = GraphBuilder()
    f = b.node("Flatten", [b.bn("x", 4)], axis=1)
    y = b.node("Gemm", [f, b.weight(3, 4 * 36), b.weight(3)], transB=1)
    out, report = _check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, folded=1)
    assert report.folded[0].direction == "following"


def test_bn_gap_gemm_and_bn_matmul_without_bias():
    b = GraphBuilder()
    g = b.node("GlobalAveragePool", [b.bn("x", 4)])
    g = b.node("Flatten", [g])
    y = b.node("MatMul", [g, b.weight(4, 3)])
    model = b.model([X4], [y])
    out, _ = _check(model, {"x": _x(2, 4, 6, 6)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["GlobalAveragePool", "Flatten", "MatMul", "Add"]
    assert out.graph.output[0].name == y


def test_bn_reducemean_matmul_add():
    b = GraphBuilder()
    m = b.node("ReduceMean", [b.bn("x", 4), b.const(np.array([2, 3], dtype=np.int64))], keepdims=0)
    y = b.node("Add", [b.node("MatMul", [m, b.weight(4, 3)]), b.weight(3)])
    out, _ = _check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["ReduceMean", "MatMul", "Add"]


@pytest.mark.parametrize("trans_a", [0, 1])
def test_bn_gemm_trans_a(trans_a):
    b = GraphBuilder()
    x = b.bn("x", 5)
    if trans_a:
        x = b.node("Transpose", [x], perm=[1, 0])
    y = b.node("Gemm", [x, b.weight(5, 3)], transA=trans_a, alpha=1.5, beta=0.5)
    _check(b.model([("x", ["N", 5])], [y]), {"x": _x(4, 5)}, folded=1)


@pytest.mark.parametrize("attrs", [{}, {"group": 2}, {"strides": [2, 2], "dilations": [2, 2]}])
def test_bn_unpadded_conv(attrs):
    b = GraphBuilder()
    groups = attrs.get("group", 1)
    y = b.node("Conv", [b.bn("x", 4), b.weight(6, 4 // groups, 3, 3)], **attrs)
    _check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, folded=1)


def test_both_directions_into_one_layer():
    """BN -> Gemm -> BN: both fold into the one Gemm (float64, cast once)."""
    b = GraphBuilder()
    y = b.bn(b.node("Gemm", [b.bn("x", 5), b.weight(6, 5), b.weight(6)], transB=1), 6)
    out, report = _check(b.model([("x", ["N", 5])], [y]), {"x": _x(4, 5)}, folded=2)
    assert {d.into for d in report.folded} == {out.graph.node[0].name}


def test_float16_graph_keeps_its_dtype():
    b = GraphBuilder(dtype=np.float16)
    c = b.node("Conv", ["x", b.weight(6, 4, 3, 3), b.weight(6)], pads=[1] * 4)
    y = b.node("Gemm", [b.node("Flatten", [b.bn(c, 6)]), b.weight(3, 216)], transB=1)
    model = b.model([X4], [y], elem=TensorProto.FLOAT16)
    out, _ = _check(model, {"x": _x(2, 4, 6, 6, dtype=np.float16)}, folded=1, tol=3e-3)
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("opset", [7, 9, 14])
def test_older_opsets(opset):
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 4, 1, 1)]), 5)
    _check(b.model([X4], [y], opset=opset), {"x": _x(2, 4, 6, 6)}, folded=1)


# --------------------------------------------------------------------------- refusals


def _left_reason(model) -> str:
    out, report = fold_proto(model)
    assert bn_count(out) == bn_count(model), "nothing may fold"
    assert len(report.left) == bn_count(model)
    return report.left[0].reason


def test_refuses_graph_input_parameters():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [c, "gamma", b.weight(4), b.weight(4), b.const(np.ones(4, np.float32))],
            ["y"],
        )
    )
    model = b.model([X4, ("gamma", [4])], ["y"])
    assert "'gamma' is a graph input" in _left_reason(model)


def test_refuses_parameters_computed_from_an_input():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    var = b.node("Abs", ["v"])
    b.nodes.append(
        helper.make_node(
            "BatchNormalization", [c, b.weight(4), b.weight(4), b.weight(4), var], ["y"]
        )
    )
    assert "computed by the graph" in _left_reason(b.model([X4, ("v", [4])], ["y"]))


def test_parameters_computed_from_constants_fold():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    var = b.node("Abs", [b.weight(4)])
    b.nodes.append(
        helper.make_node(
            "BatchNormalization", [c, b.weight(4), b.weight(4), b.weight(4), var], ["y"]
        )
    )
    out, _ = _check(b.model([X4], ["y"]), {"x": _x(2, 4, 6, 6)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_refuses_training_mode():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    y = b.bn(c, 4, training_mode=1)
    assert "training_mode=1" in _left_reason(b.model([X4], [y]))


def test_refuses_spatial_0():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    y = b.bn(c, 4, spatial=0)
    # spatial=0 with per-channel parameters is still valid in opset 7
    assert "spatial=0" in _left_reason(b.model([X4], [y], opset=7))


def test_refuses_layer_output_with_other_consumers():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1)])
    # a product (BN(c) + c would be one linear map of c: the merge of parallel branches
    # makes it one Conv, see test_onnx_reparameterize.py)
    y = b.node("Mul", [b.bn(c, 4), c])
    reason = _left_reason(b.model([X4], [y]))
    assert "also used by Mul" in reason


def test_zero_padded_following_conv_keeps_the_shift_as_an_add():
    """A BN on the model input before a padded conv: the scale folds into the conv, the
    shift stays as an Add where the BN was."""
    b = GraphBuilder()
    y = b.node("Conv", [b.bn("x", 4), b.weight(4, 4, 3, 3)], pads=[1] * 4)
    out, report = _check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, folded=1)
    d = report.folded[0]
    assert (d.direction, d.shift_kept, report.adds_added) == ("following", True, 1)
    assert [n.op_type for n in out.graph.node] == ["Add", "Conv"]


def test_refuses_nonlinear_between():
    b = GraphBuilder()
    c = b.node("Relu", [b.node("Conv", ["x", b.weight(4, 4, 1, 1)])])
    y = b.node("Sigmoid", [b.bn(c, 4)])
    reason = _left_reason(b.model([X4], [y]))
    assert "Relu" in reason and "Sigmoid" in reason


def test_refuses_reshape_that_mixes_channels():
    b = GraphBuilder()
    g = b.node("Gemm", ["x", b.weight(8, 5)], transB=1)
    r = b.node("Reshape", [g, b.const(np.array([-1, 4, 2], dtype=np.int64))])
    t = b.node("Transpose", [r], perm=[0, 2, 1])  # channels of the BN are the "2" axis
    y = b.bn(t, 2)
    reason = _left_reason(b.model([("x", ["N", 5])], [y]))
    assert "spreads a layer channel" in reason or "axis" in reason


def test_refuses_unknown_reshape_target():
    b = GraphBuilder()
    g = b.node("Gemm", ["x", b.weight(8, 5)], transB=1)
    r = b.node("Reshape", [g, "shape"])
    y = b.bn(r, 8)
    model = b.model([("x", ["N", 5]), ("shape", [4])], [y])
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    reason = _left_reason(model)
    assert "cannot be proven" in reason or "reshapes" in reason


def test_shared_weight_with_one_bn():
    """One weight read by two convs, a BN after the first only: left unless the first call
    may take its own copy of the weight."""
    b = GraphBuilder()
    w = b.weight(4, 4, 1, 1)
    c1 = b.node("Conv", ["x", w])
    c2 = b.node("Conv", [b.bn(c1, 4), w])
    model = b.model([X4], [b.node("Relu", [c2])])
    reason = _left_reason(model)
    assert "serve 2 calls" in reason and "--duplicate-shared" in reason, reason
    assert "has no BN to fold" in reason and "+64 B" in reason, reason
    # without the merge of the two 1x1 convs (a conv and the 1x1 conv right after it)
    out, report = fold_proto(model, duplicate_shared=True, merge_branches=False)
    assert bn_count(out) == 0 and report.bytes_added == 64
    assert len({n.input[1] for n in out.graph.node if n.op_type == "Conv"}) == 2
    x = {"x": _x(2, 4, 6, 6)}
    assert max_rel_diff(run(model, x), run(out, x)) <= 1e-5


def test_bn_in_if_branch_is_left_with_reason():
    b = GraphBuilder()
    inner = GraphBuilder(seed=5)
    inner.count = 100
    by = inner.bn("x", 4)
    branch = helper.make_graph(
        inner.nodes,
        "then_body",
        [],
        [helper.make_tensor_value_info(by, TensorProto.FLOAT, None)],
        inner.inits,
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["xo"])],
        "else_body",
        [],
        [helper.make_tensor_value_info("xo", TensorProto.FLOAT, None)],
    )
    y = b.node("If", ["cond"], then_branch=branch, else_branch=other)
    model = b.model([X4, ("cond", [])], [y])
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.BOOL
    out, report = fold_proto(model)
    assert len(report.left) == 1 and "then_body" in report.left[0].reason


def test_public_fold_onnx_leaves_its_input_untouched(tmp_path):
    import bnexport

    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 4, 1, 1)]), 5)
    model = b.model([X4], [y])
    before = model.SerializeToString()
    folded, report = bnexport.fold_onnx(model)
    assert model.SerializeToString() == before and bn_count(folded) == 0
    onnx.save(model, str(tmp_path / "m.onnx"))
    folded, report = bnexport.fold_onnx(tmp_path / "m.onnx")
    assert len(report.folded) == 1 and bn_count(folded) == 0


def test_exporter_computed_zero_bias_folds_and_its_computation_goes():
    """torch.onnx's bias-free conv: bias = Expand(CastLike(0, x), Shape(W)[:1])."""
    b = GraphBuilder()
    w = b.weight(5, 4, 1, 1)
    zero = b.node("CastLike", [b.const(np.array(0.0, dtype=np.float32)), "x"])
    rows = b.node("Slice", [b.node("Shape", [w]), *(b.const(np.array([v])) for v in (0, 1))])
    bias = b.node("Expand", [zero, rows])
    y = b.bn(b.node("Conv", ["x", w, bias]), 5)
    out, _ = _check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, folded=1)
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_refuses_bias_that_is_a_graph_input():
    b = GraphBuilder()
    c = b.node("Conv", ["x", b.weight(4, 4, 1, 1), "cb"])
    y = b.bn(c, 4)
    reason = _left_reason(b.model([X4, ("cb", [4])], [y]))
    assert "bias 'cb' is a graph input" in reason


# --------------------------------------------------------------------------- found in review


def test_add_that_becomes_a_bias_after_an_earlier_fold_is_not_mixed_up():
    """MatMul -> BN -> Add(c) -> BN: the second BN may not treat Add(c) as the MatMul's bias
    once the first BN is gone, because the first fold's bias does not include c."""
    b = GraphBuilder()
    y = b.bn(b.node("MatMul", ["x", b.weight(5, 6)]), 6)
    y = b.node("Add", [y, b.const(np.full(6, 3.0, np.float32))])
    model = b.model([("x", ["N", 5])], [b.bn(y, 6)])
    out, report = fold_proto(model)
    assert max_rel_diff(run(model, {"x": _x(4, 5)}), run(out, {"x": _x(4, 5)})) < 1e-5
    assert len(report.folded) >= 1


def test_initializer_used_as_weight_and_bias_of_one_layer_is_shared():
    b = GraphBuilder()
    w = b.weight(6, 6)
    model = b.model([("x", [6, 6])], [b.bn(b.node("Gemm", ["x", w, w]), 6)])
    assert "shared" in _left_reason(model)


def test_new_node_names_do_not_collide():
    b = GraphBuilder()
    t = b.node("Transpose", [b.bn("x", 5)], perm=[0, 2, 1])
    b.nodes.append(helper.make_node("MatMul", [t, b.weight(5, 6)], ["mm_out"], name="mm"))
    b.nodes.append(helper.make_node("Relu", ["mm_out"], ["r"], name="mm_bias_add"))
    model = b.model([("x", ["N", 5, 3])], ["r"])
    out, report = _check(model, {"x": _x(2, 5, 3)}, folded=1)
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))


def test_ir_version_3_lists_new_initializers_as_inputs():
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 4, 1, 1)]), 5)
    model = b.model([X4], [y], opset=8)
    model.ir_version = 3
    for init in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    onnx.checker.check_model(model)
    out, _ = _check(model, {"x": _x(2, 4, 6, 6)}, folded=1)
    inputs = {i.name for i in out.graph.input}
    assert {i.name for i in out.graph.initializer} <= inputs


def test_float16_fold_that_would_overflow_is_left():
    b = GraphBuilder(dtype=np.float16)
    c = b.node("Conv", ["x", b.const(np.full((3, 4, 1, 1), 1000, np.float16))])
    y = b.bn(c, 3)
    scale = next(t for t in b.inits if t.name.startswith("gamma"))
    scale.CopyFrom(onnx.numpy_helper.from_array(np.full(3, 300, np.float16), scale.name))
    model = b.model([X4], [y], elem=TensorProto.FLOAT16)
    assert "beyond the largest finite float16" in _left_reason(model)
