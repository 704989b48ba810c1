"""Shared layers and BN before zero-padded convs: bnexport against plain export and fx fuse.

    python benchmarks/shared_padded.py          # writes benchmarks/results_shared_padded.md
    python benchmarks/shared_padded.py --quick  # digits_cnn and a small Siamese net, few reps

Models: the shipped digits CNN (input BN before a zero-padded conv; weights from
models/digits_cnn.safetensors), a Siamese encoder (4 Conv3x3(padding=1)-BN-ReLU stages,
widths 32/64/128/256, on two 3x64x64 inputs), the same encoder with an input BatchNorm2d
before its first conv (both patterns at once) and a Conv-BN-ReLU block applied 4 times (weight
tying, 32 channels, 32x32). BN state is trained-like and seeded (`benchmarks.nets.randomize_bn`).

Each model, in eval mode, is saved with `torch.export` (dynamic batch: `Dim.AUTO` on axis 0 of
every input) and handled by three tools:

* plain export: `torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...)`, otherwise
  default settings (its ONNX optimizer on);
* fx fuse: `torch.fx.experimental.optimization.fuse(model)`, run in PyTorch;
* bnexport: `run_fold` on the saved .pt2 with `samples=2`, i.e. `bnexport fold MODEL.pt2 -o
  OUT.onnx --json REPORT.json --samples 2` without the interpreter start; its report must
  pass.

BN left: BatchNormalization nodes in the ONNX file, or BN modules still called in fx fuse's
GraphModule; "after ORT" counts them in the plain file as onnxruntime optimizes it
(ORT_ENABLE_ALL, the optimized model saved and counted). Adds: `batchnorm.adds_added` of
bnexport's JSON report (the shift of a BN before a zero-padded conv, kept as one Add).

Error: max |out - ref64| / max |ref64| with ref64 the eval model in float64 on the same inputs
(digits_cnn: its 450 held-out samples; the others: 2 seeded random batches of 8); ONNX files
run in onnxruntime with graph optimizations off, and again with level ALL (last two columns).

Latency: onnxruntime CPU, `intra_op_num_threads=1`, with graph optimizations ALL and off, at
batch 1 and 32; one warm-up run, then 5 alternating rounds of the two files (which runs first
alternates too), each round the median of a fifth of the repetitions (`median_time`);
reported: the median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import Siamese, SiameseEncoder, TiedLoop, randomize_bn  # noqa: E402
from benchmarks.peer_fold_cases import count_bn  # noqa: E402
from benchmarks.timing import median_time, ort_session  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402
from models.architectures import digits_cnn  # noqa: E402

MODELS = ROOT / "models"
RATIO_TARGET = 1.05  # optimizations ALL: bnexport / plain, given timing noise
ROUNDS = 5


@dataclass
class Case:
    name: str
    model: nn.Module
    shapes: list[tuple]  # one sample's shape per input
    eval_inputs: list[tuple[np.ndarray, ...]]  # batches the errors are measured on
    labels: np.ndarray | None = None  # held-out labels (digits_cnn)
    note: str = ""


def _random_batches(shapes: list[tuple], n: int = 8, seeds=(0, 1)) -> list[tuple]:
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        out.append(tuple(rng.standard_normal((n, *s)).astype(np.float32) for s in shapes))
    return out


def cases(quick: bool) -> list[Case]:
    from safetensors.torch import load_file

    digits = digits_cnn()
    digits.load_state_dict(load_file(str(MODELS / "digits_cnn.safetensors")))
    data = np.load(MODELS / "digits_cnn_test.npz")
    out = [
        Case(
            "digits_cnn",
            digits.eval(),
            [(1, 8, 8)],
            [(data["x"].astype(np.float32),)],
            data["labels"],
            "shipped",
        )
    ]
    torch.manual_seed(0)
    if quick:
        small = Siamese(SiameseEncoder(widths=(16, 32)))
        shapes = [(3, 32, 32)] * 2
        out.append(Case("siamese_small", randomize_bn(small, 1), shapes, _random_batches(shapes)))
        return out
    shapes = [(3, 64, 64)] * 2
    siamese = randomize_bn(Siamese(SiameseEncoder()), 1)
    out.append(Case("siamese", siamese, shapes, _random_batches(shapes)))
    with_bn = randomize_bn(Siamese(SiameseEncoder(input_bn=True)), 2)
    out.append(Case("siamese_input_bn", with_bn, shapes, _random_batches(shapes)))
    tied = randomize_bn(TiedLoop(), 3)
    out.append(Case("tied_loop", tied, [(3, 32, 32)], _random_batches([(3, 32, 32)])))
    return out


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _example(case: Case, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(123)
    return tuple(torch.randn((batch, *s), generator=gen) for s in case.shapes)


def _dyn(args) -> tuple:
    return tuple({0: torch.export.Dim.AUTO} for _ in args)


def save_pt2(case: Case, path: Path) -> None:
    args = _example(case)
    with _quiet():
        program = torch.export.export(case.model, args, dynamic_shapes=_dyn(args))
    torch.export.save(program, str(path))


def plain_export(case: Case, path: Path) -> None:
    args = _example(case)
    with _quiet():
        onnx_program = torch.onnx.export(
            case.model, args, dynamo=True, dynamic_shapes=_dyn(args), verbose=False
        )
    onnx_program.save(str(path))


def _bn_calls(graph_module: torch.fx.GraphModule) -> int:
    modules = dict(graph_module.named_modules())
    return sum(
        n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm)
        for n in graph_module.graph.nodes
    )


def fx_fuse(model: nn.Module):
    """(fused GraphModule, BN modules still called) or (None, short error message)."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
    except Exception as exc:  # noqa: BLE001 - a failure of the baseline is a result
        return None, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return fused, _bn_calls(fused)


