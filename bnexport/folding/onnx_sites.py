"""What the ONNX fold patterns match: BatchNormalization nodes, the layers a BN folds into
(Conv, ConvTranspose, Gemm, MatMul with or without a bias Add), and the ops a channel passes
through unchanged (with the channel tracked by `bnexport.folding.channels`).

Each matcher returns a site or a one-sentence reason; nothing here changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import sympy
import torch

from bnexport.folding import math as fm
from bnexport.folding.channels import NotTransparent, Tracked, track_permute, track_reduce
from bnexport.folding.channels import track_reshape as _track_reshape
from bnexport.folding.math import Layout
from bnexport.folding.onnx_graph import OnnxGraph, attr, is_onnx_op, node_name

BN_OP = "BatchNormalization"
# the attribute's default, a float32 like every float attribute: a BN that states epsilon=1e-5
# and one that leaves it out compute the same
_DEFAULT_EPSILON = float(np.float32(1e-5))
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TRANSPARENT_OPS = (
    "Identity",
    "Dropout",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "GlobalAveragePool",
    "ReduceMean",
    "AveragePool",
    "Pad",
)
# positively homogeneous: f(a x) = a f(x) for a > 0, so a positive per-channel scale passes
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "PRelu", "MaxPool")


@dataclass
class AffineSite:
    """A frozen per-channel affine map y = s * x + t on axis `axis` of its input `input`,
    computed by `nodes` (in data order; the last writes `output`): an inference-mode
    BatchNormalization with constant parameters (`stats` holds them), or a chain of
    Mul/Add/Sub/Div by per-channel or scalar constants. `s` and `t` are float64, one entry per
    channel (`channels` is 1 for a map by scalars, which applies to every element)."""

    nodes: list[ir.Node]
    name: str
    kind: str
    channels: int
    axis: int
    data_index: int  # which input of nodes[0] is the data
    s: torch.Tensor
    t: torch.Tensor
    stats: BatchNormStats | None = None

    @property
    def node(self) -> ir.Node:
        return self.nodes[0]

    @property
    def input(self) -> ir.Value:
        return self.nodes[0].inputs[self.data_index]

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    @property
    def is_batchnorm(self) -> bool:
        return self.stats is not None

    @property
    def params(self) -> list[ir.Value]:
        """The constant operands, dropped with the nodes when the map folds."""
        x = self.input
        return [
            v
            for n in self.nodes
            for v in n.inputs
            if v is not None and v is not x and v.producer() not in self.nodes
        ]


@dataclass
class BatchNormStats:
    """A BatchNormalization's parameters as stored."""

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    eps: float


