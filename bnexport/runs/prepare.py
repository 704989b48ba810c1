"""The first stage of every command: load the model and its data, and make the batches every
later stage runs on (seeded random inputs first, then the data's rows)."""

from __future__ import annotations

from dataclasses import dataclass

from bnexport.defaults import DATA_BATCH, LARGE_BATCH, ONNX_BATCHES, SMALL_BATCH
from bnexport.errors import BadInputError
from bnexport.inputs import fixed_batch, load_npz, verification_batches
from bnexport.load import load_source
from bnexport.onnx_runtime import uses_half_type
from bnexport.runs.options import Progress, RunOptions, companion_data

ONNX_REFERENCE = "the original ONNX file (both without graph optimizations)"


@dataclass
class Prepared:
    """The loaded model, its inputs, and the outputs recorded on them as the run goes."""

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
    layer_values: list | None = None  # the original's tensors where folds are checked
    original_path: str | None = None  # the model's file


def prepare(opts: RunOptions, progress: Progress) -> Prepared:
    """Load the model (and --data, or MODEL_test.npz next to it) and make the batches."""
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
    prep = Prepared(source, specs, dataset, dynamic, batches, n_random, source.is_onnx)
    prep.model_dtype = _model_dtype(source)
    prep.original_path = str(source.path)
    return prep


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


def _model_dtype(source) -> str | None:
    """ "float16"/"bfloat16" when the model computes in half precision. An ONNX file counts
    as float16 when it declares float16 tensors (a bfloat16 file's reference cannot run in
    onnxruntime, so it keeps the float32 tolerance)."""
    if source.is_onnx:
        return "float16" if uses_half_type(source.path) == "float16" else None
    dtype = source.model_dtype()
    return None if dtype is None else str(dtype).removeprefix("torch.")


def data_batching(prep: Prepared, batch_size: int | None) -> dict:
    """Chunks of the data for a pass over it: `batch_size` (default DATA_BATCH), or the fixed
    batch of a static-batch model (leftover rows are not used)."""
    if prep.dynamic:
        return {"batch_size": batch_size or DATA_BATCH, "fixed_batch": False}
    return {"batch_size": fixed_batch(prep.specs), "fixed_batch": True}


def data_chunks(prep: Prepared, dataset, batch_size: int | None) -> tuple[list, dict]:
    """The chunks of `dataset` for a pass over it (see `data_batching`) and that batching;
    refused when they hold fewer than two samples."""
    batching = data_batching(prep, batch_size)
    size = batching["batch_size"]
    chunks = [c for c in dataset.batches(size) if not batching["fixed_batch"] or len(c[0]) == size]
    if sum(len(c[0]) for c in chunks) < 2:
        raise BadInputError(
            f"The model's batch is fixed to {size}, and the {dataset.size} rows of "
            f"'{dataset.path}' do not give two samples in full batches of it. Pass more data, "
            "or export the model with a dynamic batch axis."
        )
    return chunks, batching
