"""The export stage: a (folded) torch.export program becomes a checked ONNX file.

The program is handed to `torch.onnx.export` as it is, so it is not traced again. The file is
written atomically with its metadata; models whose weights exceed `EXTERNAL_DATA_THRESHOLD`
(or on request) keep their weights in `OUT.onnx.data` next to `OUT.onnx`, and the pair is
moved into place together. `onnx.checker` accepts the file before it is moved into place.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bnexport.defaults import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD
from bnexport.errors import ExportError, summarize_exception
from bnexport.files import atomic_file_set, check_writable
from bnexport.report import FOLDED, BranchMerge, CheckPoint, FoldDecision, FoldReport, OnnxInfo
from bnexport.version import __version__

if TYPE_CHECKING:
    import torch


def onnx_metadata(report: FoldReport | None, **extra: object) -> dict[str, object]:
    """The metadata an exported file carries: the tool version, every BN folded (into which
    layer, in which direction), every BN left with its reason, and every sum of branches
    merged into one layer (with where it is checked)."""
    meta: dict[str, object] = {"bnexport_version": __version__, **extra}
    if report is not None:
        meta["bnexport_folded"] = [
            {
                "name": d.name,
                "into": d.into,
                "direction": d.direction,
                "shift_kept": d.shift_kept,
                **({"check": d.check.to_dict()} if d.check is not None else {}),
                **({"merged_into": d.merged_into} if d.merged_into is not None else {}),
            }
            for d in report.folded
        ]
        if report.merged:
            meta["bnexport_merged"] = [
                {
                    "into": m.into,
                    "branches": m.branches,
                    "convs_removed": m.convs_removed,
                    **({"check": m.check.to_dict()} if m.check is not None else {}),
                }
                for m in report.merged
            ]
        meta["bnexport_left"] = [{"name": d.name, "reason": d.reason} for d in report.left]
        if report.aliases or report.changed:
            meta["bnexport_names"] = {
                "aliases": dict(report.aliases),
                "changed": sorted(report.changed),
            }
    return meta


def _check_point(fields: dict) -> CheckPoint:
    """A check point read back from a file's metadata (keys a later version added are
    ignored)."""
    known = {"export_value", "original_value", "axis", "layer_value"}
    return CheckPoint(**{k: v for k, v in fields.items() if k in known})


def recorded_folds(path: str | Path) -> FoldReport | None:
    """The folds an ONNX file written by bnexport records in its metadata (where each is
    checked, what its tensor names mean), or None for a file without them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "bnexport_folded" not in meta:
        return None
    try:
        folded = json.loads(meta["bnexport_folded"])
        names = json.loads(meta.get("bnexport_names", "{}"))
        report = FoldReport(
            aliases=dict(names.get("aliases", {})), changed=set(names.get("changed", []))
        )
        for entry in folded:
            check = entry.get("check")
            report.decisions.append(
                FoldDecision(
                    name=entry["name"],
                    kind="",
                    status=FOLDED,
                    into=entry.get("into"),
                    direction=entry.get("direction"),
                    shift_kept=bool(entry.get("shift_kept")),
                    check=None if check is None else _check_point(check),
                    merged_into=entry.get("merged_into"),
                )
            )
        for entry in json.loads(meta.get("bnexport_merged", "[]")):
            check = entry.get("check")
            report.merges.append(
                BranchMerge(
                    into=entry["into"],
                    branches=list(entry.get("branches", [])),
                    merged=True,
                    convs_removed=int(entry.get("convs_removed", 0)),
                    check=None if check is None else _check_point(check),
                )
            )
    except (ValueError, KeyError, TypeError):
        return None  # metadata of another version or edited by hand: mapped by names instead
    return report


def count_batchnorm_nodes(model) -> int:
    """BatchNormalization nodes in the main graph, its subgraphs and every local function.

    `model` is an onnx_ir model or an onnx ModelProto.
    """
    from onnxscript import ir

    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    graphs = [model.graph, *model.functions.values()]
    return sum(
        node.op_type == "BatchNormalization"
        for graph in graphs
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )


