"""The ONNX engine on layers called several times (one weight read by several nodes) and on BNs
before a zero-padded Conv or a ConvTranspose (the scale folds, the shift stays as an Add).

Every graph runs in onnxruntime before and after folding; folded weights are compared with the
fold computed by hand in float64, so a weight folded twice (s * s * W) is caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from tests.onnx_builders import GraphBuilder, bn_count, fold_proto, max_rel_diff, run

EPS = 1e-5
X4 = ("x", ["N", 4, 6, 6])


def _x(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _bn_params(b: GraphBuilder, channels: int, *, gamma=None, beta=None) -> list[str]:
    """gamma, beta, mean, var initializers for BN nodes that read the same parameters."""
    r = b.rng
    values = [
        r.uniform(0.5, 1.5, channels) * r.choice([-1, 1], channels) if gamma is None else gamma,
        r.normal(0, 0.5, channels) if beta is None else beta,
        r.normal(0, 0.5, channels),
        r.uniform(0.3, 2.0, channels),
    ]
    return [
        b.const(np.asarray(v, dtype=np.float32), base)
        for v, base in zip(values, ("gamma", "beta", "mean", "var"))
    ]


def _bn(b: GraphBuilder, x: str, params: list[str]) -> str:
    return b.node("BatchNormalization", [x, *params], epsilon=EPS)


def _scale_shift(model: onnx.ModelProto, params: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 from a BN's parameter initializers, as the engine computes them."""
    gamma, beta, mean, var = (_inits(model)[p].astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + float(np.float32(EPS)))
    return s, beta - s * mean


def _fold_and_compare(model, feeds, *, tol=1e-5, **options):
    out, report = fold_proto(model, **options)
    onnx.checker.check_model(out, full_check=True)
    assert bn_count(out) == len(report.left)
    assert max_rel_diff(run(model, feeds), run(out, feeds)) <= tol
    return out, report


# --------------------------------------------------------------------------- shared layers


def _siamese(calls: int):
    """Conv -> BN -> Relu -> Conv -> BN, one set of weights and BN parameters, called on
    `calls` inputs (the graph torch.onnx exports for an encoder called on several inputs)."""
    b = GraphBuilder(seed=3)
    w1, b1, p1 = b.weight(4, 3, 3, 3), b.weight(4), _bn_params(b, 4)
    w2, b2, p2 = b.weight(5, 4, 3, 3), b.weight(5), _bn_params(b, 5)
    outputs = []
    for i in range(calls):
        y = _bn(b, b.node("Conv", [f"x{i}", w1, b1], pads=[1] * 4), p1)
        y = b.node("Relu", [y])
        outputs.append(_bn(b, b.node("Conv", [y, w2, b2]), p2))
    inputs = [(f"x{i}", ["N", 3, 8, 8]) for i in range(calls)]
    feeds = {f"x{i}": _x(2, 3, 8, 8, seed=i) for i in range(calls)}
    return b.model(inputs, outputs), feeds, (w1, b1, p1), (w2, b2, p2)


@pytest.mark.parametrize("calls", [2, 3])
def test_siamese_encoder_folds_once(calls):
    model, feeds, *layers = _siamese(calls)
    out, report = _fold_and_compare(model, feeds)
    assert bn_count(out) == 0 and len(report.folded) == 2 * calls
    assert {(d.direction, d.shared_calls, d.bytes_added) for d in report.folded} == {
        ("preceding", calls, 0)
    }
    before, after = _inits(model), _inits(out)
    for w, bias, params in layers:
        s, t = _scale_shift(model, params)
        want_w = before[w].astype(np.float64) * s[:, None, None, None]
        # folded once: s * W, not s * s * W
        np.testing.assert_array_equal(after[w], want_w.astype(np.float32))
        np.testing.assert_array_equal(after[bias], (s * before[bias] + t).astype(np.float32))
    # no copies: the calls still read one weight and one bias per layer
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len({tuple(n.input[1:]) for n in convs}) == 2


