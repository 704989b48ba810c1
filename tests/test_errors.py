"""Every bad input: a one-paragraph message, exit 2, no traceback, nothing created or changed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bnexport.cli import main
from tests.nets import SmallNet, randomize_bn

ARCH = "tests.nets:small_net"


@pytest.fixture()
def workdir(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.export.save(
        torch.export.export(model, (torch.randn(2, 1, 8, 8),)), str(tmp_path / "m.pt2")
    )
    return tmp_path


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _expect_refusal(workdir, args, phrase):
    before = _snapshot(workdir)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert phrase in result.output, result.output
    assert "Traceback" not in result.output
    assert _snapshot(workdir) == before  # nothing created, nothing changed
    return result.output


def test_missing_file(workdir):
    _expect_refusal(workdir, ["fold", workdir / "nope.pt2"], "does not exist")


def test_directory_as_model(workdir):
    _expect_refusal(workdir, ["fold", workdir], "is a directory")


@pytest.mark.parametrize(
    "path,why",
    [
        # the kernel refuses these whoever asks, root included (a mode of 0 would not stop root)
        ("/proc/self/mem", "Input/output error"),  # address 0 of the process is not mapped
        ("/sys/bus/platform/uevent", "Permission denied"),  # write-only: it has no read
    ],
)
def test_unreadable_file(workdir, path, why):
    """A model file that exists but cannot be read: exit 2, the path and the system's reason,
    no output file."""
    out = _expect_refusal(
        workdir, ["fold", path, "-o", workdir / "x.onnx"], f"The model file '{path}' cannot be read"
    )
    assert f"({why})" in out


@pytest.mark.parametrize("source", ["sd.pt", "m.pt2"])
def test_truncated_checkpoint(workdir, source):
    data = (workdir / source).read_bytes()
    (workdir / f"cut_{source}").write_bytes(data[: len(data) // 2])
    _expect_refusal(
        workdir,
        ["fold", workdir / f"cut_{source}", "--arch", ARCH, "--input-shape", "1,1,8,8"],
        "truncated or corrupt",
    )


def test_garbage_inside_a_torch_archive(workdir):
    data = bytearray((workdir / "sd.pt").read_bytes())
    data[200:260] = b"\x00" * 60
    (workdir / "bad.pt").write_bytes(bytes(data))
    out = _expect_refusal(
        workdir, ["fold", workdir / "bad.pt", "--arch", ARCH, "--input-shape", "1,1,8,8"], "'"
    )
    assert "corrupt" in out or "does not fit" in out


@pytest.mark.parametrize(
    "name,content,phrase",
    [
        ("empty.pt", b"", "empty"),
        ("notes.pt", b"just some text\n", "text file"),
        ("model.onnx", b"\x08\x08\x12\x07pytorch", "ONNX file without a graph"),
        ("noise.bin", bytes(range(200, 256)) * 4, "unknown format"),
    ],
)
def test_files_that_are_not_checkpoints(workdir, name, content, phrase):
    (workdir / name).write_bytes(content)
    _expect_refusal(workdir, ["fold", workdir / name], phrase)


def test_state_dict_without_arch(workdir):
    _expect_refusal(workdir, ["fold", workdir / "sd.pt", "--input-shape", "1,1,8,8"], "--arch")


def test_arch_that_cannot_be_imported(workdir):
    _expect_refusal(
        workdir, ["fold", workdir / "sd.pt", "--arch", "no_such_pkg.nets:build"], "cannot import"
    )


def test_arch_missing_callable(workdir):
    _expect_refusal(
        workdir, ["fold", workdir / "sd.pt", "--arch", "tests.nets:nothing_here"], "no callable"
    )


def test_arch_that_returns_no_module(workdir):
    _expect_refusal(
        workdir,
        ["fold", workdir / "sd.pt", "--arch", "tests.nets:not_a_module"],
        "not a torch.nn.Module",
    )


def test_state_dict_that_does_not_fit(workdir):
    state = torch.load(workdir / "sd.pt")
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, workdir / "other.pt")
    out = _expect_refusal(
        workdir,
        ["fold", workdir / "other.pt", "--arch", ARCH, "--input-shape", "1,1,8,8"],
        "does not fit",
    )
    assert "fc.bias" in out and "extra.weight" in out


def test_input_shape_that_does_not_fit_the_recorded_spec(workdir):
    out = _expect_refusal(
        workdir, ["fold", workdir / "m.pt2", "--input-shape", "1,3,8,8"], "input shape"
    )
    assert "expects (2, 1, 8, 8)" in out


def test_input_shape_rejected_by_forward(workdir):
    out = _expect_refusal(
        workdir,
        ["fold", workdir / "sd.pt", "--arch", ARCH, "--input-shape", "1,3,8,8"],
        "Could not trace the model",
    )
    assert "to have 1 channels, but got 3 channels" in out


def test_malformed_input_shape(workdir):
    _expect_refusal(workdir, ["fold", workdir / "m.pt2", "--input-shape", "1,a,8"], "positive")


def test_output_is_the_input_file(workdir):
    _expect_refusal(workdir, ["fold", workdir / "m.pt2", "-o", workdir / "m.pt2"], "input file")


def test_output_directory_missing(workdir):
    _expect_refusal(
        workdir, ["fold", workdir / "m.pt2", "-o", workdir / "no" / "x.onnx"], "does not exist"
    )


def test_output_directory_read_only(workdir):
    """/proc/sys takes no new file, root or not (the kernel refuses writes to it whatever the
    caller's capabilities): exit 2 before the export, the directory named, nothing written."""
    before = sorted(os.listdir("/proc/sys"))
    out = _expect_refusal(
        workdir, ["fold", workdir / "m.pt2", "-o", "/proc/sys/x.onnx"], "not writable"
    )
    assert "The output directory '/proc/sys' is not writable" in out
    assert sorted(os.listdir("/proc/sys")) == before


def test_data_with_wrong_names(workdir):
    np.savez(workdir / "d.npz", a=np.zeros((3, 1, 8, 8), "f4"), b=np.zeros((3, 2), "f4"))
    _expect_refusal(workdir, ["fold", workdir / "m.pt2", "--data", workdir / "d.npz"], "inputs")


def test_data_with_wrong_shape(workdir):
    np.savez(workdir / "d.npz", x=np.zeros((3, 2, 8, 8), "f4"))
    _expect_refusal(
        workdir, ["fold", workdir / "m.pt2", "--data", workdir / "d.npz"], "has shape (3, 2, 8, 8)"
    )


def test_data_not_an_npz(workdir):
    (workdir / "d.npz").write_text("x")
    _expect_refusal(workdir, ["fold", workdir / "m.pt2", "--data", workdir / "d.npz"], ".npz")


def test_verify_with_missing_onnx(workdir):
    _expect_refusal(workdir, ["verify", workdir / "m.pt2", workdir / "nope.onnx"], "does not exist")


def test_subprocess_prints_one_paragraph_without_traceback(workdir):
    (workdir / "empty.pt2").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "bnexport", "fold", str(workdir / "empty.pt2")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0
