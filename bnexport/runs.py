"""The jobs behind the CLI commands, as short compositions of the stages:

    fold:    load -> record reference -> fold -> export -> (save program) -> verify -> report
    verify:  load -> describe ONNX -> verify -> report

A PyTorch checkpoint is folded as one torch.export program and exported; an ONNX file is
folded by the ONNX engine and written back (its reference is onnxruntime on the original
file, and both files run with onnxruntime's graph optimizations off).

The reference outputs are recorded from the eval-mode original before the fold, so the fold
can rewrite the one traced program in place and the original need not stay in memory. Every
check that can refuse the run happens before the first file is written, so a run that ends in
a BadInputError leaves the file system as it found it.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bnexport.defaults import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    EXTERNAL_DATA_THRESHOLD,
    FLOAT16_FALLBACK_RTOL,
    HALF_ERROR_FACTOR,
)
from bnexport.errors import BadInputError, summarize_exception
from bnexport.report import RunReport

Progress = Callable[[str], None]

# Above this many bytes of weights, each stage's leftovers are garbage-collected before the next
# stage allocates (graphs hold reference cycles, so the weights would otherwise linger); below
# it the collection costs more time than the memory is worth.
COLLECT_ABOVE_BYTES = 256 * 2**20


@dataclass
class RunOptions:
    """Options of `fold` and `verify` (the CLI flags, as plain values)."""

    model: Path
    output: Path | None = None
    input_shapes: list[str] = field(default_factory=list)
    arch: str | None = None
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    # None: not given. A float32 model is held to DEFAULT_ATOL + DEFAULT_RTOL x scale; a
    # float16/bfloat16 one to its dtype tolerance. Either one given: atol + rtol x scale.
    atol: float | None = None
    rtol: float | None = None
    data: Path | None = None
    samples: int = DEFAULT_SAMPLES
    json_path: Path | None = None
    save_folded: Path | None = None
    trust_pickle: bool = False
    external_data: bool | None = None  # None: only when the weights exceed the threshold
    recalibrate: Path | None = None  # calibration data: recalibrate before folding
    duplicate_shared: bool = False  # copies of shared weights for calls that fold differently
    fp16: bool = False  # export float16 weights and compute (float32 where out of range)
    fp16_io: bool = False  # with fp16: float16 inputs and outputs too
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


def _quiet(_: str) -> None:
    pass


def _tolerances(opts: RunOptions) -> tuple[float, float, bool]:
    """(atol, rtol, given): the defaults stand in for a flag not given."""
    atol = DEFAULT_ATOL if opts.atol is None else opts.atol
    rtol = DEFAULT_RTOL if opts.rtol is None else opts.rtol
    return atol, rtol, opts.atol is not None or opts.rtol is not None


ONNX_REFERENCE = "the original ONNX file (both without graph optimizations)"


def default_output(model: Path) -> Path:
    """MODEL.onnx next to a checkpoint; MODEL.folded.onnx next to an ONNX file."""
    model = Path(model)
    if model.suffix.lower() == ".onnx":
        return model.with_name(model.stem + ".folded.onnx")
    return model.with_suffix(".onnx")


def companion_data(model: Path) -> Path | None:
    """Held-out data next to MODEL, used when --data is not given: `MODEL_test.npz`, or for a
    name with several suffixes (`NAME.unfolded.onnx`) `NAME_test.npz`."""
    model = Path(model)
    for stem in dict.fromkeys((model.stem, model.name.split(".")[0])):
        candidate = model.with_name(stem + "_test.npz")
        if candidate.is_file():
            return candidate
    return None


@dataclass
class _Prepared:
    source: object
    specs: list
    dataset: object
    dynamic: bool
    batches: list
    n_random: int  # the first n_random batches are seeded random inputs, the rest the data's
    onnx_in: bool = False
    model_dtype: str | None = None  # "float16" / "bfloat16" for a half-precision model
    baseline: list | None = None  # the float32 twin's outputs on every batch
    half_outputs: list | None = None  # --fp16: the model's own outputs computed in float16


def _random_samples(source, specs, dataset, samples: int) -> int:
    """How many random batches to make: none for an ONNX model with integer inputs (token
    ids, indices: their valid range is the model's), whose inputs must come from the data."""
    import torch

    ints = [s.name for s in specs if not s.dtype.is_floating_point and s.dtype != torch.bool]
    if not source.is_onnx or not ints:
        return samples
    if dataset is None:
        raise BadInputError(
            f"The ONNX input(s) {', '.join(ints)} are integers (token ids, indices), whose valid "
            "range only the model knows, so bnexport cannot make random test inputs for them. "
            "Pass --data INPUTS.npz with real inputs (one array per model input, by name)."
        )
    return 0


def _prepare(opts: RunOptions, progress: Progress) -> _Prepared:
    from bnexport.defaults import LARGE_BATCH, ONNX_BATCHES, SMALL_BATCH
    from bnexport.inputs import load_npz, verification_batches
    from bnexport.load import load_source

    progress("loading model")
    data = opts.data if opts.data is not None else companion_data(opts.model)
    source = load_source(
        opts.model,
        arch=opts.arch,
        trust_pickle=opts.trust_pickle,
        input_shapes=opts.input_shapes,
        static_batch=opts.static_batch,
        data=data,
    )
    specs = source.input_specs
    dataset = load_npz(data, specs) if data is not None else None
    dynamic = source.dynamic_batch
    samples = _random_samples(source, specs, dataset, opts.samples)
    batches = verification_batches(
        specs,
        dynamic=dynamic,
        samples=samples,
        dataset=dataset,
        sizes=ONNX_BATCHES if source.is_onnx else (SMALL_BATCH, LARGE_BATCH),
    )
    n_random = samples if dataset is not None else max(samples, 1)
    prep = _Prepared(source, specs, dataset, dynamic, batches, n_random, source.is_onnx)
    prep.model_dtype = _model_dtype(source)
    return prep


def _model_dtype(source) -> str | None:
    """ "float16"/"bfloat16" when the model computes in half precision. An ONNX file counts
    as float16 when it declares float16 tensors (a bfloat16 file's reference cannot run in
    onnxruntime, so it keeps the float32 tolerance)."""
    if source.is_onnx:
        from bnexport.verify import uses_half_type

        return "float16" if uses_half_type(source.path) == "float16" else None
    dtype = source.model_dtype()
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _record_float32(make_twin, prep: _Prepared, opts: RunOptions, report, progress) -> None:
    """A half-precision model verified with its dtype tolerance: record its float32 twin's
    outputs on the same inputs (cast exactly to float32) in `prep.baseline`. A twin that
    cannot run leaves the plain tolerance, with a warning."""
    from bnexport.verify import float32_batches, record_reference

    if prep.model_dtype is None or _tolerances(opts)[2]:
        return
    progress(f"running the {prep.model_dtype} model's float32 twin")
    try:
        prep.baseline = record_reference(make_twin(), float32_batches(prep.batches))
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the {prep.model_dtype} model's float32 twin could not run "
            f"({summarize_exception(exc)}), so the export is compared with the "
            f"{prep.model_dtype} original under the float32 tolerance"
        )


