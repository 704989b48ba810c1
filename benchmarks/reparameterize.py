"""Structural re-parameterisation: Conv and BatchNormalization nodes and onnxruntime latency of
re-parameterisable networks in training form, exported three ways.

    python benchmarks/reparameterize.py            # RepVGG-A0, MobileOne-S0 at 224 px; writes
                                                   # benchmarks/results_reparameterize.md
    python benchmarks/reparameterize.py --quick    # small versions at 32 px, one repetition

Models (benchmarks/reparam_nets.py, trained-like BN statistics, eval mode): RepVGG-A0's and
MobileOne-S0's layouts (k = 4 branches), written as their papers define the blocks.

Rows, per model:

* plain export: the model as it is, `torch.export.export` then `torch.onnx.export` with its
  default optimizer (which fuses a BN right after a Conv; the identity BNs stay, and every
  branch is a Conv);
* bnexport: `bnexport fold MODEL.pt2` (`run_fold`) on the same program saved with
  `torch.export.save`; its own verification must pass;
* hand: the authors' `reparameterize()` (the papers' kernel arithmetic, in float32), then the
  plain export.

Columns: Conv and BatchNormalization nodes, every node; error = max |file - float64 model| /
max |float64 model| over 2 seeded random batches, onnxruntime with optimizations off;
latency = onnxruntime CPU, all graph optimizations, `intra_op_num_threads=1`, batch 1, median
of alternating rounds (`benchmarks.timing.median_time`); and the latency against the hand
re-parameterisation. Target: no more nodes than the hand re-parameterisation, latency within
1.05x of it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.reparam_nets import (  # noqa: E402
    MobileOne,
    RepVGG,
    mobileone_s0,
    repvgg_a0,
    trained_like,
)
from benchmarks.timing import median_time, ort_session  # noqa: E402
from bnexport.export import export_onnx  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402
from bnexport.version import __version__ as BNEXPORT_VERSION  # noqa: E402

ROUNDS = 5


def models(quick: bool) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    if quick:
        return {
            "repvgg_small": (trained_like(RepVGG()), (1, 3, 32, 32)),
            "mobileone_small": (trained_like(MobileOne(branches=4)), (1, 3, 32, 32)),
        }
    return {
        "repvgg_a0": (trained_like(repvgg_a0()), (1, 3, 224, 224)),
        "mobileone_s0": (trained_like(mobileone_s0()), (1, 3, 224, 224)),
    }


@dataclass
class Row:
    model: str
    route: str
    convs: int
    batchnorms: int
    nodes: int
    error: float
    latency: float = 0.0
    note: str = ""


def count(path: Path) -> tuple[int, int, int]:
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return ops.count("Conv"), ops.count("BatchNormalization"), len(ops)


def error(path: Path, model: nn.Module, shape: tuple[int, ...]) -> float:
    """Max |file - float64 model| / max |float64 model| over 2 seeded batches of 2."""
    session = ort_session(path, optimize=False)
    twin = copy.deepcopy(model).double()
    worst, scale = 0.0, 0.0
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((2, *shape[1:])).astype(np.float32)
        with torch.no_grad():
            ref = twin(torch.from_numpy(x).double()).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return worst / scale


def latency(paths: list[Path], shape: tuple[int, ...], reps: int) -> list[float]:
    """Median seconds per run of each file, in rounds that alternate the order of the files."""
    sessions = [ort_session(p, optimize=True) for p in paths]
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
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


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def bench_model(name: str, model: nn.Module, shape, work: Path, reps: int) -> list[Row]:
    x = torch.randn(2, *shape[1:])  # traced at batch 2, so that the batch stays dynamic
    batch = torch.export.Dim("batch", min=1, max=256)
    with _quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        plain = work / f"{name}_plain.onnx"
        export_onnx(program, plain)
        pt2 = work / f"{name}.pt2"
        torch.export.save(program, pt2)
        ours = work / f"{name}_bnexport.onnx"
        report = run_fold(RunOptions(model=str(pt2), output=str(ours), samples=2))
        hand = work / f"{name}_hand.onnx"
        export_onnx(copy.deepcopy(model).reparameterize(), hand, (x,))
    paths = [plain, ours, hand]
    notes = ["unmerged", "verified" if report.passed else f"verdict: {report.verdict}", ""]
    if report.fold is not None:
        notes[1] += (
            f"; {len(report.fold.merged)} sums merged, {report.fold.convs_removed} convs removed"
        )
    rows = [
        Row(name, route, *count(p), error(p, model, shape), note=note)
        for route, p, note in zip(("plain export", "bnexport", "hand"), paths, notes)
    ]
    for row, seconds in zip(rows, latency(paths, shape, reps)):
        row.latency = seconds
    return rows


def render(rows: list[Row], command: str, reps: int, seconds: float) -> str:
    hand = {r.model: r for r in rows if r.route == "hand"}
    lines = [
        "# Structural re-parameterisation: nodes and latency",
        "",
        f"`{command}`, {datetime.date.today()}, bnexport {BNEXPORT_VERSION}, torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, {platform.processor() or 'cpu'}; "
        f"{reps} latency runs per file, {seconds:.0f} s.",
        "",
        "| model | route | Conv | BN | nodes | error | latency (ms) | vs hand | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.latency / hand[r.model].latency if hand[r.model].latency else float("nan")
        lines.append(
            f"| {r.model} | {r.route} | {r.convs} | {r.batchnorms} | {r.nodes} | {r.error:.2e} "
            f"| {r.latency * 1e3:.3f} | {ratio:.3f} | {r.note} |"
        )
    lines.append("")
    for model, h in hand.items():
        ours = next(r for r in rows if r.model == model and r.route == "bnexport")
        fewer = ours.convs <= h.convs and ours.batchnorms <= h.batchnorms
        ratio = ours.latency / h.latency if h.latency else float("nan")
        lines.append(
            f"- {model}: bnexport {'has no more' if fewer else 'has MORE'} Conv/BN nodes than "
            f"the hand re-parameterisation ({ours.convs}/{ours.batchnorms} vs "
            f"{h.convs}/{h.batchnorms}); latency {ratio:.3f}x of it "
            f"({'within' if ratio <= 1.05 else 'ABOVE'} the 1.05x target)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="latency runs per file")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    opts = parser.parse_args(argv)
    out = opts.out
    if out is None and not opts.quick:
        out = ROOT / "benchmarks" / "results_reparameterize.md"
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    torch.manual_seed(0)
    reps = opts.reps or (1 if opts.quick else 100)
    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, shape) in models(opts.quick).items():
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, model, shape, Path(tmp), reps)
    command = "python benchmarks/reparameterize.py" + (" --quick" if opts.quick else "")
    text = render(rows, command, reps, time.perf_counter() - start)
    if out is not None:
        out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