def test_weight_tied_block_in_a_loop():
    """The same Conv -> BN -> Relu applied 3 times in a row."""
    b = GraphBuilder(seed=4)
    w, bias, params = b.weight(4, 4, 3, 3), b.weight(4), _bn_params(b, 4)
    y = "x"
    for _ in range(3):
        y = b.node("Relu", [_bn(b, b.node("Conv", [y, w, bias], pads=[1] * 4), params)])
    model = b.model([X4], [y])
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    assert [d.shared_calls for d in report.folded] == [3] * 3 and bn_count(out) == 0
    s, _ = _scale_shift(model, params)
    want = _inits(model)[w].astype(np.float64) * s[:, None, None, None]
    np.testing.assert_array_equal(_inits(out)[w], want.astype(np.float32))


def _two_calls(second: str):
    """Conv(W, B) on x and on Relu(x); a BN after the first call, and after the second one
    with other values ('other') or none ('none')."""
    b = GraphBuilder(seed=5)
    w, bias = b.weight(4, 4, 3, 3), b.weight(4)
    c1 = b.node("Conv", ["x", w, bias], pads=[1] * 4)
    c2 = b.node("Conv", [b.node("Relu", ["x"]), w, bias], pads=[1] * 4)
    y1 = _bn(b, c1, _bn_params(b, 4))
    y2 = _bn(b, c2, _bn_params(b, 4)) if second == "other" else c2
    model = b.model([X4], [b.node("Add", [y1, y2])])
    return model, w, bias


@pytest.mark.parametrize(
    "second, why",
    [("other", "is followed by another BN"), ("none", "has no BN to fold")],
)
def test_calls_that_differ_are_left_or_get_copies(second, why):
    model, w, bias = _two_calls(second)
    feeds = {"x": _x(2, 4, 6, 6)}
    size = _inits(model)[w].nbytes + _inits(model)[bias].nbytes

    out, report = _fold_and_compare(model, feeds)
    assert bn_count(out) == bn_count(model) and not report.folded
    reason = report.left[0].reason
    assert size == 592 and "--duplicate-shared" in reason and "(+592 B)" in reason
    assert why in reason and "serve 2 calls" in reason

    out, report = _fold_and_compare(model, feeds, duplicate_shared=True)
    assert bn_count(out) == 0 and report.bytes_added == size
    assert report.folded[0].bytes_added == size and report.folded[0].shared_calls == 1
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == 2 and len({n.input[2] for n in convs}) == 2
    # the call without a BN keeps the original weight and bias
    if second == "none":
        after = _inits(out)
        np.testing.assert_array_equal(after[w], _inits(model)[w])
        np.testing.assert_array_equal(after[bias], _inits(model)[bias])


def test_public_api_takes_duplicate_shared():
    import bnexport

    model, _, _ = _two_calls("other")
    assert len(bnexport.fold_onnx(model)[1].left) == 2
    folded, report = bnexport.fold_onnx(model, duplicate_shared=True)
    assert bn_count(folded) == 0 and report.bytes_added > 0


def test_weight_also_read_by_another_op():
    b = GraphBuilder(seed=6)
    w, params = b.weight(4, 4, 1, 1), _bn_params(b, 4)
    y1 = _bn(b, b.node("Conv", ["x", w]), params)
    y2 = _bn(b, b.node("Conv", [b.node("Relu", ["x"]), w]), params)
    doubled = b.node("Mul", [w, b.const(np.array(2.0, np.float32))])
    model = b.model([X4], [b.node("Add", [y1, y2]), doubled])
    feeds = {"x": _x(2, 4, 6, 6)}
    out, report = _fold_and_compare(model, feeds)
    assert len(report.left) == 2
    assert "the weight is also read by Mul" in report.left[0].reason
    out, report = _fold_and_compare(model, feeds, duplicate_shared=True)
    # both calls take one copy, folded once; the Mul keeps the original
    assert [(d.shared_calls, d.bytes_added) for d in report.folded] == [(2, 64), (2, 0)]
    np.testing.assert_array_equal(_inits(out)[w], _inits(model)[w])