def _record(reference, batches) -> list:
    """The reference's outputs on every batch (a model that fails on them is bad input)."""
    from bnexport.verify import record_reference

    try:
        return record_reference(reference, batches)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed on its own inputs
        raise BadInputError(
            f"The model itself fails in eval mode on the verification inputs "
            f"({summarize_exception(exc)}), so no export can be checked. Check --input-shape "
            "and --data, or run with --debug for the full traceback."
        ) from exc


TWIN = "float32 twin"
ONNX_FILE = "ONNX file"


def _verify(
    reference, onnx_path: Path, prep: _Prepared, opts: RunOptions, report: RunReport, progress
) -> None:
    """Fill the report's verification (a comparison that cannot run is the verdict `not run`).

    A bfloat16 file that onnxruntime cannot run (its CPU provider has no bfloat16 Conv or
    Gemm) is verified through its float32 twin: the same weights cast exactly to float32."""
    from bnexport.verify import OnnxRunner, float32_twin_runner, uses_half_type

    progress("verifying with onnxruntime")
    optimize = not prep.onnx_in  # an ONNX original ran without graph optimizations
    try:
        try:
            runner = OnnxRunner(str(onnx_path), optimize=optimize)
            result, notes = _compare_all(reference, runner, prep, opts)
            verified = ONNX_FILE
        except Exception as exc:  # noqa: BLE001 - a bfloat16 file gets its twin verified
            if uses_half_type(onnx_path) != "bfloat16":
                raise
            cause = summarize_exception(exc)
            progress("verifying the float32 twin with onnxruntime")
            try:
                runner = float32_twin_runner(onnx_path, optimize=optimize)
                result, notes = _compare_all(reference, runner, prep, opts)
            except Exception as twin_exc:  # noqa: BLE001
                raise RuntimeError(
                    f"onnxruntime cannot run the bfloat16 file ({cause}), nor its float32 twin "
                    f"({summarize_exception(twin_exc)})"
                ) from twin_exc
            verified = TWIN
            notes.insert(0, _twin_warning(cause))
        if prep.model_dtype is not None:
            result.model_dtype, result.verified_file = prep.model_dtype, verified
        elif prep.half_outputs is not None:
            result.model_dtype, result.verified_file = "float16", verified
            result.own_error_of = (
                "the original file converted to float16 the same way"
                if prep.onnx_in
                else "the model run in float16 by PyTorch"
            )
            result.fallback_rtol = FLOAT16_FALLBACK_RTOL
        overflow = [o.name for o in result.outputs if o.original_err == float("inf")]
        if overflow and result.own_error_of is not None:
            notes.append(
                f"{result.own_error_of} gives inf or NaN (output {', '.join(overflow)}), so "
                f"there the float16 export may differ from the float32 original by "
                f"{FLOAT16_FALLBACK_RTOL:.2g} x scale (8 float16 epsilons) + atol"
            )
        elif overflow:
            notes.append(
                f"the {prep.model_dtype} original itself gives inf or NaN where its float32 twin "
                f"does not (output {', '.join(overflow)}): the model overflows in "
                f"{prep.model_dtype}, so no tolerance is granted for its own error there"
            )
        report.verify = result
        report.warnings += notes
    except Exception as exc:  # noqa: BLE001 - a run-time mismatch is a verification failure
        report.verify_error = summarize_exception(exc)


