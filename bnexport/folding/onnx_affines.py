"""Frozen affine maps that an exporter wrote as arithmetic: chains of Mul, Add, Sub and Div
whose other operand is a per-channel or scalar constant (TensorFlow's BatchNorm as exported by
tf2onnx, `x * scale + shift` of a FrozenBatchNorm, a LayerScale's `x * gamma`).

Each op of a chain updates the map y = s * x + t of the chain so far, with c its constant:

    x * c:  (s c, t c)      x + c:  (s, t + c)      x - c:  (s, t - c)
    c - x:  (-s, c - t)     x / c:  (s / c, t / c)  (every c != 0)

A constant is per-channel when, broadcast against the data, it varies along one axis only
(the channel axis) and leaves the data's shape unchanged. A chain grows while its output has
one consumer that is such an op on the same axis (or by a scalar).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from bnexport.folding.onnx_graph import OnnxGraph, is_onnx_op, node_name
from bnexport.folding.onnx_sites import AffineSite, match_layer

ARITH_OPS = ("Mul", "Add", "Sub", "Div")


def _operands(node: ir.Node, g: OnnxGraph) -> tuple[int, np.ndarray] | None:
    """(index of the data input, the constant operand), when exactly one operand is constant."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    consts = [g.constant(v) for v in node.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    data = 0 if consts[0] is None else 1
    return data, consts[1 - data]


def _channel_axis(c: np.ndarray, shape: tuple) -> tuple[int | None, int] | None:
    """(axis, channels) of a constant broadcast against data of `shape`: (None, 1) for a
    scalar; None when it varies along several axes or would change the data's shape."""
    if not np.issubdtype(c.dtype, np.floating) or c.ndim > len(shape):
        return None
    lead = len(shape) - c.ndim
    varying = [lead + i for i, n in enumerate(c.shape) if n != 1]
    if not varying:
        return None, 1
    if len(varying) != 1:
        return None
    axis = varying[0]
    dim = shape[axis]
    if not dim.is_Integer or int(dim) != c.shape[axis - lead]:
        return None
    return axis, int(dim)


def _is_layer_bias(node: ir.Node, data: ir.Value, g: OnnxGraph) -> bool:
    """An Add that gives a MatMul its bias belongs to that layer."""
    producer = data.producer()
    if producer is None or not is_onnx_op(producer, "MatMul") or not is_onnx_op(node, "Add"):
        return False
    site = match_layer(producer, g)
    return not isinstance(site, str) and site.bias_add is node


class _Step:
    """One arithmetic op of a chain: its data input, constant and channel axis."""

    def __init__(self, node: ir.Node, data: ir.Value, c: np.ndarray, axis: int | None, n: int):
        self.node, self.data, self.c, self.axis, self.channels = node, data, c, axis, n

    def apply(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.from_numpy(np.asarray(self.c, dtype=np.float64).reshape(-1).copy())
        op = self.node.op_type
        if op == "Mul":
            return s * c, t * c
        if op == "Add":
            return s, t + c
        if op == "Div":
            return s / c, t / c
        if self.node.inputs[0] is self.data:  # x - c
            return s, t - c
        return -s, c - t  # c - x


def _step(node: ir.Node, g: OnnxGraph) -> _Step | None:
    if not is_onnx_op(node, *ARITH_OPS):
        return None
    found = _operands(node, g)
    if found is None:
        return None
    index, c = found
    data = node.inputs[index]
    if node.op_type == "Div" and (index != 0 or not np.all(c != 0)):
        return None  # c / x is not affine; x / 0 is not a map we can fold
    shape = g.shape(data)
    if shape is None or _is_layer_bias(node, data, g):
        return None
    where = _channel_axis(c, shape)
    if where is None:
        return None
    return _Step(node, data, c, *where)


def _describe(steps: list[_Step], g: OnnxGraph) -> tuple[str, str]:
    """(name, kind): `Mul and Add after conv2d_5`, `Mul and Add`."""
    ops = [s.node.op_type for s in steps]
    kind = " and ".join(dict.fromkeys(ops)) if len(ops) > 1 else ops[0]
    producer = steps[0].data.producer()
    where = (
        f"after {node_name(producer)}"
        if producer is not None
        else f"on the input '{steps[0].data.name}'"
    )
    return f"{kind} {where}", kind


def match_affine_chains(g: OnnxGraph) -> list[AffineSite]:
    """Every maximal chain of arithmetic by constants in the main graph, in graph order."""
    claimed: set[ir.Node] = set()
    sites = []
    for node in g.graph:
        if node in claimed:
            continue
        first = _step(node, g)
        if first is None:
            continue
        steps = [first]
        while True:
            nxt = g.sole_consumer(steps[-1].node.outputs[0])
            step = None if nxt is None or nxt in claimed else _step(nxt, g)
            if step is None or step.data is not steps[-1].node.outputs[0]:
                break
            axes = {s.axis for s in (*steps, step) if s.axis is not None}
            sizes = {s.channels for s in (*steps, step) if s.axis is not None}
            if len(axes) > 1 or len(sizes) > 1:
                break
            steps.append(step)
        claimed.update(s.node for s in steps)
        per_channel = [s for s in steps if s.axis is not None]
        axis = per_channel[0].axis if per_channel else None
        channels = per_channel[0].channels if per_channel else 1
        s = torch.ones(channels, dtype=torch.float64)
        t = torch.zeros(channels, dtype=torch.float64)
        for st in steps:
            s, t = st.apply(s, t)
        if axis is None:  # a map by scalars: any axis carries it; the last is the layers' own
            axis = len(g.shape(first.data)) - 1
        name, kind = _describe(steps, g)
        taken = sum(site.name == name or site.name.startswith(f"{name} (") for site in sites)
        name = f"{name} ({taken + 1})" if taken else name
        index = list(node.inputs).index(first.data)
        nodes = [st.node for st in steps]
        sites.append(AffineSite(nodes, name, kind, channels, axis, index, s, t))
    return sites
