"""Defaults shared by the command line and the library; importable without torch."""

from __future__ import annotations

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5
DEFAULT_SAMPLES = 4

# A float16 or bfloat16 model is verified against its float32 twin: the export passes when its
# error is at most HALF_ERROR_FACTOR times the half-precision original's own error (both
# against the twin) + DEFAULT_ATOL + DEFAULT_RTOL x scale.
HALF_ERROR_FACTOR = {"float16": 4.0, "bfloat16": 4.0}

# Verification batch sizes: a dynamic-batch export runs at both (two sizes, neither the traced
# batch of 2, prove the batch axis is dynamic); the data set runs in batches of DATA_BATCH.
SMALL_BATCH = 1
LARGE_BATCH = 4
DATA_BATCH = 256
# An ONNX file's symbolic batch axis is checked at 1 and 8 (the file was traced at no known size).
ONNX_BATCHES = (1, 8)

# Above this many bytes of weights, the ONNX weights go to an external data file next to the
# model: protobuf cannot serialize a message over 2 GiB, and the headroom covers the graph.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