def count_ops(model) -> dict[str, int]:
    """Nodes of the main graph by op_type (an onnx_ir model or an onnx ModelProto)."""
    from onnxscript import ir

    nodes = model.graph if isinstance(model, ir.Model) else model.graph.node
    return dict(Counter(node.op_type for node in nodes))


# The ops a fold removes or adds, by the aten op (overload packet) they are traced as; each
# exports as one ONNX node of this type.
_ARITHMETIC = {"mul": "Mul", "add": "Add", "sub": "Sub", "div": "Div"}
_TRACED_AS = {
    **_ARITHMETIC,
    **{f"{op}_": name for op, name in _ARITHMETIC.items()},  # in place (MobileOne's `out +=`)
    # convs, which a merge of parallel branches removes
    **{f"conv{n}d": "Conv" for n in (1, 2, 3)},
}


def traced_ops(program) -> Counter:
    """The nodes of a torch.export program that compute on its inputs, counted by the ONNX
    op each exports as, for the ops a fold removes or adds: batch norms
    (BatchNormalization), arithmetic (Mul, Add, Sub, Div) and convs (Conv). Arithmetic on
    stored tensors alone (a frozen BN's scale computed from its buffers) is not counted: the
    exporter turns it into a constant."""
    data = set(program.graph_signature.user_inputs)
    on_data: set = set()
    counts: Counter = Counter()
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in data:
                on_data.add(node)
            continue
        if not any(arg in on_data for arg in node.all_input_nodes):
            continue
        on_data.add(node)
        packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        if "batch_norm" in packet:
            counts["BatchNormalization"] += 1
        elif packet in _TRACED_AS:
            counts[_TRACED_AS[packet]] += 1
        elif packet == "convolution" and not node.args[6]:
            counts["Conv"] += 1
    return counts


def ops_before_fold(after: dict[str, int], traced: Counter, folded: Counter) -> dict[str, int]:
    """The op counts of the export of a program before its fold, from those of the folded
    program's export (`after`) and the two programs' `traced_ops`: what the fold removed
    (BNs, arithmetic by constants) added back, what it added (an Add that keeps a shift)
    taken away. This is the graph `torch.onnx.export` writes of the original when it keeps
    every BN a node, without exporting it a second time."""
    before = Counter(after)
    before.update(traced)
    before.subtract(folded)
    return {op: n for op, n in before.items() if n > 0}


def ops_with_folds_undone(after: dict[str, int], fold: FoldReport) -> dict[str, int]:
    """The op counts of a file with the BN folds of `fold` undone: each folded BN back as one
    BatchNormalization node, each Add that keeps a shift (`shift_kept`) gone, each merged sum
    of branches back as its layers and the Adds between them."""
    before = Counter(after)
    for d in fold.folded:
        before["BatchNormalization"] += 1
        if d.shift_kept:
            before["Add"] -= 1
    for m in fold.merged:
        before["Conv"] += m.convs_removed
        before["Add"] += len(m.branches) - 1
    return {op: n for op, n in before.items() if n > 0}


