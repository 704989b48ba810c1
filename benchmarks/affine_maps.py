"""Frozen affine maps: how many each tool leaves, on real exporter output and on torch models
whose affine maps are not (only) BatchNorm modules.

    python benchmarks/affine_maps.py                 # every model, writes results_affine_maps.md
    python benchmarks/affine_maps.py --quick         # two small models, one repetition, no file
    python benchmarks/affine_maps.py --models levit  # models whose name has a word; no file

Models:

* the tf2onnx files of tests/data/tf2onnx (Keras MobileNet, MobileNetV2,
  a pre-activation mix; every BN written as Mul + Add by per-channel constants), as they are:
  every tool runs on the same file, bnexport with `run_fold` (`bnexport fold FILE.onnx`);
* the torch models of benchmarks/affine_nets.py (FrozenBatchNorm2d ResNet, ConvNeXt LayerScale,
  DenseNet, PreAct-ResNet-18, MixNet-S, LeViT, NF-ResNet, RegNet with hyphenated module names),
  trained-like state, eval mode. bnexport takes the user's route: `torch.export.export(model,
  (x,), dynamic_shapes=...)` saved with `torch.export.save` as a .pt2, then `run_fold` on it
  (`bnexport fold MODEL.pt2`); the peers run on the plain export of the same program,
  `torch.onnx.export(program, dynamo=True, optimize=False)` at torch.onnx's default opset.

Peers (benchmarks/peer_fold_cases.py PEERS, in this process): onnxoptimizer
(`fuse_bn_into_conv`), onnxslim (`slim`), onnxsim (`simplify`, which also runs onnxoptimizer's
fuse and eliminate passes), onnxscript (`optimizer.optimize`); and onnxruntime at level
EXTENDED (`optimized_model_filepath`; EXTENDED, not ALL, so its layout pass does not hide a BN
inside a Conv), the written file counted.

Columns: affine left = BatchNormalization nodes + Mul/Add/Sub/Div nodes one of whose two
inputs is a constant (an initializer, a Constant node's output, or a value computed from
those alone) broadcast over a per-channel or scalar shape (at most one axis longer than 1) and
the other is not; counted in the file itself (main graph). Among them, MatMul biases: an Add
right after a MatMul that nothing else reads, i.e. a Linear's bias as torch.onnx writes it
for inputs of rank > 2 (a Gemm holds its bias inside); each summary line also compares the
counts without them. nodes: every node, Constant nodes included (their number in brackets).

Error: max |file - reference| / max |reference| over 3 seeded random batches of 2 (standard
normal), each file run by onnxruntime with optimizations off; the reference is the float64
PyTorch model, or for a tf2onnx file the file itself run the same way.

Latency, for bnexport's file and the plain export (the tf2onnx file itself for the ONNX
models): onnxruntime CPU, all graph optimizations, `intra_op_num_threads=1`, batch 8 (or
doubled until one run of the plain file takes 2 ms), median (`benchmarks.timing.median_time`)
of alternating rounds. Peers need `pip install -e ".[bench]"`; one that fails shows its error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.affine_nets import torch_models  # noqa: E402
from benchmarks.peer_fold_cases import PEERS  # noqa: E402
from benchmarks.timing import median_time, ort_session  # noqa: E402
from bnexport.defaults import DEFAULT_SAMPLES  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402
from bnexport.version import __version__ as BNEXPORT_VERSION  # noqa: E402

TF2ONNX = ROOT / "tests" / "data" / "tf2onnx"  # real tf2onnx exports (its README says what)
TF2ONNX_FILES = ["keras_preact_mix", "keras_mobilenet_a025", "keras_mobilenetv2_a035"]
PEER_NAMES = ("onnxoptimizer", "onnxslim", "onnxsim", "onnxscript")
ORT_EXTENDED = "onnxruntime EXTENDED"
TOOLS = ("bnexport", *PEER_NAMES, ORT_EXTENDED)  # every tool but bnexport is a peer
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
RANDOM_OPS |= {"Bernoulli", "Multinomial"}
LATENCY_BATCH = 8
LATENCY_FLOOR = 2e-3  # seconds: the batch doubles until one run of the plain file takes this
ROUNDS = 5


# ------------------------------------------------------------------------------- counting


@dataclass
class Count:
    bn: int  # BatchNormalization nodes
    by_constant: int  # Mul/Add/Sub/Div by a per-channel or scalar constant
    matmul_bias: int  # of those, an Add right after a MatMul it alone reads: a Linear's bias
    nodes: int
    constants: int  # Constant nodes among `nodes`

    @property
    def affine(self) -> int:
        return self.bn + self.by_constant

    @property
    def affine_no_bias(self) -> int:
        return self.affine - self.matmul_bias


def _in_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every value's inferred type (shape inference; what it cannot infer is missing)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - contrib ops or a broken file: the declared types only
        inferred = model
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}


def _constant_value_info(
    model: onnx.ModelProto, types: dict[str, onnx.TypeProto]
) -> dict[str, tuple[tuple | None, int | None]]:
    """{name: (shape or None, element type or None)} of every constant value: initializers,
    Constant nodes' outputs, and outputs of nodes whose every input is constant (their shapes
    and types from `types`)."""
    consts: dict[str, tuple[tuple | None, int | None]] = {}
    for init in model.graph.initializer:
        consts[init.name] = (tuple(init.dims), init.data_type)

    def from_types(name: str) -> tuple[tuple | None, int | None]:
        t = types.get(name)
        if t is None or not t.HasField("tensor_type"):
            return None, None
        tt = t.tensor_type
        elem = tt.elem_type or None
        if not tt.HasField("shape"):
            return None, elem
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        return (None if None in dims else dims), elem

    for node in model.graph.node:
        if node.op_type == "Constant" and _in_default_domain(node):
            attr = node.attribute[0]
            if attr.name == "value":
                consts[node.output[0]] = (tuple(attr.t.dims), attr.t.data_type)
            elif attr.name == "value_float":
                consts[node.output[0]] = ((), onnx.TensorProto.FLOAT)
            elif attr.name == "value_floats":
                consts[node.output[0]] = ((len(attr.floats),), onnx.TensorProto.FLOAT)
            else:
                consts[node.output[0]] = from_types(node.output[0])
            continue
        inputs = [i for i in node.input if i]
        if inputs and node.op_type not in RANDOM_OPS and all(i in consts for i in inputs):
            for out in node.output:
                consts[out] = from_types(out)
    return consts


def _per_channel_or_scalar(shape: tuple | None) -> bool:
    return shape is None or sum(d != 1 for d in shape) <= 1  # unknown shape: counted


def count_nodes(path: Path) -> Count:
    """BN nodes, affine nodes by a constant (and the MatMul biases among them), all nodes and
    Constant nodes of the main graph."""
    model = onnx.load(str(path))
    types = _value_types(model)
    consts = _constant_value_info(model, types)
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in model.graph.output}
    bn = by_constant = matmul_bias = constants = 0
    for node in model.graph.node:
        if not _in_default_domain(node):
            continue
        constants += node.op_type == "Constant"
        bn += node.op_type == "BatchNormalization"
        if node.op_type not in AFFINE_OPS or len(node.input) != 2:
            continue
        a, b = node.input
        if (a in consts) == (b in consts):
            continue  # two data inputs, or a constant computation
        const, data = (a, b) if a in consts else (b, a)
        shape, elem = consts[const]
        if elem is None and data in types:
            elem = types[data].tensor_type.elem_type or None
        if (elem is None or elem in FLOAT_TYPES) and _per_channel_or_scalar(shape):
            by_constant += 1
            source = producer.get(data)
            matmul_bias += (
                node.op_type == "Add"
                and source is not None
                and source.op_type == "MatMul"
                and readers.get(data) == 1
                and data not in outputs
            )
    return Count(bn, by_constant, matmul_bias, len(model.graph.node), constants)


# ------------------------------------------------------------------------------- the models


@dataclass
class Case:
    name: str
    source: Path  # what bnexport folds: the .pt2, or the tf2onnx file
    plain: Path  # what the peers get: the plain export, or the tf2onnx file
    model: nn.Module | None  # the float32 torch model (None for a tf2onnx file)
    origin: str


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def torch_case(name: str, model: nn.Module, shape: tuple, work: Path) -> Case:
    """Save the model as bnexport's user would (.pt2) and export the same program plainly."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(123))
    pt2, plain = work / f"{name}.pt2", work / f"{name}.plain.onnx"
    with _quiet():
        dyn = ({0: torch.export.Dim("batch", min=1)},)
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=dyn)
        torch.export.save(program, str(pt2))
        onnx_program = torch.onnx.export(program, (), dynamo=True, optimize=False, verbose=False)
    onnx_program.save(str(plain))
    return Case(name, pt2, plain, model, "torch")


