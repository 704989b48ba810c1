"""Read access to an ONNX model's main graph for the fold patterns: constants, consumers,
shapes (from onnx's shape inference, the model itself untouched) and names for people."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import sympy

ONNX_DOMAINS = ("", "ai.onnx")
SHAPE_READERS = ("Shape", "Size")
_SMALL_INITIALIZER = 1024  # bytes; larger ones are left out of the shape-inference copy


def node_name(node: ir.Node) -> str:
    """A node's name, or the name of its first output when it has none."""
    if node.name:
        return node.name
    first = node.outputs[0] if node.outputs else None
    return first.name if first is not None and first.name else node.op_type


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    return node.domain in ONNX_DOMAINS and node.op_type in op_types


class OnnxGraph:
    """The main graph of an onnx_ir model, with inferred shapes."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
        self._shapes = inferred_shapes(model)
        self._fresh = 0
        self._evaluated: dict[ir.Value, np.ndarray | None] = {}

    # ------------------------------------------------------------------ values
    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's array when it is fixed: an initializer that is not a graph input, or
        the output of a Constant node. None otherwise."""
        if value is None or (value.is_graph_input() and not self.initializer_input(value)):
            return None
        if value.const_value is not None and value.is_initializer():
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and is_onnx_op(producer, "Constant"):
            tensor = ir.convenience.get_const_tensor(value)
            return None if tensor is None else tensor.numpy()
        return self._computed_constant(value)

    def _computed_constant(self, value: ir.Value) -> np.ndarray | None:
        """The value of a small computation on constants only (an exporter's zero bias made
        by Expand(CastLike(0), Shape(weight)), a Cast of a weight), evaluated by onnx's
        reference evaluator; None when it depends on an input or is not small."""
        if value in self._evaluated:
            return self._evaluated[value]
        nodes = _constant_subgraph(value, self.graph)
        result = None
        if nodes is not None:
            try:
                result = _evaluate(nodes, value, self.model)
            except Exception:  # noqa: BLE001 - an op the evaluator lacks: not a constant here
                result = None
        self._evaluated[value] = result
        return result

    def initializer_input(self, value: ir.Value) -> bool:
        """An initializer listed as a graph input because IR version 3 requires it (not to
        be fed at run time)."""
        return (self.model.ir_version or 0) < 4 and value.is_initializer()

    def not_constant_reason(self, value: ir.Value | None, what: str) -> str:
        if value is None:
            return f"its {what} is missing"
        if value.is_graph_input():
            return f"its {what} '{value.name}' is a graph input, so it can change at run time"
        return f"its {what} '{value.name}' is computed by the graph, not a constant"

    def consumers(self, value: ir.Value) -> list[ir.Node]:
        """The distinct nodes that read the data of `value` (in any graph, subgraphs
        included); Shape and Size read only its shape, and CastLike only the dtype of its
        second input (an exporter's zero bias), which no fold changes."""
        seen: list[ir.Node] = []
        for use in value.uses():
            if is_onnx_op(use.node, *SHAPE_READERS) or _reads_dtype_only(use):
                continue
            if use.node not in seen:
                seen.append(use.node)
        return seen

    def sole_consumer(self, value: ir.Value) -> ir.Node | None:
        """The one node reading `value` in the main graph, when it is also not a graph output."""
        users = self.consumers(value)
        if len(users) != 1 or value.is_graph_output() or users[0].graph is not self.graph:
            return None
        return users[0]

    def shape(self, value: ir.Value | None) -> tuple[sympy.Expr, ...] | None:
        """The value's shape with each dim as a sympy expression (a symbol for a named dim, a
        fresh dummy for an unknown one), or None when not even the rank is known."""
        if value is None:
            return None
        dims = self._shapes.get(value.name)
        if dims is None and value.shape is not None:
            dims = tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)
        if dims is None and value.const_value is not None:
            dims = tuple(value.const_value.shape.dims)
        if dims is None:
            return None
        return tuple(_dim_expr(d) for d in dims)

    def fresh_name(self, base: str) -> str:
        """A name used by no value and no node anywhere in the model."""
        taken = self._names()
        name = base
        while name in taken:
            self._fresh += 1
            name = f"{base}_{self._fresh}"
        taken.add(name)
        return name

    def _names(self) -> set[str]:
        if not hasattr(self, "_taken"):
            self._taken = {v.name for v in self.graph.inputs} | set(self.graph.initializers)
            for node in ir.traversal.RecursiveGraphIterator(self.graph):
                self._taken.update(v.name for v in node.outputs if v is not None)
                if node.name:
                    self._taken.add(node.name)
        return self._taken

    # ------------------------------------------------------------------ people
    def describe(self, node: ir.Node | None, value: ir.Value | None = None) -> str:
        """Name a producer for a user: `Relu 'relu_3'`, `the model input 'x'`."""
        if node is None:
            if value is not None and value.is_graph_input():
                return f"the model input '{value.name}'"
            return f"the constant '{value.name}'" if value is not None else "nothing"
        return f"{node.op_type} '{node_name(node)}'"


