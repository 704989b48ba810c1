"""Input specifications and the example/test inputs made from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnexport.defaults import DATA_BATCH, LARGE_BATCH, SMALL_BATCH
from bnexport.errors import BadInputError

LABELS_KEY = "labels"


@dataclass
class InputSpec:
    """One positional tensor input of forward: name, shape (batch first) and dtype.

    `batched` is False for an input without a batch axis (a program whose other inputs have a
    dynamic batch while this one's axis 0 is fixed): its shape never changes with the batch.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    dynamic_batch: bool | None = None  # None: unknown (the model decides when traced)
    batched: bool = True

    def with_batch(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape[1:]) if self.shape and self.batched else self.shape


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' -> (1, 3, 224, 224)."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        dims = tuple(int(p) for p in parts if p)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise BadInputError(
            f"--input-shape '{text}' is not a list of positive integers. Write it as "
            "comma-separated sizes, batch first, for example --input-shape 1,3,224,224."
        )
    return dims


def random_inputs(specs: list[InputSpec], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs (integers in {0, 1} for integer inputs)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = spec.with_batch(batch)
        if spec.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(spec.dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(spec.dtype))
    return tuple(out)


def fixed_batch(specs: list[InputSpec]) -> int:
    """The batch size a static-batch model was recorded with (1 when unknown)."""
    batched = [s for s in specs if s.batched and s.shape]
    return batched[0].shape[0] if batched else 1


def example_inputs(specs: list[InputSpec], *, dynamic: bool) -> tuple[torch.Tensor, ...]:
    """The inputs a model is traced with: batch 2 (so the batch axis can stay symbolic) when
    dynamic, else the recorded batch."""
    return random_inputs(specs, 2 if dynamic else fixed_batch(specs), seed=0)


def verification_batches(
    specs: list[InputSpec],
    *,
    dynamic: bool,
    samples: int,
    dataset: Dataset | None = None,
    sizes: tuple[int, ...] = (SMALL_BATCH, LARGE_BATCH),
) -> list[tuple[torch.Tensor, ...]]:
    """`samples` seeded random batches (alternately of each of `sizes` when dynamic, else the
    fixed batch), then the data set's batches (those of the fixed size, for a static-batch
    model). `samples` may be 0 only with a data set."""
    sizes = list(sizes) if dynamic else [fixed_batch(specs)]
    count = samples if dataset is not None else max(samples, 1)
    batches = [random_inputs(specs, sizes[i % len(sizes)], seed=1000 + i) for i in range(count)]
    if dataset is not None:
        size = DATA_BATCH if dynamic else fixed_batch(specs)
        batches += [b for b in dataset.batches(size) if dynamic or b[0].shape[0] == size]
    return batches


@dataclass
class Dataset:
    """User-supplied inputs (one array per model input) and optional class labels."""

    inputs: tuple[torch.Tensor, ...]
    labels: np.ndarray | None
    path: str

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].dim() else 0

    def batches(self, batch_size: int):
        for start in range(0, self.size, batch_size):
            yield tuple(x[start : start + batch_size] for x in self.inputs)


def load_npz(path: Path, specs: list[InputSpec]) -> Dataset:
    """Read an .npz whose arrays are the model inputs (by input name, or the only array)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise BadInputError(f"The --data file '{path}' does not exist.") from None
    except Exception:  # noqa: BLE001 - any unreadable file gets the same answer
        raise BadInputError(
            f"The --data file '{path}' is not a readable .npz archive. Save inputs with "
            "numpy.savez(path, <input name>=array, labels=array)."
        ) from None
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if all(n in arrays for n in names):
        chosen = [arrays[n] for n in names]
    elif len(specs) == 1 and len(arrays) == 1:
        chosen = list(arrays.values())
    else:
        raise BadInputError(
            f"The --data file '{path}' holds arrays {sorted(arrays)} but the model takes inputs "
            f"{names}. Name each array after the model input it feeds (plus an optional "
            f"'{LABELS_KEY}' array of class indices)."
        )
    tensors = []
    for spec, array in zip(specs, chosen):
        expected = spec.shape[1:]
        if tuple(array.shape[1:]) != tuple(expected) or array.ndim != len(spec.shape):
            raise BadInputError(
                f"The --data array for input '{spec.name}' has shape {tuple(array.shape)}, but "
                f"the model expects (batch, {', '.join(map(str, expected))}). Save arrays whose "
                "shape after the batch axis matches the model's input."
            )
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)).to(spec.dtype))
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1 or (labels is not None and len(labels) not in sizes):
        raise BadInputError(
            f"The arrays in --data file '{path}' have different batch sizes; every input array "
            "(and 'labels') must have the same length along axis 0."
        )
    return Dataset(tuple(tensors), None if labels is None else np.asarray(labels), str(path))