def cases(quick: bool, work: Path, words: list[str] | None):
    """Yield the cases one at a time (each torch model is exported when its turn comes)."""
    files = TF2ONNX_FILES[:1] if quick else TF2ONNX_FILES
    for name in files:
        path = TF2ONNX / f"{name}.onnx"
        if words and not any(w in name for w in words):
            continue
        if not path.is_file():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        yield Case(name, path, path, None, "tf2onnx")
    for name, model, shape in torch_models(quick):
        if not words or any(w in name for w in words):
            yield torch_case(name, model, shape, work)


# ------------------------------------------------------------------------------- references


def _session(path: Path) -> ort.InferenceSession:
    return ort_session(path, optimize=False)


def _random_feeds(session: ort.InferenceSession, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in arg.shape]
        shape[0] = batch
        feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


class Reference:
    """The exact outputs on 3 seeded random batches of 2: the float64 torch model, or the
    tf2onnx file itself in onnxruntime (optimizations off)."""

    def __init__(self, case: Case):
        session = _session(case.plain)
        self.batches = [list(_random_feeds(session, 2, seed).values()) for seed in range(3)]
        if case.model is None:
            self.outputs = [self._run(session, b) for b in self.batches]
            return
        model64 = copy.deepcopy(case.model).double()
        self.outputs = []
        with torch.no_grad():
            for b in self.batches:
                out = model64(*(torch.from_numpy(a).double() for a in b))
                outs = out if isinstance(out, tuple) else (out,)
                self.outputs.append([o.numpy() for o in outs])

    @staticmethod
    def _run(session: ort.InferenceSession, arrays: list) -> list[np.ndarray]:
        feeds = {i.name: a for i, a in zip(session.get_inputs(), arrays)}
        return [o.astype(np.float64) for o in session.run(None, feeds)]

    def error(self, path: Path) -> float:
        session = _session(path)
        worst = 0.0
        for arrays, exact in zip(self.batches, self.outputs):
            for ref, got in zip(exact, self._run(session, arrays)):
                if got.shape != ref.shape:
                    raise ValueError(f"output shape {got.shape}, not {ref.shape}")
                err = float(np.abs(got - ref).max() / (np.abs(ref).max() or 1.0))
                worst = err if np.isnan(err) else max(worst, err)
        return worst


