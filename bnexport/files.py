"""The one place that writes files: atomic writes into the destination's directory."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