def test_calls_with_other_attributes_are_left():
    b = GraphBuilder(seed=7)
    w, params = b.weight(5, 6), _bn_params(b, 6)
    y1 = _bn(b, b.node("Gemm", ["x", w]), params)
    y2 = _bn(b, b.node("Gemm", ["x", w], alpha=2.0), params)
    model = b.model([("x", ["N", 5])], [b.node("Add", [y1, y2])])
    out, report = _fold_and_compare(model, {"x": _x(3, 5)})
    assert len(report.left) == 2 and "other attributes" in report.left[0].reason
    out, report = _fold_and_compare(model, {"x": _x(3, 5)}, duplicate_shared=True)
    assert bn_count(out) == 0


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_shared_layer_without_bias_gets_one_bias(op):
    """Two bias-free calls with equal BNs after them: one new bias that both calls read."""
    b = GraphBuilder(seed=8)
    w, params = b.weight(5, 6), _bn_params(b, 6)
    y1 = _bn(b, b.node(op, ["x", w]), params)
    y2 = _bn(b, b.node(op, [b.node("Relu", ["x"]), w]), params)
    model = b.model([("x", ["N", 5])], [y1, y2])
    out, report = _fold_and_compare(model, {"x": _x(3, 5)})
    assert [d.shared_calls for d in report.folded] == [2, 2]
    new = set(_inits(out)) - set(_inits(model))
    assert len(new) == 1  # the one bias
    readers = [n for n in out.graph.node if new & set(n.input)]
    assert [n.op_type for n in readers] == (["Add", "Add"] if op == "MatMul" else ["Gemm"] * 2)


def test_both_sides_of_a_shared_layer():
    """BN -> Conv -> BN on each of two inputs, one weight and equal BNs: four BNs, two folds
    into the one weight."""
    b = GraphBuilder(seed=9)
    w, bias, p_in, p_out = b.weight(4, 4, 1, 1), b.weight(4), _bn_params(b, 4), _bn_params(b, 4)
    outs = []
    for x in ("x", b.node("Relu", ["x"])):
        outs.append(_bn(b, b.node("Conv", [_bn(b, x, p_in), w, bias]), p_out))
    model = b.model([X4], outs)
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    assert bn_count(out) == 0 and [d.shared_calls for d in report.folded] == [2] * 4
    s_in, t_in = _scale_shift(model, p_in)
    s_out, t_out = _scale_shift(model, p_out)
    w0, b0 = _inits(model)[w][:, :, 0, 0].astype(np.float64), _inits(model)[bias]
    want_w = s_out[:, None] * w0 * s_in[None, :]
    want_b = s_out * (b0 + w0 @ t_in) + t_out
    np.testing.assert_allclose(_inits(out)[w][:, :, 0, 0], want_w, rtol=1e-6)
    np.testing.assert_allclose(_inits(out)[bias], want_b, rtol=1e-5, atol=1e-6)


def test_copy_carries_the_folds_already_decided():
    """Equal BNs before both calls of a weight, different BNs after them: the BNs before fold
    once into the shared weight; with duplicate_shared, the call that then takes a copy keeps
    that fold."""
    b = GraphBuilder(seed=19)
    w, bias, p_in = b.weight(4, 4, 1, 1), b.weight(4), _bn_params(b, 4)
    outs = [
        _bn(b, b.node("Conv", [_bn(b, x, p_in), w, bias]), _bn_params(b, 4))
        for x in ("x", b.node("Relu", ["x"]))
    ]
    model = b.model([X4], outs)
    feeds = {"x": _x(2, 4, 6, 6)}
    out, report = _fold_and_compare(model, feeds)
    assert [d.status for d in report.decisions] == ["folded", "left", "folded", "left"]
    out, report = _fold_and_compare(model, feeds, duplicate_shared=True)
    assert bn_count(out) == 0 and report.bytes_added == 4 * 16 + 4 * 4


# --------------------------------------------------------------------------- torch exports


class _Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3),
            nn.BatchNorm2d(5),
        )

    def forward(self, *xs):
        return tuple(self.enc(x) for x in xs)


class _Looped(nn.Module):
    """One Conv -> BN -> ReLU block applied three times in a row."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        for _ in range(3):
            x = torch.relu(self.bn(self.conv(x)))
        return x


class _LoopedNoBias(_Looped):
    """The same block with a bias-free conv: the exporter computes a zero bias per call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)