def recorded_ops_before(path: str | Path) -> dict[str, int] | None:
    """The op counts before the fold that a file bnexport wrote records in its metadata
    (None for a file without them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        counts = json.loads(meta["bnexport_ops_before"])
        return {str(op): int(n) for op, n in counts.items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _external_files(model) -> list[str]:
    from onnxscript import ir

    files = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.location not in files:
            files.append(tensor.location)
    return files


def has_external_data(model) -> bool:
    """True when some initializer of an onnx_ir model lives in an external data file."""
    return bool(_external_files(model))


def describe_model(model, path: str | Path) -> OnnxInfo:
    """What an onnx_ir model (saved at `path`) holds: opset, inputs, outputs, batch axis, BNs.

    The batch axis is dynamic when axis 0 of some input is symbolic (an input whose axis 0 is
    fixed beside it has no batch axis); otherwise the model fixes the batch to the first
    input's axis 0.
    """
    batch_dims = [v.shape[0] for v in model.graph.inputs if v.shape is not None and len(v.shape)]
    dynamic = any(not isinstance(d, int) for d in batch_dims)
    fixed = next((d for d in batch_dims if isinstance(d, int)), None)
    return OnnxInfo(
        path=str(path),
        opset=int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))),
        batchnorm_nodes=count_batchnorm_nodes(model),
        inputs=[v.name for v in model.graph.inputs],
        outputs=[v.name for v in model.graph.outputs],
        dynamic_batch=dynamic,
        external_data=_external_files(model) or None,
        batch_size=None if dynamic else fixed,
    )


def describe_onnx(path: str | Path) -> OnnxInfo:
    """Read an ONNX file's description (external weights are not loaded)."""
    from onnxscript import ir

    return describe_model(ir.load(str(path)), path)


def to_onnx_program(program: torch.export.ExportedProgram, *, opset: int | None = DEFAULT_OPSET):
    """`torch.onnx.export` of an already traced program (no second trace)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                program, (), dynamo=True, opset_version=opset, verbose=False, report=False
            )
        except Exception as exc:  # noqa: BLE001 - summarised for the user
            raise ExportError(
                f"torch.onnx.export failed ({summarize_exception(exc)}). Try another --opset "
                "or --static-batch; run with --debug for the full trace."
            ) from exc


def export_names(onnx_program, program: torch.export.ExportedProgram) -> dict[str, str]:
    """The name of each node of `program` in the file `torch.onnx.export` made of it.

    The exporter traces the program again and names every node afresh, by its op and how
    many came before it: a fold that removes a conv, an Add or a Mul renumbers the later ones
    (the third conv2d, `conv2d_2`, becomes `conv2d_1` once a merge removes one before it).
    Each node of the traced-again program records the node it came from (`from_node`); the
    last one from a node holds its value. Inputs and stored tensors keep their names."""
    own = {n.name for n in program.graph.nodes}
    names = {n.name: n.name for n in program.graph.nodes if n.op == "placeholder"}
    exported = getattr(onnx_program, "exported_program", None)
    if exported is None:
        return {name: name for name in own}
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        source = _source_name(node.meta.get("from_node") or [], own)
        if source is not None:
            names[source] = node.name
    return names


def _source_name(sources, own: set[str]) -> str | None:
    """The first node of `own` in a chain of `from_node` records."""
    for source in sources:
        if getattr(source, "name", None) in own:
            return source.name
        found = _source_name(getattr(source, "from_node", None) or [], own)
        if found is not None:
            return found
    return None


def exported_report(report: FoldReport, names: dict[str, str]) -> FoldReport:
    """A copy of `report` whose check points, aliases and changed names are the file's
    (`export_names`); names of nodes the file does not have are dropped."""
    import copy

    renamed = copy.deepcopy(report)

    def point(check: CheckPoint | None) -> None:
        if check is None:
            return
        check.export_value = names.get(check.export_value, check.export_value)
        if check.layer_value is not None:
            check.layer_value = names.get(check.layer_value, check.layer_value)

    for d in renamed.decisions:
        point(d.check)
    for m in renamed.merges:
        point(m.check)
    renamed.aliases = {names[k]: v for k, v in report.aliases.items() if k in names}
    renamed.changed = {names[k] for k in report.changed if k in names}
    return renamed


def initializer_bytes(model) -> int:
    """Bytes of weights held by an onnx_ir model's initializers."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def release_weights(model) -> None:
    """Drop an onnx_ir model's references to its weight tensors, once it has been written.

    The ONNX rewriter keeps the last graph it matched in module-level rule objects, so the
    model's graph outlives it; without this the (folded) weights would stay in memory while
    onnxruntime loads its own copy for verification.
    """
    for value in model.graph.initializers.values():
        value.const_value = None


