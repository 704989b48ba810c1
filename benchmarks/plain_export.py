"""The field's baseline: plain torch.onnx.export of a saved torch.export program, unfolded.

    python benchmarks/plain_export.py CHECKPOINT.pt2 OUT.onnx

The loaded program itself is exported (not `program.module()`, which would trace again), so
both sides of a comparison start from the same saved program. A process of its own, so the
benchmark can time it and measure its peak RSS like the `bnexport fold` command.
"""

from __future__ import annotations

import sys
import warnings

import torch


def main(checkpoint: str, output: str) -> None:
    warnings.simplefilter("ignore")
    program = torch.export.load(checkpoint)
    torch.onnx.export(program, (), dynamo=True, verbose=False).save(output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
