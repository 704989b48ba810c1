"""BatchNorm-fusion test models of peer tools, rebuilt as hand-made ONNX graphs.

Each builder returns a fresh `onnx.ModelProto` equivalent to one model of a peer's
BatchNorm-fusion tests: same ops, attributes, shapes, opset and IR version, with the peer's
weight distribution drawn from a seeded `numpy.random.default_rng` (float32, one fixed seed per
case). Symbolic batch dimensions of the peer models are fixed to 1 so every shape is static.
Every model passes `onnx.checker.check_model(model, full_check=True)` and runs in onnxruntime
on the CPU execution provider.

Sources (read from the peers' GitHub repositories):

- onnxscript (microsoft/onnxscript):
  ``onnxscript/rewriter/rules/common/_fuse_batchnorm_test.py`` (class ``FuseBatchnormTest``;
  the tests call ``_fuse_batchnorm.rules.apply_to_model``), plus the Gemm ``beta`` cases that
  pull request #3027 ("Fold Gemm beta into the fused BatchNorm bias", in onnxscript 0.7.2)
  adds to that file.
- onnxoptimizer (onnx/optimizer): ``onnxoptimizer/test/optimizer_test.py``, pass
  ``fuse_bn_into_conv``: ``test_fuse_bn_into_conv_simple`` as on the main branch and as first
  committed (b4950ec5, 2020), and ``test_fuse_bn_into_conv_transpose_simple`` from the unmerged
  pull request #316 (commit dabff0b0).
- onnxslim (inisis/OnnxSlim): ``tests/test_fusion_patterns.py`` (``test_convbn_pattern``,
  ``test_convbn_pattern_with_multiple_unnamed_convs``, ``test_convtransposebn_pattern``),
  ``tests/test_pattern_matcher.py`` (``test_conv_bn``) and ``tests/test_coverage.py``
  (``test_bn_model``, ``test_sequential_model``). The torch-exported ones are rebuilt as the
  graph torch.onnx.export (TorchScript exporter, eval mode) emits before any folding.
- ``derived_*`` cases have no peer test: they exercise a refusal condition written in the
  peers' pass sources (onnxoptimizer ``fuse_bn_into_conv.h``, onnxslim
  ``core/pattern/fusion/convbn.py``, onnxscript ``_fuse_batchnorm.py``).

Left out, as they cannot run in onnxruntime on the CPU: onnxscript's
``test_fuse_batchnorm_convtranspose_grouped_invalid_skipped`` (ConvTranspose with 32 input
channels and group=3, which the peer test never runs either), and the float64 variant of the
first onnxoptimizer ``test_fuse_bn_into_conv_simple`` (no float64 Conv kernel on the CPU).

``PEER_CASES`` maps a case name to ``(builder, description)``; the description names the
source test and what the peer test expects (folded or not, and why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_F32 = TensorProto.FLOAT

_ONNXSCRIPT_OPSET = 17  # `< ir_version: 7, opset_import: ["" : 17] >` in the peer tests
_ONNXSCRIPT_IR = 7


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name=name)


def _vi(name: str, shape: Sequence[int], elem_type: int = _F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto],
    *,
    opset: int,
    ir_version: int,
    value_info: Sequence[onnx.ValueInfoProto] = (),
    name: str = "test_model",
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, inputs, outputs, initializer=initializers, value_info=list(value_info)
    )
    return helper.make_model(
        graph,
        producer_name="bnexport-peer-cases",
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
    )


# --------------------------------------------------------------------------------------------
# onnxscript: onnxscript/rewriter/rules/common/_fuse_batchnorm_test.py
# --------------------------------------------------------------------------------------------


def _onnxscript_bn_params(rng: np.random.Generator, size: int, suffix: str = "") -> list:
    """`_create_batchnorm_params`: gamma, beta, mean ~ randn; var = |randn|."""
    return [
        _init(f"gamma{suffix}", _randn(rng, size)),
        _init(f"beta{suffix}", _randn(rng, size)),
        _init(f"input_mean{suffix}", _randn(rng, size)),
        _init(f"input_var{suffix}", np.abs(_randn(rng, size))),
    ]


_BN_INPUTS = ["X1", "gamma", "beta", "input_mean", "input_var"]


def _onnxscript_conv(bias: bool, group: int, seed: int) -> onnx.ModelProto:
    """`test_fuse_batchnorm_conv`: X[N,32,14,16] -> Conv<group>(X, W[, B]) -> BN(64)."""
    rng = _rng(seed)
    w = _randn(rng, 64, 32 // group, 3, 3)
    inits = [_init("W", w), *_onnxscript_bn_params(rng, 64)]
    conv_inputs = ["X", "W"]
    if bias:
        inits.append(_init("B", _randn(rng, 64)))
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["X1"], group=group),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 32, 14, 16])],
        [_vi("Y", [1, 64, 12, 14])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_conv_bn() -> onnx.ModelProto:
    return _onnxscript_conv(bias=False, group=1, seed=101)


def onnxscript_conv_bias_bn() -> onnx.ModelProto:
    return _onnxscript_conv(bias=True, group=1, seed=102)


def onnxscript_conv_group2_bn() -> onnx.ModelProto:
    return _onnxscript_conv(bias=False, group=2, seed=103)


def onnxscript_conv_bias_group2_bn() -> onnx.ModelProto:
    return _onnxscript_conv(bias=True, group=2, seed=104)


def _onnxscript_convtranspose(bias: bool, group: int, seed: int) -> onnx.ModelProto:
    """`test_fuse_batchnorm_convtranspose`: W[32,64,3,3], group g, BN over 64*g channels."""
    rng = _rng(seed)
    out_channels = 64 * group
    inits = [_init("W", _randn(rng, 32, 64, 3, 3)), *_onnxscript_bn_params(rng, out_channels)]
    conv_inputs = ["X", "W"]
    if bias:
        inits.append(_init("B", _randn(rng, out_channels)))
        conv_inputs.append("B")
    nodes = [
        helper.make_node("ConvTranspose", conv_inputs, ["X1"], group=group),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 32, 14, 16])],
        [_vi("Y", [1, out_channels, 16, 18])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_convtranspose_bn() -> onnx.ModelProto:
    return _onnxscript_convtranspose(bias=False, group=1, seed=111)


def onnxscript_convtranspose_bias_bn() -> onnx.ModelProto:
    return _onnxscript_convtranspose(bias=True, group=1, seed=112)


def onnxscript_convtranspose_group4_bn() -> onnx.ModelProto:
    return _onnxscript_convtranspose(bias=False, group=4, seed=113)


def onnxscript_convtranspose_bias_group4_bn() -> onnx.ModelProto:
    return _onnxscript_convtranspose(bias=True, group=4, seed=114)


def _onnxscript_gemm(
    bias: bool, trans_b: int, seed: int, beta: float | None = None
) -> onnx.ModelProto:
    """`test_fuse_batchnorm_gemm`: X[N,32] -> Gemm<transB>(X, W[, B]) -> BN(64)."""
    rng = _rng(seed)
    w = _randn(rng, 32, 64)
    if trans_b:
        w = np.ascontiguousarray(w.T)
    inits = [_init("W", w), *_onnxscript_bn_params(rng, 64)]
    gemm_inputs = ["X", "W"]
    if bias:
        inits.append(_init("B", _randn(rng, 64)))
        gemm_inputs.append("B")
    attrs: dict = {"transB": trans_b}
    if beta is not None:
        attrs["beta"] = beta
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["X1"], **attrs),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 32])],
        [_vi("Y", [1, 64])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_gemm_bn() -> onnx.ModelProto:
    return _onnxscript_gemm(bias=False, trans_b=0, seed=121)


def onnxscript_gemm_bias_bn() -> onnx.ModelProto:
    return _onnxscript_gemm(bias=True, trans_b=0, seed=122)


def onnxscript_gemm_transb_bn() -> onnx.ModelProto:
    return _onnxscript_gemm(bias=False, trans_b=1, seed=123)


def onnxscript_gemm_bias_transb_bn() -> onnx.ModelProto:
    return _onnxscript_gemm(bias=True, trans_b=1, seed=124)


def onnxscript_gemm_beta2_bn() -> onnx.ModelProto:
    """PR #3027: `Gemm<beta=2.0>(X, W, B)` then BN (the PR's exact test code was not read)."""
    return _onnxscript_gemm(bias=True, trans_b=0, seed=125, beta=2.0)