def _twin_warning(cause: str) -> str:
    import re

    op = re.search(r"of operator \((\w+)\)|implementation for (\w+)\(", cause)
    what = f"bfloat16 {op.group(1) or op.group(2)}" if op else "every op of this file in bfloat16"
    return (
        f"onnxruntime's CPU provider cannot run {what}, so the bfloat16 file itself was not "
        "run; its float32 twin (the same folded weights, cast exactly) was verified instead"
    )


def _check_float16_request(prep: _Prepared, opts: RunOptions) -> None:
    if opts.fp16 and prep.model_dtype is not None:
        raise BadInputError(
            f"--fp16 converts a float32 model to float16, but this model already computes in "
            f"{prep.model_dtype}. Leave out --fp16: the export keeps the model's own dtype."
        )


def _record_float16_run(original, prep: _Prepared, report: RunReport, progress) -> None:
    """--fp16 from a checkpoint: the model's own outputs in float16 (PyTorch, `.half()` on a
    copy), whose error against the float32 original sets the float16 export's allowance."""
    import copy

    import torch

    from bnexport.verify import record_reference

    progress("running the model in float16")
    try:
        half = copy.deepcopy(original).half()
        batches = [
            tuple(x.half() if torch.is_floating_point(x) else x for x in batch)
            for batch in prep.batches
        ]
        prep.half_outputs = record_reference(half, batches)
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the model could not run in float16 in PyTorch ({summarize_exception(exc)}), so "
            "the float16 export is held to the float32 tolerance"
        )


