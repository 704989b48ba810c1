"""Where each fold stands in an exported ONNX file, and the piece of the file around it.

A fold is checked by tensor names (`CheckPoint`): the export's tensor that stands where the
fold is, computed from the nearest tensors upstream that still hold the original's values.
`cut_layers` walks back from that tensor through the file until it reaches such tensors
(a name the fold report maps to the original's, or one whose meaning the fold did not change)
and makes a small ONNX model of what lies between. A file bnexport did not write has no fold
report: `folds_by_names` finds its folds by the tensor names the exporter kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bnexport.report import CheckPoint, FoldReport


@dataclass
class LayerCut:
    """One fold's piece of the exported file: the ONNX model computing `check.export_value`
    from `feeds` (a name of the piece -> the original's tensor that feeds it)."""

    decision_name: str
    layer_name: str
    check: CheckPoint
    model: object  # onnx.ModelProto
    feeds: dict[str, str]
    original_value: str  # the original's tensor the piece's output must equal


def cut_layers(
    export, report: FoldReport, available: Callable[[str], bool], base_dir: str = "."
) -> tuple[list[LayerCut], list[dict[str, str]]]:
    """The piece of the exported ModelProto `export` around every checked fold of `report`,
    and the folds that could not be cut out (with the reason). `available(name)` tells
    whether the original's tensor `name` can be had; weights kept in external data are read
    from `base_dir` for the pieces that need them."""
    producers = {out: node for node in export.graph.node for out in node.output}
    initializers = {t.name for t in export.graph.initializer}
    graph_inputs = {i.name for i in export.graph.input}
    cuts, unmapped = [], []
    points = [(d.name, d.into or d.name, d.check) for d in report.folded]
    # a sum of branches merged into one layer: the layer's output where the sum's was
    points += [(f"{len(m.branches)} merged branches", m.into, m.check) for m in report.merged]
    for name, layer, check in points:
        if check is None:
            continue
        value = check.export_value
        if value not in producers and check.layer_value in producers:
            value = check.layer_value  # the reshapes after the layer were merged away
        piece = _cut(export, value, producers, initializers, graph_inputs, report, available)
        if isinstance(piece, str):
            unmapped.append({"name": name, "reason": piece})
            continue
        model, feeds = piece
        _load_external(model, base_dir)
        # a layer that took in a BN on each side: its output now stands for the later BN's
        target = report.aliases.get(check.export_value, check.original_value)
        if check.export_value in report.changed or not available(target):
            reason = f"the original has no tensor equal to {check.export_value} of the export"
            unmapped.append({"name": name, "reason": reason})
            continue
        cuts.append(LayerCut(name, layer, check, model, feeds, target))
    return cuts, unmapped


def _feed_of(name: str, report: FoldReport, available, graph_inputs: set[str]) -> str | None:
    """The original's tensor holding the export's value `name`, or None when it has none."""
    if name in report.aliases:
        return report.aliases[name]
    if name in report.changed:
        return None
    if name in graph_inputs or available(name):
        return name
    return None


def _cut(export, output: str, producers, initializers, graph_inputs, report, available):
    """(ModelProto, feeds) computing `output`, or the reason it cannot be cut out."""
    import onnx

    if output not in producers:
        return f"the exported file has no tensor {output}"
    nodes: dict[int, object] = {}
    feeds: dict[str, str] = {}
    needed_initializers: set[str] = set()
    order = {id(node): i for i, node in enumerate(export.graph.node)}
    stack = [producers[output]]
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return f"{node.name or node.op_type} holds a subgraph"
        nodes[id(node)] = node
        for name in node.input:
            if not name or name in feeds or name in needed_initializers:
                continue
            if name in initializers:
                needed_initializers.add(name)
                continue
            feed = _feed_of(name, report, available, graph_inputs)
            if feed is not None:
                feeds[name] = feed
            elif name in producers:
                stack.append(producers[name])
            else:
                return f"the original's value of {name} is not known"
        if len(nodes) > 256:
            return "the layer's inputs lie too far upstream"
    kept = sorted(nodes.values(), key=lambda n: order[id(n)])
    types = value_types(export)
    graph = onnx.helper.make_graph(
        kept,
        "layer",
        [value_info(name, types) for name in feeds],
        [value_info(output, types)],
        [t for t in export.graph.initializer if t.name in needed_initializers],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=list(export.opset_import), ir_version=export.ir_version
    )
    model.functions.extend(export.functions)
    return model, feeds


def _load_external(model, base_dir: str) -> None:
    from onnx import external_data_helper

    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, base_dir)
            tensor.data_location = tensor.DEFAULT
            del tensor.external_data[:]


