"""Frozen affine maps written as arithmetic, through the ONNX engine: graphs shaped like
tf2onnx's output (each TensorFlow BatchNorm that tf2onnx did not fold into a conv becomes a
Mul and an Add by per-channel constants; the NHWC input passes a Transpose), the Sub and Div
forms, maps by scalars, pre-activation Mul/Add -> Relu -> Conv, a Concat of convs, and the
real tf2onnx exports in tests/data/tf2onnx (its README says what each holds)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnexport.cli import main
from tests.onnx_builders import GraphBuilder, fold_proto, max_rel_diff, run

TF2ONNX = Path(__file__).resolve().parent / "data" / "tf2onnx"
X4 = ("x", ["N", 8, 6, 6])


def _x(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _by_constant(model: onnx.ModelProto) -> int:
    """Mul/Add/Sub/Div nodes one of whose operands is an initializer: counted from the graph."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(
        n.op_type in ("Mul", "Add", "Sub", "Div") and any(i in inits | consts for i in n.input)
        for n in model.graph.node
    )


def _per_channel(b: GraphBuilder, channels: int, rank: int, axis: int, *, low=0.5, high=1.5):
    """A constant varying along `axis` of a rank-`rank` tensor (broadcast shape)."""
    shape = [channels] + [1] * (rank - axis - 1)
    values = b.rng.uniform(low, high, channels).astype(np.float32)
    return b.const(values.reshape(shape), "c"), values


def _fold(model, feeds, tol=2e-6):
    out, report = fold_proto(model)
    onnx.checker.check_model(out, full_check=True)
    err = max_rel_diff(run(model, feeds), run(out, feeds))
    assert err <= tol, (err, [(d.name, d.detail) for d in report.decisions])
    return out, report


def test_conv_mul_add_folds_into_the_conv_like_tf2onnx_after_a_depthwise_conv():
    """MobileNet's depthwise conv -> Mul(1, C, 1, 1) -> Add(1, C, 1, 1) -> Clip."""
    b = GraphBuilder(seed=3)
    dw = b.node("Conv", ["x", b.weight(8, 1, 3, 3)], group=8, pads=[1, 1, 1, 1])
    conv = b.nodes[-1].name
    scale = b.const(b.rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32))
    y = b.node("Add", [b.node("Mul", [dw, scale]), shift])
    lo, hi = b.const(np.float32(0)), b.const(np.float32(6))
    model = b.model([X4], [b.node("Clip", [y, lo, hi])])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    (d,) = report.decisions
    assert (d.status, d.direction, d.into, d.kind, d.batchnorm) == (
        "folded",
        "preceding",
        conv,
        "Mul and Add",
        False,
    )
    assert d.name == f"Mul and Add after {conv}"
    assert _ops(out) == collections.Counter({"Conv": 1, "Clip": 1})
    assert report.to_dict()["affine_maps"] == {"total": 1, "folded": 1}


@pytest.mark.parametrize("form", ["x-c", "c-x", "x/c", "x*c+c", "c*x"])
def test_sub_and_div_forms_fold_exactly(form):
    """Every arithmetic form of a per-channel map folds into the conv before it; c - x negates
    the scale, x / c divides by it."""
    b = GraphBuilder(seed=4)
    conv = b.node("Conv", ["x", b.weight(8, 8, 1, 1)])
    c, _ = _per_channel(b, 8, 4, 1)
    c2, _ = _per_channel(b, 8, 4, 1, low=-1.0, high=1.0)
    y = {
        "x-c": lambda: b.node("Sub", [conv, c]),
        "c-x": lambda: b.node("Sub", [c, conv]),
        "x/c": lambda: b.node("Div", [conv, c]),
        "x*c+c": lambda: b.node("Add", [b.node("Mul", [conv, c]), c2]),
        "c*x": lambda: b.node("Mul", [c, conv]),
    }[form]()
    model = b.model([X4], [b.node("Relu", [y])])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    assert [d.status for d in report.decisions] == ["folded"]
    assert _by_constant(out) == 0


def test_nhwc_input_through_a_transpose_into_a_padded_conv():
    """tf2onnx's input BN on NHWC data: Mul(C) and Add(C) on the last axis, Transpose to NCHW,
    then a zero-padded conv: the scale folds into the conv and the shift stays as one Add."""
    b = GraphBuilder(seed=5)
    scale = b.const(b.rng.uniform(0.5, 1.5, 3).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.5, 3).astype(np.float32))
    y = b.node("Add", [b.node("Mul", ["x", scale]), shift])
    nchw = b.node("Transpose", [y], perm=[0, 3, 1, 2])
    conv = b.node("Conv", [nchw, b.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1])
    model = b.model([("x", ["N", 6, 6, 3])], [conv])
    out, report = _fold(model, {"x": _x(2, 6, 6, 3)})
    (d,) = report.decisions
    assert d.folded and d.shift_kept and d.direction == "following"
    assert d.name == "Mul and Add on the input 'x'"
    assert _ops(out)["Mul"] == 0 and _ops(out)["Add"] == 1


def test_maps_by_scalars_fold_and_are_not_reported_when_left():
    """x * 0.5 + 1 after a conv folds into it; a scalar Mul between two nonlinear ops (a
    GELU's 0.5 * x) stays and is not listed among the per-channel maps left."""
    b = GraphBuilder(seed=6)
    conv = b.node("Conv", ["x", b.weight(8, 8, 1, 1)])
    y = b.node("Add", [b.node("Mul", [conv, b.const(np.float32(0.5))]), b.const(np.float32(1))])
    s = b.node("Sigmoid", [y])
    z = b.node("Tanh", [b.node("Mul", [s, b.const(np.float32(0.5))])])
    model = b.model([X4], [z])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    assert [(d.kind, d.status) for d in report.decisions] == [("Mul and Add", "folded")]
    assert _ops(out)["Mul"] == 1 and _ops(out)["Add"] == 0