def onnxscript_gemm_beta0p5_bn() -> onnx.ModelProto:
    """PR #3027: `Gemm<beta=0.5>(X, W, B)` then BN."""
    return _onnxscript_gemm(bias=True, trans_b=0, seed=126, beta=0.5)


def onnxscript_non_initializers() -> onnx.ModelProto:
    """`test_fuse_batchnorm_non_initializers`: W, B and all BN params are plain graph inputs."""
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["X1"]),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    inputs = [
        _vi("X", [1, 32, 14, 16]),
        _vi("W", [64, 32, 3, 3]),
        _vi("B", [64]),
        _vi("gamma", [64]),
        _vi("beta", [64]),
        _vi("input_var", [64]),
        _vi("input_mean", [64]),
    ]
    return _model(
        nodes,
        inputs,
        [_vi("Y", [1, 64, 12, 14])],
        [],
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_graph_inputs() -> onnx.ModelProto:
    """`test_fuse_batchnorm_graph_inputs`: W is a graph input that also has an initializer."""
    rng = _rng(131)
    inits = [_init("W", _randn(rng, 64, 32, 3, 3)), *_onnxscript_bn_params(rng, 64)]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["X1"]),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 32, 14, 16]), _vi("W", [64, 32, 3, 3])],
        [_vi("Y", [1, 64, 12, 14])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_two_convs_same_parent() -> onnx.ModelProto:
    """`test_fuse_batchnorm_does_not_collide_names_with_same_parent_node`."""
    rng = _rng(141)
    inits = [
        _init("W1", _randn(rng, 64, 32, 3, 3)),
        *_onnxscript_bn_params(rng, 64, suffix="_64"),
        _init("W2", _randn(rng, 256, 32, 3, 3)),
        *_onnxscript_bn_params(rng, 256, suffix="_256"),
    ]

    def bn(x: str, size: int, y: str) -> onnx.NodeProto:
        params = [f"{p}_{size}" for p in ("gamma", "beta", "input_mean", "input_var")]
        return helper.make_node("BatchNormalization", [x, *params], [y])

    nodes = [
        helper.make_node("MaxPool", ["X"], ["X1"], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["X1", "W1"], ["X2"]),
        bn("X2", 64, "Y1"),
        helper.make_node("Conv", ["X1", "W2"], ["X3"]),
        bn("X3", 256, "Y2"),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 32, 14, 16])],
        [_vi("Y1", [1, 64, 10, 12]), _vi("Y2", [1, 256, 10, 12])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


def onnxscript_shared_weights() -> onnx.ModelProto:
    """`test_fuse_batchnorm_skips_shared_weight_initializers` (issue #2382)."""
    rng = _rng(151)
    inits = [
        _init("W", _randn(rng, 16, 32, 3, 3)),
        _init("B", _randn(rng, 16)),
        *_onnxscript_bn_params(rng, 16),
    ]
    params = ["gamma", "beta", "input_mean", "input_var"]
    nodes = [
        helper.make_node("Conv", ["X1", "W", "B"], ["C1"]),
        helper.make_node("BatchNormalization", ["C1", *params], ["BN1"]),
        helper.make_node("Conv", ["X2", "W", "B"], ["C2"]),
        helper.make_node("BatchNormalization", ["C2", *params], ["BN2"]),
        helper.make_node("Add", ["BN1", "BN2"], ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X1", [1, 32, 14, 16]), _vi("X2", [1, 32, 14, 16])],
        [_vi("Y", [1, 16, 12, 14])],
        inits,
        opset=_ONNXSCRIPT_OPSET,
        ir_version=_ONNXSCRIPT_IR,
    )


# --------------------------------------------------------------------------------------------
# onnxoptimizer: onnxoptimizer/test/optimizer_test.py, pass fuse_bn_into_conv
# --------------------------------------------------------------------------------------------

_ONNXOPTIMIZER_OPSET = 13  # LATEST_STABLE_OPSET_VERSION, used by `_optimized`
_ONNXOPTIMIZER_IR = 10  # `_optimized` builds with ir_version=10


def _raw(name: str, array: np.ndarray, elem_type: int) -> TensorProto:
    """The peer's `helper.make_tensor(name, type, shape, npa.tobytes(), raw=True)`."""
    return helper.make_tensor(name, elem_type, array.shape, array.tobytes(), raw=True)


def _onnxoptimizer_params(
    rng: np.random.Generator, w_shape: Sequence[int], channels: int, dtype
) -> dict[str, np.ndarray]:
    """W, B, scale, b, mean ~ randn + 2 and var = |randn| + 2, as in the peer tests."""
    return {
        "W": _randn(rng, *w_shape, dtype=dtype) + 2,
        "B": _randn(rng, channels, dtype=dtype) + 2,
        "scale": _randn(rng, channels, dtype=dtype) + 2,
        "b": _randn(rng, channels, dtype=dtype) + 2,
        "mean": _randn(rng, channels, dtype=dtype) + 2,
        "var": np.abs(_randn(rng, channels, dtype=dtype)) + 2,
    }


_ONNXOPTIMIZER_BN = helper.make_node(
    "BatchNormalization", ["Y", "scale", "b", "mean", "var"], ["Z"]
)


def onnxoptimizer_fuse_bn_into_conv_simple() -> onnx.ModelProto:
    """`test_fuse_bn_into_conv_simple` on main: X(5,2,28,28) -> Conv(W,B) -> BN(3)."""
    params = _onnxoptimizer_params(_rng(201), (3, 2, 5, 5), 3, np.float32)
    return _model(
        [helper.make_node("Conv", ["X", "W", "B"], ["Y"]), _ONNXOPTIMIZER_BN],
        [_vi("X", [5, 2, 28, 28])],
        [_vi("Z", [5, 3, 24, 24])],
        [_raw(n, a, _F32) for n, a in params.items()],
        opset=_ONNXOPTIMIZER_OPSET,
        ir_version=_ONNXOPTIMIZER_IR,
        value_info=[_vi("Y", [5, 3, 24, 24])],
        name="test",
    )


def onnxoptimizer_fuse_bn_into_conv_simple_2020() -> onnx.ModelProto:
    """First `test_fuse_bn_into_conv_simple` (b4950ec5): every parameter is also an input.

    That test built the model with `helper.make_model(graph)` defaults of its time (onnx 1.7:
    opset 12, IR 7), so initializers listed among the graph inputs are legal defaults. It also
    ran a float64 variant, left out here (onnxruntime has no float64 Conv on the CPU).
    """
    params = _onnxoptimizer_params(_rng(202), (3, 2, 5, 5), 3, np.float32)
    inputs = [_vi("X", [5, 2, 28, 28])] + [_vi(n, a.shape) for n, a in params.items()]
    return _model(
        [helper.make_node("Conv", ["X", "W", "B"], ["Y"]), _ONNXOPTIMIZER_BN],
        inputs,
        [_vi("Z", [5, 3, 24, 24])],
        [_raw(n, a, _F32) for n, a in params.items()],
        opset=12,
        ir_version=7,
        value_info=[_vi("Y", [5, 3, 24, 24])],
        name="test",
    )


def onnxoptimizer_fuse_bn_into_conv_transpose_simple() -> onnx.ModelProto:
    """PR #316 `test_fuse_bn_into_conv_transpose_simple`: ConvTranspose 4->6, stride 2."""
    in_channels, out_channels = 4, 6
    params = _onnxoptimizer_params(
        _rng(204), (in_channels, out_channels, 2, 2), out_channels, np.float32
    )
    return _model(
        [
            helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], strides=(2, 2)),
            _ONNXOPTIMIZER_BN,
        ],
        [_vi("X", [1, in_channels, 8, 8])],
        [_vi("Z", [1, out_channels, 16, 16])],
        [_raw(n, a, _F32) for n, a in params.items()],
        opset=_ONNXOPTIMIZER_OPSET,
        ir_version=_ONNXOPTIMIZER_IR,
        value_info=[_vi("Y", [1, out_channels, 16, 16])],
        name="test",
    )


