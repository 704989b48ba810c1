"""The shipped example models fold, export and agree with the originals on held-out data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bnexport.runs import RunOptions, run_fold

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
METRICS = json.loads((MODELS / "metrics.json").read_text())


@pytest.fixture(scope="module", params=sorted(METRICS))
def folded(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    report = run_fold(RunOptions(model=MODELS / f"{name}.pt2", output=out, samples=2))
    return name, report


def test_every_shipped_file_is_small():
    for path in MODELS.iterdir():
        if path.is_file():
            assert path.stat().st_size < 1_000_000, path


def test_shipped_model_folds_and_agrees_on_held_out_data(folded):
    name, report = folded
    expected = METRICS[name]
    assert report.passed
    assert report.fold.total == expected["batchnorm_layers"]
    assert len(report.fold.folded) == expected["batchnorm_layers"] and not report.fold.left
    v = report.verify
    assert v.data_size == expected["n_test"]
    if expected["test_accuracy"] is not None:
        assert v.data_argmax_agreement == 1.0
        assert v.accuracy.reference == pytest.approx(expected["test_accuracy"], abs=1e-12)
        assert v.accuracy.onnx == v.accuracy.reference


def test_autoencoder_reconstruction_matches_recorded_mse(tmp_path):
    import onnxruntime as ort

    name = "digits_autoencoder"
    out = tmp_path / f"{name}.onnx"
    report = run_fold(RunOptions(model=MODELS / f"{name}.pt2", output=out, samples=1))

    data = np.load(MODELS / f"{name}_test.npz")
    sess = ort.InferenceSession(report.onnx.path, providers=["CPUExecutionProvider"])
    (recon,) = sess.run(None, {sess.get_inputs()[0].name: data["x"]})
    mse = float(np.mean((recon - data["x"]) ** 2))
    assert mse == pytest.approx(METRICS[name]["test_mse"], rel=1e-4)


def test_readme_records_the_measured_accuracies():
    readme = (ROOT / "README.md").read_text()
    for name, m in METRICS.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        if m["test_accuracy"] is not None:
            shown = re.findall(r"(\d+\.\d+)%", row)
            assert shown and float(shown[0]) == pytest.approx(100 * m["test_accuracy"], abs=0.005)


def test_architectures_load_the_shipped_state_dicts():
    from safetensors.torch import load_file

    from models import architectures

    for name in METRICS:
        model = getattr(architectures, name)()
        model.load_state_dict(load_file(str(MODELS / f"{name}.safetensors")))
        program = torch.export.load(str(MODELS / f"{name}.pt2"))
        x = torch.from_numpy(np.load(MODELS / f"{name}_test.npz")["x"][:16])
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), program.module()(x))
