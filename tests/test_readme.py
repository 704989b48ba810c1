"""Every command in the README's quick start and deploy section works as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _workdir(tmp_path: Path) -> Path:
    def generated(_: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(".onnx") and not n.endswith(".unfolded.onnx")]

    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=generated)
    return tmp_path


def test_quick_start_command_runs_as_written(tmp_path):
    section = _section("Quick start")
    command = next(
        line.strip() for line in section.splitlines() if line.strip().startswith("bnexport fold")
    )
    argv = command.split()
    work = _workdir(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "bnexport", *argv[1:]], cwd=work, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: PASS" in done.stdout
    assert (work / "models" / "digits_cnn.onnx").is_file()
    shown = re.search(r"original (\d+\.\d+)%, ONNX (\d+\.\d+)%", section)
    measured = re.search(r"original (\d+\.\d+)%, ONNX (\d+\.\d+)%", done.stdout)
    assert shown and measured and shown.groups() == measured.groups()
    assert "Traceback" not in done.stderr


def test_deploy_snippet_runs_on_the_exported_file(tmp_path):
    work = _workdir(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "bnexport", "fold", "models/digits_cnn.pt2", "--samples", "1"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    code = re.search(r"```python\n(.*?)```", _section("Deploying the exported file"), re.S)
    done = subprocess.run(
        [sys.executable, "-c", code.group(1)], cwd=work, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"accuracy 0\.9\d+ on 450 held-out digits", done.stdout)


def test_python_api_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section("Python API"), re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "True" in done.stdout and (tmp_path / "net.onnx").is_file()


def test_install_and_test_commands_match_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    install = next(
        line.strip() for line in _section("Install").splitlines() if "pip install" in line
    )
    test = next(
        line.strip() for line in _section("Running the tests").splitlines() if "pytest" in line
    )
    assert install in ci
    assert test.split()[:4] == ["python3", "-m", "pytest", "-q"]
    assert "python3 -m pytest -q" in ci


def test_quick_start_onnx_command_runs_as_written(tmp_path):
    section = _section("Quick start")
    command = next(
        line.strip()
        for line in section.splitlines()
        if line.strip().startswith("bnexport fold") and ".onnx" in line
    )
    work = _workdir(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "bnexport", *command.split()[1:]],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BatchNorm: 4 before, 0 after (4 folded); 1 shift kept as Add node" in done.stdout
    assert "original 98.22%, ONNX 98.22%" in done.stdout and "98.22%" in section
    assert (work / "models" / "digits_cnn.unfolded.folded.onnx").is_file()


def test_stale_model_commands_run_as_written(tmp_path):
    section = _section("Recalibrating the statistics")
    commands = [
        line.strip().split()
        for line in section.splitlines()
        if line.strip().startswith("bnexport ") and "models/digits_cnn_stale" in line
    ]
    assert [c[1] for c in commands] == ["inspect", "recalibrate", "fold"]
    work = _workdir(tmp_path)
    outputs = []
    for argv in commands:
        done = subprocess.run(
            [sys.executable, "-m", "bnexport", *argv[1:]], cwd=work, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "stale: 4 of 4 BNs" in outputs[0]
    shown = re.search(r"(\d+\.\d+)% -> (\d+\.\d+)%", section).groups()
    assert f"before {shown[0]}%, after {shown[1]}%" in outputs[1]
    assert "original 99.11%, ONNX 99.11%" in outputs[2] and "99.11%" in section