class _SharedConvOneBn(nn.Module):
    """One conv and one BN module, both called on two inputs: an FX-style fuser folds the BN
    into the conv once per call, so the weight is scaled twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, a, b):
        return self.bn(self.conv(a)) + self.bn(self.conv(b))


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return model.eval()


def _export(model: nn.Module, args: tuple) -> onnx.ModelProto:
    program = torch.onnx.export(model, args, dynamo=True, optimize=False, verbose=False)
    return program.model_proto


def _torch_scale(bn: nn.BatchNorm2d) -> np.ndarray:
    with torch.no_grad():
        return (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, args, name, calls",
    [
        (_Siamese, 2, "enc.0", 2),
        (_Siamese, 3, "enc.0", 3),
        (_Looped, 1, "conv", 3),
        (_LoopedNoBias, 1, "conv", 3),
        (_SharedConvOneBn, 2, "conv", 2),
    ],
    ids=["siamese2", "siamese3", "loop", "loop_no_bias", "one_bn_two_calls"],
)
def test_torch_exported_shared_layers_fold_once(model, args, name, calls):
    module = _randomize(model())
    channels = 4 if issubclass(model, _Looped) else 3
    inputs = tuple(torch.randn(2, channels, 8, 8) for _ in range(args))
    proto = _export(module, inputs)
    assert bn_count(proto) >= calls
    out, report = fold_proto(proto)
    onnx.checker.check_model(out, full_check=True)
    assert bn_count(out) == 0 and not report.left
    assert {d.shared_calls for d in report.folded} == {calls}
    feeds = {i.name: x.numpy() for i, x in zip(proto.graph.input, inputs)}
    with torch.no_grad():
        want = module(*inputs)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    assert max_rel_diff(want, run(out, feeds)) <= 1e-5
    assert max_rel_diff(run(proto, feeds), run(out, feeds)) <= 1e-5
    conv = module.get_submodule(name)
    bn = module.enc[1] if model is _Siamese else module.bn
    want_w = conv.weight.detach().double().numpy() * _torch_scale(bn)[:, None, None, None]
    np.testing.assert_allclose(_inits(out)[f"{name}.weight"], want_w, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- BN -> padded conv


def _shift_kept_check(model, feeds, *, layer_op="Conv"):
    """One BN before a padded layer: folded with its shift kept, the BN replaced by one Add."""
    out, report = _fold_and_compare(model, feeds)
    (d,) = report.decisions
    assert d.folded and (d.direction, d.shift_kept) == ("following", True), d
    assert report.adds_added == 1 and bn_count(out) == 0
    before, after = _ops(model), _ops(out)
    assert after.count("Add") == before.count("Add") + 1
    assert len(after) == len(before) and layer_op in after
    return out, report


PADDED = [
    (2, {"pads": [1] * 4}),
    (2, {"pads": [2] * 4}),
    (2, {"pads": [0, 1, 2, 0]}),
    (2, {"pads": [2] * 4, "dilations": [2, 2]}),
    (2, {"pads": [1] * 4, "strides": [2, 2]}),
    (2, {"pads": [1] * 4, "group": 2}),
    (2, {"pads": [1] * 4, "group": 4}),
    (2, {"auto_pad": "SAME_UPPER"}),
    (2, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    (1, {"pads": [1, 1]}),
    (3, {"pads": [1] * 6}),
]


@pytest.mark.parametrize("dims, attrs", PADDED, ids=[str(a) for _, a in PADDED])
@pytest.mark.parametrize("source", ["input", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_before_padded_conv(dims, attrs, source, bias):
    b = GraphBuilder(seed=10)
    params = _bn_params(b, 4)
    groups = attrs.get("group", 1)
    x = "x" if source == "input" else b.node("Relu", ["x"])
    w = b.weight(8, 4 // groups, *[3] * dims)
    inputs = [_bn(b, x, params), w] + ([b.weight(8)] if bias else [])
    model = b.model([("x", ["N", 4, *[6] * dims])], [b.node("Conv", inputs, **attrs)])
    out, _ = _shift_kept_check(model, {"x": _x(2, 4, *[6] * dims)})
    # the weight takes the scale per input channel; the bias is unchanged; the Add adds t / s
    s, t = _scale_shift(model, params)
    grid = np.repeat(s.reshape(groups, 1, -1), 8 // groups, axis=0).reshape(8, -1)
    want_w = _inits(model)[w].astype(np.float64) * grid.reshape(8, 4 // groups, *[1] * dims)
    after = _inits(out)
    np.testing.assert_array_equal(after[w], want_w.astype(np.float32))
    if bias:
        np.testing.assert_array_equal(after[inputs[2]], _inits(model)[inputs[2]])
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert add.input[0] == x
    np.testing.assert_array_equal(
        after[add.input[1]], (t / s).astype(np.float32).reshape(4, *[1] * dims)
    )


@pytest.mark.parametrize(
    "attrs",
    [{}, {"pads": [1] * 4}, {"strides": [2, 2], "output_padding": [1, 1]}, {"group": 2}],
)
def test_bn_before_conv_transpose(attrs):
    b = GraphBuilder(seed=11)
    groups = attrs.get("group", 1)
    x = b.bn(b.node("Relu", ["x"]), 4)
    y = b.node("ConvTranspose", [x, b.weight(4, 6 // groups, 3, 3)], **attrs)
    _shift_kept_check(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)}, layer_op="ConvTranspose")


def test_transparent_ops_between_stay():
    """BN -> Dropout -> Pad(reflect) -> padded Conv: the Add replaces the BN, the ops stay."""
    b = GraphBuilder(seed=12)
    y = b.node("Dropout", [b.bn(b.node("Relu", ["x"]), 4)])
    y = b.node("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], mode="reflect")
    model = b.model([X4], [b.node("Conv", [y, b.weight(5, 4, 3, 3)], pads=[1] * 4)])
    out, _ = _shift_kept_check(model, {"x": _x(2, 4, 6, 6)})
    assert _ops(out) == ["Relu", "Add", "Dropout", "Pad", "Conv"]


def test_unpadded_conv_still_folds_the_shift_into_its_bias():
    b = GraphBuilder(seed=13)
    y = b.node("Conv", [b.bn(b.node("Relu", ["x"]), 4), b.weight(5, 4, 3, 3)])
    out, report = _fold_and_compare(b.model([X4], [y]), {"x": _x(2, 4, 6, 6)})
    assert report.folded[0].shift_kept is False and _ops(out) == ["Relu", "Conv"]


def test_zero_gamma_before_padded_conv_is_left():
    """The reason names the padded layer, the channels with scale 0 and why the shift
    cannot stay as an Add."""
    b = GraphBuilder(seed=14)
    params = _bn_params(b, 4, gamma=np.array([1.0, 0.0, -0.5, 0.0]))
    conv = b.node(
        "Conv", [_bn(b, b.node("Relu", ["x"]), params), b.weight(5, 4, 3, 3)], pads=[1] * 4
    )
    model = b.model([X4], [conv])
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    assert bn_count(out) == 1
    reason = report.left[0].reason
    assert f"{model.graph.node[-1].name} pads with zeros that do not pass through the BN" in reason
    assert "channels 1, 3 of the BN have scale 0 (gamma = 0)" in reason
    assert "its shift cannot be kept as an Add before the padding" in reason


def test_bn_output_also_used_elsewhere_is_left():
    b = GraphBuilder(seed=15)
    bn = b.bn(b.node("Relu", ["x"]), 4)
    conv = b.node("Conv", [bn, b.weight(4, 4, 3, 3)], pads=[1] * 4)
    model = b.model([X4], [b.node("Add", [conv, bn])])
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    reason = report.left[0].reason
    assert bn_count(out) == 1 and "its output feeds Add" in reason, reason


def test_unknown_rank_is_left():
    """A BN whose input comes from a Reshape to a shape fed at run time: its rank is unknown,
    so the shape of the Add's shift is too."""
    b = GraphBuilder(seed=16)
    x = b.node("Reshape", ["x", "shape"])
    y = b.node("Conv", [b.bn(x, 4), b.weight(4, 4, 3, 3)], pads=[1] * 4)
    model = b.model([X4, ("shape", ["k"])], [y])
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    feeds = {"x": _x(2, 4, 6, 6), "shape": np.array([2, 4, 6, 6])}
    out, report = _fold_and_compare(model, feeds)
    assert bn_count(out) == 1 and "rank of its input is unknown" in report.left[0].reason


