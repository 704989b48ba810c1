"""Faults and hostile input: real signals sent to a running `bnexport` (exit 130/143, no
verdict, no file left), checks that end a run with exit 2 before anything is written, damaged
archives, malicious pickles, hostile --data, and messages that name the real cause."""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnexport.cli import main
from bnexport.errors import Interrupted
from bnexport.interrupts import handling_signals, interrupted
from tests.nets import SmallNet, randomize_bn

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ONNX = ROOT / "models" / "digits_cnn.unfolded.onnx"


# --------------------------------------------------------------------------- signals


class WideMLP(nn.Module):
    """Linear(4000, 4000) + BatchNorm1d, twice: 128 MB of weights, so that its export and its
    verification each take long enough to be interrupted while they run."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(4000, 4000), nn.BatchNorm1d(4000)
        self.fc2, self.bn2 = nn.Linear(4000, 4000), nn.BatchNorm1d(4000)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


@pytest.fixture(scope="module")
def wide_pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(WideMLP()).eval()
    args = (torch.randn(2, 4000),)
    program = torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("wide") / "wide.pt2"
    torch.export.save(program, str(path))
    return path


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bnexport", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _when(proc: subprocess.Popen, condition, timeout: float = 180) -> None:
    """Poll until `condition()` holds while the run is still going."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before the moment came: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the moment to send the signal never came")
        time.sleep(0.002)