def bn_calls_in_model(model: nn.Module) -> int | None:
    try:
        return _bn_calls(torch.fx.symbolic_trace(model))
    except Exception:  # noqa: BLE001
        return None


def run_bnexport(pt2: Path, out: Path, json_path: Path) -> dict:
    report = run_fold(RunOptions(model=pt2, output=out, json_path=json_path, samples=2))
    if not report.passed:
        raise RuntimeError(f"bnexport fold did not verify {pt2}: {report.verdict}")
    return json.loads(json_path.read_text())


def _feeds(session: ort.InferenceSession, arrays: tuple) -> dict:
    return {i.name: a for i, a in zip(session.get_inputs(), arrays)}


def after_ort(path: Path, work: Path) -> tuple[int, float]:
    """(BatchNormalization nodes, MB of initializers) once onnxruntime has optimized the file
    (level ALL)."""
    saved = work / (path.stem + ".ort_all.onnx")
    ort_session(path, True, saved)
    from onnxscript import ir

    size = sum(v.const_value.nbytes for v in ir.load(str(saved)).graph.initializers.values())
    return count_bn(onnx.load(str(saved))), size / 2**20


class Reference:
    """The eval model in float64 on the case's batches."""

    def __init__(self, case: Case):
        model64 = copy.deepcopy(case.model).double()
        self.batches = case.eval_inputs
        with torch.no_grad():
            self.outputs = [
                model64(*(torch.from_numpy(a).double() for a in b)).numpy() for b in self.batches
            ]

    def _error(self, outputs: list[np.ndarray]) -> float:
        return max(
            float(np.abs(got.astype(np.float64) - ref).max() / (np.abs(ref).max() or 1.0))
            for got, ref in zip(outputs, self.outputs)
        )

    def onnx_outputs(self, path: Path, optimize: bool = False) -> list[np.ndarray]:
        session = ort_session(path, optimize)
        return [session.run(None, _feeds(session, b))[0] for b in self.batches]

    def torch_outputs(self, model: nn.Module) -> list[np.ndarray]:
        with torch.no_grad():
            return [model(*(torch.from_numpy(a) for a in b)).numpy() for b in self.batches]

    def onnx_error(self, path: Path, optimize: bool = False) -> float:
        return self._error(self.onnx_outputs(path, optimize))

    def torch_error(self, model: nn.Module) -> float:
        return self._error(self.torch_outputs(model))


