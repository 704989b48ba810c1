"""Frozen affine maps written as arithmetic in a torch.export graph: chains of mul, add, sub
and div whose other operand is constant (a stored tensor, a number, or a computation on
those alone): torchvision's FrozenBatchNorm2d (`x * scale + shift` from buffers), timm's
LayerScale (`x * gamma`), a hand-written `x * s + t`.

Each op updates the map y = s * x + t of the chain so far, with c its constant:

    x * c:  (s c, t c)      x + a c:  (s, t + a c)      x - a c:  (s, t - a c)
    c - x:  (-s, c - t)     x / c:    (s / c, t / c)    (every c != 0)

A constant is per-channel when, broadcast against the data, it varies along one axis only
(the channel axis) and leaves the data's shape unchanged; a number applies to every element.
The constants are computed as the program computes them (in their own dtype), then the map
in float64. This module only reads the graph.
"""

from __future__ import annotations

import numbers

import torch
from torch import fx

from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import BatchNormCall, data_users, module_scope

aten = torch.ops.aten

_ARITH = {
    aten.mul.Tensor: "mul",
    aten.mul.Scalar: "mul",
    aten.add.Tensor: "add",
    aten.add.Scalar: "add",
    aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub",
    aten.div.Tensor: "div",
    aten.div.Scalar: "div",
}


class ConstantValues:
    """The values of graph nodes computed from stored tensors and numbers alone, evaluated
    once each by running their ops; None for a node that depends on an input."""

    def __init__(self, state: ProgramState):
        self.state = state
        self._values: dict[fx.Node, torch.Tensor | None] = {}

    def __call__(self, node: object) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        if node not in self._values:
            self._values[node] = self._compute(node)
        return self._values[node]

    def _compute(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "placeholder":
            return None if self.state.target(node) is None else self.state.tensor(node).detach()
        if node.op != "call_function" or node.is_impure() or not hasattr(node.target, "_schema"):
            return None
        if node.target._schema.is_mutable:
            return None
        inputs = [a for a in node.all_input_nodes]
        if any(self(a) is None for a in inputs):
            return None
        args = fx.node.map_arg(node.args, self)
        kwargs = fx.node.map_arg(node.kwargs, self)
        try:
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run here is not a constant
            return None
        return value if isinstance(value, torch.Tensor) else None


def _number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


class _Step:
    """One arithmetic op of a chain on the data node `data`, by the constant `c`."""

    def __init__(self, node: fx.Node, data: fx.Node, c: torch.Tensor, axis: int | None):
        self.node, self.data, self.c, self.axis = node, data, c, axis

    @property
    def channels(self) -> int:
        return 1 if self.axis is None else int(self.c.numel())

    def apply(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c.detach().to(torch.float64).reshape(-1)
        op = _ARITH[self.node.target]
        alpha = self.node.kwargs.get("alpha", 1)
        if op == "mul":
            return s * c, t * c
        if op == "div":
            return s / c, t / c
        if op == "add":
            return s, t + alpha * c
        if self.node.args[0] is self.data:  # x - a c
            return s, t - alpha * c
        return -alpha * s, c - alpha * t  # c - a x


def _step(node: fx.Node, constants: ConstantValues) -> _Step | None:
    if node.op != "call_function" or node.target not in _ARITH or len(node.args) != 2:
        return None
    if not _number(node.kwargs.get("alpha", 1)) or node.kwargs.get("rounding_mode"):
        return None
    a, b = node.args
    values = [
        torch.tensor(float(v), dtype=torch.float64) if _number(v) else constants(v) for v in (a, b)
    ]
    if (values[0] is None) == (values[1] is None):
        return None
    index = 0 if values[0] is None else 1
    data, c = (a, b)[index], values[1 - index]
    if not isinstance(data, fx.Node) or "val" not in data.meta or "val" not in node.meta:
        return None
    if _ARITH[node.target] == "div" and (index != 0 or not bool((c != 0).all())):
        return None
    if not c.is_floating_point() or not data.meta["val"].is_floating_point():
        return None
    x_shape, out_shape = tuple(data.meta["val"].shape), tuple(node.meta["val"].shape)
    if len(out_shape) != len(x_shape) or c.dim() > len(x_shape):
        return None
    if any(not _same_dim(p, q) for p, q in zip(x_shape, out_shape)):
        return None
    lead = len(x_shape) - c.dim()
    varying = [lead + i for i, n in enumerate(c.shape) if n != 1]
    if not varying:
        return _Step(node, data, c.reshape(()), None)
    if len(varying) != 1:
        return None
    return _Step(node, data, c.reshape(-1), varying[0])


def _same_dim(p, q) -> bool:
    if isinstance(p, int) and isinstance(q, int):
        return p == q
    return str(p) == str(q)


def _name_and_kind(steps: list[_Step]) -> tuple[str, str]:
    """A frozen-BN module's path and class (`layer1.0.bn1`, `FrozenBatchNorm2d`), or what the
    chain is and where (`mul and add after conv2d_5`)."""
    path, cls = module_scope(steps[-1].node)
    if path and cls and all(module_scope(s.node)[0] == path for s in steps):
        return path, cls
    ops = list(dict.fromkeys(_ARITH[s.node.target] for s in steps))
    kind = " and ".join(ops)
    return f"{kind} after {steps[0].data.name}", kind


def match_affine(node: fx.Node, constants: ConstantValues) -> BatchNormCall | None:
    """The chain of arithmetic by constants that starts at `node`, as a map call (None when
    `node` is no such op)."""
    first = _step(node, constants)
    if first is None:
        return None
    steps = [first]
    while True:
        users = data_users(steps[-1].node)
        nxt = _step(users[0], constants) if len(users) == 1 else None
        if nxt is None or nxt.data is not steps[-1].node:
            break
        per_channel = {(s.axis, s.channels) for s in (*steps, nxt) if s.axis is not None}
        if len(per_channel) > 1:
            break
        steps.append(nxt)
    axes = [s for s in steps if s.axis is not None]
    channels = axes[0].channels if axes else 1
    s = torch.ones(channels, dtype=torch.float64)
    t = torch.zeros(channels, dtype=torch.float64)
    for st in steps:
        s, t = st.apply(s, t)
    rank = first.data.meta["val"].dim()
    axis = axes[0].axis if axes else max(rank - 1, 0)
    name, kind = _name_and_kind(steps)
    return BatchNormCall(
        node=steps[-1].node,
        input=first.data,
        weight=None,
        bias=None,
        running_mean=None,
        running_var=None,
        eps=0.0,
        uses_batch_stats=False,
        name=name,
        kind=kind,
        op_node=first.node,
        extra_nodes=[st.node for st in steps[:-1]],
        affine=(s, t),
        axis=axis,
    )


def affine_calls(graph: fx.Graph, constants: ConstantValues) -> list[BatchNormCall]:
    """Every maximal chain of arithmetic by constants in the graph, in data-flow order."""
    claimed: set[fx.Node] = set()
    found = []
    for node in graph.nodes:
        if node in claimed:
            continue
        call = match_affine(node, constants)
        if call is None:
            continue
        claimed.update([call.op_node, *call.extra_nodes, call.node])
        found.append(call)
    return found
