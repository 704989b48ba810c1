"""Input specifications and the example/test inputs made from them."""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

from bnexport.defaults import DATA_BATCH, DATA_SIZE_LIMIT, LARGE_BATCH, SMALL_BATCH
from bnexport.errors import BadInputError
from bnexport.formatting import fmt_bytes

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


def random_inputs(
    specs: list[InputSpec], batch: int, seed: int, moments: dict | None = None
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs: standard normal, or for an input named in `moments` (name ->
    (mean, std) per channel on axis 1) normal with those moments; integers in {0, 1} for
    integer inputs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = spec.with_batch(batch)
        if spec.dtype.is_floating_point:
            x = torch.randn(shape, generator=gen)
            if moments and spec.name in moments and len(shape) >= 2:
                mean, std = (torch.as_tensor(m, dtype=torch.float64) for m in moments[spec.name])
                view = (1, -1) + (1,) * (len(shape) - 2)
                x = x.double() * std.reshape(view) + mean.reshape(view)
            out.append(x.to(spec.dtype))
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
    moments: dict | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """`samples` seeded random batches (of each of `sizes` in turn, the last size repeating,
    when dynamic, else the fixed batch), then the data set's batches (those of the fixed
    size, for a static-batch model). `samples` may be 0 only with a data set. `moments` as
    in `random_inputs`."""
    sizes = list(sizes) if dynamic else [fixed_batch(specs)]
    count = samples if dataset is not None else max(samples, 1)
    batches = [
        random_inputs(specs, sizes[min(i, len(sizes) - 1)], seed=1000 + i, moments=moments)
        for i in range(count)
    ]
    if dataset is not None:
        size = DATA_BATCH if dynamic else fixed_batch(specs)
        batches += [b for b in dataset.batches(size) if dynamic or b[0].shape[0] == size]
    return batches


@dataclass
class Dataset:
    """User-supplied inputs (one array per model input) and optional class labels: finite
    real numbers, at least one row; labels are non-negative integers (int64), one per row."""

    inputs: tuple[torch.Tensor, ...]
    labels: np.ndarray | None
    path: str

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].dim() else 0

    def batches(self, batch_size: int):
        for start in range(0, self.size, batch_size):
            yield tuple(x[start : start + batch_size] for x in self.inputs)

    def check_labels(self, classes: int) -> None:
        """Refuse labels that are not class indices of an output with `classes` columns."""
        if self.labels is None or not len(self.labels):
            return
        over = np.flatnonzero(self.labels >= classes)
        if len(over):
            raise BadInputError(
                f"The labels in '{self.path}' must be class indices from 0 to {classes - 1} "
                f"(the model's first output has {classes} columns); labels outside that range: "
                f"{len(over)} of {len(self.labels)}, the first {self.labels[over[0]]} in row "
                f"{over[0]}. Check that the labels belong to this model and count from 0."
            )


ArrayHeader = tuple[tuple[int, ...], np.dtype]


def npz_headers(path: Path) -> dict[str, ArrayHeader]:
    """The shape and dtype of every array in an .npz archive, read from the .npy headers
    alone: no array data is read. Raises OSError or zipfile.BadZipFile for a file that is not
    a zip archive, ValueError naming a member that is not a .npy array."""
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename.removesuffix(".npy")
            try:
                with zf.open(info) as fh:
                    version = npy_format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = npy_format.read_array_header_1_0(fh)
                    else:  # 2.0 and 3.0 differ only in the header's text encoding
                        shape, _, dtype = npy_format.read_array_header_2_0(fh)
            except Exception as exc:  # noqa: BLE001 - whatever fails, the member is no array
                raise ValueError(f"'{name}' is not a .npy array ({exc})") from None
            headers[name] = (tuple(int(d) for d in shape), dtype)
    return headers


def _nbytes(header: ArrayHeader) -> int:
    shape, dtype = header
    return math.prod(shape) * dtype.itemsize