# --------------------------------------------------------------------------------------------
# onnxslim: tests/test_fusion_patterns.py, tests/test_pattern_matcher.py, tests/test_coverage.py
# --------------------------------------------------------------------------------------------


def _onnxslim_bn_params(rng: np.random.Generator, size: int, suffix: str = "") -> list:
    """scale, bias, mean ~ randn; var = |randn| (test_fusion_patterns.py)."""
    return [
        _init(f"scale{suffix}", _randn(rng, size)),
        _init(f"bias{suffix}", _randn(rng, size)),
        _init(f"mean{suffix}", _randn(rng, size)),
        _init(f"var{suffix}", np.abs(_randn(rng, size))),
    ]


def onnxslim_convbn_pattern() -> onnx.ModelProto:
    """`test_convbn_pattern`: 1x3x224x224 -> Conv 3->16 k3 s2 p1 (no bias) -> BN, opset 11."""
    rng = _rng(301)
    inits = [_init("weights", _randn(rng, 16, 3, 3, 3)), *_onnxslim_bn_params(rng, 16)]
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "weights"],
            ["conv_output"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv_output", "scale", "bias", "mean", "var"],
            ["output"],
            epsilon=1e-5,
        ),
    ]
    return _model(
        nodes,
        [_vi("input", [1, 3, 224, 224])],
        [_vi("output", [1, 16, 112, 112])],
        inits,
        opset=11,
        ir_version=7,
        name="convbn-test",
    )


