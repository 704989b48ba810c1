"""Defaults shared by the command line and the library; importable without torch."""

from __future__ import annotations

# None: the export takes torch.onnx's own default opset (20 with torch 2.13), unless --opset
DEFAULT_OPSET: int | None = None
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5
DEFAULT_SAMPLES = 4

# A float16 or bfloat16 model is verified against its float32 twin: the export passes when its
# error is at most HALF_ERROR_FACTOR times the half-precision original's own error (both
# against the twin) + DEFAULT_ATOL + DEFAULT_RTOL x scale. Measured (export error / original's
# error, 8 random batches plus the held-out data where there is some) on the correct folds of
# the shipped digits CNN and autoencoder, the tabular MLP (bfloat16 only: one running_var of
# 3e5 overflows float16), a post-activation ResNet (9 seeds), a BatchNorm1d MLP (9 seeds) and
# a pre-activation ResNet (3 seeds, bfloat16 only: it overflows float16): at most 1.53 for
# float16 (the file itself, in onnxruntime) and 1.28 for bfloat16 (its float32 twin). Wrong
# folds: a running_var off by 1e-3 gave 19 to 206 (float16) and 2.6 to 122 (bfloat16);
# omitting eps gave 14 to 27 where variances are small, 2.5 and 3.3 on the ResNet in float16,
# and below 2 where it changes no weight by more than the half type rounds it.
HALF_ERROR_FACTOR = {"float16": 3.0, "bfloat16": 2.0}
# `fold --fp16` of a float32 model: the export's error against the float32 original may be
# HALF_ERROR_FACTOR["float16"] times the error of the model run in float16 by PyTorch. Where
# that run overflows (inf) there is no such measure, and the allowance is this many float16
# epsilons (2**-11) of each output's scale instead: 8 x 2**-11 = 3.9e-3.
FLOAT16_FALLBACK_RTOL = 8 * 2.0**-11

# A float32 model whose export misses the plain tolerance is measured against its float64 twin
# (parameters, buffers and inputs cast exactly): the export passes when its error against the
# twin is at most FLOAT32_ERROR_FACTOR times the float32 original's own error (+ atol + rtol x
# scale). An ONNX original has no float64 twin in onnxruntime (no float64 Conv): its own
# float32 rounding is measured as how far its outputs move when every weight is moved by one
# float32 unit in the last place (what rounding each folded weight once does), and the export
# may differ from the original by ONNX_FLOAT32_FACTOR times that. Both factors are measured
# in benchmarks/verification.py (docs/how-it-works.md).
FLOAT32_ERROR_FACTOR = 3.0
ONNX_FLOAT32_FACTOR = 3.0

# Every folded layer is also checked where it is (bnexport.layer_check): the export's tensor
# there, computed from the original's own values just upstream, may differ from the
# original's by LAYER_RTOL x the channel's scale (max |value| over the samples; at least
# LAYER_SCALE_FLOOR x the largest channel's scale) + DEFAULT_ATOL: a few float32 roundings
# of one layer.
LAYER_RTOL = 1e-4
LAYER_SCALE_FLOOR = 1e-2
# The original's tensors kept for that check: batch by batch while they fit in this many bytes.
LAYER_CHECK_BYTES = 256 * 2**20

# Verification batch sizes: a dynamic-batch export runs at both (two sizes, neither the traced
# batch of 2, prove the batch axis is dynamic); the data set runs in batches of DATA_BATCH.
SMALL_BATCH = 1
LARGE_BATCH = 4
DATA_BATCH = 256
# Random batches after the first two hold SAMPLE_MACS_BUDGET / (multiply-accumulates of one
# sample) samples, between LARGE_BATCH and MAX_RANDOM_BATCH (bnexport.input_profile).
SAMPLE_MACS_BUDGET = 2 * 10**9
MAX_RANDOM_BATCH = 256
# An ONNX file's symbolic batch axis is checked at 1 and 8 (the file was traced at no known size).
ONNX_BATCHES = (1, 8)

# The most bytes of arrays bnexport reads from an .npz (--data, --recalibrate, MODEL_test.npz):
# the model's inputs and labels, sized from the .npy headers before any array is read. A run
# holds the data, the reference outputs and the ONNX outputs of every row at once: 1 GiB of
# data (4.2 million rows of the digits CNN) took 3.9 GB of memory and 319 s. Verification and
# statistics need a few thousand rows; a larger archive is refused, to be subsampled.
DATA_SIZE_LIMIT = 512 * 2**20

# Above this many bytes of weights, the ONNX weights go to an external data file next to the
# model: protobuf cannot serialize a message over 2 GiB, and the headroom covers the graph.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
