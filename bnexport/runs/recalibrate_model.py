"""`bnexport recalibrate`: every BN's running statistics replaced by the population
statistics of its input over --data (upstream BNs already recalibrated), measured before and
after, written in the input's own format."""

from __future__ import annotations

from pathlib import Path

from bnexport.errors import BadInputError
from bnexport.files import all_or_nothing, write_atomic
from bnexport.inputs import example_inputs
from bnexport.load import PICKLED_MODULE, SAFETENSORS, STATE_DICT, detect_format
from bnexport.runs.options import (
    Progress,
    RunOptions,
    check_outputs,
    default_recalibrated,
    quiet,
)
from bnexport.runs.prepare import data_chunks, prepare
from bnexport.runs.saving import save_program, save_report
from bnexport.stats.inspect import inspect_program
from bnexport.stats.population import STATISTICS_BUFFERS
from bnexport.stats.recalibrate import (
    RecalibrateReport,
    accuracy,
    check_calibration_data,
    recalibrate_program,
)


@all_or_nothing()
def run_recalibrate(
    opts: RunOptions, batch_size: int | None = None, progress: Progress = quiet
) -> RecalibrateReport:
    """Recalibrate the model over --data and write it (MODEL.recalibrated.pt2 by default)."""
    if opts.data is None:  # never the held-out MODEL_test.npz by default
        raise BadInputError(
            "recalibrate needs data: pass --data CALIB.npz with inputs from the data the model "
            "will see (one array per forward input; labels optional, for accuracy)."
        )
    inputs = [Path(opts.model), Path(opts.data)]
    detect_format(Path(opts.model))  # a missing or unreadable model is named first
    output = Path(opts.output or default_recalibrated(opts.model, _recalibrated_suffix(opts.model)))
    check_outputs([output, opts.json_path], inputs)
    prep = prepare(opts, progress)
    source, dataset = prep.source, prep.dataset
    if source.is_onnx:
        raise BadInputError(
            f"'{opts.model}' is an ONNX model; `bnexport recalibrate` recomputes the statistics "
            "of PyTorch checkpoints. Recalibrate the checkpoint, then export it."
        )
    check_calibration_data(dataset, prep.specs)
    progress("tracing the model with torch.export")
    program = source.to_program(
        example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
    )
    chunks, batching = data_chunks(prep, dataset, batch_size)
    progress("measuring the drift before")
    # the report needs only the drift: no dry run of the fold engine
    before = inspect_program(program, str(opts.model), dataset=dataset, dry_run=False, **batching)
    _check_labels(program.module(), chunks, dataset)
    acc_before = accuracy(program.module(), chunks, dataset.labels)
    progress("recalibrating (one pass over the data)")
    done, left = recalibrate_program(program, chunks, str(opts.model))
    acc_after = accuracy(program.module(), chunks, dataset.labels)
    progress("measuring the drift after")
    after = inspect_program(program, str(output), dataset=dataset, dry_run=False, **batching)
    progress("writing the recalibrated model")
    _write_recalibrated(source, program, output)
    layers = [
        {
            "name": b.name,
            "kind": b.kind,
            "channels": b.channels,
            "mean_shift_before": b.mean_shift,
            "var_ratio_before": b.var_ratio,
            "mean_shift": a.mean_shift,
            "var_ratio": a.var_ratio,
        }
        for b, a in zip(before.batchnorm, after.batchnorm)
        if b.input_node is not None
    ]
    report = RecalibrateReport(
        str(opts.model),
        str(output),
        dataset.size,
        len(chunks),
        layers,
        left,
        acc_before,
        acc_after,
        list(source.warnings),
    )
    if opts.json_path is not None:
        save_report(report, opts.json_path)
    return report


def _check_labels(module, chunks: list, dataset) -> None:
    """Labels must be class indices of the first output (its columns, on the first chunk)."""
    import torch

    from bnexport.outputs import as_outputs

    if dataset.labels is None or not chunks:
        return
    with torch.no_grad():
        arrays = as_outputs(module(*chunks[0])).arrays
    if arrays and arrays[0].ndim == 2:
        dataset.check_labels(int(arrays[0].shape[1]))


def _recalibrated_suffix(model: Path) -> str:
    """The suffix of the file `recalibrate` writes: the input's own format; a .pt2 for a
    program or a TorchScript archive (converted to a program when loaded)."""
    fmt = detect_format(Path(model))
    if fmt in (STATE_DICT, PICKLED_MODULE):
        return Path(model).suffix or ".pt"
    return ".safetensors" if fmt == SAFETENSORS else ".pt2"


def _write_recalibrated(source, program, output: Path) -> None:
    """Write the recalibrated model in the input's format: a .pt2 program, or the module's
    state_dict (same keys) as torch.save or safetensors, or the whole pickled module."""
    import torch

    module = source.model
    if not isinstance(module, torch.nn.Module):
        save_program(program, output, "-o")
        return
    state = module.state_dict()
    with torch.no_grad():
        for key, value in program.state_dict.items():
            if key in state and key.rsplit(".", 1)[-1] in STATISTICS_BUFFERS:
                state[key].copy_(value)
    if source.format == SAFETENSORS:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state.items()}
        write_atomic(output, lambda tmp: save_file(tensors, str(tmp)))
    elif source.format == PICKLED_MODULE:
        write_atomic(output, lambda tmp: torch.save(module, tmp))
    else:
        write_atomic(output, lambda tmp: torch.save(state, tmp))