def _reads_dtype_only(use) -> bool:
    return is_onnx_op(use.node, "CastLike") and use.idx == 1


def attr(node: ir.Node, name: str, default=None):
    """The value of an attribute, or `default`."""
    a = node.attributes.get(name)
    return default if a is None else a.value


_MAX_CONSTANT_NODES = 16


def _constant_subgraph(value: ir.Value, graph: ir.Graph) -> list[ir.Node] | None:
    """The nodes computing `value` from initializers and Constants only, in order; None when
    an input, a subgraph or another domain is involved, or more than a few nodes."""
    order: list[ir.Node] = []
    seen: set[ir.Node] = set()

    def visit(v: ir.Value | None) -> bool:
        if v is None or v.name == "":
            return True
        if v.is_graph_input():
            return False
        if v.is_initializer():
            return v.const_value is not None
        node = v.producer()
        if node is None or node.graph is not graph or node.domain not in ONNX_DOMAINS:
            return False
        if node in seen:
            return True
        if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return False
        seen.add(node)
        # CastLike reads only the dtype of its second input (the exporter passes the model
        # input there); that dtype is fixed by the graph
        inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
        if node.op_type == "CastLike" and (len(node.inputs) < 2 or node.inputs[1].dtype is None):
            return False
        if len(seen) > _MAX_CONSTANT_NODES or not all(visit(i) for i in inputs):
            return False
        order.append(node)
        return True

    return order if value.producer() is not None and visit(value) else None


def _evaluate(nodes: list[ir.Node], value: ir.Value, model: ir.Model) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    produced = {o.name for n in nodes for o in n.outputs if o is not None}
    inits, protos = [], []
    for node in nodes:
        proto = ir.serde.serialize_node(node)
        reads = node.inputs
        if node.op_type == "CastLike":
            proto = onnx.helper.make_node(
                "Cast", [proto.input[0]], list(proto.output), to=int(node.inputs[1].dtype)
            )
            reads = node.inputs[:1]
        elif node.op_type == "Shape" and node.inputs[0].is_initializer():
            # the shape of a weight, without copying the weight
            dims = list(node.inputs[0].const_value.shape.dims)
            dims = dims[attr(node, "start", 0) : attr(node, "end", None)]
            proto = onnx.helper.make_node(
                "Constant",
                [],
                list(proto.output),
                value=onnx.numpy_helper.from_array(np.array(dims, dtype=np.int64)),
            )
            reads = []
        protos.append(proto)
        for i in reads:
            if i is not None and i.name and i.name not in produced and i.is_initializer():
                # read into memory: the evaluator cannot open a weight stored as external data
                inits.append(onnx.numpy_helper.from_array(i.const_value.numpy(), i.name))
    graph = onnx.helper.make_graph(
        protos,
        "constant",
        [],
        [onnx.helper.make_empty_tensor_value_info(value.name)],
        inits,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    return np.asarray(ReferenceEvaluator(proto).run(None, {})[0])


def _dim_expr(d) -> sympy.Expr:
    if isinstance(d, (int, np.integer)):
        return sympy.Integer(int(d))
    if isinstance(d, str) and d:
        return sympy.Symbol(d, positive=True, integer=True)
    return sympy.Dummy(positive=True, integer=True)


def inferred_shapes(model: ir.Model) -> dict[str, tuple]:
    """Value name -> dims (int, or str for a named dim, or None) from onnx's shape inference
    on a copy of the graph without large initializer data. The model is not modified."""
    proto = _structure_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to the shapes the file carries
        inferred = proto
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        t = info.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
    return shapes


def _structure_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large initializers are typed graph inputs without data."""
    graph = model.graph
    held: dict[str, ir.TensorProtocol] = {}
    declared = {v.name: (v.type, v.shape) for v in graph.initializers.values()}
    extra_inputs = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes > _SMALL_INITIALIZER:
            if tensor is not None:
                held[value.name] = tensor
                if value.shape is None:
                    value.shape = tensor.shape
                if value.dtype is None:
                    value.dtype = tensor.dtype
            if not value.is_graph_input():
                extra_inputs.append(value)
    order = list(graph.initializers)
    saved = {name: graph.initializers[name] for name in order}
    try:
        for name in held:
            saved[name].const_value = None
            graph.initializers.pop(name)
        for value in extra_inputs:
            if value.name in graph.initializers:
                graph.initializers.pop(value.name)
        graph.inputs.extend(extra_inputs)
        return ir.serde.serialize_model(model)
    finally:
        for _ in extra_inputs:
            graph.inputs.pop()
        for name, tensor in held.items():
            saved[name].const_value = tensor
        graph.initializers.clear()
        for name in order:
            graph.initializers.add(saved[name])
            saved[name].type, saved[name].shape = declared[name]
