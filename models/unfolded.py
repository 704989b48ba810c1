"""Write each shipped model as the ONNX file an unoptimizing exporter makes: every BatchNorm
kept as a BatchNormalization node (NAME.unfolded.onnx), the input of `bnexport fold
NAME.unfolded.onnx`.

    python -m models.unfolded
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NAMES = ("digits_cnn", "tabular_mlp", "digits_autoencoder")


def export_unfolded(pt2: Path, out: Path) -> None:
    """torch.onnx.export of a saved program without the ONNX optimizer (BNs stay nodes)."""
    program = torch.export.load(str(pt2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (), dynamo=True, optimize=False, verbose=False)
    onnx_program.save(str(out))


def main() -> None:
    for name in NAMES:
        out = HERE / f"{name}.unfolded.onnx"
        export_unfolded(HERE / f"{name}.pt2", out)
        print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
