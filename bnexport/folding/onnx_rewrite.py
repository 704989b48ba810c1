"""Rewriting an ONNX graph for the folds decided: a BN node taken out (or replaced by the Add
of its shift), and the weight arithmetic of every fold into one weight applied at once, in
float64, each weight and bias cast once to its own dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from bnexport.folding import math as fm
from bnexport.folding.onnx_graph import OnnxGraph, attr, node_name
from bnexport.folding.onnx_patterns import OnnxFoldPlan
from bnexport.folding.onnx_sites import LayerSite
from bnexport.folding.patterns import PRECEDING


@dataclass
class Affine:
    """One BN's affine, on the layer's channels, to fold into a weight."""

    direction: str
    s: torch.Tensor
    t: torch.Tensor
    shift_kept: bool = False

    @property
    def changes_bias(self) -> bool:
        """A fold into the preceding layer, or a shift that the following layer's bias takes."""
        return self.direction == PRECEDING or (not self.shift_kept and bool(self.t.any()))


@dataclass
class LayerFolds:
    """The affines to fold into one weight, in the order they were decided, and every call
    (layer node) reading that weight and its bias."""

    calls: dict[ir.Node, LayerSite]
    affines: list[Affine] = field(default_factory=list)

    @property
    def layer(self) -> LayerSite:
        return next(iter(self.calls.values()))


def _remove_site(plan: OnnxFoldPlan, g: OnnxGraph) -> None:
    """Remove the map's nodes (their output no longer read) and the constants only they read."""
    params = plan.bn.params  # removing the nodes detaches their inputs
    for node in reversed(plan.bn.nodes):
        g.graph.remove(node, safe=True)
    for value in params:
        drop_if_unused(value, g)


def rewire(plan: OnnxFoldPlan, g: OnnxGraph) -> None:
    """Take the map's nodes out of the graph: the consumers of its output read its input."""
    x, y = plan.bn.input, plan.bn.output
    if y.is_graph_output():
        # the model's output keeps its name: the map's input value takes it over
        name, declared_type, declared_shape = y.name, y.type, y.shape
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        _remove_site(plan, g)
        x.name = name
        x.type, x.shape = declared_type or x.type, declared_shape or x.shape
    else:
        ir.convenience.replace_all_uses_with(y, x)
        _remove_site(plan, g)


def rewire_with_add(plan: OnnxFoldPlan, u: np.ndarray, g: OnnxGraph) -> ir.Value:
    """Replace the map's nodes by Add(x, u), u on the map's channel axis of x; the Add's output
    takes the name of the map's output. Returns the new initializer holding u."""
    site = plan.bn
    x, y = site.input, site.output
    rank = len(g.shape(x))
    shape = (-1,) + (1,) * (rank - 1 - site.axis) if site.channels > 1 else (1,)
    base = node_name(site.node)
    shift = new_initializer(g, f"{base}_shift", u.reshape(shape))
    add = ir.Node("", "Add", [x, shift], name=g.fresh_name(f"{base}_shift_add"))
    result = add.outputs[0]
    g.graph.insert_before(site.node, add)
    name, declared_type, declared_shape = y.name, y.type, y.shape
    ir.convenience.replace_all_uses_with(y, result, replace_graph_outputs=True)
    _remove_site(plan, g)
    result.name = name
    result.type, result.shape = declared_type or x.type, declared_shape or x.shape
    return shift


