"""ONNX in: bnexport's ONNX engine against the ONNX optimizers on the same unfolded files.

    python benchmarks/onnx_in.py            # every model, writes benchmarks/results_onnx_in.md
    python benchmarks/onnx_in.py --quick    # two small models, one repetition

Each model is exported with `torch.onnx.export(program, dynamo=True, optimize=False)`, which
keeps every BatchNormalization node: the file a user of an older exporter, or of another
framework's converter, holds. On that file each tool runs in this process:

* bnexport: `run_fold` (load, run the original in onnxruntime, fold, write, verify in
  onnxruntime on 4 random batches), i.e. `bnexport fold MODEL.onnx` without the interpreter
  start;
* onnxoptimizer (`fuse_bn_into_conv`), onnxslim (`slim`), onnxsim (`simplify`), onnxscript
  (`optimizer.optimize`): load the file, transform, save; none verifies.

Columns: BatchNormalization nodes left; max error against the exact outputs (the PyTorch model
in float64) relative to their scale, over 3 seeded random batches of 2, each file run in
onnxruntime with graph optimizations off (the unfolded file's own error is the floor); wall
time (median of the repetitions). Peers need the benchmark extra:
`pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import reference_models, train_statistics  # noqa: E402
from benchmarks.peer_fold_cases import PEERS, count_bn  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402

PEER_NAMES = ("onnxoptimizer", "onnxslim", "onnxsim", "onnxscript")
MODELS = ROOT / "models"


class SequenceHead(nn.Module):
    """Linear on (B, T, K) -> transpose -> BatchNorm1d over features: the sequence layout of
    TF/Keras and 1-D conv models, where the BN's channel is the Linear's output feature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.conv = nn.Conv1d(32, 32, 1)
        self.bn2 = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        y = self.bn(self.proj(x).transpose(1, 2))
        y = torch.relu(self.bn2(self.conv(y)))
        return self.head(y.mean(-1))


def _export(model_or_program, args: tuple | None, path: Path) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if isinstance(model_or_program, torch.export.ExportedProgram):
            onnx_program = torch.onnx.export(
                model_or_program, (), dynamo=True, optimize=False, verbose=False
            )
        else:
            dyn = tuple({0: torch.export.Dim("batch", min=1)} for _ in args)
            program = torch.export.export(model_or_program, args, dynamic_shapes=dyn)
            onnx_program = torch.onnx.export(
                program, (), dynamo=True, optimize=False, verbose=False
            )
    onnx_program.save(str(path))


def benchmark_files(quick: bool, work: Path) -> list[tuple[str, Path]]:
    """The unfolded ONNX files: shipped checkpoints, the reference architectures, a
    sequence model."""
    files = []
    shipped = ["tabular_mlp"] if quick else ["digits_cnn", "tabular_mlp", "digits_autoencoder"]
    for name in shipped:
        path = work / f"{name}.onnx"
        program = torch.export.load(str(MODELS / f"{name}.pt2"))
        _export(program, None, path)
        files.append((name, path, program.module()))
    for name, model, shape in reference_models(quick):
        path = work / f"{name}.onnx"
        _export(model, (torch.randn(2, *shape),), path)
        files.append((name, path, model))
    if not quick:
        model = train_statistics(SequenceHead(), (16, 12, 16))
        path = work / "sequence_head.onnx"
        _export(model, (torch.randn(2, 12, 16),), path)
        files.append(("sequence_head", path, model))
    return files


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Float64Truth:
    """The model's exact outputs (its float64 copy) on 3 seeded random batches of 2."""

    def __init__(self, model: nn.Module, path: Path):
        session = _session(path)
        model64 = copy.deepcopy(model).to(torch.float64)
        self.batches, self.outputs = [], []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            feeds = {}
            for i in session.get_inputs():
                shape = [d if isinstance(d, int) else 2 for d in i.shape]
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
            with torch.no_grad():
                out = model64(*(torch.from_numpy(a).double() for a in feeds.values()))
            self.batches.append(feeds)
            self.outputs.append([o.numpy() for o in (out if isinstance(out, tuple) else (out,))])

    def error(self, path: Path) -> float:
        """max |file - exact| / max |exact|, the file run in onnxruntime (optimizations off)."""
        session = _session(path)
        worst = 0.0
        for feeds, exact in zip(self.batches, self.outputs):
            for x, y in zip(exact, session.run(None, feeds)):
                worst = max(worst, float(np.abs(x - y).max() / (np.abs(x).max() or 1.0)))
        return worst


def run_bnexport(path: Path, out: Path) -> float:
    """Run `bnexport fold`; return the seconds of its fold + write stages alone."""
    marks: dict[str, float] = {}

    def progress(stage: str) -> None:
        marks[stage] = time.perf_counter()

    report = run_fold(RunOptions(model=path, output=out, samples=4), progress)
    if not report.passed:
        raise RuntimeError(f"bnexport did not verify {path}")
    return marks["verifying with onnxruntime"] - marks["folding BatchNormalization nodes"]


