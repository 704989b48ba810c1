"""Property tests for the ONNX fold engine on random graphs built with onnx.helper.

Hypothesis draws the structure (blocks, kernel sizes, pads, strides, dilations, groups, Gemm
attributes, transparent ops in between, which direction a BN should fold, layers called several
times with one weight, whether calls may get their own weight copies) and a seed for the numpy
weights. The generator records, for every BatchNormalization it emits, the status it
knows the engine must report ('folded' or 'left'), or nothing when it does not know. Each graph
is checked for:

(a) the same outputs in onnxruntime before and after folding (batch 1 and 3);
(b) as many BatchNormalization nodes left in the graph as decisions with status 'left';
(c) every BN the generator knows to be foldable reported 'folded' (and every BN it knows must
    stay reported 'left');
(d) a folded model that passes onnx.checker (full check), keeps its output names and leaves
    the input proto untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnexport.folding.onnx_engine import fold_onnx_model

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FOLDED, LEFT = "folded", "left"
OPSET = 18


# --------------------------------------------------------------------------- graph building


@dataclass
class T:
    """A tensor of the graph being built: its name and its shape without the batch dim."""

    name: str
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[1:]


@dataclass
class Builder:
    """Nodes, initializers and what the generator knows about each BN's fate."""

    seed: int
    eps: float
    dtype: type = np.float32
    const_nodes: bool = False  # hand weights and BN parameters over as Constant nodes
    duplicate_shared: bool = False  # the engine option the graph is folded with
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    param_inputs: list = field(default_factory=list)  # initializers also listed as inputs
    expect: dict = field(default_factory=dict)  # BN node name -> FOLDED / LEFT
    last_bn_params: list = field(default_factory=list)  # the initializers the last BN reads
    log: list = field(default_factory=list)
    count: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array, base: str = "c", *, as_node: bool = False) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if as_node:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=self.fresh("Constant"), value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "ints", as_node=self.const_nodes)

    def weight(self, shape, fan_in: int, base: str = "w") -> str:
        w = self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        return self.const(w.astype(self.dtype), base, as_node=self.const_nodes)

    def bias(self, shape, base: str = "b") -> str:
        b = self.rng.normal(0.0, 0.5, shape)
        return self.const(b.astype(self.dtype), base, as_node=self.const_nodes)

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(op), **attrs))
        return outs[0]

    def bn_values(self, channels: int, *, zero_gamma: bool = False) -> list[np.ndarray]:
        """Random gamma, beta, running mean and running variance (`zero_gamma`: channel 0
        has gamma = 0)."""
        r = self.rng
        gamma = r.uniform(0.2, 2.0, channels) * r.choice([-1.0, 1.0], channels)
        if zero_gamma:
            gamma[0] = 0.0
        return [
            gamma,
            r.normal(0.0, 0.5, channels),  # beta
            r.normal(0.0, 0.5, channels),  # running mean
            r.uniform(0.2, 3.0, channels),  # running var
        ]

    def bn(
        self,
        x: str,
        channels: int,
        expect: str,
        *,
        param_input: bool = False,
        training: bool = False,
        values: list[np.ndarray] | None = None,
        names: list[str] | None = None,
    ) -> str:
        """A BatchNormalization; `param_input` makes its scale an overridable graph input,
        `training` sets training_mode=1 (with its two running-statistics outputs). `values`
        (from `bn_values`) gives its parameters, `names` the initializers it reads (another
        BN's)."""
        r = self.rng
        params = self.bn_values(channels) if values is None else values
        names = names or [
            self.const(
                p.astype(self.dtype),
                base,
                as_node=self.const_nodes and not (param_input and i == 0),
            )
            for i, (p, base) in enumerate(zip(params, ("gamma", "beta", "mean", "var")))
        ]
        if param_input:  # an initializer that is also a graph input: a default, overridable
            self.param_inputs.append((names[0], (channels,)))
        name = self.fresh("bn")
        outs = [self.fresh("bn_out")]
        attrs = {}
        if self.eps != 1e-5 or r.integers(2):  # 1e-5 is the default
            attrs["epsilon"] = self.eps
        if training:
            outs += [self.fresh("running_mean"), self.fresh("running_var")]
            attrs["training_mode"] = 1
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *names], outs, name=name, **attrs)
        )
        self.expect[name] = expect
        self.last_bn_params = names
        return outs[0]

    def model(self, x: T, elem=TensorProto.FLOAT, batch="N") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [
                helper.make_tensor_value_info(x.name, elem, [batch, *x.shape]),
                *(helper.make_tensor_value_info(n, elem, s) for n, s in self.param_inputs),
            ],
            [helper.make_tensor_value_info(o, elem, None) for o in self.outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = min(model.ir_version, 10)
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, inf in zip(model.graph.output, inferred.graph.output):
            out.type.CopyFrom(inf.type)
        onnx.checker.check_model(model, full_check=True)
        return model


@dataclass
class Case:
    proto: onnx.ModelProto
    expect: dict
    input_shape: tuple[int, ...]
    seed: int
    log: list
    duplicate_shared: bool = False

    def __repr__(self) -> str:
        return (
            f"Case(seed={self.seed}, input={self.input_shape}, blocks={self.log}, "
            f"duplicate_shared={self.duplicate_shared})"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _common_divisors(a: int, b: int) -> list[int]:
    return [d for d in _divisors(a) if b % d == 0]


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


# --------------------------------------------------------------------------- layers


def conv(draw, g: Builder, x: T, *, cout=None, padded=None, stride=None, k=None) -> T:
    """A Conv of random kernel, pads, strides, dilations and groups; `padded=False` gives one
    that never zero-pads (no pads, zero pads, auto_pad VALID, or SAME_UPPER with 1-wide
    kernels), `padded=True` one that does."""
    c, sp = x.channels, x.spatial
    d = len(sp)
    cout = cout or draw(st.integers(1, 6))
    groups = draw(st.sampled_from(_common_divisors(c, cout)))
    style = "pads"
    if padded is False:
        style = draw(st.sampled_from(["none", "zeros", "valid", "same_k1"]))
    kernel, pads_b, pads_e, dil, strides, out = [], [], [], [], [], []
    for i, size in enumerate(sp):
        if padded is None and style == "pads":
            pb, pe = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        elif padded:
            pb, pe = (1, 1) if i == 0 else (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
        else:
            pb = pe = 0
        dd = 1 if style == "same_k1" else draw(st.integers(1, 2))  # ORT: no dilated SAME
        opts = [kk for kk in (1, 2, 3) if (kk - 1) * dd + 1 <= size + pb + pe]
        if padded and i == 0:
            opts = [kk for kk in opts if kk > 1] or [1]
        kk = 1 if style == "same_k1" else (k or draw(st.sampled_from(opts)))
        kk = kk if (kk - 1) * dd + 1 <= size + pb + pe else 1
        s = stride or draw(st.integers(1, 2))
        kernel.append(kk)
        pads_b.append(pb)
        pads_e.append(pe)
        dil.append(dd)
        strides.append(s)
        out.append((size + pb + pe - ((kk - 1) * dd + 1)) // s + 1)
    attrs = {"group": groups, "strides": strides, "dilations": dil}
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if style == "pads":
        attrs["pads"] = pads_b + pads_e
    elif style == "zeros":
        attrs["pads"] = [0] * 2 * d
    elif style == "valid":
        attrs["auto_pad"] = "VALID"
    elif style == "same_k1":
        attrs["auto_pad"] = "SAME_UPPER"
    fan_in = (c // groups) * _numel(kernel)
    inputs = [x.name, g.weight((cout, c // groups, *kernel), fan_in)]
    bias = draw(st.sampled_from(["yes", "no", "empty"]))  # empty: an optional input left ""
    inputs += [g.bias((cout,))] if bias == "yes" else [""] if bias == "empty" else []
    g.log.append(f"Conv(k={kernel}, {style}={pads_b + pads_e}, s={strides}, d={dil}, g={groups})")
    return T(g.node("Conv", inputs, **attrs), (cout, *out))


def conv_transpose(draw, g: Builder, x: T) -> T:
    c, sp = x.channels, x.spatial
    cout = draw(st.integers(1, 6))
    groups = draw(st.sampled_from(_common_divisors(c, cout)))
    kernel, strides, dil, pads_b, pads_e, opad, out = [], [], [], [], [], [], []
    for size in sp:
        kk, dd = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        s = draw(st.integers(1, 2)) if size <= 4 else 1
        op = draw(st.integers(0, s - 1))
        full = (size - 1) * s + (kk - 1) * dd + 1 + op
        pb = draw(st.integers(0, 1)) if full > 2 else 0
        pe = draw(st.integers(0, 1)) if full > 2 else 0
        kernel.append(kk)
        strides.append(s)
        dil.append(dd)
        pads_b.append(pb)
        pads_e.append(pe)
        opad.append(op)
        out.append(full - pb - pe)
    attrs = {
        "group": groups,
        "strides": strides,
        "dilations": dil,
        "pads": pads_b + pads_e,
        "output_padding": opad,
    }
    inputs = [x.name, g.weight((c, cout // groups, *kernel), c * _numel(kernel) // groups)]
    if draw(st.booleans()):
        inputs.append(g.bias((cout,)))
    g.log.append(f"ConvTranspose(k={kernel}, s={strides}, d={dil}, g={groups}, op={opad})")
    return T(g.node("ConvTranspose", inputs, **attrs), (cout, *out))


def gemm(draw, g: Builder, x: T, *, via_trans_a=None, n=None) -> T:
    """Gemm with random transA (through a Transpose before it), transB, alpha, beta, C."""
    f = x.channels
    n = n or draw(st.integers(1, 8))
    trans_a = draw(st.booleans()) if via_trans_a is None else via_trans_a
    trans_b = draw(st.booleans())
    a = g.node("Transpose", [x.name], perm=[1, 0]) if trans_a else x.name
    w = g.weight((n, f) if trans_b else (f, n), f)
    c_shape = draw(st.sampled_from(["none", "empty", "n", "1n", "scalar", "1"]))
    inputs = [a, w, ""] if c_shape == "empty" else [a, w]
    if c_shape not in ("none", "empty"):
        shape = {"n": (n,), "1n": (1, n), "scalar": (), "1": (1,)}[c_shape]
        inputs.append(g.bias(shape))
    attrs = {"transA": int(trans_a), "transB": int(trans_b)}
    alpha = draw(st.sampled_from([1.0, 0.5, -1.5]))
    beta = draw(st.sampled_from([1.0, 0.7, 2.0]))
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    g.log.append(f"Gemm(tA={int(trans_a)}, tB={int(trans_b)}, C={c_shape}, a={alpha}, b={beta})")
    return T(g.node("Gemm", inputs, **attrs), (n,))


def matmul(draw, g: Builder, x: T) -> T:
    """MatMul of a constant (F, G) weight over the last axis, with an optional bias Add."""
    f = x.shape[-1]
    n = draw(st.integers(1, 8))
    y = g.node("MatMul", [x.name, g.weight((f, n), f)])
    bias = draw(st.sampled_from(["none", "n", "1n", "scalar", "1"]))
    if bias != "none":
        rank = len(x.shape) + 1
        shape = {"n": (n,), "1n": (1,) * (rank - 1) + (n,), "scalar": (), "1": (1,)}[bias]
        b = g.bias(shape)
        y = g.node("Add", [y, b] if draw(st.booleans()) else [b, y])
    g.log.append(f"MatMul(bias={bias})")
    return T(y, (*x.shape[:-1], n))


# --------------------------------------------------------------------------- transparent ops


def between_nd(draw, g: Builder, x: T, *, following: bool) -> T:
    """An op that commutes with a per-channel affine on (N, C, *spatial)."""
    sp = x.spatial
    options = ["none", "identity", "dropout", "pad", "reducemean", "gap", "avgpool", "reshape"]
    if following:  # keep the spatial size for the conv that follows, most of the time
        options += ["none", "identity", "pad"]
    if len(sp) >= 2:
        options.append("transpose")
    kind = draw(st.sampled_from(options))
    if kind == "none":
        return x
    g.log.append(kind)
    if kind == "identity":
        return T(g.node("Identity", [x.name]), x.shape)
    if kind == "dropout":
        inputs = [x.name]
        if draw(st.booleans()):
            inputs.append(g.const(np.array(0.3, np.float32), "ratio"))
            if draw(st.booleans()):
                inputs.append(g.const(np.array(False), "training"))
        n_out = draw(st.integers(1, 2))  # an unused mask output
        return T(g.node("Dropout", inputs, n_out=n_out), x.shape)
    if kind == "reshape":  # merge the spatial axes: (N, C, H * W)
        merged = _numel(sp)
        target = draw(st.sampled_from([[0, x.channels, -1], [-1, x.channels, merged]]))
        return T(g.node("Reshape", [x.name, g.ints(target)]), (x.channels, merged))
    if kind == "transpose":
        i, j = draw(st.permutations(range(len(sp))))[:2]
        perm = list(range(2 + len(sp)))
        perm[2 + i], perm[2 + j] = perm[2 + j], perm[2 + i]
        shape = [x.channels, *sp]
        shape[1 + i], shape[1 + j] = shape[1 + j], shape[1 + i]
        return T(g.node("Transpose", [x.name], perm=perm), tuple(shape))
    if kind == "pad":
        axis = draw(st.integers(0, len(sp) - 1))
        mode = "reflect" if sp[axis] >= 2 and draw(st.booleans()) else "edge"
        pads = [0] * (2 * len(sp))
        pads[axis], pads[len(sp) + axis] = 1, draw(st.integers(0, 1))
        shape = list(x.shape)
        shape[1 + axis] += 1 + pads[len(sp) + axis]
        if draw(st.booleans()):  # pads for every axis, zero on batch and channels
            pads = [0, 0, *pads[: len(sp)], 0, 0, *pads[len(sp) :]]
            return T(g.node("Pad", [x.name, g.ints(pads)], mode=mode), tuple(shape))
        axes = g.ints([2 + i - draw(st.sampled_from([0, 2 + len(sp)])) for i in range(len(sp))])
        return T(g.node("Pad", [x.name, g.ints(pads), "", axes], mode=mode), tuple(shape))
    if kind == "gap":
        return T(g.node("GlobalAveragePool", [x.name]), (x.channels, *[1] * len(sp)))
    if kind == "reducemean":
        axes = draw(st.sets(st.integers(2, 1 + len(sp)), min_size=1))
        shape = [x.channels, *[1 if 2 + i in axes else s for i, s in enumerate(sp)]]
        signed = [a - draw(st.sampled_from([0, 2 + len(sp)])) for a in sorted(axes)]
        return T(g.node("ReduceMean", [x.name, g.ints(signed)], keepdims=1), tuple(shape))
    # AveragePool without counting its zero padding
    kernel = [draw(st.integers(1, min(2, s))) for s in sp]
    pads = [draw(st.integers(0, k - 1)) for k in kernel for _ in range(2)]
    pads = pads[0::2] + pads[1::2]
    shape = [x.channels] + [
        s + pads[i] + pads[len(sp) + i] - k + 1 for i, (s, k) in enumerate(zip(sp, kernel))
    ]
    node = g.node("AveragePool", [x.name], kernel_shape=kernel, pads=pads, count_include_pad=0)
    return T(node, tuple(shape))


def between_2d(draw, g: Builder, x: T) -> T:
    kind = draw(st.sampled_from(["none", "identity", "dropout"]))
    if kind == "none":
        return x
    g.log.append(kind)
    return T(g.node(kind.capitalize(), [x.name]), x.shape)


# --------------------------------------------------------------------------- chain blocks


def blk_conv_bn(draw, g: Builder, x: T) -> T:
    """Conv -> [transparent] -> BN (-> BN): every BN folds into the conv."""
    y = between_nd(draw, g, conv(draw, g, x), following=False)
    y = T(g.bn(y.name, y.channels, FOLDED), y.shape)
    if draw(st.integers(0, 3)) == 0:
        y = T(g.bn(y.name, y.channels, FOLDED), y.shape)
    return y


def blk_bn_conv(draw, g: Builder, x: T) -> T:
    """BN -> [transparent] -> Conv without zero padding: the BN folds (either way)."""
    y = T(g.bn(x.name, x.channels, FOLDED), x.shape)
    return conv(draw, g, between_nd(draw, g, y, following=True), padded=False)


def blk_bn_padded_conv(draw, g: Builder, x: T) -> T:
    """[Relu ->] BN -> [transparent] -> a Conv that pads with zeros, or a ConvTranspose: the
    BN folds (after a Relu, its scale into the layer and its shift as an Add)."""
    src = x.name if draw(st.booleans()) else g.node("Relu", [x.name])
    y = between_nd(draw, g, T(g.bn(src, x.channels, FOLDED), x.shape), following=True)
    if draw(st.booleans()):
        g.log.append("shift_kept:convT")
        return conv_transpose(draw, g, y)
    g.log.append("shift_kept:padded")
    return conv(draw, g, y, padded=True)


def blk_tied_conv_bn(draw, g: Builder, x: T) -> T:
    """One Conv -> BN [-> Relu] block applied 2 or 3 times in a row with tied weights (one
    weight initializer, the BNs reading one set of parameters or equal copies): every BN
    folds, once into the shared weight."""
    c, d = x.channels, len(x.spatial)
    k, dil = draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
    groups = draw(st.sampled_from(_divisors(c)))
    inputs = [g.weight((c, c // groups, *[k] * d), c * k**d // groups)]
    inputs += [g.bias((c,))] if draw(st.booleans()) else []
    attrs = {"group": groups, "pads": [dil * (k // 2)] * 2 * d, "dilations": [dil] * d}
    values, same_names = g.bn_values(c), draw(st.booleans())
    relu = draw(st.booleans())
    names = None
    y = x.name
    for _ in range(draw(st.integers(2, 3))):
        y = g.bn(g.node("Conv", [y, *inputs], **attrs), c, FOLDED, values=values, names=names)
        names = g.last_bn_params if same_names else None
        y = g.node("Relu", [y]) if relu else y
    g.log.append(f"tied(k={k}, d={dil}, g={groups}, same_bn_names={same_names}, relu={relu})")
    return T(y, x.shape)


def blk_convtranspose_bn(draw, g: Builder, x: T) -> T:
    y = conv_transpose(draw, g, x)
    return T(g.bn(y.name, y.channels, FOLDED), y.shape)


def blk_conv_bn_relu(draw, g: Builder, x: T) -> T:
    y = conv(draw, g, x)
    return T(g.node("Relu", [g.bn(y.name, y.channels, FOLDED)]), y.shape)


def blk_left_nd(draw, g: Builder, x: T) -> T:
    """A BN that must stay: no layer on either side it can fold into."""
    kind = draw(
        st.sampled_from(
            [
                "relu_bn_padconv_zero_gamma",
                "conv_relu_bn",
                "conv_maxpool_bn",
                "conv_bn_param_input",
                "conv_bn_training",
            ]
        )
    )
    g.log.append(f"left:{kind}")
    if kind in ("conv_bn_param_input", "conv_bn_training"):
        y = conv(draw, g, x)
        training = kind == "conv_bn_training"
        b = g.bn(y.name, y.channels, LEFT, param_input=not training, training=training)
        return T(g.node("Relu", [b]), y.shape)
    if kind == "relu_bn_padconv_zero_gamma":  # no shift t / s to keep before the padding
        r = g.node("Relu", [x.name])
        values = g.bn_values(x.channels, zero_gamma=True)
        return conv(draw, g, T(g.bn(r, x.channels, LEFT, values=values), x.shape), padded=True)
    y = conv(draw, g, x)
    if kind == "conv_relu_bn":
        z = T(g.node("Relu", [y.name]), y.shape)
    else:
        z = T(g.node("MaxPool", [y.name], kernel_shape=[1] * len(y.spatial)), y.shape)
    # a scale <= 0 in one channel: the BN cannot pass the Relu after it into a next layer
    values = _one_negative_scale(g.bn_values(z.channels))
    return T(g.node("Relu", [g.bn(z.name, z.channels, LEFT, values=values)]), z.shape)


def _one_negative_scale(values: list[np.ndarray]) -> list[np.ndarray]:
    """BN values (gamma, beta, mean, var) whose channel 0 has a negative gamma."""
    values[0][0] = -abs(values[0][0]) - 0.1
    return values


def pointwise(draw, g: Builder, x: T) -> tuple[T, bool]:
    """A 1x1 conv done channels-last: Transpose -> MatMul(+Add) -> Transpose, or
    Transpose -> Reshape(-1, C) -> Gemm / MatMul -> Reshape(-1, *spatial, G) -> Transpose.
    Also says whether it took the Reshape way."""
    d = len(x.spatial)
    last = g.node("Transpose", [x.name], perm=[0, *range(2, 2 + d), 1])
    reshaped = draw(st.booleans())
    if reshaped:
        g.log.append("tokens")
        tokens = T(g.node("Reshape", [last, g.ints([-1, x.channels])]), (x.channels,))
        y = gemm(draw, g, tokens) if draw(st.booleans()) else matmul(draw, g, tokens)
        n = y.shape[-1]
        y = T(g.node("Reshape", [y.name, g.ints([-1, *x.spatial, n])]), (*x.spatial, n))
    else:
        y = matmul(draw, g, T(last, (*x.spatial, x.channels)))
    back = g.node("Transpose", [y.name], perm=[0, 1 + d, *range(1, 1 + d)])
    return T(back, (y.shape[-1], *x.spatial)), reshaped


def blk_pointwise_matmul_bn(draw, g: Builder, x: T) -> T:
    y, _ = pointwise(draw, g, x)
    return T(g.bn(y.name, y.channels, FOLDED), y.shape)


def blk_bn_pointwise_matmul(draw, g: Builder, x: T) -> T:
    return pointwise(draw, g, T(g.bn(x.name, x.channels, FOLDED), x.shape))[0]


def blk_conv_bn_gap_gemm(draw, g: Builder, x: T) -> T:
    """Conv -> BN -> GlobalAveragePool -> Flatten -> Gemm (or ReduceMean -> Gemm)."""
    y = conv(draw, g, x)
    b = g.bn(y.name, y.channels, FOLDED)
    d = len(y.spatial)
    if draw(st.booleans()):
        flat = g.node("Flatten", [g.node("GlobalAveragePool", [b])])
    else:
        flat = g.node("ReduceMean", [b, g.ints(list(range(2, 2 + d)))], keepdims=0)
    return gemm(draw, g, T(flat, (y.channels,)), via_trans_a=False)


def blk_conv_gap_flatten_bn(draw, g: Builder, x: T) -> T:
    """Conv -> GlobalAveragePool -> Flatten -> BN on 2-D."""
    y = conv(draw, g, x)
    if draw(st.booleans()):
        flat = g.node("Flatten", [g.node("GlobalAveragePool", [y.name])])
    else:
        axes = list(range(2, 2 + len(y.spatial)))
        flat = g.node("ReduceMean", [y.name, g.ints(axes)], keepdims=0)
    return T(g.bn(flat, y.channels, FOLDED), (y.channels,))


def blk_bn_flatten_gemm(draw, g: Builder, x: T) -> T:
    """BN -> Flatten / GlobalAveragePool -> Flatten / ReduceMean / Reshape(0, -1) -> Gemm or
    MatMul."""
    b = g.bn(x.name, x.channels, FOLDED)
    kind = draw(st.sampled_from(["flatten", "gap", "reshape", "reducemean"]))
    g.log.append(f"bn->{kind}")
    if kind == "gap":
        flat, k = g.node("Flatten", [g.node("GlobalAveragePool", [b])]), x.channels
    elif kind == "reducemean":
        axes = g.ints(list(range(2, 2 + len(x.spatial))))
        flat, k = g.node("ReduceMean", [b, axes], keepdims=0), x.channels
    elif kind == "flatten":
        flat, k = g.node("Flatten", [b]), _numel(x.shape)
    else:
        flat, k = g.node("Reshape", [b, g.ints([0, -1])]), _numel(x.shape)
    if draw(st.booleans()):
        return matmul(draw, g, T(flat, (k,)))
    return gemm(draw, g, T(flat, (k,)), via_trans_a=False)


def blk_matmul_bn(draw, g: Builder, x: T) -> T:
    """2-D: MatMul(+Add) -> [Identity / Dropout / Unsqueeze] -> BN."""
    y = between_2d(draw, g, matmul(draw, g, x))
    if draw(st.booleans()):
        u = g.node("Unsqueeze", [y.name, g.ints([2])])
        b = g.bn(u, y.channels, FOLDED)
        return T(g.node("Squeeze", [b, g.ints([2])]), y.shape)
    return T(g.bn(y.name, y.channels, FOLDED), y.shape)


def blk_gemm_bn(draw, g: Builder, x: T) -> T:
    y = between_2d(draw, g, gemm(draw, g, x))
    return T(g.bn(y.name, y.channels, FOLDED), y.shape)


def blk_bn_gemm(draw, g: Builder, x: T) -> T:
    """2-D: BN -> [Identity / Dropout] -> Gemm, or BN -> Transpose -> Gemm(transA=1)."""
    b = T(g.bn(x.name, x.channels, FOLDED), x.shape)
    if draw(st.booleans()):
        return gemm(draw, g, b, via_trans_a=True)
    return gemm(draw, g, between_2d(draw, g, b), via_trans_a=False)


def blk_bn_matmul(draw, g: Builder, x: T) -> T:
    b = T(g.bn(x.name, x.channels, FOLDED), x.shape)
    return matmul(draw, g, between_2d(draw, g, b))


def blk_gemm_reshape_bn(draw, g: Builder, x: T) -> T:
    """Gemm -> Reshape(N, C, k, 1) -> BN(C): k layer channels per BN channel."""
    c, k = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    y = gemm(draw, g, x, via_trans_a=False, n=c * k)
    head = draw(st.sampled_from([0, -1]))
    r = g.node("Reshape", [y.name, g.ints([head, c, k, 1])])
    # c == 1, k == 2 folds too: see test_reshape_to_unit_channel_axis_folds
    return T(g.bn(r, c, FOLDED), (c, k, 1))


def blk_left_2d(draw, g: Builder, x: T) -> T:
    """Relu -> BN with a negative scale -> Relu (no positive scale to pass the Relu), or
    Gemm -> BN -> Gemm with the BN's scale a graph input."""
    if draw(st.booleans()):
        g.log.append("left:relu_bn_relu")
        r = g.node("Relu", [x.name])
        values = _one_negative_scale(g.bn_values(x.channels))
        return T(g.node("Relu", [g.bn(r, x.channels, LEFT, values=values)]), x.shape)
    g.log.append("left:gemm_bn_gemm_param_input")
    y = gemm(draw, g, x)
    return gemm(draw, g, T(g.bn(y.name, y.channels, LEFT, param_input=True), y.shape))


BLOCKS_ND = [
    blk_conv_bn,
    blk_bn_conv,
    blk_bn_padded_conv,
    blk_tied_conv_bn,
    blk_convtranspose_bn,
    blk_conv_bn_relu,
    blk_left_nd,
    blk_pointwise_matmul_bn,
    blk_bn_pointwise_matmul,
    blk_conv_bn_gap_gemm,
    blk_conv_gap_flatten_bn,
    blk_bn_flatten_gemm,
]
BLOCKS_2D = [
    blk_matmul_bn,
    blk_gemm_bn,
    blk_bn_gemm,
    blk_bn_matmul,
    blk_gemm_reshape_bn,
    blk_left_2d,
]


def _input(draw) -> T:
    if draw(st.integers(0, 2)) == 0:
        return T("x", (draw(st.integers(1, 8)),))
    d = draw(st.integers(1, 3))
    top = 7 if d < 3 else 4
    return T("x", (draw(st.integers(1, 6)), *[draw(st.integers(3, top)) for _ in range(d)]))


def _builder(draw) -> Builder:
    return Builder(
        seed=draw(st.integers(0, 2**32 - 1)),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        const_nodes=draw(st.integers(0, 4)) == 0,
        duplicate_shared=draw(st.booleans()),
    )


@st.composite
def chains(draw) -> Case:
    g = _builder(draw)
    x = _input(draw)
    y = x
    for _ in range(draw(st.integers(1, 4))):
        blocks = BLOCKS_2D if len(y.shape) == 1 else BLOCKS_ND
        if len(y.shape) > 1 and _numel(y.shape) > 1500:  # keep the graphs small
            blocks = [blk_conv_bn_gap_gemm, blk_left_nd]
        block = draw(st.sampled_from(blocks))
        g.log.append(block.__name__)
        y = block(draw, g, y)
    g.outputs.append(y.name)
    return Case(g.model(x), g.expect, x.shape, g.seed, g.log, g.duplicate_shared)


# --------------------------------------------------------------------------- residual blocks


def res_basic(draw, g: Builder, x: T) -> T:
    """x -> Conv -> BN (-> Relu -> Conv -> BN) -> Add(x) -> Relu: every BN folds."""
    y = x
    for i in range(draw(st.integers(1, 2))):
        if i:
            y = T(g.node("Relu", [y.name]), y.shape)
        y = _same_conv(draw, g, y, x.channels, draw(st.sampled_from([1, 3])), 1)
        y = T(g.bn(y.name, y.channels, FOLDED), y.shape)
    pair = [y.name, x.name] if draw(st.booleans()) else [x.name, y.name]
    return T(g.node("Relu", [g.node("Add", pair)]), x.shape)


def _same_conv(draw, g: Builder, x: T, cout: int, k: int, stride: int) -> T:
    """A k x k conv (k odd) with pads (k // 2) * dilation: output size (size - 1) // stride + 1."""
    d = len(x.spatial)
    groups = draw(st.sampled_from(_common_divisors(x.channels, cout)))
    dil = draw(st.integers(1, 2))
    w = g.weight((cout, x.channels // groups, *[k] * d), x.channels * k**d // groups)
    inputs = [x.name, w] + ([g.bias((cout,))] if draw(st.booleans()) else [])
    y = g.node(
        "Conv",
        inputs,
        group=groups,
        pads=[dil * (k // 2)] * 2 * d,
        strides=[stride] * d,
        dilations=[dil] * d,
    )
    return T(y, (cout, *[(s - 1) // stride + 1 for s in x.spatial]))


def res_projection(draw, g: Builder, x: T) -> T:
    """Two branches, each Conv -> BN, added: both BNs fold."""
    cout, stride = draw(st.integers(1, 6)), draw(st.integers(1, 2))
    a = _same_conv(draw, g, x, cout, 3, stride)
    b = _same_conv(draw, g, x, cout, 1, stride)
    ya = g.bn(a.name, cout, FOLDED)
    yb = g.bn(b.name, cout, FOLDED)
    return T(g.node("Relu", [g.node("Add", [ya, yb])]), a.shape)


def res_conv_output_reused(draw, g: Builder, x: T) -> T:
    """Conv -> c; c -> BN and c -> Mul / Relu / the model's outputs: the BN must stay. (BN(c)
    + c would be one linear map of c: the merge of parallel branches makes it one Conv.)"""
    c = _same_conv(draw, g, x, x.channels, draw(st.sampled_from([1, 3])), 1)
    kind = draw(st.sampled_from(["mul", "relu_add", "output"]))
    g.log.append(kind)
    b = g.bn(c.name, c.channels, LEFT)
    if kind == "mul":
        s = g.node("Mul", [b, c.name])
    elif kind == "relu_add":
        s = g.node("Add", [g.node("Relu", [c.name]), b])
    else:
        g.outputs.append(c.name)
        s = g.node("Add", [b, x.name])
    return T(g.node("Relu", [s]), c.shape)


def res_bn_exported(draw, g: Builder, x: T) -> T:
    """Conv -> BN whose output is also a model output: the BN still folds."""
    c = _same_conv(draw, g, x, x.channels, draw(st.sampled_from([1, 3])), 1)
    b = g.bn(c.name, c.channels, FOLDED)
    g.outputs.append(b)
    return T(g.node("Relu", [g.node("Add", [b, x.name])]), c.shape)


def res_preact(draw, g: Builder, x: T) -> T:
    """x -> BN -> Relu -> Conv -> Add(x) (a pre-activation block): with every scale positive
    the scale passes the Relu into the conv and the shift stays as an Add; with a scale <= 0
    the BN must stay."""
    values = g.bn_values(x.channels)
    if draw(st.booleans()):
        values[0] = np.abs(values[0])
    expect = FOLDED if (values[0] > 0).all() else LEFT
    b = g.bn(x.name, x.channels, expect, values=values)
    c = _same_conv(draw, g, T(g.node("Relu", [b]), x.shape), x.channels, 3, 1)
    return T(g.node("Relu", [g.node("Add", [x.name, c.name])]), x.shape)


def res_bn_into_branch_conv(draw, g: Builder, x: T) -> T:
    """x -> BN -> Conv -> Add(x): the BN folds into an unpadded conv, into a padded one
    keeping its shift as an Add, and into both of two convs it feeds."""
    kind = draw(st.sampled_from(["unpadded", "padded", "two_convs"]))
    g.log.append(kind)
    b = T(g.bn(x.name, x.channels, FOLDED), x.shape)
    c = _same_conv(draw, g, b, x.channels, 1 if kind != "padded" else 3, 1)
    if kind == "two_convs":
        c2 = _same_conv(draw, g, b, x.channels, 1, 1)
        c = T(g.node("Add", [c.name, c2.name]), c.shape)
    return T(g.node("Relu", [g.node("Add", [c.name, x.name])]), x.shape)


def res_shared_weight(draw, g: Builder, x: T) -> T:
    """One weight initializer read by two convs, a BN after one of them only, or BNs of other
    values after both: the BNs stay, unless each call may get its own copy of the weight."""
    d = len(x.spatial)
    w = g.weight((x.channels, x.channels, *[1] * d), x.channels)
    c1 = g.node("Conv", [x.name, w])
    c2 = g.node("Conv", [g.node("Relu", [x.name]), w])
    expect = FOLDED if g.duplicate_shared else LEFT
    b = g.bn(c1, x.channels, expect)
    if draw(st.booleans()):
        g.log.append("other_bn")
        c2 = g.bn(c2, x.channels, expect)
    return T(g.node("Relu", [g.node("Add", [b, c2])]), x.shape)


def res_shared_calls(draw, g: Builder, x: T) -> T:
    """A Siamese branch: one conv weight (and bias) read by 2 or 3 Conv nodes on x, Relu(x),
    Neg(x), each call with BNs of equal values after it, before it, or both (before a padded
    conv the shift stays as an Add): every BN folds, once into the shared weight."""
    c, d = x.channels, len(x.spatial)
    side = draw(st.sampled_from(["after", "before", "both"]))
    k, dil = draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
    groups = draw(st.sampled_from(_divisors(c)))
    inputs = [g.weight((c, c // groups, *[k] * d), c * k**d // groups)]
    inputs += [g.bias((c,))] if draw(st.booleans()) else []
    attrs = {"group": groups, "pads": [dil * (k // 2)] * 2 * d, "dilations": [dil] * d}
    before, after = g.bn_values(c), g.bn_values(c)
    same_names = draw(st.booleans())
    names: dict = {}
    calls = draw(st.integers(2, 3))
    g.log.append(f"calls={calls}, {side}, k={k}, d={dil}, g={groups}, same_bn={same_names}")
    outs = []
    for src in [x.name, g.node("Relu", [x.name]), g.node("Neg", [x.name])][:calls]:
        if side != "after":
            src = g.bn(src, c, FOLDED, values=before, names=names.get("before"))
            names.setdefault("before", g.last_bn_params if same_names else None)
        y = g.node("Conv", [src, *inputs], **attrs)
        if side != "before":
            y = g.bn(y, c, FOLDED, values=after, names=names.get("after"))
            names.setdefault("after", g.last_bn_params if same_names else None)
        outs.append(y)
    total = outs[0]
    for y in outs[1:]:
        total = g.node("Add", [total, y])
    return T(g.node("Relu", [total]), x.shape)


def res_bn_after_add(draw, g: Builder, x: T) -> T:
    """x -> Conv -> BN -> Add(x) -> BN -> Relu: the first folds into the Conv; the Conv, x and
    the second BN merge into one Conv (RepViT's BN(conv(x) + x))."""
    c = _same_conv(draw, g, x, x.channels, draw(st.sampled_from([1, 3])), 1)
    s = g.node("Add", [g.bn(c.name, c.channels, FOLDED), x.name])
    return T(g.node("Relu", [g.bn(s, c.channels, FOLDED)]), x.shape)


def res_concat(draw, g: Builder, x: T) -> T:
    """Dense block: Concat(x, Conv -> BN) -> Relu; the BN folds."""
    c = _same_conv(draw, g, x, draw(st.integers(1, 3)), 3, 1)
    b = g.bn(c.name, c.channels, FOLDED)
    cat = g.node("Concat", [x.name, b], axis=1)
    return T(g.node("Relu", [cat]), (x.channels + c.channels, *x.spatial))


def res_shape_readers(draw, g: Builder, x: T) -> T:
    """Shape reads only shapes, which no fold changes: x -> BN -> 1x1 Conv with Shape(BN
    output) reshaping the conv, or Conv -> BN with Shape(conv output) reshaping the BN."""
    if draw(st.booleans()):
        g.log.append("shape_of_bn")
        b = g.bn(x.name, x.channels, FOLDED)
        c = _same_conv(draw, g, T(b, x.shape), x.channels, 1, 1)
        y = g.node("Reshape", [c.name, g.node("Shape", [b])])
    else:
        g.log.append("shape_of_conv")
        c = _same_conv(draw, g, x, x.channels, draw(st.sampled_from([1, 3])), 1)
        y = g.node("Reshape", [g.bn(c.name, c.channels, FOLDED), g.node("Shape", [c.name])])
    return T(g.node("Relu", [g.node("Add", [y, x.name])]), x.shape)


RESIDUAL_BLOCKS = [
    res_basic,
    res_projection,
    res_conv_output_reused,
    res_bn_exported,
    res_preact,
    res_bn_into_branch_conv,
    res_shared_weight,
    res_shared_calls,
    res_bn_after_add,
    res_concat,
    res_shape_readers,
]


@st.composite
def residual_graphs(draw) -> Case:
    g = _builder(draw)
    d = draw(st.integers(1, 3))
    top = 6 if d < 3 else 4
    x = T("x", (draw(st.integers(1, 4)), *[draw(st.integers(3, top)) for _ in range(d)]))
    y = x
    if draw(st.booleans()):
        g.log.append("stem")
        y = blk_conv_bn_relu(draw, g, y)
    for _ in range(draw(st.integers(1, 3))):
        if y.channels > 8:
            y = T(g.node("Relu", [_same_conv(draw, g, y, 4, 1, 1).name]), (4, *y.spatial))
        block = draw(st.sampled_from(RESIDUAL_BLOCKS))
        g.log.append(block.__name__)
        y = block(draw, g, y)
    if draw(st.booleans()):
        g.log.append("head")
        y = blk_bn_flatten_gemm(draw, g, y)
    g.outputs.append(y.name)
    return Case(g.model(x), g.expect, x.shape, g.seed, g.log, g.duplicate_shared)


# --------------------------------------------------------------------------- checking


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _bn_count(proto: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def _fold(proto: onnx.ModelProto, duplicate_shared: bool = False):
    model = ir.serde.deserialize_model(proto)
    report = fold_onnx_model(model, duplicate_shared=duplicate_shared)
    return ir.serde.serialize_model(model), report


def check_case(
    case: Case,
    *,
    np_dtype=np.float32,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    batches: tuple[int, ...] = (1, 3),
):
    proto = case.proto
    before = proto.SerializeToString()
    folded, report = _fold(proto, case.duplicate_shared)
    assert proto.SerializeToString() == before, "the input proto was changed"

    # (d) a valid model with the same outputs
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == [o.name for o in proto.graph.output]

    # (b) one decision per BN; the BNs left in the graph are the ones reported 'left'
    decisions = {d.name: d for d in report.decisions}
    assert len(report.decisions) == len(decisions) == _bn_count(proto)
    left = [d for d in report.decisions if d.status == LEFT]
    assert _bn_count(folded) == len(left), report.decisions
    remaining = {n.name for n in folded.graph.node if n.op_type == "BatchNormalization"}
    assert remaining == {d.name for d in left}
    for d in report.decisions:
        assert d.status in (FOLDED, LEFT)
        if d.status == FOLDED:
            assert d.into and d.direction in ("preceding", "following", "merged"), d
        else:
            assert d.reason, d

    # (c) what the generator knows: every BN's decision
    assert set(case.expect) == set(decisions)
    for name, status in case.expect.items():
        assert decisions[name].status == status, (name, decisions[name], case)

    # (a) the same outputs, batch 1 and 3
    rng = np.random.default_rng(case.seed ^ 0x5EED)
    for batch in batches:
        x = rng.standard_normal((batch, *case.input_shape)).astype(np_dtype)
        want = _run(proto, {"x": x})
        got = _run(folded, {"x": x})
        for w, o in zip(want, got):
            assert w.shape == o.shape and o.dtype == w.dtype
            w64, o64 = w.astype(np.float64), o.astype(np.float64)
            err = float(np.abs(w64 - o64).max()) if w.size else 0.0
            scale = float(np.abs(w64).max()) if w.size else 0.0
            assert err <= atol + rtol * scale, (err, scale, case)
    return folded, report


# --------------------------------------------------------------------------- the tests


@SETTINGS
@given(chains())
def test_random_chains_fold_exactly(case: Case):
    check_case(case)


@SETTINGS
@given(residual_graphs())
def test_random_residual_graphs_fold_exactly(case: Case):
    check_case(case)


def test_float16_conv_bn_gemm_keeps_float16():
    """Conv -> BN -> Relu -> BN -> Flatten -> Gemm -> BN, every initializer and the input
    float16, the Conv without bias and the Gemm without C: all three BNs fold, the biases the
    engine adds and every weight stay float16, the outputs still match."""
    g = Builder(seed=7, eps=1e-3, dtype=np.float16)

    def stats(var):
        """Random gamma, beta and mean; variances of a trained net, some as small as eps."""
        values = g.bn_values(len(var))
        values[3] = np.array(var)
        return values

    x = T("x", (3, 5, 5))
    w = g.weight((4, 3, 3, 3), 27)
    c = g.node("Conv", [x.name, w], pads=[1, 1, 1, 1])
    b1 = g.bn(c, 4, FOLDED, values=stats([1e-3, 0.3, 4e-3, 1.5]))  # into the Conv before it
    # into the Gemm after it
    b2 = g.bn(g.node("Relu", [b1]), 4, FOLDED, values=stats([0.8, 2e-3, 1.2, 1e-3]))
    y = g.node("Gemm", [g.node("Flatten", [b2]), g.weight((6, 100), 100)], transB=1, alpha=0.5)
    # into the Gemm before it
    g.outputs.append(g.bn(y, 6, FOLDED, values=stats([2e-3, 0.5, 1e-3, 2.0, 5e-3, 0.9])))
    case = Case(g.model(x, elem=TensorProto.FLOAT16), g.expect, x.shape, g.seed, g.log)
    assert {i.data_type for i in case.proto.graph.initializer} == {TensorProto.FLOAT16}

    # float16 rounding leaves the fold 9.2e-4 of the output's scale off (measured); a fold with
    # eps 10% off is 4.5e-2 off, one without eps 0.8
    folded, report = check_case(case, np_dtype=np.float16, rtol=4e-3, atol=0.0)
    assert [d.status for d in report.decisions] == [FOLDED] * 3
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Flatten", "Gemm"]
    conv_node, gemm_node = folded.graph.node[0], folded.graph.node[3]
    assert len(conv_node.input) == 3 and len(gemm_node.input) == 3  # biases were added
    inits = {i.name: i for i in folded.graph.initializer}
    assert set(inits) == {*conv_node.input[1:], *gemm_node.input[1:]}
    assert {i.data_type for i in inits.values()} == {TensorProto.FLOAT16}
    assert folded.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert folded.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


# --------------------------------------------------------------------------- engine bugs


def test_matmul_bias_that_raises_the_rank():
    """x (4, 3) @ W (3, 4) + b (1, 1, 4) is (1, 4, 4), and the BN normalizes its axis 1: the
    4 rows of x, not the 4 MatMul channels. Folding it into W and b would change the outputs:
    the BN is left."""
    g = Builder(seed=0, eps=1e-5)
    mm = g.node("MatMul", ["x", g.weight((3, 4), 3)])
    add = g.node("Add", [mm, g.bias((1, 1, 4))])
    g.outputs.append(g.bn(add, 4, LEFT))
    case = Case(g.model(T("x", (3,)), batch=4), g.expect, (3,), g.seed, g.log)
    check_case(case, batches=(4,))


def test_reshape_to_unit_channel_axis_folds():
    """A one-channel BN after a Reshape that splits the Gemm's 2 channels as (1, 2): both
    Gemm channels get the BN's one affine, an exact fold the generator expects."""
    g = Builder(seed=0, eps=1e-5)
    y = g.node("Gemm", ["x", g.weight((5, 2), 5)])
    r = g.node("Reshape", [y, g.ints([-1, 1, 2, 1])])
    g.outputs.append(g.bn(r, 1, FOLDED))
    check_case(Case(g.model(T("x", (5,))), g.expect, (5,), g.seed, g.log))