def onnxslim_convbn_multiple_unnamed_convs() -> onnx.ModelProto:
    """`test_convbn_pattern_with_multiple_unnamed_convs`: two unnamed 1x1 Conv->BN branches.

    The peer uses constant weights (ones; BN scale 1, bias 0, mean 0, var 1, i.e. an identity
    BN); here they are seeded random so that a wrong fold changes the outputs.
    """
    rng = _rng(302)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for suffix in ("a", "b"):
        inits.append(_init(f"weights_{suffix}", _randn(rng, 2, 2, 1, 1)))
        inits += _onnxslim_bn_params(rng, 2, suffix=f"_{suffix}")
        conv_inputs = ["input", f"weights_{suffix}"]
        nodes.append(helper.make_node("Conv", conv_inputs, [f"conv_output_{suffix}"]))
        bn_inputs = [f"conv_output_{suffix}"]
        bn_inputs += [f"{p}_{suffix}" for p in ("scale", "bias", "mean", "var")]
        nodes.append(helper.make_node("BatchNormalization", bn_inputs, [f"output_{suffix}"]))
    return _model(
        nodes,
        [_vi("input", [1, 2, 4, 4])],
        [_vi("output_a", [1, 2, 4, 4]), _vi("output_b", [1, 2, 4, 4])],
        inits,
        opset=11,
        ir_version=7,
        name="unnamed-convbn-test",
    )


