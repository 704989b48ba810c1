"""The one place that writes files: atomic writes into the destination's directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bnexport.errors import BadInputError


def check_writable(path: Path, *, inputs: list[Path] = ()) -> None:
    """Raise BadInputError unless `path` can be created without touching any of `inputs`."""
    target = path.resolve()
    for source in inputs:
        if source.exists() and target == source.resolve():
            raise BadInputError(
                f"The output path '{path}' is the input file itself, which would be overwritten. "
                "Choose another output name with -o (the default is the model's name with .onnx)."
            )
    if target.is_dir():
        raise BadInputError(
            f"The output path '{path}' is a directory. Give a file name, for example "
            f"-o {path / 'model.onnx'}."
        )
    parent = target.parent
    if not parent.is_dir():
        raise BadInputError(
            f"The output directory '{parent}' does not exist. Create it first or choose an "
            "existing directory with -o."
        )
    if not os.access(parent, os.W_OK):
        raise BadInputError(
            f"The output directory '{parent}' is not writable. Choose a directory you can "
            "write to with -o."
        )


def _normal_permissions(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _normal_permissions(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_file_set(path: Path) -> Iterator[Path]:
    """Yield `path`'s own name inside a fresh directory beside it; the block writes that file
    and any companions next to it (`OUT.onnx.data`, which the file names relatively).

    Only if the block succeeds is the set moved into place: first the old file at `path` is
    removed, then the companions are moved, then the file itself. An interruption therefore
    leaves the old set, no file at `path`, or the new set: never a file beside the wrong
    companions, never a half-written file.
    """
    path = Path(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_dir / path.name
        written = [p for p in tmp_dir.iterdir() if p.name != path.name]
        if written and path.is_file():
            path.unlink()
        for companion in written:
            _normal_permissions(companion)
            os.replace(companion, path.parent / companion.name)
        _normal_permissions(tmp_dir / path.name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