def _record_float16_file(model, prep: _Prepared, report: RunReport, progress) -> None:
    """--fp16 from an ONNX file: the original file converted to float16 the same way, run in
    onnxruntime; its error against the original sets the float16 export's allowance."""
    from onnxscript import ir

    from bnexport.half import to_float16
    from bnexport.verify import OnnxRunner, as_numpy_batch, record_reference

    progress("converting the original file to float16")
    try:
        batches = [as_numpy_batch(b) for b in prep.batches]
        half, _ = to_float16(ir.serde.serialize_model(model), batches)
        # run as the original and the export are: without graph optimizations
        runner = OnnxRunner(half.SerializeToString(), optimize=False)
        prep.half_outputs = record_reference(runner, batches)
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the original file could not be converted to float16 ({summarize_exception(exc)}), "
            "so the float16 export is held to the float32 tolerance"
        )


def _to_float16(model, prep: _Prepared, opts: RunOptions, report: RunReport, progress, exact):
    """The folded float32 model as float16 (`bnexport.half.to_float16`), ranges measured on
    the verification inputs; `exact` holds the float64 folded values, each rounded once."""
    from onnxscript import ir

    from bnexport.half import to_float16
    from bnexport.verify import as_numpy_batch

    progress("converting to float16")
    batches = [as_numpy_batch(b) for b in prep.batches]
    proto = ir.serde.serialize_model(model)
    # float64 tensors from the PyTorch engine, arrays from the ONNX engine; a value the
    # exporter stored under another name (or folded into a constant) is rounded from float32
    names = {i.name for i in proto.graph.initializer}
    values = {
        k: getattr(v, "numpy", lambda v=v: v)() for k, v in (exact or {}).items() if k in names
    }
    half, report.float16 = to_float16(proto, batches, keep_io_types=not opts.fp16_io, exact=values)
    return ir.serde.deserialize_model(half)


def _compare_all(reference, runner, prep: _Prepared, opts: RunOptions):
    """The comparison on the random batches and on the data: (merged result, warnings)."""
    from bnexport.verify import compare, merge

    atol, rtol, _ = _tolerances(opts)
    n_random = prep.n_random
    baseline = prep.baseline
    half = prep.half_outputs
    kw = {"atol": atol, "rtol": rtol}
    if baseline is not None:
        kw["factor"] = HALF_ERROR_FACTOR[prep.model_dtype]
    elif half is not None:
        kw["factor"] = HALF_ERROR_FACTOR["float16"]
    notes, results = [], []
    if n_random:
        if baseline is not None:
            kw["baseline"] = baseline[:n_random]
        elif half is not None:
            kw["half_outputs"] = half[:n_random]
        results.append(compare(reference[:n_random], runner, prep.batches[:n_random], **kw))
    if prep.dataset is not None:
        if baseline is not None:
            kw["baseline"] = baseline[n_random:]
        elif half is not None:
            kw["half_outputs"] = half[n_random:]
        data = compare(
            reference[n_random:],
            runner,
            prep.batches[n_random:],
            labels=prep.dataset.labels,
            **kw,
        )
        used = sum(int(b[0].shape[0]) for b in prep.batches[n_random:])
        data.data, data.data_size = prep.dataset.path, used
        if used < prep.dataset.size:
            notes.append(
                f"only {used} of the {prep.dataset.size} rows of {prep.dataset.path} were "
                f"compared: the model's batch is fixed to {prep.batches[0][0].shape[0]}, "
                "and the rows left over do not fill a batch"
            )
        results.append(data)
    return merge(results), notes


def _weight_bytes(program) -> int:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def _collect(large: bool) -> None:
    if large:
        gc.collect()