def test_float16_shift_that_would_overflow_is_left():
    b = GraphBuilder(seed=17, dtype=np.float16)
    gamma = b.const(np.full(4, 1e-3, np.float16), "gamma")
    beta = b.const(np.full(4, 100.0, np.float16), "beta")
    params = [gamma, beta, b.const(np.zeros(4, np.float16)), b.const(np.ones(4, np.float16))]
    y = b.node("Conv", [_bn(b, b.node("Relu", ["x"]), params), b.weight(4, 4, 3, 3)], pads=[1] * 4)
    model = b.model([X4], [y], elem=TensorProto.FLOAT16)
    out, report = fold_proto(model)
    assert bn_count(out) == 1 and "beyond the largest finite float16" in report.left[0].reason


def test_shared_padded_conv_after_input_bns():
    """A Siamese branch that starts with a BN: BN -> padded Conv on two inputs, one weight and
    one set of BN parameters. Both BNs become Adds, the weight takes the scale once."""
    b = GraphBuilder(seed=18)
    w, bias, params = b.weight(5, 4, 3, 3), b.weight(5), _bn_params(b, 4)
    outs = [
        b.node("Conv", [_bn(b, x, params), w, bias], pads=[1] * 4)
        for x in ("x", b.node("Relu", ["x"]))
    ]
    model = b.model([X4], outs)
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    assert [(d.shift_kept, d.shared_calls) for d in report.folded] == [(True, 2)] * 2
    assert report.adds_added == 2 and _ops(out).count("Add") == 2
    s, _ = _scale_shift(model, params)
    want = _inits(model)[w].astype(np.float64) * s[None, :, None, None]
    np.testing.assert_array_equal(_inits(out)[w], want.astype(np.float32))
    np.testing.assert_array_equal(_inits(out)[bias], _inits(model)[bias])


