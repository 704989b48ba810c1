"""The verify stage: an ONNX file in onnxruntime against a reference, on the same inputs.

The reference is a callable (the eval-mode original; an nn.Module is run in eval mode with its
flags restored) or the outputs it gave, recorded beforehand (one per batch). Outputs may be
torch tensors or numpy arrays, nested in tuples, lists or dicts.

For each output o over all batches: max abs error max|onnx - ref|, its scale max|ref|, and
max relative error = max abs error / scale. An output passes when
max abs error <= atol + rtol * scale. Class-score outputs (2-D, last axis >= 2) also report
argmax agreement.

A model that computes in float16 or bfloat16 is held to the precision it has. Its float32
twin (the same parameters and inputs cast exactly to float32) gives a second reference, the
`baseline`; the ONNX file and the half-precision original are both measured against it, and
an output passes when

    export error <= factor * the original's own error + atol + rtol * scale

(`factor`: HALF_ERROR_FACTOR, measured on real models; see bnexport.defaults). An original
whose own error is not finite (it overflows where float32 does not) gives no allowance.
Argmax agreement and accuracy still compare the ONNX file with the original itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np

from bnexport.defaults import DEFAULT_ATOL, DEFAULT_RTOL
from bnexport.onnx_runtime import OnnxRunner
from bnexport.outputs import Outputs, as_numpy_batch, as_outputs
from bnexport.report import Accuracy, OutputCheck, VerifyResult

__all__ = ["OnnxRunner", "VerifyResult", "compare", "merge", "record_reference", "verify_onnx"]


def float32_batches(batches: Iterable) -> list[tuple]:
    """The batches with every float16/bfloat16 input cast (exactly) to float32."""
    import torch

    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        return x

    return [tuple(cast(x) for x in (b if isinstance(b, (tuple, list)) else (b,))) for b in batches]


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
    baseline: Sequence | None = None,
    factor: float | None = None,
    half_outputs: Sequence | None = None,
    baseline_dtype: str = "float32",
) -> VerifyResult:
    """Run the ONNX model on every batch and accumulate per-output errors against the reference.

    `reference` is a callable, or a sequence with the recorded output of each batch.
    `baseline`: the recorded outputs of the float32 twin of a half-precision reference; then
    the errors (and scales) of the ONNX model and of the reference itself are measured against
    it, and `factor` (the dtype tolerance) applies; `baseline_dtype` names the baseline's
    dtype ("float64" for a float32 model measured against its float64 twin).
    `half_outputs`: for a float16 export of a float32 reference, the reference model's own
    outputs computed in float16 on every batch; the errors are measured against the reference
    and the allowance is `factor` times the error of `half_outputs` against it.
    """
    recorded = None if callable(reference) else list(reference)
    twin = None if baseline is None else list(baseline)
    own = None if half_outputs is None else list(half_outputs)
    measured = twin is not None or own is not None
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
            checks = [OutputCheck(n, original_err=0.0 if measured else None) for n in names]
        # what the errors are measured against, and the half-precision run whose own error
        # against that sets the allowance: the original against its float32 twin, or the
        # reference's float16 run against the (float32) reference
        base = ref if twin is None else as_outputs(twin[i]).arrays
        mine = as_outputs(own[i]).arrays if own is not None else ref
        for check, r, g, b, h in zip(checks, ref, got, base, mine):
            if measured:
                err_h = _error_and_scale(b, h)[0] if b.shape == h.shape else float("inf")
                check.original_err = max(check.original_err, err_h)
            if b.shape != g.shape:
                check.max_abs_err = float("inf")
                continue
            err, scale = _error_and_scale(b, g)
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
    if measured:
        result.factor = factor
        result.reference_dtype = baseline_dtype if twin is not None else "float32"
    if n_labels:
        result.accuracy = Accuracy(ref_correct / n_labels, onnx_correct / n_labels, n_labels)
        result.data_argmax_agreement = agree / total
    return result


def merge(results: list[VerifyResult]) -> VerifyResult:
    """Combine several comparisons of the same model (random and user data)."""
    base = results[0]
    merged = replace(
        base,
        outputs=[OutputCheck(o.name) for o in base.outputs],
        samples=0,
        batch_sizes=[],
        accuracy=None,
        data_argmax_agreement=None,
        data=None,
        data_size=0,
    )
    for r in results:
        merged.samples += r.samples
        merged.batch_sizes += r.batch_sizes
        for m, o in zip(merged.outputs, r.outputs):
            if o.original_err is not None:
                m.original_err = max(m.original_err or 0.0, o.original_err)
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