def latency(plain: Path, ours: Path, arrays: tuple, optimize: bool, reps: int):
    """Median seconds per run of the plain file and of bnexport's, alternating rounds."""
    sa, sb = ort_session(plain, optimize), ort_session(ours, optimize)
    fa, fb = _feeds(sa, arrays), _feeds(sb, arrays)
    sa.run(None, fa)
    sb.run(None, fb)
    per_round = max(1, reps // ROUNDS)
    ta, tb = [], []
    for i in range(ROUNDS):
        for times, s, f in ((ta, sa, fa), (tb, sb, fb))[:: 1 if i % 2 == 0 else -1]:
            times.append(median_time(lambda s=s, f=f: s.run(None, f), per_round))
    return statistics.median(ta), statistics.median(tb)


@dataclass
class Result:
    name: str
    note: str
    bn_calls: int | None
    bn_plain: int
    bn_plain_ort: int
    weights_ort: tuple[float, float]  # MB of initializers after ORT (level ALL): plain, ours
    bn_fx: int | str
    bn_ours: int
    adds: int
    err_plain: float
    err_fx: float | None
    err_ours: float
    err_plain_all: float
    err_ours_all: float
    latency: list[tuple] = field(default_factory=list)  # (opt, batch, plain s, ours s)
    accuracy: dict | None = None


def _accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    return float((np.concatenate(outputs).argmax(1) == labels).mean())


def bench_case(case: Case, reps: tuple[int, int], work: Path) -> Result:
    pt2, plain = work / f"{case.name}.pt2", work / f"{case.name}.plain.onnx"
    ours, report = work / f"{case.name}.bnexport.onnx", work / f"{case.name}.json"
    save_pt2(case, pt2)
    plain_export(case, plain)
    data = run_bnexport(pt2, ours, report)
    fused, bn_fx = fx_fuse(case.model)
    ref = Reference(case)
    bn_plain_ort, plain_mb = after_ort(plain, work)
    result = Result(
        case.name,
        case.note,
        bn_calls_in_model(case.model),
        count_bn(onnx.load(str(plain))),
        bn_plain_ort,
        (plain_mb, after_ort(ours, work)[1]),
        bn_fx,
        count_bn(onnx.load(str(ours))),
        data["batchnorm"]["adds_added"],
        ref.onnx_error(plain),
        ref.torch_error(fused) if fused is not None else None,
        ref.onnx_error(ours),
        ref.onnx_error(plain, optimize=True),
        ref.onnx_error(ours, optimize=True),
    )
    if case.labels is not None:
        result.accuracy = {
            "eval model (PyTorch)": _accuracy(ref.torch_outputs(case.model), case.labels),
            "plain export (ORT)": _accuracy(ref.onnx_outputs(plain), case.labels),
            "bnexport (ORT)": _accuracy(ref.onnx_outputs(ours), case.labels),
        }
        if fused is not None:
            result.accuracy["fx fuse (PyTorch)"] = _accuracy(ref.torch_outputs(fused), case.labels)
    for optimize in (True, False):
        for batch, n in zip((1, 32), reps):
            rng = np.random.default_rng(7)
            arrays = tuple(rng.standard_normal((batch, *s)).astype(np.float32) for s in case.shapes)
            a, b = latency(plain, ours, arrays, optimize, n)
            result.latency.append(("all" if optimize else "off", batch, a, b))
    return result


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1e}" if x < 0.01 else f"{x:.3g}"
    return str(x)


