"""The end-to-end jobs behind the CLI: load -> fold -> export -> verify -> report.

Every check that can refuse the run happens before the first file is written, so a run
that ends in a BadInputError leaves the file system as it found it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from bnexport import __version__
from bnexport.errors import BadInputError
from bnexport.export import (
    DEFAULT_OPSET,
    OnnxInfo,
    count_batchnorm_nodes,
    fold_metadata,
    save_onnx,
    to_onnx_proto,
)
from bnexport.files import check_writable, write_atomic, write_text_atomic
from bnexport.fold import FoldResult, fold
from bnexport.fold.torch_graph import eval_mode
from bnexport.inputs import Dataset, InputSpec, load_npz, parse_shape, random_inputs
from bnexport.load import TORCHSCRIPT, LoadedModel, load_model, torchscript_to_program
from bnexport.report import FoldReport
from bnexport.verify import DEFAULT_ATOL, DEFAULT_RTOL, OnnxRunner, VerifyResult, compare, merge

LARGE_BATCH = 8
DATA_BATCH = 256


@dataclass
class RunOptions:
    """Options shared by `fold` and `verify` (the CLI flags, as plain values)."""

    model: Path
    output: Path | None = None
    input_shapes: list[str] = field(default_factory=list)
    arch: str | None = None
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    data: Path | None = None
    samples: int = 4
    json_path: Path | None = None
    save_folded: Path | None = None
    trust_pickle: bool = False


@dataclass
class RunReport:
    """What a run did: the fold report, the ONNX file written and the verification figures."""

    model: str
    output: str
    fold: FoldReport | None
    onnx: OnnxInfo | None
    verify: VerifyResult | None
    warnings: list[str] = field(default_factory=list)
    verify_error: str | None = None

    @property
    def passed(self) -> bool:
        return self.verify is not None and self.verify_error is None and self.verify.passed

    def to_dict(self) -> dict:
        out: dict = {"model": self.model, "output": self.output, "bnexport_version": __version__}
        if self.fold is not None:
            fold_dict = self.fold.to_dict()
            out["batchnorm"] = {
                "total": fold_dict["total"],
                "folded": fold_dict["folded"],
                "left": fold_dict["left"],
                "layers": fold_dict["layers"],
            }
        if self.onnx is not None:
            out["onnx"] = {
                "path": self.onnx.path,
                "opset": self.onnx.opset,
                "batchnorm_nodes": self.onnx.batchnorm_nodes,
                "inputs": self.onnx.inputs,
                "outputs": self.onnx.outputs,
                "dynamic_batch": self.onnx.dynamic_batch,
            }
        verify = self.verify.to_dict() if self.verify is not None else {"passed": False}
        if self.verify_error:
            verify["passed"] = False
            verify["error"] = self.verify_error
        out["verify"] = verify
        out["warnings"] = list(self.warnings)
        return out


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _check_against_program(given: list[InputSpec], recorded: list[InputSpec]) -> None:
    if len(given) != len(recorded):
        raise BadInputError(
            f"The model takes {len(recorded)} input(s) ({', '.join(s.name for s in recorded)}) "
            f"but {len(given)} --input-shape flag(s) were given. Give one per input, or none "
            "to use the shapes the checkpoint records."
        )
    for g, r in zip(given, recorded):
        fixed = [(i, d) for i, d in enumerate(r.shape) if i > 0 or r.dynamic_batch is False]
        if len(g.shape) != len(r.shape) or any(g.shape[i] != d for i, d in fixed):
            expected = ", ".join(
                "batch" if i == 0 and r.dynamic_batch else str(d) for i, d in enumerate(r.shape)
            )
            raise BadInputError(
                f"The input shape {g.shape} does not fit input '{r.name}': the model expects "
                f"({expected}). Fix --input-shape, or leave it out to use the recorded shape."
            )


def input_specs(loaded: LoadedModel, shapes: list[str]) -> list[InputSpec]:
    """Input specs from --input-shape flags, else from the checkpoint itself."""
    if shapes and loaded.input_specs:
        given = [
            InputSpec(r.name, parse_shape(t), r.dtype, r.dynamic_batch)
            for t, r in zip(shapes, loaded.input_specs)
        ] + [
            InputSpec(f"input_{i}", parse_shape(t))
            for i, t in enumerate(shapes[len(loaded.input_specs) :], len(loaded.input_specs))
        ]
        _check_against_program(given, loaded.input_specs)
        return given
    if shapes:
        names = loaded.input_names
        if loaded.input_specs and len(loaded.input_specs) == len(shapes):
            names = [s.name for s in loaded.input_specs]
        dtypes = [s.dtype for s in loaded.input_specs or []]
        specs = []
        for i, text in enumerate(shapes):
            name = names[i] if i < len(names) else f"input_{i}"
            dtype = dtypes[i] if i < len(dtypes) else torch.float32
            specs.append(InputSpec(name, parse_shape(text), dtype))
        return specs
    if loaded.input_specs:
        return loaded.input_specs
    raise BadInputError(
        f"'{loaded.path}' is a {loaded.format}, which does not record its input shapes. Give "
        "one --input-shape per forward input, batch first, for example --input-shape "
        "1,3,224,224."
    )


def _static(specs: list[InputSpec], static_batch: bool) -> bool:
    return static_batch or any(s.dynamic_batch is False for s in specs)


def _example_batch(specs: list[InputSpec], static_batch: bool) -> int:
    if _static(specs, static_batch):
        return specs[0].shape[0] if specs and specs[0].shape else 1
    return 2


def _reference(loaded: LoadedModel) -> Callable:
    model = loaded.model
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()
        return lambda *args: module(*args)
    return model


def _call_reference(reference: Callable, *args):
    if isinstance(reference, nn.Module):
        with eval_mode(reference), torch.no_grad():
            return reference(*args)
    with torch.no_grad():
        return reference(*args)


def _verification_batches(specs, opts: RunOptions, dynamic: bool):
    batches = [1, LARGE_BATCH] if dynamic else [specs[0].shape[0] if specs[0].shape else 1]
    for i in range(max(opts.samples, 1)):
        yield random_inputs(specs, batches[i % len(batches)], seed=1000 + i)


def verify_against(
    loaded: LoadedModel,
    onnx_path: Path,
    specs: list[InputSpec],
    opts: RunOptions,
    dataset: Dataset | None,
    dynamic: bool,
) -> VerifyResult:
    """Compare the eval-mode original with the ONNX file on random inputs and `dataset`."""
    reference = _reference(loaded)

    def ref(*args):
        return _call_reference(reference, *args)

    runner = OnnxRunner(str(onnx_path))
    results = [
        compare(
            ref, runner, _verification_batches(specs, opts, dynamic), atol=opts.atol, rtol=opts.rtol
        )
    ]
    if dataset is not None:
        batch = DATA_BATCH if dynamic else specs[0].shape[0]
        batches = dataset.batches(batch)
        if not dynamic:
            batches = (b for b in batches if b[0].shape[0] == batch)
        results.append(
            compare(ref, runner, batches, atol=opts.atol, rtol=opts.rtol, labels=dataset.labels)
        )
    merged = merge(results)
    if dataset is not None:
        merged.data, merged.data_size = dataset.path, dataset.size
    return merged


def companion_data(model: Path) -> Path | None:
    """`MODEL_test.npz` next to MODEL: held-out data used when --data is not given."""
    candidate = Path(model).with_name(Path(model).stem + "_test.npz")
    return candidate if candidate.is_file() else None


def _prepare(opts: RunOptions, progress: Progress):
    progress("loading model")
    loaded = load_model(opts.model, arch=opts.arch, trust_pickle=opts.trust_pickle)
    specs = input_specs(loaded, opts.input_shapes)
    data = opts.data if opts.data is not None else companion_data(opts.model)
    dataset = load_npz(data, specs) if data is not None else None
    example = random_inputs(specs, _example_batch(specs, opts.static_batch), seed=0)
    if loaded.format == TORCHSCRIPT:
        loaded = LoadedModel(
            torchscript_to_program(loaded.model, example), TORCHSCRIPT, loaded.path, specs
        )
    return loaded, specs, dataset, example


def default_output(model: Path) -> Path:
    return (
        model.with_suffix(".onnx")
        if model.suffix != ".onnx"
        else model.with_name(model.name + ".folded.onnx")
    )


def run_fold(opts: RunOptions, progress: Progress = _quiet) -> RunReport:
    """Fold, export, verify; write the ONNX file (and the JSON report / folded program)."""
    output = opts.output or default_output(opts.model)
    sources = [opts.model] + ([opts.data] if opts.data else [])
    if companion_data(opts.model) is not None:
        sources.append(companion_data(opts.model))
    for path in [output, opts.json_path, opts.save_folded]:
        if path is not None:
            check_writable(Path(path), inputs=sources)
    loaded, specs, dataset, example = _prepare(opts, progress)
    progress("folding BatchNorm layers")
    dynamic = not _static(specs, opts.static_batch)
    result: FoldResult = fold(loaded.model, example, dynamic_batch=dynamic)
    progress("exporting to ONNX")
    proto = to_onnx_proto(result.module, example, opset=opts.opset, dynamic_batch=dynamic)
    metadata = fold_metadata(result.report, bnexport_source=Path(opts.model).name)
    if opts.save_folded is not None:
        program = torch.export.export(result.module, example, strict=False)
        write_atomic(Path(opts.save_folded), lambda tmp: torch.export.save(program, tmp))
    info = save_onnx(proto, output, metadata=metadata)
    progress("verifying with onnxruntime")
    warnings = loaded.warnings + result.report.warnings
    if dynamic != (not opts.static_batch):
        warnings.append(
            f"the checkpoint fixes the batch size to {example[0].shape[0]}; the ONNX file keeps "
            "that static batch"
        )
    report = RunReport(str(opts.model), str(output), result.report, info, None, warnings=warnings)
    try:
        report.verify = verify_against(loaded, output, specs, opts, dataset, info.dynamic_batch)
    except Exception as exc:  # noqa: BLE001 - a run-time mismatch is a verification failure
        report.verify_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    _write_json(report, opts.json_path)
    return report


def _write_json(report: RunReport, path: Path | None) -> None:
    if path is not None:
        write_text_atomic(Path(path), json.dumps(report.to_dict(), indent=2) + "\n")


def run_verify(opts: RunOptions, onnx_path: Path, progress: Progress = _quiet) -> RunReport:
    """Verify an existing ONNX file against the original model; write only the JSON report."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInputError(f"The ONNX file '{onnx_path}' does not exist or is not a file.")
    if opts.json_path is not None:
        check_writable(Path(opts.json_path), inputs=[opts.model, onnx_path])
    loaded, specs, dataset, _ = _prepare(opts, progress)
    import onnx

    try:
        proto = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"'{onnx_path}' is not a readable ONNX model ({exc}).") from None
    dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    dynamic = bool(dims) and all(len(d) and d[0].dim_param for d in dims)
    dynamic = dynamic and not _static(specs, opts.static_batch)
    fixed = [d[0].dim_value for d in dims if len(d) and d[0].dim_value > 0]
    if not dynamic and fixed and not opts.input_shapes:
        specs = [replace(s, shape=s.with_batch(fixed[0])) for s in specs]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    info = OnnxInfo(
        str(onnx_path),
        int(opset),
        count_batchnorm_nodes(proto),
        [i.name for i in proto.graph.input],
        [o.name for o in proto.graph.output],
        dynamic,
    )
    progress("verifying with onnxruntime")
    report = RunReport(
        str(opts.model), str(onnx_path), None, info, None, warnings=list(loaded.warnings)
    )
    try:
        report.verify = verify_against(loaded, onnx_path, specs, opts, dataset, dynamic)
    except Exception as exc:  # noqa: BLE001
        report.verify_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    _write_json(report, opts.json_path)
    return report