# ------------------------------------------------------------------------------- the tools


def run_bnexport(case: Case, out: Path, samples: int) -> str:
    """`bnexport fold` on the .pt2 (or the ONNX file): its verdict, as a note."""
    with _quiet():
        report = run_fold(RunOptions(model=case.source, output=out, samples=samples))
    return "verified" if report.passed else f"bnexport's own verification: {report.verdict}"


def run_peer(name: str, path: Path, out: Path) -> str:
    with _quiet():
        result = PEERS[name](onnx.load(str(path)))
    model, note = result if isinstance(result, tuple) else (result, "")
    onnx.save(model, str(out))
    return note


def run_ort_extended(path: Path, out: Path) -> str:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return ""


def _short(exc: BaseException, limit: int = 80) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Row:
    model: str
    tool: str
    count: Count | None = None
    error: float | None = None
    seconds: float | None = None  # the tool's wall time
    latency: float | None = None  # seconds per run, ORT all optimizations
    note: str = ""


@dataclass
class ModelResult:
    name: str
    origin: str
    rows: list[Row] = field(default_factory=list)
    batch: int = LATENCY_BATCH

    def row(self, tool: str) -> Row | None:
        return next((r for r in self.rows if r.tool == tool), None)


def _latency_batch(path: Path) -> int:
    session = ort_session(path, optimize=True)
    batch = LATENCY_BATCH
    while batch < 256:
        feeds = _random_feeds(session, batch, 7)
        session.run(None, feeds)
        if median_time(lambda f=feeds: session.run(None, f), 3) >= LATENCY_FLOOR:
            break
        batch *= 2
    return batch