def run_peer(name: str, path: Path, out: Path) -> str:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = PEERS[name](onnx.load(str(path)))
    model, note = result if isinstance(result, tuple) else (result, "")
    onnx.save(model, str(out))
    return note


def bench_file(name: str, path: Path, model: nn.Module, reps: int, work: Path) -> list[tuple]:
    """One row per tool: (model, tool, BN before, BN left, error vs float64, seconds, note)."""
    truth = Float64Truth(model, path)
    before = count_bn(onnx.load(str(path), load_external_data=False))
    rows = [(name, "(unfolded file)", before, before, truth.error(path), None, "the floor")]
    out = work / f"{name}.bnexport.onnx"
    run_bnexport(path, out)  # warm-up: imports and first-call costs are not the tool's time
    stages: list[float] = []
    seconds = median_time(lambda: stages.append(run_bnexport(path, out)), reps)
    left, err = count_bn(onnx.load(str(out))), truth.error(out)
    alone = statistics.median(stages)
    note = f"verification included; fold + write alone {alone:.3f} s"
    rows.append((name, "bnexport", before, left, err, seconds, note, alone))
    for peer in PEER_NAMES:
        out = work / f"{name}.{peer}.onnx"
        try:
            note = run_peer(peer, path, out)
            seconds = median_time(lambda p=peer, o=out: run_peer(p, path, o), reps)
            left, err = count_bn(onnx.load(str(out))), truth.error(out)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
            left, err, seconds, note = None, None, None, f"error: {str(exc)[:60]}"
        rows.append((name, peer, before, left, err, seconds, note))
    return rows


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if x < 0.01 else f"{x:.3f}"
    return str(x)


def verdicts(rows: list[tuple]) -> list[str]:
    """The issue's targets per model: BN left <= the best peer's, error <= theirs, time <=
    2x the fastest peer's."""
    lines = []
    for model in dict.fromkeys(r[0] for r in rows):
        ours = next(r for r in rows if r[0] == model and r[1] == "bnexport")
        peers = [
            r
            for r in rows
            if r[0] == model and r[1] in PEER_NAMES and r[3] is not None and r[5] is not None
        ]
        if not peers:
            lines.append(f"| {model} | {ours[3]} vs - | - | - | - | - | - | - |")
            continue
        best_left = min(r[3] for r in peers)
        folding = [r for r in peers if r[3] < r[2]]
        worst_err = min((r[4] for r in folding), default=None)
        fastest = min(r[5] for r in peers)
        fastest_folding = min((r[5] for r in folding), default=None)
        vs_folding = (
            f"{ours[5] / fastest_folding:.2f} ({ours[7] / fastest_folding:.2f})"
            if fastest_folding
            else "-"
        )
        lines.append(
            f"| {model} | {ours[3]} vs {best_left} | "
            f"{'yes' if ours[3] <= best_left else 'no'} | "
            f"{_fmt(ours[4])} vs {_fmt(worst_err)} | "
            f"{'yes' if worst_err is None or ours[4] <= worst_err else 'no'} | "
            f"{ours[5] / fastest:.2f} | {'yes' if ours[5] <= 2 * fastest else 'no'} | "
            f"{vs_folding} |"
        )
    return lines


def render(rows: list[tuple], cmd: str) -> str:
    lines = [
        f"ONNX-in benchmark {datetime.date.today().isoformat()}: `{cmd}`",
        "",
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}.",
        "",
        "| model | tool | BN before | BN left | max err vs float64 | time (s) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(x) for x in r[:7]) + " |")
    lines += [
        "",
        "Error: max |file - exact| / max |exact| over 3 seeded random batches of 2, exact = "
        "the PyTorch model in float64, each file run by onnxruntime with optimizations off; "
        "the unfolded file's own error is the floor. Targets: BN left <= the best peer's; "
        "error <= the most precise peer that folds something; bnexport's time, verification "
        "included, <= 2x the fastest peer's.",
        "",
        "| model | BN left (ours vs best peer) | met | error (ours vs best folding peer) | met "
        "| time ratio to fastest peer | met | time ratio to fastest folding peer (fold + write "
        "alone) |",
        "|---|---|---|---|---|---|---|---|",
        *verdicts(rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small models, one repetition")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_onnx_in.md")
    opts = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    reps = opts.reps or (1 if opts.quick else 3)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, path, model in benchmark_files(opts.quick, work):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_file(name, path, model, reps, work)
    flags = " --quick" if opts.quick else ""
    table = render(rows, "python benchmarks/onnx_in.py" + flags)
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