def drop_if_unused(value: ir.Value | None, g: OnnxGraph) -> None:
    """Remove `value` once nothing reads it: an initializer, or the nodes that computed it
    (a Constant, or an exporter's bias computation), back to the first value still in use."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.is_graph_input():
        if not g.initializer_input(value):
            return
        g.graph.inputs.remove(value)
    if value.is_initializer():
        g.graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is None or producer.graph is not g.graph:
        return
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in producer.outputs):
        return
    inputs = list(producer.inputs)
    g.graph.remove(producer, safe=True)
    for v in inputs:
        drop_if_unused(v, g)


def _store(
    nodes: list[ir.Node], value: ir.Value, array: np.ndarray, dtype: np.dtype, g: OnnxGraph
) -> ir.Value:
    """Give the input `value` of `nodes` the new contents (cast once to `dtype`): in place for
    an initializer, else (a Constant node's output) as a new initializer that `nodes` read.
    Returns the initializer written."""
    array = np.ascontiguousarray(array.astype(dtype))
    if value.is_initializer():
        value.const_value = ir.Tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return value
    new = new_initializer(g, value.name, array)
    for use in list(value.uses()):
        if any(use.node is node for node in nodes):
            use.node.replace_input_with(use.idx, new)
    drop_if_unused(value, g)
    return new


def new_initializer(g: OnnxGraph, base: str, array: np.ndarray) -> ir.Value:
    name = g.fresh_name(base)
    tensor = ir.Tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    g.graph.register_initializer(value)
    if (g.model.ir_version or 0) < 4:
        g.graph.inputs.append(value)  # IR version 3 lists every initializer as an input
    return value


def apply_layer(folds: LayerFolds, g: OnnxGraph, exact: dict | None = None) -> None:
    """Fold every affine decided for one weight, in float64; cast weight and bias once.
    `exact`, a dict, receives the float64 values written, by initializer name."""
    layer = folds.layer
    w_dtype = layer.weight_array.dtype
    weight = fm.array_f64(layer.weight_array)
    n_out = layer.out_channels
    bias_array = g.constant(layer.bias)
    b_dtype = bias_array.dtype if bias_array is not None else w_dtype
    bias = (
        torch.zeros(n_out, dtype=torch.float64) if bias_array is None else fm.array_f64(bias_array)
    )
    if layer.kind == "gemm":
        alpha = float(attr(layer.node, "alpha", 1.0))
        bias = bias * float(attr(layer.node, "beta", 1.0)) if bias_array is not None else bias
    else:
        alpha = 1.0
    for a in folds.affines:
        if a.direction == PRECEDING:
            weight = fm.scale_weight(weight, a.s, layer.layout.out_axis, layer.layout)
            bias = a.s * bias + a.t  # the bias broadcasts along its last axis, the channels
        elif a.shift_kept or not bool(a.t.any()):  # no shift reaches the bias
            weight = fm.scale_weight(weight, a.s, layer.layout.in_axis, layer.layout)
        else:
            delta = fm.following_bias_delta(weight, a.t, layer.layout, n_out)
            weight = fm.scale_weight(weight, a.s, layer.layout.in_axis, layer.layout)
            bias = bias + alpha * _as_bias(delta, bias)
    calls = list(folds.calls.values())
    written = _store([c.node for c in calls], layer.weight, weight.numpy(), w_dtype, g)
    if exact is not None:
        exact[written.name] = weight.numpy()
    if any(a.changes_bias for a in folds.affines):
        written = _write_bias(calls, bias.numpy(), b_dtype, g)
        if exact is not None:
            exact[written.name] = bias.numpy()


def _as_bias(delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return delta if bias.ndim <= 1 else delta.reshape((1,) * (bias.ndim - 1) + (-1,))


def _write_bias(
    calls: list[LayerSite], bias: np.ndarray, dtype: np.dtype, g: OnnxGraph
) -> ir.Value:
    """Write the folded bias of a weight's calls: into their bias, or as one new bias that
    every call reads. Returns the initializer written."""
    layer = calls[0]
    if layer.bias is not None and any(c.bias is not layer.bias for c in calls):
        # equal biases, one per call (an exporter's zero bias computed for each call): one
        # new bias that every call reads
        value = new_initializer(g, f"{layer.weight.name}_bias", bias.astype(dtype))
        for c in calls:
            old = c.bias
            repoint(c.bias_add or c.node, old, value)
            drop_if_unused(old, g)
        if layer.kind == "gemm":
            for c in calls:
                c.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return value
    if layer.bias is not None:
        value = _store([c.bias_add or c.node for c in calls], layer.bias, bias, dtype, g)
        if layer.kind == "gemm":
            for c in calls:
                c.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return value
    value = new_initializer(g, f"{layer.weight.name}_bias", bias.astype(dtype))
    if layer.kind in ("conv", "conv_transpose", "gemm"):
        for c in calls:
            if len(c.node.inputs) < 3:
                c.node.resize_inputs(3)
            c.node.replace_input_with(2, value)
            if layer.kind == "gemm":
                c.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return value
    for c in calls:  # a MatMul without bias gets an Add after it
        _add_after(c.node, value, g)
    return value


def _add_after(node: ir.Node, value: ir.Value, g: OnnxGraph) -> None:
    """An Add of the bias `value` after `node`; the Add's output takes the name of the node's
    output (which the fold's check points name), the node's own output a new one."""
    out = node.outputs[0]
    users = list(out.uses())
    add = ir.Node("", "Add", [out, value], name=g.fresh_name(f"{node_name(node)}_bias_add"))
    result = add.outputs[0]
    if out.type is not None:
        result.type, result.shape = out.type, out.shape
    g.graph.insert_after(node, add)
    for use in users:
        use.node.replace_input_with(use.idx, result)
    name = out.name
    out.name = g.fresh_name(f"{name}_unbiased")
    result.name = name
    if out.is_graph_output():
        outputs = g.graph.outputs
        outputs[outputs.index(out)] = result


def repoint(node: ir.Node, old: ir.Value, new: ir.Value) -> None:
    for use in list(old.uses()):
        if use.node is node:
            node.replace_input_with(use.idx, new)