def _check_outputs(paths: list[Path | None], inputs: list[Path]) -> None:
    """Every output can be written, touches no input, and no two outputs are the same file."""
    from bnexport.files import check_writable

    seen: dict[Path, Path] = {}
    for path in (Path(p) for p in paths if p is not None):
        check_writable(path, inputs=inputs)
        key = path.resolve()
        if key in seen:
            raise BadInputError(
                f"Two outputs of this run would be the same file '{path}' (also given as "
                f"'{seen[key]}'), and one would overwrite the other. Give the ONNX file (-o, "
                "and its OUT.onnx.data), --json and --save-folded different names."
            )
        seen[key] = path


def save_program(program, path: Path, flag: str = "--save-folded") -> None:
    """Write a torch.export program atomically (`torch.export.load` reads it back)."""
    import torch

    from bnexport.files import write_atomic

    try:
        write_atomic(path, lambda tmp: torch.export.save(program, tmp))
    except OSError as exc:
        raise BadInputError(
            f"Writing the folded program to '{path}' failed ({summarize_exception(exc)}); "
            f"nothing was written. Free some space or choose another {flag} path."
        ) from exc


def run_fold(opts: RunOptions, progress: Progress = _quiet) -> RunReport:
    """Fold, export, verify; write the ONNX file (and the JSON report / folded program)."""
    from bnexport.render import write_json

    output = Path(opts.output or default_output(opts.model))
    inputs = [Path(opts.model)] + ([Path(opts.data)] if opts.data else [])
    inputs += [Path(opts.recalibrate)] if opts.recalibrate else []
    if companion_data(opts.model) is not None:
        inputs.append(companion_data(opts.model))
    data_file = output.with_name(output.name + ".data")
    _check_outputs([output, data_file, opts.json_path, opts.save_folded], inputs)
    prep = _prepare(opts, progress)
    _check_float16_request(prep, opts)
    report = RunReport("fold", str(opts.model), str(output), warnings=list(prep.source.warnings))
    if prep.onnx_in:
        report.reference = ONNX_REFERENCE
        reference = _fold_onnx_file(prep, opts, output, report, progress)
    else:
        reference = _fold_checkpoint(prep, opts, output, report, progress)
    _verify(reference, output, prep, opts, report, progress)
    if opts.json_path is not None:
        write_json(report, opts.json_path)
    return report


def _fold_checkpoint(
    prep: _Prepared, opts: RunOptions, output: Path, report: RunReport, progress: Progress
) -> list:
    """A PyTorch checkpoint: trace once, record the reference, fold the program in place,
    export it. Returns the recorded reference outputs."""
    from bnexport.export import release_weights, save_onnx_model, to_onnx_program
    from bnexport.folding.torch_engine import fold_program
    from bnexport.inputs import example_inputs
    from bnexport.load import float32_twin
    from bnexport.render import onnx_metadata

    source = prep.source
    program = source.to_program(
        example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
    )
    original = source.reference()
    if opts.recalibrate is not None:
        _recalibrate_before_fold(program, prep, opts, report, progress)
        original = program.module()  # the recalibrated model is the one the export must match
    progress("running the original model")
    reference = _record(original, prep.batches)
    _record_float32(functools.partial(float32_twin, original), prep, opts, report, progress)
    if opts.fp16:
        _record_float16_run(original, prep, report, progress)
    del original
    module_names = source.batchnorm_modules()
    # From here on the traced program is all this run holds of the model: it is folded in
    # place, and (for a large model) each stage's leftovers are freed before the next stage
    # allocates.
    prep.source = source = None
    large = _weight_bytes(program) > COLLECT_ABOVE_BYTES
    _collect(large)

    progress("folding BatchNorm layers")
    exact: dict | None = {} if opts.fp16 else None  # float64 folded values, rounded once
    folded, report.fold = fold_program(
        program,
        module_names,
        copy_graph=False,
        in_place=True,
        duplicate_shared=opts.duplicate_shared,
        exact=exact,
    )
    del program
    _collect(large)
    report.warnings += report.fold.warnings

    progress("exporting to ONNX")
    onnx_program = to_onnx_program(folded, opset=opts.opset)
    save_folded = None
    if opts.save_folded is not None:
        # written after onnx.checker accepts the export and before the ONNX file is moved
        # into place: a run that fails leaves neither
        report.saved_program = str(opts.save_folded)
        save_folded = functools.partial(save_program, folded, Path(opts.save_folded))
    model = onnx_program.model
    if opts.fp16:
        model = _to_float16(model, prep, opts, report, progress, exact)
    report.onnx = save_onnx_model(
        model,
        output,
        metadata=onnx_metadata(report.fold, bnexport_source=Path(opts.model).name),
        external_data=opts.external_data,
        threshold=opts.external_data_threshold,
        before_commit=save_folded,
    )
    release_weights(onnx_program.model)
    del model
    del onnx_program, save_folded, folded
    _collect(large)
    if prep.dynamic != (not opts.static_batch):
        report.warnings.append(
            f"the checkpoint fixes the batch size to {prep.batches[0][0].shape[0]}; the ONNX "
            "file keeps that static batch"
        )
    return reference