def test_shared_refusal_wording():
    """The reason names the layer, the calls, what differs, the flag and the bytes it adds."""
    model, w, bias = _two_calls("none")
    _, report = fold_proto(model)
    name, other = model.graph.node[0].name, model.graph.node[2].name
    reason = report.left[0].reason
    assert reason.startswith(f"preceding: the weights of {name} serve 2 calls and "), reason
    assert f"Conv '{other}' has no BN to fold, so folding into them would change" in reason
    # the copy: a 4x4x3x3 float32 weight (576 bytes) and a bias of 4 floats (16 bytes)
    flag = "--duplicate-shared gives this call its own folded copy of the weights (+592 B);"
    assert f"; {flag}" in reason, reason


def test_three_calls_with_three_bns_name_the_bns_left_earlier():
    b = GraphBuilder(seed=7)
    w, bias = b.weight(4, 4, 3, 3), b.weight(4)
    outs = []
    for k in range(3):
        x = "x" if k == 0 else b.node("Relu", [outs[-1]])
        c = b.node("Conv", [x, w, bias], pads=[1] * 4)
        outs.append(_bn(b, c, _bn_params(b, 4)))
    model = b.model([X4], [outs[-1]])
    out, report = _fold_and_compare(model, {"x": _x(2, 4, 6, 6)})
    assert len(report.left) == 3
    for d in report.left:
        assert "has no BN to fold" not in d.reason, d.reason
        assert "another BN" in d.reason or "a BN that stays" in d.reason, d.reason


@pytest.mark.parametrize("padding", [0, 1])
def test_bn_before_a_bias_free_conv_of_a_torch_export(padding):
    """torch.onnx gives a bias-free conv a zero bias computed by CastLike(0, BN output): that
    reads only the BN output's dtype, so the BN still folds."""
    module = _randomize(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding, bias=False))
    )
    x = torch.randn(2, 3, 8, 8)
    proto = _export(module, (x,))
    out, report = fold_proto(proto)
    assert bn_count(out) == 0 and not report.left
    assert report.folded[0].shift_kept == bool(padding)
    feeds = {proto.graph.input[0].name: x.numpy()}
    with torch.no_grad():
        want = module(x).numpy()
    assert max_rel_diff([want], run(out, feeds)) <= 1e-5
