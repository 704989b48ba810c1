"""The verify stage: an ONNX file in onnxruntime against a reference, on the same inputs.

The reference is a callable (the eval-mode original; an nn.Module is run in eval mode with its
flags restored) or the outputs it gave, recorded beforehand (one per batch). Outputs may be
torch tensors or numpy arrays, nested in tuples, lists or dicts.

For each output o over all batches: max abs error max|onnx - ref|, its scale max|ref|, and
max relative error = max abs error / scale. An output passes when
max abs error <= atol + rtol * scale. Class-score outputs (2-D, last axis >= 2) also report
argmax agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexport.defaults import DEFAULT_ATOL, DEFAULT_RTOL


@dataclass
class OutputCheck:
    name: str
    max_abs_err: float = 0.0
    scale: float = 0.0
    argmax_agree: int = 0
    argmax_total: int = 0

    @property
    def max_rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_agree / self.argmax_total if self.argmax_total else None


@dataclass
class Accuracy:
    reference: float
    onnx: float
    n: int


@dataclass
class VerifyResult:
    outputs: list[OutputCheck]
    samples: int
    atol: float
    rtol: float
    batch_sizes: list[int] = field(default_factory=list)
    accuracy: Accuracy | None = None
    data_argmax_agreement: float | None = None
    data: str | None = None
    data_size: int = 0

    @property
    def passed(self) -> bool:
        return all(o.max_abs_err <= self.atol + self.rtol * o.scale for o in self.outputs)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        from bnexport.render import verify_dict

        return verify_dict(self)


@dataclass
class Outputs:
    """The tensor leaves of one model output, flattened in the exporter's order, as numpy."""

    names: list[str]
    arrays: list[np.ndarray]


def as_outputs(value) -> Outputs:
    """Flatten a (nested) output of torch tensors or numpy arrays into named numpy arrays."""
    if isinstance(value, Outputs):
        return value
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(value)
    names, arrays = [], []
    for path, leaf in leaves:
        if hasattr(leaf, "detach"):
            leaf = leaf.detach().cpu().numpy()
        if isinstance(leaf, np.ndarray):
            names.append(pytree.keystr(path) or "output")
            arrays.append(leaf)
    return Outputs(names, arrays)


def as_numpy_batch(batch) -> tuple[np.ndarray, ...]:
    """One batch (a tensor, an array, or a tuple of them) as a tuple of numpy arrays."""
    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in items)


def run_reference(reference: Callable, batch) -> Outputs:
    """Call `reference` on one batch without autograd (an nn.Module in eval mode)."""
    import torch

    from bnexport.trace import eval_mode

    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    args = tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in items)
    with torch.inference_mode():
        if isinstance(reference, torch.nn.Module):
            with eval_mode(reference):
                return as_outputs(reference(*args))
        return as_outputs(reference(*args))


def record_reference(reference: Callable, batches: Iterable) -> list[Outputs]:
    """The reference's outputs on every batch, to compare with later."""
    return [run_reference(reference, batch) for batch in batches]


class OnnxRunner:
    """An onnxruntime CPU session fed with positional inputs (torch tensors or numpy)."""

    def __init__(self, path: str, optimize: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures reach the report as exceptions
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args) -> list[np.ndarray]:
        feed = dict(zip(self.input_names, as_numpy_batch(args)))
        return self.session.run(None, feed)


def _error_and_scale(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) over the finite reference values.

    A non-finite reference value (inf, -inf or NaN, as in masked log-probabilities) must be
    matched exactly; otherwise the error is inf. So an infinite output never widens the
    tolerance of the others.
    """
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r64)
    if not finite.all():
        same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))
        if not same[~finite].all():
            return float("inf"), 0.0
        r64, g64 = r64[finite], g64[finite]
    if not r64.size:
        return 0.0, 0.0
    err = float(np.max(np.abs(r64 - g64)))
    return (err if np.isfinite(err) else float("inf")), float(np.max(np.abs(r64)))


def compare(
    reference: Callable | Sequence,
    runner: Callable,
    batches: Iterable,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
) -> VerifyResult:
    """Run the ONNX model on every batch and accumulate per-output errors against the reference.

    `reference` is a callable, or a sequence with the recorded output of each batch.
    """
    recorded = None if callable(reference) else list(reference)
    checks: list[OutputCheck] | None = None
    samples, batch_sizes = 0, []
    ref_correct = onnx_correct = n_labels = 0
    agree = total = 0
    for i, batch in enumerate(batches):
        expected = run_reference(reference, batch) if recorded is None else recorded[i]
        expected = as_outputs(expected)
        names, ref = expected.names, expected.arrays
        arrays = as_numpy_batch(batch)
        got = runner(*arrays)
        if len(got) != len(ref):
            raise ValueError(f"the ONNX model has {len(got)} outputs but the model has {len(ref)}")
        if checks is None:
            checks = [OutputCheck(n) for n in names]
        for check, r, g in zip(checks, ref, got):
            if r.shape != g.shape:
                check.max_abs_err = float("inf")
                continue
            err, scale = _error_and_scale(r, g)
            check.max_abs_err = max(check.max_abs_err, err)
            check.scale = max(check.scale, scale)
            if r.ndim == 2 and r.shape[1] >= 2 and np.issubdtype(r.dtype, np.floating):
                check.argmax_agree += int((r.argmax(1) == g.argmax(1)).sum())
                check.argmax_total += r.shape[0]
        if labels is not None and ref and ref[0].ndim == 2:
            lab = labels[n_labels : n_labels + ref[0].shape[0]]
            ref_correct += int((ref[0].argmax(1) == lab).sum())
            onnx_correct += int((got[0].argmax(1) == lab).sum())
            n_labels += len(lab)
            agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
            total += len(lab)
        samples += 1
        batch_sizes.append(int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1)
    result = VerifyResult(checks or [], samples, atol, rtol, batch_sizes)
    if n_labels:
        result.accuracy = Accuracy(ref_correct / n_labels, onnx_correct / n_labels, n_labels)
        result.data_argmax_agreement = agree / total
    return result


def merge(results: list[VerifyResult]) -> VerifyResult:
    """Combine several comparisons of the same model (random and user data)."""
    base = results[0]
    merged = VerifyResult([OutputCheck(o.name) for o in base.outputs], 0, base.atol, base.rtol, [])
    for r in results:
        merged.samples += r.samples
        merged.batch_sizes += r.batch_sizes
        for m, o in zip(merged.outputs, r.outputs):
            m.max_abs_err = max(m.max_abs_err, o.max_abs_err)
            m.scale = max(m.scale, o.scale)
            m.argmax_agree += o.argmax_agree
            m.argmax_total += o.argmax_total
        if r.accuracy is not None:
            merged.accuracy = r.accuracy
            merged.data_argmax_agreement = r.data_argmax_agreement
        if r.data is not None:
            merged.data, merged.data_size = r.data, r.data_size
    return merged


def verify_onnx(
    reference: Callable | Sequence,
    onnx_path: str,
    inputs: Iterable,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
) -> VerifyResult:
    """Compare a reference with the ONNX file at `onnx_path` on every batch of `inputs`.

    `reference`: a callable (an nn.Module is run in eval mode, its flags restored) or the
    recorded output of each batch (torch tensors or numpy arrays). `inputs` yields one batch
    per item: a tensor or array, or a tuple of forward's positional inputs.
    """
    batches = list(inputs)
    return compare(
        reference, OnnxRunner(str(onnx_path)), batches, atol=atol, rtol=rtol, labels=labels
    )
