"""The field's baseline for the memory benchmark: torch.onnx.export of a checkpoint, unfolded."""

from __future__ import annotations

import sys
import warnings

import torch


def main(checkpoint: str, output: str) -> None:
    warnings.simplefilter("ignore")
    program = torch.export.load(checkpoint)
    args = tuple(program.example_inputs[0])
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    onnx_program = torch.onnx.export(
        program.module(), args, dynamo=True, dynamic_shapes=dyn, verbose=False
    )
    onnx_program.save(output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
