"""Verification: the exported ONNX file in onnxruntime against the eval-mode original.

For each output o over all samples: max abs error max|onnx - ref|, its scale max|ref|, and
max relative error = max abs error / scale. An output passes when
max abs error <= atol + rtol * scale. Class-score outputs (2-D, last axis >= 2) also report
argmax agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5


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
        out = {
            "passed": self.passed,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "samples": self.samples,
            "atol": self.atol,
            "rtol": self.rtol,
            "batch_sizes": self.batch_sizes,
            "outputs": [
                {
                    "name": o.name,
                    "max_abs_err": o.max_abs_err,
                    "max_rel_err": o.max_rel_err,
                    "scale": o.scale,
                    "argmax_agreement": o.argmax_agreement,
                }
                for o in self.outputs
            ],
        }
        if self.accuracy is not None:
            out["accuracy"] = {
                "original": self.accuracy.reference,
                "onnx": self.accuracy.onnx,
                "n": self.accuracy.n,
            }
        if self.data_argmax_agreement is not None:
            out["data_argmax_agreement"] = self.data_argmax_agreement
        if self.data is not None:
            out["data"] = {"path": self.data, "samples": self.data_size}
        return out


def flatten_outputs(value) -> tuple[list[str], list[np.ndarray]]:
    """Tensor leaves of a (nested) output in the exporter's order, with readable names."""
    leaves, _ = pytree.tree_flatten_with_path(value)
    names, arrays = [], []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            names.append(pytree.keystr(path) or "output")
            arrays.append(leaf.detach().cpu().numpy())
    return names, arrays


class OnnxRunner:
    """An onnxruntime CPU session fed with positional tensors."""

    def __init__(self, path: str, optimize: bool = True):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> list[np.ndarray]:
        leaves = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, leaves)}
        return self.session.run(None, feed)


def compare(
    reference: Callable,
    runner: OnnxRunner,
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
) -> VerifyResult:
    """Run both models on every batch and accumulate per-output errors."""
    checks: list[OutputCheck] | None = None
    samples, batch_sizes = 0, []
    ref_correct = onnx_correct = n_labels = 0
    agree = total = 0
    for batch in batches:
        with torch.no_grad():
            names, ref = flatten_outputs(reference(*batch))
        got = runner(*batch)
        if len(got) != len(ref):
            raise ValueError(f"the ONNX model has {len(got)} outputs but the model has {len(ref)}")
        if checks is None:
            checks = [OutputCheck(n) for n in names]
        for check, r, g in zip(checks, ref, got):
            if r.shape != g.shape:
                check.max_abs_err = float("inf")
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            err = float(np.max(np.abs(r64 - g64))) if r.size else 0.0
            check.max_abs_err = max(check.max_abs_err, err if np.isfinite(err) else float("inf"))
            check.scale = max(check.scale, float(np.max(np.abs(r64))) if r.size else 0.0)
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
        batch_sizes.append(int(batch[0].shape[0]) if batch and batch[0].dim() else 1)
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
    return merged


def verify_onnx(
    model: Callable,
    onnx_path: str,
    inputs: Iterable[tuple[torch.Tensor, ...] | torch.Tensor],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
) -> VerifyResult:
    """Compare `model` (an nn.Module is run in eval mode, its flags restored) with the ONNX file.

    `inputs` yields one batch per item: a tensor or a tuple of forward's positional tensors.
    """
    from bnexport.fold.torch_graph import eval_mode

    def reference(*args):
        if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
            with eval_mode(model), torch.no_grad():
                return model(*args)
        with torch.no_grad():
            return model(*args)

    batches = ((b,) if isinstance(b, torch.Tensor) else tuple(b) for b in inputs)
    return compare(
        reference, OnnxRunner(str(onnx_path)), batches, atol=atol, rtol=rtol, labels=labels
    )