def render(results: list[Result], cmd: str, reps: tuple[int, int]) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Shared-layer and padded-conv benchmark {datetime.date.today().isoformat()}: `{cmd}`",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__},"
        f" onnx {onnx.__version__}; load average at the end {load}.",
        "",
        "BN calls: BatchNorm modules called by the eval model (its fx trace). BN left: "
        "BatchNormalization nodes in the ONNX file (plain export, bnexport), in the plain file "
        "after onnxruntime's optimizations (level ALL), BN modules still called after fx fuse. "
        "Adds: Add nodes bnexport added (kept shifts). Weights after ORT: MB of initializers "
        "in the file as onnxruntime optimizes it (level ALL), plain / bnexport. Error: "
        "max |out - ref64| / max |ref64|, ref64 = the eval model in float64; ONNX files in "
        "onnxruntime, optimizations off (the last two columns: level ALL).",
        "",
        "| model | BN calls | BN left: plain | BN left: plain after ORT | BN left: fx fuse "
        "| BN left: bnexport | Adds added: bnexport | weights after ORT (MB) | error: plain "
        "| error: fx fuse | error: bnexport | error, ORT all: plain | error, ORT all: bnexport |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r.name} ({r.note})" if r.note else r.name
        fx_err = _fmt(r.err_fx) if r.err_fx is not None else str(r.bn_fx)
        lines.append(
            f"| {name} | {_fmt(r.bn_calls)} | {r.bn_plain} | {r.bn_plain_ort} | "
            f"{r.bn_fx if isinstance(r.bn_fx, int) else '-'} | {r.bn_ours} | {r.adds} | "
            f"{r.weights_ort[0]:.3g} / {r.weights_ort[1]:.3g} | "
            f"{_fmt(r.err_plain)} | {fx_err} | {_fmt(r.err_ours)} | "
            f"{_fmt(r.err_plain_all)} | {_fmt(r.err_ours_all)} |"
        )
    for r in results:
        if r.accuracy:
            acc = ", ".join(f"{k} {v:.4f}" for k, v in r.accuracy.items())
            lines += ["", f"{r.name} held-out accuracy ({MODELS.name}/{r.name}_test.npz): {acc}."]
    lines += [
        "",
        f"Latency (ms): onnxruntime CPU, 1 thread, median of {ROUNDS} alternating rounds "
        "(the file run first alternates too), "
        f"{reps[0]} runs at batch 1 and {reps[1]} at batch 32 per file. Targets: optimizations "
        f"ALL, bnexport / plain <= {RATIO_TARGET} (timing noise), and < 1.0 where bnexport "
        "removes a BN node that onnxruntime keeps in the plain file; optimizations off, < 1.0 "
        "where bnexport's file has fewer BN nodes (information).",
        "",
        "| model | ORT optimizations | batch | plain (ms) | bnexport (ms) | ratio bnexport/plain "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for opt, batch, a, b in r.latency:
            ratio = b / a
            if opt == "all":
                target = f"<= {RATIO_TARGET}"
                met = ratio <= RATIO_TARGET
                if r.bn_plain_ort > r.bn_ours:
                    target += ", < 1.0"
                    met = ratio < 1.0
                met_s = "yes" if met else "no"
            else:
                target = "< 1.0 (info)" if r.bn_plain > r.bn_ours else "info"
                met_s = ""
            lines.append(
                f"| {r.name} | {opt} | {batch} | {a * 1e3:.3g} | {b * 1e3:.3g} | "
                f"{ratio:.3f} | {target} | {met_s} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small models, few runs")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results_shared_padded.md"
    )
    opts = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    reps = (20, 5) if opts.quick else (200, 30)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(opts.quick):
            print(f"benchmarking {case.name} ...", file=sys.stderr, flush=True)
            results.append(bench_case(case, reps, Path(tmp)))
    flags = " --quick" if opts.quick else ""
    table = render(results, "python benchmarks/shared_padded.py" + flags, reps)
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