def save_onnx_model(
    model,
    path: str | Path,
    *,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
    before_commit: Callable[[], None] | None = None,
    accept_checker_error: Callable[[Exception], bool] | None = None,
) -> OnnxInfo:
    """Write an onnx_ir model to `path` atomically, checked by onnx.checker first.

    When the checker rejects the model, `accept_checker_error(exc)` (for a model whose own
    source file the checker rejects too) may return True to write it all the same.

    Metadata keys are set, not appended, so a model that already carries them stays valid.
    `external_data=None` chooses external data when the weights exceed `threshold` bytes; a
    stale `path.data` from an earlier external-data export is removed when this one is not.
    `before_commit` runs once the checker has accepted the file and before it is moved into
    place, for files that must exist only together with it.
    """
    import onnx
    from onnxscript import ir

    path = Path(path)
    check_writable(path)
    data_file = path.with_name(f"{path.name}.data")
    for key, value in (metadata or {}).items():
        model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    external = external_data if external_data is not None else initializer_bytes(model) > threshold
    if not external and has_external_data(model):
        ir.external_data.load_to_model(model)  # embedded in the new file, not referenced
    with atomic_file_set(path) as tmp:
        try:
            ir.save(model, tmp, external_data=f"{path.name}.data" if external else None)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(
                f"Writing the ONNX file failed ({summarize_exception(exc)}). For a model over "
                "2 GB, let the weights go to external data (the default; do not pass "
                "--no-external-data)."
            ) from exc
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:  # noqa: BLE001
            if accept_checker_error is None or not accept_checker_error(exc):
                raise ExportError(
                    f"The exported ONNX model fails onnx.checker ({summarize_exception(exc)}); "
                    "nothing was written. Try another --opset; run with --debug for details."
                ) from exc
        if before_commit is not None:
            before_commit()
    if not external and data_file.is_file():
        data_file.unlink()  # the weights of the file just replaced
    info = describe_model(model, path)
    if external:
        info.external_data = [data_file.name]
    return info


def export_program(
    program: torch.export.ExportedProgram,
    path: str | Path,
    *,
    opset: int | None = DEFAULT_OPSET,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> OnnxInfo:
    """Export a torch.export program to a checked ONNX file at `path` (atomic)."""
    onnx_program = to_onnx_program(program, opset=opset)
    return save_onnx_model(
        onnx_program.model,
        path,
        metadata=metadata,
        external_data=external_data,
        threshold=threshold,
    )


def export_onnx(
    model,
    path: str | Path,
    example_inputs: tuple | None = None,
    *,
    opset: int | None = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
) -> OnnxInfo:
    """Export a `FoldResult`, an ExportedProgram or an nn.Module to `path` atomically.

    A FoldResult exports its folded program as it is and records its fold decisions in the
    ONNX metadata (`bnexport_folded`, `bnexport_left`). An nn.Module is traced once with
    `example_inputs` (batch axis dynamic unless `dynamic_batch` is False).
    """
    import torch

    from bnexport.trace import trace

    report = getattr(model, "report", None)
    if report is not None:
        program = model.program
    elif isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if example_inputs is None:
            raise TypeError("export_onnx() needs example_inputs for an nn.Module")
        program = trace(model, tuple(example_inputs), dynamic_batch=dynamic_batch)
    onnx_program = to_onnx_program(program, opset=opset)
    if report is not None:
        report = exported_report(report, export_names(onnx_program, program))
    meta = onnx_metadata(report)
    meta.update(metadata or {})
    return save_onnx_model(
        onnx_program.model,
        path,
        metadata=meta,
        external_data=external_data,
        threshold=EXTERNAL_DATA_THRESHOLD,
    )