@pytest.mark.parametrize("negative", [False, True])
def test_preactivation_mul_add_relu_conv(negative):
    """Mul/Add -> Relu -> padded Conv (a Keras pre-activation block): with every scale
    positive the scale passes the Relu into the conv and one Add stays; with a scale <= 0
    the map stays, and the reason counts the channels."""
    b = GraphBuilder(seed=7)
    a = b.node("Relu", ["x"])
    values = b.rng.uniform(0.5, 1.5, 8).astype(np.float32)
    if negative:
        values[[2, 5]] *= -1
    scale = b.const(values.reshape(8, 1, 1))
    shift = b.const(b.rng.normal(0, 0.5, (8, 1, 1)).astype(np.float32))
    y = b.node("Relu", [b.node("Add", [b.node("Mul", [a, scale]), shift])])
    model = b.model([X4], [b.node("Conv", [y, b.weight(8, 8, 3, 3)], pads=[1, 1, 1, 1])])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    (d,) = report.decisions
    if negative:
        assert d.status == "left" and "2 of its 8 channels have a scale <= 0" in d.reason
        assert _by_constant(out) == 2
    else:
        assert d.folded and d.shift_kept
        assert _ops(out)["Mul"] == 0 and _ops(out)["Add"] == 1


def test_mul_add_after_a_concat_of_convs_folds_per_branch():
    """A Concat of a 1x1 and a 3x3 conv, then Mul/Add (tf2onnx's BN after a Keras
    concatenate; MixNet's mixed convs): each conv takes its slice of the channels."""
    b = GraphBuilder(seed=8)
    c1 = b.node("Conv", ["x", b.weight(3, 8, 1, 1)])
    n1 = b.nodes[-1].name
    c2 = b.node("Conv", ["x", b.weight(5, 8, 3, 3)], pads=[1, 1, 1, 1])
    n2 = b.nodes[-1].name
    cat = b.node("Concat", [c1, c2], axis=1)
    scale, _ = _per_channel(b, 8, 4, 1)
    shift, _ = _per_channel(b, 8, 4, 1, low=-1, high=1)
    y = b.node("Add", [b.node("Mul", [cat, scale]), shift])
    model = b.model([X4], [b.node("Relu", [y])])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    (d,) = report.decisions
    assert d.folded and d.direction == "preceding" and d.into == f"{n1}, {n2}"
    assert _by_constant(out) == 0


def test_a_bn_after_a_concat_with_a_branch_that_is_no_layer_stays():
    b = GraphBuilder(seed=9)
    c1 = b.node("Conv", ["x", b.weight(3, 8, 1, 1)])
    cat = b.node("Concat", [c1, b.node("Relu", ["x"])], axis=1)
    model = b.model([X4], [b.bn(cat, 11)])
    _, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    (d,) = report.decisions
    assert d.status == "left" and "input 1 of Concat" in d.reason, d.reason


def test_bn_reaching_two_convs_folds_into_both():
    """A pre-activation block's BN -> Relu -> (conv3x3, shortcut conv1x1)."""
    b = GraphBuilder(seed=10)
    bn = b.bn("x", 8)
    # positive scales: a BN's gamma here may be negative
    gamma = next(t for t in b.inits if t.name.startswith("gamma"))
    gamma.CopyFrom(
        onnx.numpy_helper.from_array(np.abs(onnx.numpy_helper.to_array(gamma)), gamma.name)
    )
    r = b.node("Relu", [bn])
    c1 = b.node("Conv", [r, b.weight(8, 8, 3, 3)], pads=[1, 1, 1, 1])
    n1 = b.nodes[-1].name
    c2 = b.node("Conv", [r, b.weight(8, 8, 1, 1)])
    n2 = b.nodes[-1].name
    model = b.model([X4], [b.node("Add", [c1, c2])])
    out, report = _fold(model, {"x": _x(2, 8, 6, 6)})
    (d,) = report.decisions
    assert d.folded and d.shift_kept and set(d.into.split(", ")) == {n1, n2}
    assert _ops(out)["BatchNormalization"] == 0


# ----------------------------------------------------------------------- real tf2onnx exports

CASES = {
    # file: (maps, folded, Mul nodes after, Add nodes after)
    "keras_mobilenet_a025.onnx": (13, 13, 0, 0),
    "keras_mobilenetv2_a035.onnx": (17, 17, 0, 10),  # 9 residual Adds, the Dense bias
    # 2 residual Adds, 3 shifts kept, the bias the first Dense takes from its BN
    "keras_preact_mix.onnx": (6, 6, 0, 6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_tf2onnx_exports_through_the_cli(name, tmp_path):
    """`bnexport fold FILE.onnx` on tf2onnx's own output: every Mul/Add BN folds, the file
    verifies against the original in onnxruntime, and the report counts the maps."""
    source = TF2ONNX / name
    model = tmp_path / name
    model.write_bytes(source.read_bytes())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        main, ["fold", str(model), "-o", str(out), "--json", str(report), "--samples", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "verify: PASS" in result.output
    maps, folded, muls, adds = CASES[name]
    data = json.loads(report.read_text())
    assert data["batchnorm"]["affine_maps"] == {"total": maps, "folded": folded}
    before, after = onnx.load(str(source)), onnx.load(str(out))
    assert _ops(before)["Mul"] == maps  # tf2onnx wrote one Mul per BN
    assert (_ops(after)["Mul"], _ops(after)["Add"]) == (muls, adds)
    assert _ops(after)["Conv"] == _ops(before)["Conv"]
    assert model.read_bytes() == source.read_bytes()