def latency(paths: list[Path], batch: int, reps: int) -> list[float]:
    """Median seconds per run of each file (ORT all optimizations, one thread), in rounds that
    alternate the order of the files."""
    sessions = [ort_session(p, optimize=True) for p in paths]
    feeds = [_random_feeds(s, batch, 7) for s in sessions]
    for s, f in zip(sessions, feeds):
        s.run(None, f)
    rounds = ROUNDS if reps >= ROUNDS else 1
    per_round = max(1, reps // rounds)
    times: list[list[float]] = [[] for _ in paths]
    for i in range(rounds):
        order = range(len(paths)) if i % 2 == 0 else reversed(range(len(paths)))
        for k in order:
            s, f = sessions[k], feeds[k]
            times[k].append(median_time(lambda s=s, f=f: s.run(None, f), per_round))
    return [statistics.median(t) for t in times]


def bench_case(case: Case, reps: int, work: Path, samples: int = DEFAULT_SAMPLES) -> ModelResult:
    result = ModelResult(case.name, case.origin)
    ref = Reference(case)
    baseline = "(tf2onnx file)" if case.model is None else "(plain export)"
    plain = Row(case.name, baseline, count_nodes(case.plain), ref.error(case.plain))
    plain.note = "the input of every peer"
    result.rows.append(plain)
    runners = {
        "bnexport": lambda out: run_bnexport(case, out, samples),
        **{p: (lambda out, p=p: run_peer(p, case.plain, out)) for p in PEER_NAMES},
        ORT_EXTENDED: lambda out: run_ort_extended(case.plain, out),
    }
    for tool, runner in runners.items():
        out = work / f"{case.name}.{tool.split()[0]}.onnx"
        row = Row(case.name, tool)
        try:
            start = time.perf_counter()
            row.note = runner(out)
            row.seconds = time.perf_counter() - start
            row.count = count_nodes(out)
            row.error = ref.error(out)
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
            row.note = f"error: {_short(exc)}"
        result.rows.append(row)
    ours = result.row("bnexport")
    if ours is not None and ours.count is not None:
        ours_path = work / f"{case.name}.bnexport.onnx"
        result.batch = _latency_batch(case.plain)
        plain.latency, ours.latency = latency([case.plain, ours_path], result.batch, reps)
    return result


# ------------------------------------------------------------------------------- the report


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}" if x < 0.01 else f"{x:.3g}"