def onnxslim_convtransposebn_pattern() -> onnx.ModelProto:
    """`test_convtransposebn_pattern`: ConvTranspose 3->16 k3 s2 p1 output_padding 1 -> BN."""
    rng = _rng(303)
    inits = [_init("weights", _randn(rng, 3, 16, 3, 3)), *_onnxslim_bn_params(rng, 16)]
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["input", "weights"],
            ["convt_output"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            output_padding=[1, 1],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["convt_output", "scale", "bias", "mean", "var"],
            ["output"],
            epsilon=1e-5,
        ),
    ]
    return _model(
        nodes,
        [_vi("input", [1, 3, 224, 224])],
        [_vi("output", [1, 16, 448, 448])],
        inits,
        opset=11,
        ir_version=7,
        name="convtransposebn-test",
    )


def _torch_bn(prefix: str, x: str, y: str, rng: np.random.Generator, c: int) -> tuple:
    """A BatchNorm2d as the TorchScript exporter writes it (eval mode), seeded parameters."""
    names = [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    arrays = [
        _randn(rng, c),
        _randn(rng, c),
        _randn(rng, c),
        np.abs(_randn(rng, c)) + np.float32(0.1),
    ]
    node = helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-5, momentum=0.9)
    return node, [_init(n, a) for n, a in zip(names, arrays)]