def _input_fails_checker_too(model: Path, report: RunReport, exc: Exception) -> bool:
    """A folded file the checker rejects is written when the input file fails it too (the
    fold did not cause it), with a warning; the verification still runs."""
    from bnexport.load_onnx import onnx_checker_error

    problem = onnx_checker_error(Path(model))
    if problem is None:
        return False
    report.warnings.append(
        f"the input file does not pass onnx.checker ({problem}); the folded file is written "
        "all the same and verified in onnxruntime as usual"
    )
    return True


def _recalibrate_before_fold(program, prep, opts: RunOptions, report: RunReport, progress) -> None:
    """`fold --recalibrate CALIB.npz`: replace the program's BN statistics in place first."""
    from bnexport.inputs import load_npz
    from bnexport.stats.recalibrate import check_calibration_data, recalibrate_program

    calib = load_npz(Path(opts.recalibrate), prep.specs)
    check_calibration_data(calib, prep.specs)
    progress("recalibrating BatchNorm statistics")
    chunks, _ = _data_chunks(prep, calib, None)
    done, left = recalibrate_program(program, chunks, str(opts.model))
    report.recalibrated = {
        "data": str(opts.recalibrate),
        "samples": calib.size,
        "batchnorm": [r.name for r in done],
        "left": left,
    }


def _fold_onnx_file(
    prep: _Prepared, opts: RunOptions, output: Path, report: RunReport, progress: Progress
) -> list:
    """An ONNX file: record the reference in onnxruntime, fold the model in place with the
    ONNX engine, write it back (external data when the input had it). Returns the recorded
    reference outputs."""
    from bnexport.export import has_external_data, save_onnx_model
    from bnexport.folding.onnx_engine import fold_onnx_model
    from bnexport.load_onnx import keep_declared_value_info
    from bnexport.render import onnx_metadata

    if opts.recalibrate is not None:
        raise BadInputError(
            "--recalibrate recomputes the statistics of a PyTorch checkpoint; an ONNX file "
            "cannot be recalibrated here. Recalibrate the checkpoint it was exported from."
        )
    if opts.save_folded is not None:
        raise BadInputError(
            "--save-folded saves a folded torch.export program, which an ONNX input does not "
            "have; the folded ONNX file (-o) is the result. Leave out --save-folded."
        )
    source = prep.source
    progress("running the original model in onnxruntime")
    reference = _record(source.reference(), prep.batches)
    _record_float32(functools.partial(_onnx_twin, source.path), prep, opts, report, progress)
    model = source.model
    if opts.fp16:
        _record_float16_file(model, prep, report, progress)
    came_external = has_external_data(model)  # before folds replace external tensors
    progress("folding BatchNormalization nodes")
    exact: dict | None = {} if opts.fp16 else None  # float64 folded values, rounded once
    report.fold = fold_onnx_model(model, duplicate_shared=opts.duplicate_shared, exact=exact)
    report.warnings += report.fold.warnings
    keep_declared_value_info(model)
    if opts.fp16:
        model = _to_float16(model, prep, opts, report, progress, exact)
    progress("writing the folded ONNX file")
    external = opts.external_data
    if external is None and came_external:
        external = True  # written back the way it came
    report.onnx = save_onnx_model(
        model,
        output,
        metadata=onnx_metadata(report.fold, bnexport_source=Path(opts.model).name),
        external_data=external,
        threshold=opts.external_data_threshold,
        accept_checker_error=functools.partial(_input_fails_checker_too, opts.model, report),
    )
    prep.source = source = model = None
    return reference