def _interrupted(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    assert out == ""  # no report, no verdict
    assert err.startswith(f"interrupted ({signal.Signals(sig).name})"), err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    return out, err


def _tree(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_sigint_as_verification_starts_is_an_interrupt_not_a_failure(wide_pt2, tmp_path):
    """The output is complete but not verified: it is removed, and no report is written."""
    before = wide_pt2.stat()
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = _start("fold", wide_pt2, "-o", out, "--json", report)
    _when(proc, out.exists)
    _, err = _interrupted(proc, signal.SIGINT)
    assert "removed" in err and str(out) in err and "not yet verified" in err
    assert _tree(tmp_path) == []
    assert _tree(wide_pt2.parent) == ["wide.pt2"]
    assert wide_pt2.stat().st_mtime_ns == before.st_mtime_ns


def test_sigterm_during_the_export_leaves_no_temporary_and_no_half_pair(wide_pt2, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _start("fold", wide_pt2, "-o", out, "--external-data")

    def writing() -> bool:
        return any(p.is_dir() and p.name.endswith(".tmp") for p in tmp_path.iterdir())

    _when(proc, writing)
    _interrupted(proc, signal.SIGTERM)
    assert _tree(tmp_path) == []  # no .out.onnx.XXXX.tmp/, no out.onnx, no out.onnx.data


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_sigint_while_loading_exits_130(wide_pt2, tmp_path):
    proc = _start("fold", wide_pt2, "-o", tmp_path / "out.onnx")
    fds = Path(f"/proc/{proc.pid}/fd")

    def reading_the_model() -> bool:
        try:
            return any(os.readlink(fd) == str(wide_pt2) for fd in fds.iterdir())
        except OSError:  # a descriptor closed while listed
            return False

    _when(proc, reading_the_model)
    _, err = _interrupted(proc, signal.SIGINT)
    assert "left no file" in err
    assert _tree(tmp_path) == []


def test_an_interrupt_a_library_turned_into_an_error_still_ends_the_run(tmp_path, monkeypatch):
    """onnxruntime interrupted while importing raises `ImportError: initialization failed`,
    which the verify stage reports as a comparison that could not run: the run must end as
    interrupted all the same, its output removed and no report written."""
    import bnexport.runs.fold as fold

    def interrupted_verify(reference, output, prep, opts, report, *args, **kw):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
        except Interrupted:
            report.verify_error = "ImportError: initialization failed"

    monkeypatch.setattr(fold, "verify_output", interrupted_verify)
    torch.manual_seed(0)
    program = torch.export.export(randomize_bn(SmallNet()).eval(), (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["fold", str(tmp_path / "m.pt2"), "-o", str(out), "--json", str(report)]
    with handling_signals(), pytest.raises(Interrupted) as caught:
        CliRunner().invoke(main, args, catch_exceptions=False)
    assert caught.value.exit_code == 130 and caught.value.removed == [str(out)]
    assert _tree(tmp_path) == ["m.pt2"]
    assert interrupted() is None  # the record ends with the block


# --------------------------------------------------------------------------- exit 2 first


@pytest.fixture()
def workdir(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    program = torch.export.export(
        model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(tmp_path / "m.pt2"))
    return tmp_path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _refused(workdir: Path, args: list, *phrases: str) -> str:
    before = _snapshot(workdir)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    assert _snapshot(workdir) == before  # nothing created, nothing changed
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]
    return result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize(
    "flag,extra",
    [("--json", []), ("--json", ["--external-data"]), ("--save-folded", [])],
)
def test_unwritable_report_or_program_path_is_refused_before_the_export(workdir, flag, extra):
    _refused(
        workdir,
        ["fold", workdir / "m.pt2", "-o", workdir / "ok.onnx", flag, "/proc/bnexport.out", *extra],
        "No file can be created in the output directory '/proc'",
    )


def test_a_report_that_fails_late_takes_the_export_with_it(workdir, monkeypatch):
    def full_disk(report, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bnexport.render.write_json", full_disk)
    args = ["fold", workdir / "m.pt2", "-o", workdir / "ok.onnx", "--external-data"]
    _refused(workdir, [*args, "--json", workdir / "r.json"], "Writing the report", "no file")


# --------------------------------------------------------------------------- damaged archives


def _overwrite_member(path: Path, member_suffix: str, offset: int = 8, size: int = 32) -> str:
    """Overwrite `size` bytes inside a stored member, leaving its recorded CRC as it was."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len + offset
    size = min(size, info.file_size - offset)
    data[start : start + size] = bytes(b ^ 0x5A for b in data[start : start + size])
    path.write_bytes(bytes(data))
    return info.filename


def test_corrupt_weight_inside_a_pt2_is_refused(workdir):
    bad = workdir / "bad.pt2"
    bad.write_bytes((workdir / "m.pt2").read_bytes())
    with zipfile.ZipFile(bad) as zf:
        weights = [i for i in zf.infolist() if "/data/weights/weight_" in i.filename]
    biggest = max(weights, key=lambda i: i.file_size).filename
    member = _overwrite_member(bad, biggest)
    _refused(workdir, ["fold", bad, "-o", workdir / "x.onnx"], f"'{member}'", "checksum")


def test_corrupt_tensor_inside_a_torch_save_archive_is_refused(workdir):
    bad = workdir / "bad.pt"
    bad.write_bytes((workdir / "sd.pt").read_bytes())
    member = _overwrite_member(bad, "data/0")
    args = ["fold", bad, "--arch", "tests.nets:small_net", "--input-shape", "1,1,8,8"]
    _refused(workdir, args, f"'{member}'", "checksum")


# --------------------------------------------------------------------------- pickles


class RunsACommand:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "save",
    [
        lambda obj, path: torch.save({"state_dict": obj}, path),
        lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
        lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
    ],
    ids=["zip", "legacy", "plain-pickle"],
)
def test_a_malicious_pickle_is_refused_as_a_pickle(workdir, save):
    marker = workdir.parent / f"{workdir.name}-ran"
    save(RunsACommand(marker), workdir / "evil.pt")
    out = _refused(
        workdir,
        ["fold", workdir / "evil.pt", "--input-shape", "1,1,8,8"],
        "pickle",
        "--trust-pickle",
        "torch.export",
        "state_dict",
        ".safetensors",
    )
    assert "posix.system" in out or "os.system" in out  # the unpickler's own reason
    assert "truncated" not in out and "corrupt" not in out
    assert not marker.exists()


# --------------------------------------------------------------------------- hostile data


def _x(rows: int = 6, dtype="float32") -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, 1, 8, 8)).astype(dtype)


def _with_nan() -> np.ndarray:
    x = _x()
    x[2, 0, 1, 1] = np.nan
    x[4, 0, 0, 0] = np.inf
    return x


LABELS = np.array([0, 1, 2, 0, 1, 2])
HOSTILE = {
    "nan-inf": ({"x": _with_nan()}, ["NaN or Inf", "2 of its 6 rows", "row 2"]),
    "complex": ({"x": _x().astype(np.complex64)}, ["complex", "imaginary part"]),
    "strings": ({"x": np.array([["a"]] * 6)}, ["not numbers"]),
    "zero-rows": ({"x": _x(0), "labels": LABELS[:0]}, ["0 rows"]),
    "label-99": ({"x": _x(), "labels": np.array([0, 1, 99, 0, 1, 2])}, ["from 0 to 2", "99"]),
    "label-neg": ({"x": _x(), "labels": np.array([0, 1, -5, 0, 1, 2])}, ["from 0 up", "-5"]),
    "label-half": ({"x": _x(), "labels": np.array([0, 1, 0.5, 0, 1, 2])}, ["integer", "0.5"]),
    "one-hot": ({"x": _x(), "labels": np.eye(3)[LABELS]}, ["one class index per row"]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_data_is_refused(workdir, case):
    arrays, phrases = HOSTILE[case]
    np.savez(workdir / "d.npz", **arrays)
    args = ["fold", workdir / "m.pt2", "-o", workdir / "x.onnx", "--data", workdir / "d.npz"]
    _refused(workdir, args, *phrases)


@pytest.mark.parametrize("case", ["nan-inf", "complex", "zero-rows", "label-99"])
def test_hostile_data_is_refused_by_recalibrate(workdir, case):
    arrays, phrases = HOSTILE[case]
    np.savez(workdir / "d.npz", **arrays)
    args = ["recalibrate", workdir / "m.pt2", "--data", workdir / "d.npz"]
    _refused(workdir, [*args, "-o", workdir / "r.pt2"], *phrases)


@pytest.mark.parametrize("case", ["nan-inf", "complex", "zero-rows"])
def test_hostile_data_is_refused_by_inspect(workdir, case):
    arrays, phrases = HOSTILE[case]
    np.savez(workdir / "d.npz", **arrays)
    _refused(workdir, ["inspect", workdir / "m.pt2", "--data", workdir / "d.npz"], *phrases)


def test_whole_number_float_labels_are_class_indices(workdir):
    np.savez(workdir / "d.npz", x=_x(), labels=LABELS.astype(np.float64))
    args = ["fold", workdir / "m.pt2", "-o", workdir / "x.onnx", "--data", workdir / "d.npz"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "accuracy on 6 labelled samples" in result.output


def test_an_archive_declaring_more_than_the_limit_is_refused_unread(workdir):
    """The header declares 16 GiB; the member holds no data at all, so reading it would fail
    with another message: the refusal comes from the header alone."""
    with zipfile.ZipFile(workdir / "big.npz", "w") as zf, zf.open("x.npy", "w") as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (2**26, 1, 8, 8)}
        np.lib.format.write_array_header_1_0(fh, header)
    args = ["fold", workdir / "m.pt2", "--data", workdir / "big.npz"]
    _refused(workdir, args, "16.0 GB", "more than the 512.0 MB", "nothing was read")


# --------------------------------------------------------------------------- the real cause


def test_output_inside_a_regular_file(workdir):
    out = _refused(
        workdir, ["fold", workdir / "m.pt2", "-o", workdir / "sd.pt" / "x.onnx"], "is a file"
    )
    assert "does not exist" not in out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_output_in_proc(workdir):
    _refused(workdir, ["fold", workdir / "m.pt2", "-o", "/proc/x.onnx"], "No file can be created")


def test_report_onto_a_fifo_is_refused(workdir):
    os.mkfifo(workdir / "pipe")
    _refused(workdir, ["fold", workdir / "m.pt2", "--json", workdir / "pipe"], "not a regular file")


def test_safetensors_with_an_absurd_header_length(workdir):
    (workdir / "w.safetensors").write_bytes(struct.pack("<Q", 2**40) + b'{"w": 1}')
    out = _refused(workdir, ["fold", workdir / "w.safetensors"], "safetensors", "corrupt")
    assert "text file" not in out


def test_onnx_external_data_outside_its_folder_is_not_read(tmp_path):
    model = onnx.load(str(DIGITS_ONNX))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin")
    (folder / "w.bin").rename(tmp_path / "w.bin")
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(proto, str(folder / "m.onnx"))
    out = _refused(folder, ["fold", folder / "m.onnx"], "'../w.bin'", "outside the model's folder")
    assert "onnxruntime cannot load" not in out and "custom-op" not in out
