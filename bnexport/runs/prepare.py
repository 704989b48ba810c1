"""The first stage of every command: load the model and its data, and make the batches every
later stage runs on (seeded random inputs first, then the data's rows)."""

from __future__ import annotations

from dataclasses import dataclass

from bnexport.defaults import DATA_BATCH, LARGE_BATCH, ONNX_BATCHES, SMALL_BATCH
from bnexport.errors import BadInputError
from bnexport.input_profile import InputProfile
from bnexport.inputs import example_inputs, fixed_batch, load_npz, verification_batches
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
    layer_problem: str | None = None  # why they could not be recorded
    # a float32 model's own rounding, measured when the plain tolerance is missed: "float64"
    # (`baseline` holds the float64 twin's outputs) or "one ulp" (`half_outputs` holds the
    # ONNX original's outputs with every weight moved by one unit in the last place)
    noise_floor: str | None = None
    samples: int = 0  # seeded random batches asked for
    random_source: str = "standard normal"  # where the random inputs are drawn from
    # () -> the eval-mode original as a graph module, for its float64 twin
    make_original: object = None
    original_path: str | None = None  # the model's file


def _load(opts: RunOptions):
    data = opts.data if opts.data is not None else companion_data(opts.model)
    source = load_source(
        opts.model,
        arch=opts.arch,
        trust_pickle=opts.trust_pickle,
        input_shapes=opts.input_shapes,
        static_batch=opts.static_batch,
        data=data,
    )
    return source, data


def reload_original(opts: RunOptions, specs: list, dynamic: bool):
    """The eval-mode original loaded again from its file (after a fold rewrote the run's
    own copy in place), as the graph module of its traced program (whose tensors bear the
    names the checks use)."""
    source = _load(opts)[0]
    return source.to_program(example_inputs(specs, dynamic=dynamic), dynamic_batch=dynamic).module()


def prepare(opts: RunOptions, progress: Progress) -> Prepared:
    """Load the model (and --data, or MODEL_test.npz next to it). The batches are made by
    `profile_batches`, once the model's profile is known."""
    progress("loading model")
    source, data = _load(opts)
    specs = source.input_specs
    dataset = load_npz(data, specs) if data is not None else None
    dynamic = source.dynamic_batch
    samples = _random_samples(source, specs, dataset, opts.samples)
    n_random = samples if dataset is not None else max(samples, 1)
    prep = Prepared(source, specs, dataset, dynamic, [], n_random, source.is_onnx)
    prep.samples = samples
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


def profile_batches(prep: Prepared, profile: InputProfile) -> None:
    """Make the batches with what the model's profile says: inputs drawn from an input BN's
    statistics, and random batches as large as the model can afford."""
    if prep.onnx_in:
        sizes = (*ONNX_BATCHES, max(ONNX_BATCHES[-1], profile.batch_size()))
    else:
        sizes = (SMALL_BATCH, LARGE_BATCH, max(LARGE_BATCH, profile.batch_size()))
    prep.batches = verification_batches(
        prep.specs,
        dynamic=prep.dynamic,
        samples=prep.samples,
        dataset=prep.dataset,
        sizes=sizes,
        moments=profile.moments,
    )
    prep.random_source = profile.source


def random_samples_of(prep: Prepared) -> int:
    """How many samples the random batches hold."""
    return sum(int(b[0].shape[0]) if b and b[0].dim() else 1 for b in prep.batches[: prep.n_random])


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