def _onnx_twin(path: str):
    from bnexport.verify import Float32TwinReference

    return Float32TwinReference(path)


def run_verify(opts: RunOptions, onnx_path: Path, progress: Progress = _quiet) -> RunReport:
    """Verify an existing ONNX file against the original model; write only the JSON report."""
    from bnexport.export import describe_onnx
    from bnexport.inputs import verification_batches
    from bnexport.render import write_json

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInputError(f"The ONNX file '{onnx_path}' does not exist or is not a file.")
    _check_outputs([opts.json_path], [Path(opts.model), onnx_path])
    try:
        info = describe_onnx(onnx_path)
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(
            f"'{onnx_path}' is not a readable ONNX model ({summarize_exception(exc)})."
        ) from None
    prep = _prepare(opts, progress)
    if not info.dynamic_batch:
        prep.dynamic = False
        if info.batch_size and not opts.input_shapes:
            prep.specs = [replace(s, shape=s.with_batch(info.batch_size)) for s in prep.specs]
        prep.batches = verification_batches(
            prep.specs, dynamic=False, samples=opts.samples, dataset=prep.dataset
        )
    info.dynamic_batch = info.dynamic_batch and prep.dynamic
    progress("running the original model")
    reference = _record(prep.source.reference(), prep.batches)
    report = RunReport(
        "verify", str(opts.model), str(onnx_path), onnx=info, warnings=list(prep.source.warnings)
    )
    if prep.onnx_in:
        report.reference = ONNX_REFERENCE
        twin = functools.partial(_onnx_twin, prep.source.path)
    else:
        twin = prep.source.float32_reference
    _record_float32(twin, prep, opts, report, progress)
    _verify(reference, onnx_path, prep, opts, report, progress)
    if opts.json_path is not None:
        write_json(report, opts.json_path)
    return report


def _flag_training_mode(source, report) -> None:
    """Flag the BN modules of a module saved in training mode (traced in eval mode, so the
    program alone does not show it)."""
    import torch

    from bnexport.stats.inspect import TRAINING_MODE

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


def _data_chunks(prep: _Prepared, dataset, batch_size: int | None) -> tuple[list, dict]:
    """The chunks of `dataset` for a pass over it (see `_data_batching`) and that batching;
    refused when they hold fewer than two samples."""
    batching = _data_batching(prep, batch_size)
    size = batching["batch_size"]
    chunks = [c for c in dataset.batches(size) if not batching["fixed_batch"] or len(c[0]) == size]
    if sum(len(c[0]) for c in chunks) < 2:
        raise BadInputError(
            f"The model's batch is fixed to {size}, and the {dataset.size} rows of "
            f"'{dataset.path}' do not give two samples in full batches of it. Pass more data, "
            "or export the model with a dynamic batch axis."
        )
    return chunks, batching


def _data_batching(prep: _Prepared, batch_size: int | None) -> dict:
    """Chunks of the data for a pass over it: `batch_size` (default DATA_BATCH), or the fixed
    batch of a static-batch model (leftover rows are not used)."""
    from bnexport.defaults import DATA_BATCH
    from bnexport.inputs import fixed_batch

    if prep.dynamic:
        return {"batch_size": batch_size or DATA_BATCH, "fixed_batch": False}
    return {"batch_size": fixed_batch(prep.specs), "fixed_batch": True}