def _torch_conv(
    prefix: str, x: str, y: str, rng: np.random.Generator, cin: int, cout: int, pad: int
) -> tuple:
    """An nn.Conv2d(cin, cout, 3, padding=pad) (with bias) as the exporter writes it."""
    inits = [
        _init(f"{prefix}.weight", _randn(rng, cout, cin, 3, 3)),
        _init(f"{prefix}.bias", _randn(rng, cout)),
    ]
    node = helper.make_node(
        "Conv",
        [x, f"{prefix}.weight", f"{prefix}.bias"],
        [y],
        dilations=[1, 1],
        group=1,
        kernel_shape=[3, 3],
        pads=[pad] * 4,
        strides=[1, 1],
    )
    return node, inits


def onnxslim_conv_bn_torch() -> onnx.ModelProto:
    """`test_pattern_matcher.py::test_conv_bn`: Conv2d(1,1,3) -> BatchNorm2d(1), opset 14."""
    rng = _rng(304)
    conv, conv_inits = _torch_conv("conv", "input", "/conv/Conv_output_0", rng, 1, 1, 0)
    bn, bn_inits = _torch_bn("bn", "/conv/Conv_output_0", "output", rng, 1)
    return _model(
        [conv, bn],
        [_vi("input", [1, 1, 24, 24])],
        [_vi("output", [1, 1, 22, 22])],
        conv_inits + bn_inits,
        opset=14,
        ir_version=8,
        name="main_graph",
    )


def onnxslim_bn_only() -> onnx.ModelProto:
    """`test_coverage.py::test_bn_model`: a lone BatchNorm2d(3) in eval mode, opset 14."""
    bn, inits = _torch_bn("bn", "input", "output", _rng(305), 3)
    return _model(
        [bn],
        [_vi("input", [1, 3, 32, 32])],
        [_vi("output", [1, 3, 32, 32])],
        inits,
        opset=14,
        ir_version=8,
        name="main_graph",
    )


def onnxslim_sequential_conv_bn_relu() -> onnx.ModelProto:
    """`test_coverage.py::test_sequential_model`: (Conv3x3 -> BN -> ReLU) x2, 3->16->32."""
    rng = _rng(306)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = "input"
    for i, (cin, cout) in enumerate([(3, 16), (16, 32)]):
        conv_out, bn_out = f"/seq/{3 * i}/Conv_output_0", f"/seq/{3 * i + 1}/BN_output_0"
        relu_out = "output" if i == 1 else f"/seq/{3 * i + 2}/Relu_output_0"
        conv, conv_inits = _torch_conv(f"seq.{3 * i}", x, conv_out, rng, cin, cout, 1)
        bn, bn_inits = _torch_bn(f"seq.{3 * i + 1}", conv_out, bn_out, rng, cout)
        nodes += [conv, bn, helper.make_node("Relu", [bn_out], [relu_out])]
        inits += conv_inits + bn_inits
        x = relu_out
    return _model(
        nodes,
        [_vi("input", [1, 3, 32, 32])],
        [_vi("output", [1, 32, 32, 32])],
        inits,
        opset=14,
        ir_version=8,
        name="main_graph",
    )


# --------------------------------------------------------------------------------------------
# derived: refusal conditions in the peers' pass sources, with no peer test of their own
# --------------------------------------------------------------------------------------------


def derived_conv_output_used_twice() -> onnx.ModelProto:
    """Conv output feeds the BN and a Relu graph output as well."""
    rng = _rng(401)
    inits = [
        _init("W", _randn(rng, 8, 4, 3, 3)),
        _init("B", _randn(rng, 8)),
        *_onnxscript_bn_params(rng, 8),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["X1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
        helper.make_node("Relu", ["X1"], ["R"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 4, 10, 10])],
        [_vi("Y", [1, 8, 10, 10]), _vi("R", [1, 8, 10, 10])],
        inits,
        opset=18,
        ir_version=8,
    )


