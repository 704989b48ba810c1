"""The labels given with the data, checked against the model once its reference outputs are
recorded (before anything is written): class indices of the first output."""

from __future__ import annotations

from bnexport.outputs import as_outputs
from bnexport.report import RunReport
from bnexport.runs.prepare import Prepared


def check_labels(prep: Prepared, reference: list, report: RunReport) -> None:
    """Refuse labels outside [0, columns of the first output); say so when that output is not
    (batch, classes), which gives no accuracy."""
    dataset = prep.dataset
    if dataset is None or dataset.labels is None or len(reference) <= prep.n_random:
        return
    arrays = as_outputs(reference[prep.n_random]).arrays
    if not arrays or arrays[0].ndim != 2:
        shape = tuple(arrays[0].shape) if arrays else ()
        report.warnings.append(
            f"{dataset.path} has labels, but the model's first output is not (batch, classes) "
            f"(its shape is {shape}), so no accuracy is measured"
        )
        return
    dataset.check_labels(int(arrays[0].shape[1]))
