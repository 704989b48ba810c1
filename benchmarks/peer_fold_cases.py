"""Which peer tool folds the BatchNorm of each peer test model (tests/peer_cases.py).

    python benchmarks/peer_fold_cases.py             # every case, markdown table on stdout
    python benchmarks/peer_fold_cases.py gemm conv   # only cases whose name contains a word

For every case of `PEER_CASES` each peer runs on a fresh copy of the model; the table shows the
BatchNormalization nodes left and the largest absolute difference of the peer's outputs from
the original model's, both run by onnxruntime (CPU, graph optimizations off, so onnxruntime's
own Conv+BN fusion does not hide anything) on one seeded random input. A peer that raises, or
whose result does not run, shows `error: <short message>`; "drops input W" marks a result
that no longer has a graph input the original had (an initializer-backed, overridable input
folded away).

The last column is bnexport's ONNX engine (`bnexport.fold_onnx`).

Peers: onnxoptimizer (pass `fuse_bn_into_conv` only), onnxslim (`slim`), onnxsim (`simplify` with
its default optimizations and constant folding), onnxscript's optimizer
(`onnxscript.optimizer.optimize`: constant folding plus the default rewrite rules) and
onnxscript's rewriter (`onnxscript.rewriter.rewrite` with its default rules, which include the
`_fuse_batchnorm` rules the peer's own tests apply).

More columns: `main(extra_peers={"name": fn})` or `peer_results(model, {**PEERS, "name": fn})`,
where `fn(model: onnx.ModelProto)` returns the transformed ModelProto, or (ModelProto, note).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peer_cases import PEER_CASES  # noqa: E402

PeerOutput = onnx.ModelProto | tuple[onnx.ModelProto, str]
Peer = Callable[[onnx.ModelProto], PeerOutput]
Result = tuple[int | None, float | None, str]  # (BN nodes left, max abs error, note)

SEED = 0


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _onnxsim(model: onnx.ModelProto) -> PeerOutput:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    return simplified, "" if ok else "onnxsim check: not ok"


def _onnxscript_optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def _onnxscript_rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript import rewriter

    return rewriter.rewrite(model)


def _bnexport(model: onnx.ModelProto) -> onnx.ModelProto:
    from bnexport import fold_onnx

    return fold_onnx(model)[0]


PEERS: dict[str, Peer] = {
    "onnxoptimizer": _onnxoptimizer,
    "onnxslim": _onnxslim,
    "onnxsim": _onnxsim,
    "onnxscript": _onnxscript_optimize,
    "onnxscript rewrite": _onnxscript_rewrite,
}


def count_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and the model's local functions."""

    def in_nodes(nodes) -> int:
        total = 0
        for node in nodes:
            total += node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
            for attr in node.attribute:
                if attr.HasField("g"):
                    total += in_nodes(attr.g.node)
                for graph in attr.graphs:
                    total += in_nodes(graph.node)
        return total

    return in_nodes(model.graph.node) + sum(in_nodes(f.node) for f in model.functions)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


def random_feeds(model: onnx.ModelProto, seed: int = SEED) -> dict[str, np.ndarray]:
    """Uniform [0, 1) values for every graph input without an initializer (peer tests' rand)."""
    rng = np.random.default_rng(seed)
    initialized = {t.name for t in model.graph.initializer}
    feeds = {}
    for arg in _session(model).get_inputs():
        if arg.name not in initialized:
            feeds[arg.name] = rng.random(arg.shape).astype(_NUMPY_TYPES[arg.type])
    return feeds


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(model)
    wanted = {arg.name for arg in session.get_inputs()}
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _input_names(model: onnx.ModelProto) -> list[str]:
    return [arg.name for arg in model.graph.input]


def _short(exc: BaseException, limit: int = 70) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _max_err(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    if set(ref) != set(got):  # a renamed output: compare in order
        if len(ref) != len(got):
            raise ValueError(f"{len(got)} outputs instead of {len(ref)}")
        got = dict(zip(ref, got.values()))
    err = 0.0
    for name, expected in ref.items():
        if got[name].shape != expected.shape:
            raise ValueError(f"output {name} has shape {got[name].shape}, not {expected.shape}")
        diff = np.abs(got[name].astype(np.float64) - expected.astype(np.float64))
        err = max(err, float(np.nanmax(diff)) if diff.size else 0.0)
        if np.isnan(diff).any():
            err = float("nan")
    return err


def peer_results(
    model: onnx.ModelProto, peers: Mapping[str, Peer] | None = None, *, seed: int = SEED
) -> dict[str, Result]:
    """Run each peer on a copy of `model`: {peer: (BN nodes left, max abs error, note)}."""
    peers = PEERS if peers is None else peers
    feeds = random_feeds(model, seed)
    reference = _run(model, feeds)
    results: dict[str, Result] = {}
    for name, peer in peers.items():
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                out = peer(copy.deepcopy(model))
        except Exception as exc:  # a peer's failure is a result
            results[name] = (None, None, f"error: {_short(exc)}")
            continue
        notes = []
        if isinstance(out, tuple):
            out, note = out
            notes += [note] if note else []
        kept = set(_input_names(out))
        dropped = [arg for arg in _input_names(model) if arg not in kept]
        if dropped:
            notes.append("drops input " + ", ".join(dropped))
        note = "; ".join(notes)
        bn_left = count_bn(out)
        try:
            err = _max_err(reference, _run(out, feeds))
        except Exception as exc:
            note = "; ".join([f"error: result does not run: {_short(exc)}", *notes])
            results[name] = (bn_left, None, note)
            continue
        results[name] = (bn_left, err, note)
    return results


def _cell(result: Result) -> str:
    bn_left, err, note = result
    if bn_left is None:
        text = note
    elif err is None:
        text = f"{bn_left}; {note}"
    else:
        text = f"{bn_left} ({err:.1e})" + (f"; {note}" if note else "")
    return text.replace("|", "\\|")


def main(extra_peers: Mapping[str, Peer] | None = None, words: list[str] | None = None) -> None:
    ort.set_default_logger_severity(3)
    peers = {**PEERS, "bnexport": _bnexport, **(extra_peers or {})}
    header = ["case", "BN before", *peers]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for case, (build, _description) in PEER_CASES.items():
        if words and not any(word in case for word in words):
            continue
        model = build()
        results = peer_results(model, peers)
        cells = [case, str(count_bn(model)), *(_cell(results[p]) for p in peers)]
        print("| " + " | ".join(cells) + " |", flush=True)
    print()
    print(
        "Cells: BatchNormalization nodes left (max abs error of the outputs against the "
        f"original, onnxruntime CPU, optimizations off, seed {SEED})."
    )


if __name__ == "__main__":
    main(words=sys.argv[1:])
