"""The options of a run (the CLI flags as plain values) and the paths they imply.

Every output a run may write is checked here before the first one is written, so a run that
ends in a BadInputError leaves the file system as it found it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bnexport.defaults import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    EXTERNAL_DATA_THRESHOLD,
)
from bnexport.errors import BadInputError
from bnexport.files import check_writable

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A progress callback that shows nothing."""


@dataclass
class RunOptions:
    """Options of `fold` and `verify` (the CLI flags, as plain values)."""

    model: Path
    output: Path | None = None
    input_shapes: list[str] = field(default_factory=list)
    arch: str | None = None
    opset: int | None = DEFAULT_OPSET
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

    @property
    def tolerances(self) -> tuple[float, float, bool]:
        """(atol, rtol, given): the defaults stand in for a flag not given."""
        atol = DEFAULT_ATOL if self.atol is None else self.atol
        rtol = DEFAULT_RTOL if self.rtol is None else self.rtol
        return atol, rtol, self.atol is not None or self.rtol is not None


def default_output(model: Path) -> Path:
    """MODEL.onnx next to a checkpoint; MODEL.folded.onnx next to an ONNX file."""
    model = Path(model)
    if model.suffix.lower() == ".onnx":
        return model.with_name(model.stem + ".folded.onnx")
    return model.with_suffix(".onnx")


def default_recalibrated(model: Path, suffix: str = ".pt2") -> Path:
    """MODEL.recalibrated.pt2 (or the state_dict's own suffix) next to MODEL."""
    model = Path(model)
    return model.with_name(model.name.split(".")[0] + ".recalibrated" + suffix)


def companion_data(model: Path) -> Path | None:
    """Held-out data next to MODEL, used when --data is not given: `MODEL_test.npz`, or for a
    name with several suffixes (`NAME.unfolded.onnx`) `NAME_test.npz`."""
    model = Path(model)
    for stem in dict.fromkeys((model.stem, model.name.split(".")[0])):
        candidate = model.with_name(stem + "_test.npz")
        if candidate.is_file():
            return candidate
    return None


def check_outputs(paths: list[Path | None], inputs: list[Path]) -> None:
    """Every output can be written, touches no input, and no two outputs are the same file."""
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