def run_inspect(opts: RunOptions, plot: Path | None = None, progress: Progress = _quiet):
    """Every BN's statistics, flags and fold decision; with data, their drift. Writes only
    the JSON report (and the plot of the drift)."""
    from bnexport.inputs import example_inputs
    from bnexport.render import write_json
    from bnexport.stats.inspect import inspect_program

    _check_outputs([opts.json_path, plot], [Path(opts.model)])
    prep = _prepare(opts, progress)
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
        **_data_batching(prep, None),
    )
    report.warnings[:0] = list(source.warnings)
    _flag_training_mode(source, report)
    if plot is not None:
        from bnexport.stats.plot import plot_drift

        plot_drift(report, plot)
    if opts.json_path is not None:
        write_json(report, opts.json_path)
    return report


def default_recalibrated(model: Path, suffix: str = ".pt2") -> Path:
    """MODEL.recalibrated.pt2 (or the state_dict's own suffix) next to MODEL."""
    model = Path(model)
    return model.with_name(model.name.split(".")[0] + ".recalibrated" + suffix)


def _recalibrated_suffix(model: Path) -> str:
    """The suffix of the file `recalibrate` writes: the input's own format; a .pt2 for a
    program or a TorchScript archive (converted to a program when loaded)."""
    from bnexport.load import PICKLED_MODULE, SAFETENSORS, STATE_DICT, detect_format

    fmt = detect_format(Path(model))
    if fmt in (STATE_DICT, PICKLED_MODULE):
        return Path(model).suffix or ".pt"
    return ".safetensors" if fmt == SAFETENSORS else ".pt2"


def _write_recalibrated(source, program, output: Path) -> None:
    """Write the recalibrated model in the input's format: a .pt2 program, or the module's
    state_dict (same keys) as torch.save or safetensors, or the whole pickled module."""
    import torch

    from bnexport.files import write_atomic
    from bnexport.load import PICKLED_MODULE, SAFETENSORS
    from bnexport.stats.population import STATISTICS_BUFFERS

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


def run_recalibrate(opts: RunOptions, batch_size: int | None = None, progress: Progress = _quiet):
    """Replace every BN's running statistics with the population statistics of its input over
    --data (upstream BNs already recalibrated); write a .pt2 that `bnexport fold` reads."""
    from bnexport.inputs import example_inputs
    from bnexport.load import detect_format
    from bnexport.render import write_json
    from bnexport.stats.inspect import inspect_program
    from bnexport.stats.recalibrate import (
        RecalibrateReport,
        accuracy,
        check_calibration_data,
        recalibrate_program,
    )

    if opts.data is None:  # never the held-out MODEL_test.npz by default
        raise BadInputError(
            "recalibrate needs data: pass --data CALIB.npz with inputs from the data the model "
            "will see (one array per forward input; labels optional, for accuracy)."
        )
    inputs = [Path(opts.model), Path(opts.data)]
    detect_format(Path(opts.model))  # a missing or unreadable model is named first
    output = Path(opts.output or default_recalibrated(opts.model, _recalibrated_suffix(opts.model)))
    _check_outputs([output, opts.json_path], inputs)
    prep = _prepare(opts, progress)
    source, dataset = prep.source, prep.dataset
    if source.is_onnx:
        raise BadInputError(
            f"'{opts.model}' is an ONNX model; `bnexport recalibrate` recomputes the statistics "
            "of PyTorch checkpoints. Recalibrate the checkpoint, then export it."
        )
    check_calibration_data(dataset, prep.specs)
    program = source.to_program(
        example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
    )
    chunks, batching = _data_chunks(prep, dataset, batch_size)
    progress("measuring the drift before")
    # the report needs only the drift: no dry run of the fold engine
    before = inspect_program(program, str(opts.model), dataset=dataset, dry_run=False, **batching)
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
        write_json(report, opts.json_path)
    return report
