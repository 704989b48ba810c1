"""The benchmark script runs end to end in quick mode and writes a complete table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import METRICS, main


@pytest.mark.slow
def test_quick_benchmark_writes_every_metric(tmp_path):
    out = tmp_path / "results.md"
    assert main(["--quick", "--out", str(out)]) == 0
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    models = {row.split("|")[1].strip() for row in rows[1:]}
    assert models == {"mlp_input_bn", "encoder_decoder"}
    metric_names = [row.split("|")[2].strip() for row in rows[1:]]
    for metric in METRICS:
        assert any(name.startswith(metric) for name in metric_names), metric
    for row in rows[1:]:
        ours = row.split("|")[3].strip()
        assert re.fullmatch(r"[-+0-9.e]+", ours), row


@pytest.mark.slow
def test_quick_onnx_in_benchmark(tmp_path):
    """The ONNX-in benchmark runs (peers that are not installed show as errors)."""
    from benchmarks import onnx_in

    out = tmp_path / "onnx_in.md"
    assert onnx_in.main(["--quick", "--out", str(out)]) == 0
    rows = [
        line.split("|")[1:-1] for line in out.read_text().splitlines() if "| bnexport |" in line
    ]
    assert {r[0].strip() for r in rows} == {"tabular_mlp", "mlp_input_bn", "encoder_decoder"}
    for r in rows:
        assert int(r[3]) == 0  # every BN of these models folds
        assert float(r[4]) < 1e-5  # error against the float64 model


@pytest.mark.slow
def test_quick_recalibrate_benchmark(tmp_path):
    from benchmarks import recalibrate

    out = tmp_path / "recal.md"
    assert recalibrate.main(["--quick", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if "| mlp" in line]
    assert len(rows) == 1
    assert float(rows[0][6]) <= 1e-6  # bnexport's fixed-point error


@pytest.mark.slow
def test_quick_shared_padded_benchmark(tmp_path):
    """Both quick models: bnexport leaves no BN node where the plain export keeps some, and
    its file matches the float64 model."""
    from benchmarks import shared_padded

    out = tmp_path / "shared_padded.md"
    assert shared_padded.main(["--quick", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model | BN calls"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0].split()[0]] = dict(zip(columns, cells))
    assert set(rows) == {"digits_cnn", "siamese_small"}
    for row in rows.values():
        assert int(row["BN left: bnexport"]) == 0
        assert int(row["BN left: plain"]) > 0
        assert float(row["error: bnexport"]) < 1e-5


@pytest.mark.slow
def test_quick_verification_benchmark(tmp_path):
    """The verification benchmark runs on the masked MLP: no false alarm, a defect caught."""
    from benchmarks import verification

    out = tmp_path / "verification.md"
    assert verification.main(["--quick", "--models", "masked_mlp", "--out", str(out)]) == 0
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| masked_mlp")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2:5] == ["PASS", "PASS", "PASS"]
    assert float(cells[-1]) <= 1e-3  # the smallest defect caught


@pytest.mark.slow
def test_affine_maps_quick():
    """The affine-maps benchmark's quick mode runs in its own process and prints a table row
    for bnexport on each of its two models (a tf2onnx file and a torch model)."""
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "affine_maps.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if "| bnexport |" in line]
    assert {r[0].strip() for r in rows} == {"keras_preact_mix", "preact_resnet18_w16"}
    for r in rows:
        assert r[2].strip().isdigit(), r  # affine nodes left, counted in bnexport's file
