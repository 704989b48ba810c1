"""`bnexport inspect`: every BN's statistics, flags and fold decision; with data, their drift.
Writes only the JSON report (and the plot of the drift)."""

from __future__ import annotations

from pathlib import Path

from bnexport.errors import BadInputError
from bnexport.files import all_or_nothing
from bnexport.inputs import example_inputs
from bnexport.runs.options import Progress, RunOptions, check_outputs, quiet
from bnexport.runs.prepare import data_batching, prepare
from bnexport.runs.saving import save_report
from bnexport.stats.inspect import TRAINING_MODE, InspectReport, inspect_program
from bnexport.stats.plot import plot_drift


@all_or_nothing()
def run_inspect(
    opts: RunOptions, plot: Path | None = None, progress: Progress = quiet
) -> InspectReport:
    """Inspect the model's BNs (and draw their drift to `plot`)."""
    check_outputs([opts.json_path, plot], [Path(opts.model)])
    prep = prepare(opts, progress)
    if plot is not None and prep.dataset is None:
        raise BadInputError(
            "--plot draws the drift of each BN against data: pass --data INPUTS.npz (or keep "
            "MODEL_test.npz next to the model)."
        )
    source = prep.source
    if source.is_onnx:
        raise BadInputError(
            f"'{opts.model}' is an ONNX model; `bnexport inspect` reads the statistics of "
            "PyTorch checkpoints. Inspect the checkpoint it was exported from."
        )
    progress("tracing the model with torch.export")
    program = source.to_program(
        example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
    )
    progress("reading BatchNorm statistics")
    report = inspect_program(
        program,
        str(opts.model),
        module_names=source.batchnorm_modules(),
        dataset=prep.dataset,
        progress=progress,
        **data_batching(prep, None),
    )
    report.warnings[:0] = list(source.warnings)
    _flag_training_mode(source, report)
    if plot is not None:
        plot_drift(report, plot)
    if opts.json_path is not None:
        save_report(report, opts.json_path)
    return report


def _flag_training_mode(source, report: InspectReport) -> None:
    """Flag the BN modules of a module saved in training mode (traced in eval mode, so the
    program alone does not show it)."""
    import torch

    if not isinstance(source.model, torch.nn.Module):
        return
    training = {
        name
        for name, m in source.model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
    }
    for entry in report.batchnorm:
        if entry.name.split(" (call ")[0] in training and TRAINING_MODE not in entry.flags:
            entry.flags.append(TRAINING_MODE)