def match_batchnorm(node: ir.Node, g: OnnxGraph) -> AffineSite | str:
    """The BN's parameters, or the reason it cannot be folded whatever its neighbours."""
    name = node_name(node)
    if g.opset < 7:
        return f"BatchNormalization of opset {g.opset} (before 7) is not supported"
    if int(attr(node, "spatial", 1)) == 0:
        return "it has spatial=0 (statistics per element, not per channel)"
    if int(attr(node, "training_mode", 0)) == 1:
        return "it has training_mode=1, so it normalizes with the statistics of each batch"
    for extra in node.outputs[1:]:
        if extra is not None and (extra.uses() or extra.is_graph_output()):
            return f"its running-statistics output '{extra.name}' is used"
    params = {}
    for what, value in zip(("scale", "bias", "mean", "variance"), node.inputs[1:5]):
        array = g.constant(value)
        if array is None:
            return g.not_constant_reason(value, what)
        params[what] = array
    if not all(np.issubdtype(a.dtype, np.floating) for a in params.values()):
        return "its parameters are not floating point"
    shapes = {a.shape for a in params.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return "its parameters are not vectors of one length"
    channels = int(params["mean"].shape[0])
    x_shape = g.shape(node.inputs[0])
    if x_shape is not None and (
        len(x_shape) < 2 or (x_shape[1].is_Integer and int(x_shape[1]) != channels)
    ):
        return f"its input does not carry {channels} channels on axis 1"
    stats = BatchNormStats(
        params["mean"],
        params["variance"],
        params["scale"],
        params["bias"],
        float(attr(node, "epsilon", _DEFAULT_EPSILON)),
    )
    s, t = fm.bn_scale_shift(
        fm.array_f64(stats.mean),
        fm.array_f64(stats.var),
        fm.array_f64(stats.scale),
        fm.array_f64(stats.bias),
        stats.eps,
    )
    return AffineSite([node], name, BN_OP, channels, 1, 0, s, t, stats)


@dataclass
class LayerSite:
    """A layer a BN can fold into.

    `out_axis`/`in_axis`: the channel axis of the layer's output and of its data input.
    `bias` is the bias value (Conv/ConvTranspose input 2, Gemm C, or the constant operand of
    the Add after a MatMul), None when the layer has none; `bias_add` is that Add.
    `output` is the layer's output (the Add's, when the bias is an Add).
    """

    node: ir.Node
    kind: str
    weight: ir.Value
    weight_array: np.ndarray
    layout: Layout
    out_axis: int
    in_axis: int
    bias: ir.Value | None
    bias_add: ir.Node | None
    output: ir.Value

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def out_channels(self) -> int:
        w = self.weight_array.shape
        return w[1] * self.layout.groups if self.layout.out_axis == 1 else w[0]


def match_layer(node: ir.Node, g: OnnxGraph, *, with_bias_add: bool = True) -> LayerSite | str:
    """The layer `node` heads, or why it is not one a BN can fold into."""
    if not is_onnx_op(node, *LAYER_OPS):
        return f"{g.describe(node)} is not a conv or linear layer"
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    w = g.constant(weight)
    if w is None:
        why = g.not_constant_reason(weight, "weight")
        return f"{g.describe(node)} has no constant weight ({why})"
    if not np.issubdtype(w.dtype, np.floating):
        return f"the weight of {g.describe(node)} is {w.dtype}, not floating point"
    op = node.op_type
    out = node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and g.constant(bias) is None:
        return f"{g.describe(node)} has no constant bias ({g.not_constant_reason(bias, 'bias')})"
    if op in ("Conv", "ConvTranspose"):
        groups = int(attr(node, "group", 1))
        layout = Layout(0 if op == "Conv" else 1, groups)
        kind = "conv" if op == "Conv" else "conv_transpose"
        return LayerSite(node, kind, weight, w, layout, 1, 1, bias, None, out)
    if w.ndim != 2:
        return f"the weight of {g.describe(node)} is not a matrix"
    if op == "Gemm":
        layout = Layout(0 if int(attr(node, "transB", 0)) else 1)
        in_axis = 0 if int(attr(node, "transA", 0)) else 1
        return LayerSite(node, "gemm", weight, w, layout, 1, in_axis, bias, None, out)
    a_shape = g.shape(node.inputs[0])
    if a_shape is None or len(a_shape) < 2:
        return f"the rank of the input of {g.describe(node)} is unknown or below 2"
    last = len(a_shape) - 1
    site = LayerSite(node, "matmul", weight, w, Layout(1), last, last, None, None, out)
    add = g.sole_consumer(out) if with_bias_add else None
    if add is not None and is_onnx_op(add, "Add") and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = g.constant(other)
        # a bias of higher rank than the product would move the channels to another axis
        fits = b is not None and b.ndim <= len(a_shape) and _is_channel_bias(b, w.shape[1])
        if fits and other is not out:
            site.bias, site.bias_add, site.output = other, add, add.outputs[0]
    return site


def _is_channel_bias(b: np.ndarray, channels: int) -> bool:
    """True for a bias that varies at most along the last axis: (), (N,), (1, ..., N)."""
    return (
        np.issubdtype(b.dtype, np.floating)
        and all(d == 1 for d in b.shape[:-1])
        and (b.ndim == 0 or b.shape[-1] in (1, channels))
    )


def zero_padded(layer: LayerSite, g: OnnxGraph) -> bool:
    """True when the conv pads its input with zeros (which never pass through a BN)."""
    if layer.kind != "conv":
        return False
    auto_pad = attr(layer.node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in layer.weight_array.shape[2:])
    if auto_pad == "VALID":
        return False
    return any(int(p) != 0 for p in attr(layer.node, "pads", []) or [])


# --------------------------------------------------------------------------- transparent ops


def _ints_input(node: ir.Node, index: int, g: OnnxGraph) -> list[int] | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    array = g.constant(value)
    return None if array is None else [int(v) for v in np.asarray(array).ravel()]


def _reshape_target(node: ir.Node, src: tuple, dst: tuple, g: OnnxGraph) -> tuple:
    """A Reshape's output dims from its constant target (0 copies an input dim unless
    allowzero, -1 takes the rest), as exact as the input's; the inferred `dst` otherwise."""
    target = _ints_input(node, 1, g)
    if target is None or len(target) != len(dst):
        return dst
    allowzero = int(attr(node, "allowzero", 0))
    dims = [
        src[i] if d == 0 and not allowzero and i < len(src) else sympy.Integer(d)
        for i, d in enumerate(target)
    ]
    if -1 in target:
        rest = sympy.Mul(*[d for d, t in zip(dims, target) if t != -1])
        dims[target.index(-1)] = sympy.simplify(sympy.Mul(*src) / rest)
    return tuple(dims)


def is_transparent(node: ir.Node) -> bool:
    return is_onnx_op(node, *TRANSPARENT_OPS)


def is_homogeneous(node: ir.Node) -> bool:
    return is_onnx_op(node, *HOMOGENEOUS_OPS)


def step_scalar(node: ir.Node, g: OnnxGraph) -> None:
    """Raise NotTransparent when `node` does not commute with a map by scalars, y = s x + t:
    constant padding, an average that counts padding, training-mode dropout."""
    if is_onnx_op(node, "Pad", "AveragePool", "Dropout"):
        step(node, Tracked(0, np.zeros((1, 1), dtype=np.int64)), g)


def step(node: ir.Node, tr: Tracked, g: OnnxGraph) -> Tracked:
    """Carry `tr` (on node.inputs[0]) through `node`, or raise NotTransparent with a reason."""
    op = node.op_type
    src, dst = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if op in ("Identity", "Relu", "LeakyRelu", "PRelu"):
        return tr
    if op == "Dropout":
        training = _ints_input(node, 2, g) if len(node.inputs) > 2 and node.inputs[2] else [0]
        if training is None or any(training):
            raise NotTransparent(f"{g.describe(node)} may run in training mode")
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise NotTransparent(f"the mask of {g.describe(node)} is used")
        return tr
    if src is None or dst is None:
        raise NotTransparent(
            f"the shapes around {g.describe(node)} are unknown, so the channel mapping cannot "
            "be proven"
        )
    ndim = len(src)
    if op == "Reshape":
        return _track_reshape(src, _reshape_target(node, src, dst, g), tr)
    if op in ("Flatten", "Squeeze", "Unsqueeze"):
        return _track_reshape(src, dst, tr)
    if op == "Transpose":
        perm = attr(node, "perm", None) or list(reversed(range(ndim)))
        return track_permute([int(p) for p in perm], tr)
    if op == "GlobalAveragePool":
        return track_reduce(list(range(2, ndim)), True, tr)
    if op == "ReduceMean":
        axes = attr(node, "axes", None)
        if axes is None and g.opset >= 18 and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _ints_input(node, 1, g)
            if axes is None:
                raise NotTransparent(f"the axes of {g.describe(node)} are not constant")
        if not axes:
            if int(attr(node, "noop_with_empty_axes", 0)):
                return tr
            axes = list(range(ndim))
        return track_reduce([int(a) % ndim for a in axes], bool(attr(node, "keepdims", 1)), tr)
    if op == "MaxPool":
        if tr.axis >= 2:
            raise NotTransparent(f"{g.describe(node)} pools over the channel axis")
        return tr
    if op == "AveragePool":
        pads = attr(node, "pads", None) or []
        auto_pad = attr(node, "auto_pad", "NOTSET")
        padded = any(int(p) for p in pads) or auto_pad not in ("NOTSET", "VALID", b"NOTSET")
        if padded and int(attr(node, "count_include_pad", 0)):
            raise NotTransparent(f"the average of {g.describe(node)} counts zero padding")
        return track_reduce(list(range(2, ndim)), True, tr, what="pools")
    if op == "Pad":
        mode = attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant":
            raise NotTransparent(
                f"{g.describe(node)} pads with constants that do not pass through the BN"
            )
        pads = attr(node, "pads", None)
        if pads is None:
            pads = _ints_input(node, 1, g)
        axes = _ints_input(node, 3, g) if len(node.inputs) > 3 and node.inputs[3] else None
        if pads is None or (len(node.inputs) > 3 and node.inputs[3] and axes is None):
            raise NotTransparent(f"the pads of {g.describe(node)} are not constant")
        axes = [a % ndim for a in axes] if axes else list(range(ndim))
        half = len(pads) // 2
        if any(pads[i] or pads[i + half] for i, a in enumerate(axes) if a == tr.axis):
            raise NotTransparent(f"{g.describe(node)} pads the channel axis")
        return tr
    raise NotTransparent(f"{g.describe(node)} is not an identity on channels")