def load_npz(path: Path, specs: list[InputSpec], flag: str = "--data") -> Dataset:
    """Read an .npz whose arrays are the model inputs (by input name, or the only array) and
    optional labels. Everything the .npy headers tell (names, dtypes, shapes, rows, the total
    size against DATA_SIZE_LIMIT) is checked before any array is read; then the values (no
    NaN or Inf; labels non-negative integers)."""
    path = Path(path)
    what = f"The {flag} file '{path}'"
    if not path.is_file():
        raise BadInputError(f"{what} does not exist or is not a file.")
    try:
        headers = npz_headers(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        member = f" ({exc})" if isinstance(exc, ValueError) else ""
        raise BadInputError(
            f"{what} is not a readable .npz archive{member}. Save inputs with "
            "numpy.savez(path, <input name>=array, labels=array)."
        ) from None
    label_header = headers.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if all(n in headers for n in names):
        chosen = names
    elif len(specs) == 1 and len(headers) == 1:
        chosen = list(headers)
    else:
        raise BadInputError(
            f"{what} holds arrays {sorted(headers)} but the model takes inputs "
            f"{names}. Name each array after the model input it feeds (plus an optional "
            f"'{LABELS_KEY}' array of class indices)."
        )
    for spec, key in zip(specs, chosen):
        _check_input_header(flag, what, spec, key, headers[key])
    if label_header is not None:
        _check_label_header(what, label_header)
    read = [headers[k] for k in chosen] + ([label_header] if label_header is not None else [])
    rows = {shape[0] for shape, _ in read}
    if len(rows) != 1:
        raise BadInputError(
            f"The arrays in {flag} file '{path}' have different batch sizes; every input array "
            "(and 'labels') must have the same length along axis 0."
        )
    if rows == {0}:
        raise BadInputError(
            f"{what} holds 0 rows: there is nothing to run the model on. Save at least one "
            "row per input (at least two for statistics)."
        )
    total = sum(_nbytes(header) for header in read)
    if total > DATA_SIZE_LIMIT:
        raise BadInputError(
            f"{what} holds {fmt_bytes(total)} of arrays ({min(rows)} rows), more than the "
            f"{fmt_bytes(DATA_SIZE_LIMIT)} bnexport reads; nothing was read. A few thousand "
            "rows verify an export and give the statistics: save a subset, for example "
            "numpy.savez(path, x=x[:4000], labels=labels[:4000])."
        )
    wanted = [*chosen, *([LABELS_KEY] if label_header is not None else [])]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in wanted}
    except Exception:  # noqa: BLE001 - a member cut short or corrupt: the same answer
        raise BadInputError(
            f"{what} is not a readable .npz archive (an array in it is truncated or "
            "corrupt). Save inputs with numpy.savez(path, <input name>=array, labels=array)."
        ) from None
    labels = arrays.pop(LABELS_KEY, None)
    tensors = []
    for spec, key in zip(specs, chosen):
        array = _native(arrays.pop(key))
        _check_finite(what, key, array)
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)).to(spec.dtype))
    if labels is not None:
        labels = _class_indices(what, labels)
    return Dataset(tuple(tensors), labels, str(path))


def _check_input_header(
    flag: str, what: str, spec: InputSpec, key: str, header: ArrayHeader
) -> None:
    shape, dtype = header
    expected = spec.shape[1:]
    if dtype.kind == "c":
        raise BadInputError(
            f"{what}: the array '{key}' for input '{spec.name}' is complex ({dtype}); the "
            "model takes real numbers, and the imaginary part would be dropped. Save the "
            "values the model takes, for example x.real or abs(x)."
        )
    if dtype.kind not in "biuf":
        raise BadInputError(
            f"{what}: the array '{key}' for input '{spec.name}' has dtype {dtype}, which is not "
            "numbers. Save the model's inputs as float, integer or bool arrays."
        )
    if tuple(shape[1:]) != tuple(expected) or len(shape) != len(spec.shape):
        raise BadInputError(
            f"The {flag} array for input '{spec.name}' has shape {tuple(shape)}, but "
            f"the model expects (batch, {', '.join(map(str, expected))}). Save arrays whose "
            "shape after the batch axis matches the model's input."
        )


def _check_label_header(what: str, header: ArrayHeader) -> None:
    shape, dtype = header
    if len(shape) != 1:
        raise BadInputError(
            f"{what}: '{LABELS_KEY}' has shape {shape}; it must hold one class index per row. "
            f"For one-hot labels save {LABELS_KEY}.argmax(1)."
        )
    if dtype.kind not in "biuf":
        raise BadInputError(
            f"{what}: '{LABELS_KEY}' has dtype {dtype}; it must hold integer class indices."
        )


def _native(array: np.ndarray) -> np.ndarray:
    """The array in the machine's byte order (torch takes no other)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _check_finite(what: str, key: str, array: np.ndarray) -> None:
    """Refuse NaN and Inf: outputs computed from them are NaN or Inf, and compare as equal."""
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array).reshape(len(array), -1)
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):
        raise BadInputError(
            f"{what}: the array '{key}' holds NaN or Inf ({int(bad.sum())} values in "
            f"{len(rows)} of its {len(array)} rows, the first in row {rows[0]}). Whatever is "
            "computed from those rows (the model's outputs, their comparison, BN statistics) "
            "is NaN or Inf and tells nothing. Remove or fix those rows."
        )


def _class_indices(what: str, labels: np.ndarray) -> np.ndarray:
    """Labels as int64 class indices; refused unless whole numbers from 0 up."""
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            row = int(np.flatnonzero(~whole)[0])
            raise BadInputError(
                f"{what}: '{LABELS_KEY}' must hold integer class indices, but row {row} holds "
                f"{labels[row]}. Save the class index of each row (labels.astype(int) if the "
                "values are whole numbers stored as floats)."
            )
    labels = labels.astype(np.int64)
    negative = np.flatnonzero(labels < 0)
    if len(negative):
        raise BadInputError(
            f"{what}: '{LABELS_KEY}' must hold class indices from 0 up; negative labels: "
            f"{len(negative)} of {len(labels)}, the first {labels[negative[0]]} in row "
            f"{negative[0]}."
        )
    return labels