def value_types(model) -> dict[str, int]:
    types = {}
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    return types


def value_info(name: str, types: dict[str, int]):
    import onnx

    return onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)


def needed_names(cuts: Iterable[LayerCut]) -> set[str]:
    """The original's tensors the cuts are fed with or compared to."""
    names: set[str] = set()
    for cut in cuts:
        names.update(cut.feeds.values())
        names.add(cut.original_value)
    return names


def onnx_value_names(model) -> set[str]:
    """Every tensor an ONNX ModelProto computes or takes (not its initializers)."""
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names - {t.name for t in model.graph.initializer}


@dataclass
class BatchNormPoint:
    """One BN of an original model: its input and output tensors, and whether its input is
    a conv/linear layer's output (so a fold into that layer would stand in its place)."""

    name: str
    input: str
    output: str
    after_layer: bool


def program_batchnorm_points(program) -> list[BatchNormPoint]:
    """The BN calls of a torch.export program, in data-flow order."""
    from bnexport.folding.program_state import ProgramState
    from bnexport.folding.sites import match_layer
    from bnexport.folding.torch_engine import batchnorm_calls, call_names

    state = ProgramState(program, copy_graph=False)
    calls = batchnorm_calls(state.graph)
    return [
        BatchNormPoint(name, c.input.name, c.node.name, match_layer(c.input, state) is not None)
        for c, name in zip(calls, call_names(calls))
    ]


def onnx_batchnorm_points(path: str) -> list[BatchNormPoint]:
    """The BatchNormalization nodes of the main graph of an ONNX file, in order."""
    import onnx

    from bnexport.folding.onnx_sites import LAYER_OPS

    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    points = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.input[0], node.output[0]
        producer = producers.get(x)
        layer = producer is not None and producer.op_type in LAYER_OPS
        points.append(BatchNormPoint(node.name or y, x, y, layer))
    return points


def onnx_batchnorm_inputs(model) -> set[str]:
    """The tensors the BatchNormalization nodes of an ONNX ModelProto read as their input."""
    return {n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"}


def folds_by_names(
    points: list[BatchNormPoint], names: set[str], normalized: set[str] = frozenset()
) -> tuple[FoldReport, list[dict[str, str]]]:
    """The folds a file without bnexport's records shows by its tensor names: a BN whose
    output name is gone, and whose input (a layer's output) is there and not normalized by a
    BatchNormalization of the file (`normalized`), was folded into that layer. Returns them,
    and the BNs that could not be placed (with the reason)."""
    from bnexport.folding.patterns import PRECEDING
    from bnexport.report import FOLDED, FoldDecision

    report, unmapped = FoldReport(), []
    for p in points:
        if p.output in names or p.input in normalized:
            continue  # the BN is still computed: nothing folded here
        if p.input in names and p.after_layer:
            report.aliases[p.input] = p.output
            report.decisions.append(
                FoldDecision(
                    name=p.name,
                    kind="",
                    status=FOLDED,
                    into=p.input,
                    direction=PRECEDING,
                    check=CheckPoint(p.input, p.output, 1),
                )
            )
            continue
        unmapped.append(
            {
                "name": p.name,
                "reason": f"the file has neither its output {p.output} nor, after a layer, "
                f"its input {p.input}",
            }
        )
    return report, unmapped