def derived_bn_params_constant_nodes() -> onnx.ModelProto:
    """Conv weight and BN parameters come from Constant nodes rather than initializers."""
    rng = _rng(402)
    arrays = {
        "W": _randn(rng, 8, 4, 3, 3),
        "B": _randn(rng, 8),
        "gamma": _randn(rng, 8),
        "beta": _randn(rng, 8),
        "input_mean": _randn(rng, 8),
        "input_var": np.abs(_randn(rng, 8)),
    }
    nodes = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, name=n))
        for n, a in arrays.items()
    ]
    nodes += [
        helper.make_node("Conv", ["X", "W", "B"], ["X1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", _BN_INPUTS, ["Y"]),
    ]
    return _model(
        nodes,
        [_vi("X", [1, 4, 10, 10])],
        [_vi("Y", [1, 8, 10, 10])],
        [],
        opset=18,
        ir_version=8,
    )


_OS = "onnxscript _fuse_batchnorm_test.py"
_OO = "onnxoptimizer optimizer_test.py"
_SL = "onnxslim"

PEER_CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    # onnxscript
    "onnxscript_conv_bn": (
        onnxscript_conv_bn,
        f"{_OS}::test_fuse_batchnorm_conv[bias_false_group1], opset 17: expects folded "
        "(1 rewrite, 1 node left).",
    ),
    "onnxscript_conv_bias_bn": (
        onnxscript_conv_bias_bn,
        f"{_OS}::test_fuse_batchnorm_conv[bias_true_group1]: expects folded.",
    ),
    "onnxscript_conv_group2_bn": (
        onnxscript_conv_group2_bn,
        f"{_OS}::test_fuse_batchnorm_conv[bias_false_group2] (grouped Conv): expects folded.",
    ),
    "onnxscript_conv_bias_group2_bn": (
        onnxscript_conv_bias_group2_bn,
        f"{_OS}::test_fuse_batchnorm_conv[bias_true_group2]: expects folded.",
    ),
    "onnxscript_convtranspose_bn": (
        onnxscript_convtranspose_bn,
        f"{_OS}::test_fuse_batchnorm_convtranspose[bias_false_group1], W[32,64,3,3]: "
        "expects folded.",
    ),
    "onnxscript_convtranspose_bias_bn": (
        onnxscript_convtranspose_bias_bn,
        f"{_OS}::test_fuse_batchnorm_convtranspose[bias_true_group1]: expects folded.",
    ),
    "onnxscript_convtranspose_group4_bn": (
        onnxscript_convtranspose_group4_bn,
        f"{_OS}::test_fuse_batchnorm_convtranspose[bias_false_group4], 256 out channels: "
        "expects folded.",
    ),
    "onnxscript_convtranspose_bias_group4_bn": (
        onnxscript_convtranspose_bias_group4_bn,
        f"{_OS}::test_fuse_batchnorm_convtranspose[bias_true_group4]: expects folded.",
    ),
    "onnxscript_gemm_bn": (
        onnxscript_gemm_bn,
        f"{_OS}::test_fuse_batchnorm_gemm[bias_false_transB_0]: expects folded.",
    ),
    "onnxscript_gemm_bias_bn": (
        onnxscript_gemm_bias_bn,
        f"{_OS}::test_fuse_batchnorm_gemm[bias_true_transB_0]: expects folded.",
    ),
    "onnxscript_gemm_transb_bn": (
        onnxscript_gemm_transb_bn,
        f"{_OS}::test_fuse_batchnorm_gemm[bias_false_transB_1]: expects folded.",
    ),
    "onnxscript_gemm_bias_transb_bn": (
        onnxscript_gemm_bias_transb_bn,
        f"{_OS}::test_fuse_batchnorm_gemm[bias_true_transB_1]: expects folded.",
    ),
    "onnxscript_gemm_beta2_bn": (
        onnxscript_gemm_beta2_bn,
        "onnxscript PR #3027 Gemm<beta=2.0>(X, W, B) -> BN: expects folded with beta*C moved "
        "into the fused bias (before the fix the fold was silently wrong).",
    ),
    "onnxscript_gemm_beta0p5_bn": (
        onnxscript_gemm_beta0p5_bn,
        "onnxscript PR #3027 Gemm<beta=0.5>(X, W, B) -> BN: expects folded, beta folded into "
        "the bias.",
    ),
    "onnxscript_non_initializers": (
        onnxscript_non_initializers,
        f"{_OS}::test_fuse_batchnorm_non_initializers: W, B and BN params are plain graph "
        "inputs; expects NOT folded (0 rewrites: not constant initializers).",
    ),
    "onnxscript_graph_inputs": (
        onnxscript_graph_inputs,
        f"{_OS}::test_fuse_batchnorm_graph_inputs: W is a graph input with an initializer "
        "default (overridable); expects NOT folded (0 rewrites: W is a graph input).",
    ),
    "onnxscript_two_convs_same_parent": (
        onnxscript_two_convs_same_parent,
        f"{_OS}::test_fuse_batchnorm_does_not_collide_names_with_same_parent_node: MaxPool "
        "feeding two bias-less Conv->BN; expects both folded (2 rewrites, distinct bias names).",
    ),
    "onnxscript_shared_weights": (
        onnxscript_shared_weights,
        f"{_OS}::test_fuse_batchnorm_skips_shared_weight_initializers: two Conv share W/B "
        "and BN params; expects NOT folded (0 rewrites: shared initializers), model valid. "
        "Both calls take the same BN, so one fold into W/B is exact for both.",
    ),
    # onnxoptimizer
    "onnxoptimizer_fuse_bn_into_conv_simple": (
        onnxoptimizer_fuse_bn_into_conv_simple,
        f"{_OO}::test_fuse_bn_into_conv_simple (main), opset 13: expects folded; the test "
        "asserts only checker + onnxruntime equality (rtol 1e-4, atol 1e-5).",
    ),
    "onnxoptimizer_fuse_bn_into_conv_simple_2020": (
        onnxoptimizer_fuse_bn_into_conv_simple_2020,
        f"{_OO}::test_fuse_bn_into_conv_simple as first committed (b4950ec5), opset 12, "
        "params also graph inputs: expects folded (1 Conv node, 2 initializers W', b').",
    ),
    "onnxoptimizer_fuse_bn_into_conv_transpose_simple": (
        onnxoptimizer_fuse_bn_into_conv_transpose_simple,
        f"{_OO}::test_fuse_bn_into_conv_transpose_simple (unmerged PR #316, dabff0b0), "
        "ConvTranspose 4->6: expects folded (no BN left); released pass matches Conv only.",
    ),
    # onnxslim
    "onnxslim_convbn_pattern": (
        onnxslim_convbn_pattern,
        f"{_SL} test_fusion_patterns.py::test_convbn_pattern, opset 11: expects folded "
        "(fewer nodes; outputs within atol 1e-3).",
    ),
    "onnxslim_convbn_multiple_unnamed_convs": (
        onnxslim_convbn_multiple_unnamed_convs,
        f"{_SL} test_fusion_patterns.py::test_convbn_pattern_with_multiple_unnamed_convs: "
        "expects both folded (2 Conv named after their outputs, no BN).",
    ),
    "onnxslim_convtransposebn_pattern": (
        onnxslim_convtransposebn_pattern,
        f"{_SL} test_fusion_patterns.py::test_convtransposebn_pattern, 224->448: expects "
        "folded (fewer nodes; outputs within rtol 1e-2, atol 1e-5).",
    ),
    "onnxslim_conv_bn_torch": (
        onnxslim_conv_bn_torch,
        f"{_SL} test_pattern_matcher.py::test_conv_bn, Conv2d(1,1,3)+BN2d(1), opset 14: "
        "expects folded (Conv count 1; torch's eval export may already fold it).",
    ),
    "onnxslim_bn_only": (
        onnxslim_bn_only,
        f"{_SL} test_coverage.py::test_bn_model, lone BN2d(3): nothing to fold into; the "
        "test only expects slim to return a model (BN stays).",
    ),
    "onnxslim_sequential_conv_bn_relu": (
        onnxslim_sequential_conv_bn_relu,
        f"{_SL} test_coverage.py::test_sequential_model, (Conv-BN-ReLU)x2: the test only "
        "expects slim to return a model; both BN are foldable.",
    ),
    # derived from the peers' sources
    "derived_conv_output_used_twice": (
        derived_conv_output_used_twice,
        "no peer test; Conv output also feeds a Relu output: onnxoptimizer (single use), "
        "onnxslim (users == 1) and onnxscript (pattern-internal value) should NOT fold.",
    ),
    "derived_bn_params_constant_nodes": (
        derived_bn_params_constant_nodes,
        "no peer test; W/B/BN params from Constant nodes: onnxoptimizer and onnxslim accept "
        "Constant producers (fold); onnxscript's rule wants initializers (NOT folded).",
    ),
}