def table_rows(results: list[ModelResult]) -> list[str]:
    lines = [
        "| model | tool | affine left | BN | by constant | MatMul biases | nodes (Constant) "
        "| max err | ORT ms (batch) | tool s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res.rows:
            c = r.count
            cells = [
                res.name,
                r.tool,
                str(c.affine) if c else "-",
                str(c.bn) if c else "-",
                str(c.by_constant) if c else "-",
                str(c.matmul_bias) if c else "-",
                f"{c.nodes} ({c.constants})" if c else "-",
                _fmt_err(r.error),
                f"{r.latency * 1e3:.3g} ({res.batch})" if r.latency is not None else "",
                f"{r.seconds:.2f}" if r.seconds is not None else "",
                r.note.replace("|", "\\|"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fewest(peers: list[Row], key) -> tuple[int, str]:
    fewest = min(key(r.count) for r in peers)
    return fewest, ", ".join(r.tool for r in peers if key(r.count) == fewest)


def _verdict(ours: int, fewest: int) -> str:
    return "fewer" if ours < fewest else "as many" if ours == fewest else "MORE"


def summary(res: ModelResult) -> str:
    """`bnexport N left; fewest peer M (tool)`, the verdict on the target, the same without
    MatMul biases, the latency."""
    ours = res.row("bnexport")
    ok = ours is not None and ours.count is not None
    peers = [r for r in res.rows if r.tool in TOOLS[1:] and r.count is not None]
    n = str(ours.count.affine) if ok else "- (failed)"
    if not peers:
        return f"{res.name}: bnexport {n} left; no peer ran"
    fewest, tools = _fewest(peers, lambda c: c.affine)
    line = f"{res.name}: bnexport {n} left; fewest peer {fewest} ({tools})"
    if ok:
        line += f": {_verdict(ours.count.affine, fewest)}"
        fewest_nb, tools_nb = _fewest(peers, lambda c: c.affine_no_bias)
        k = ours.count.affine_no_bias
        line += (
            f"; without MatMul biases bnexport {k}, fewest peer {fewest_nb} ({tools_nb}): "
            f"{_verdict(k, fewest_nb)}"
        )
    plain = res.rows[0]
    if ok and ours.latency and plain.latency:
        ratio = ours.latency / plain.latency
        line += (
            f"; ORT latency {ours.latency * 1e3:.3g} ms vs {plain.latency * 1e3:.3g} ms "
            f"{plain.tool[1:-1]} (x{ratio:.3f})"
        )
    return line


def _versions() -> str:
    names = ["torch", "onnxruntime", "onnx", "onnxoptimizer", "onnxslim", "onnxsim", "onnxscript"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts) + f", bnexport {BNEXPORT_VERSION}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(results: list[ModelResult], cmd: str, reps: int, seconds: float) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Frozen affine maps benchmark {datetime.date.today().isoformat()}: `{cmd}`",
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average at the end {load}; the run took {seconds:.0f} s.",
        "",
        f"Versions: {_versions()}.",
        "",
        "affine left = BN + by constant: BatchNormalization nodes, and Mul/Add/Sub/Div nodes "
        "with one input a constant (initializer, Constant output, or computed from those "
        "alone) over a per-channel or scalar shape and the other input data. MatMul biases: "
        "the Adds among them that follow a MatMul read by nothing else (a Linear's bias, "
        "which torch.onnx writes as MatMul + Add; a Gemm holds it inside). nodes: every "
        "node of the main graph (Constant nodes among them). max err: max |file - reference| "
        "/ max |reference| over 3 seeded random batches of 2, onnxruntime with optimizations "
        "off; reference: the float64 PyTorch model, or the tf2onnx file itself. ORT ms: "
        f"onnxruntime CPU, all optimizations, 1 thread, median of {reps} runs in alternating "
        "rounds, at the batch given. tool s: the tool's wall time (bnexport: `run_fold` "
        "with its verification). Peers run on the plain export "
        "(`torch.onnx.export(program, dynamo=True, optimize=False)`) or the tf2onnx file; "
        "bnexport on the saved .pt2 or the tf2onnx file.",
        "",
        *table_rows(results),
        "",
        "Target: bnexport leaves fewer affine nodes than every peer, never more; its file is "
        "not slower in onnxruntime than the plain export.",
        "",
        *(f"- {summary(res)}" for res in results),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small models, one repetition")
    parser.add_argument("--models", nargs="*", help="only models whose name contains a word")
    parser.add_argument("--reps", type=int, default=None, help="latency runs per file")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    parser.add_argument("--keep", type=Path, default=None, help="keep every file in this folder")
    opts = parser.parse_args(argv)
    out = opts.out
    if out is None and not opts.quick and not opts.models:
        out = ROOT / "benchmarks" / "results_affine_maps.md"
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    reps = opts.reps or (1 if opts.quick else 50)
    samples = 2 if opts.quick else DEFAULT_SAMPLES  # bnexport's random verification batches
    start = time.perf_counter()
    results: list[ModelResult] = []
    with contextlib.ExitStack() as stack:
        if opts.keep is not None:
            opts.keep.mkdir(parents=True, exist_ok=True)
            work = opts.keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for case in cases(opts.quick, work, opts.models):
            print(f"benchmarking {case.name} ...", file=sys.stderr, flush=True)
            results.append(bench_case(case, reps, work, samples))
    flags = (" --quick" if opts.quick else "") + (
        " --models " + " ".join(opts.models) if opts.models else ""
    )
    text = render(
        results, "python benchmarks/affine_maps.py" + flags, reps, time.perf_counter() - start
    )
    if out is not None:
        out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
