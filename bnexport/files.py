"""The one place that writes files: atomic writes into the destination's directory.

A run's writes are all or nothing (`all_or_nothing`): the files it moved into place are removed
again when it does not complete, so an interrupted or failed run leaves none of them. Moving a
file into place and every clean-up are `held()` sections, which a signal cannot cut in half.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bnexport.errors import BadInputError, Interrupted
from bnexport.interrupts import held, interrupted, raise_if_interrupted

_temporaries: set[Path] = set()  # temporary files and directories of the writes in progress
# per open all_or_nothing block: each file moved into place, with its (st_dev, st_ino)
_records: list[list[tuple[Path, tuple[int, int]]]] = []


def check_writable(path: Path, *, inputs: list[Path] = ()) -> None:
    """Raise BadInputError unless `path` can be created without touching any of `inputs`.

    The directory is tested by creating (and removing) a file in it: permissions alone do not
    tell whether a file system such as /proc takes new files.
    """
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
    if target.exists() and not target.is_file():
        raise BadInputError(
            f"The output path '{path}' exists and is not a regular file (a device, pipe or "
            "socket). bnexport writes a new file and renames it over the old one, which would "
            "replace it. Give the path of a regular file."
        )
    parent = target.parent
    if not parent.is_dir():
        blocker = next((p for p in parent.parents if p.exists()), None)
        if parent.exists() or (blocker is not None and not blocker.is_dir()):
            raise BadInputError(
                f"The output path '{path}' goes through '{parent if parent.exists() else blocker}'"
                ", which is a file, not a directory. Choose a path inside a directory."
            )
        raise BadInputError(
            f"The output directory '{parent}' does not exist. Create it first or choose an "
            "existing directory with -o."
        )
    if not os.access(parent, os.W_OK):
        raise BadInputError(
            f"The output directory '{parent}' is not writable. Choose a directory you can "
            "write to with -o."
        )
    try:
        with held():
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise BadInputError(
            f"No file can be created in the output directory '{parent}' ({exc.strerror}), so "
            f"'{path}' cannot be written. Choose a directory of an ordinary file system that "
            "you can write to."
        ) from None


def _normal_permissions(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _moved_into_place(path: Path) -> None:
    st = path.stat()
    for record in _records:
        record.append((path, (st.st_dev, st.st_ino)))


def _remove_if_ours(path: Path, identity: tuple[int, int]) -> bool:
    """Remove `path` if it is still the file this run moved there (another run may have
    replaced it since)."""
    try:
        st = path.stat()
        if (st.st_dev, st.st_ino) != identity:
            return False
        path.unlink()
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    _temporaries.discard(path)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds
    (and no signal came)."""
    path = Path(path)
    tmp_path = None
    try:
        with held():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            _temporaries.add(tmp_path)
        yield tmp_path
        raise_if_interrupted()
        with held():
            _normal_permissions(tmp_path)
            os.replace(tmp_path, path)
            _moved_into_place(path)
    finally:
        if tmp_path is not None:
            with held():
                _remove(tmp_path)


@contextlib.contextmanager
def atomic_file_set(path: Path) -> Iterator[Path]:
    """Yield `path`'s own name inside a fresh directory beside it; the block writes that file
    and any companions next to it (`OUT.onnx.data`, which the file names relatively).

    Only if the block succeeds (and no signal came) is the set moved into place: first the old
    file at `path` is removed, then the companions are moved, then the file itself, in one
    section no signal interrupts. A crash in between (SIGKILL, power loss) leaves the old set,
    no file at `path`, or the new set: never a file beside the wrong companions, never a
    half-written file.
    """
    path = Path(path)
    tmp_dir = None
    try:
        with held():
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp_dir = Path(tmp)
            _temporaries.add(tmp_dir)
        yield tmp_dir / path.name
        raise_if_interrupted()
        with held():
            written = [p for p in tmp_dir.iterdir() if p.name != path.name]
            if written and path.is_file():
                path.unlink()
            for companion in written:
                _normal_permissions(companion)
                os.replace(companion, path.parent / companion.name)
                _moved_into_place(path.parent / companion.name)
            _normal_permissions(tmp_dir / path.name)
            os.replace(tmp_dir / path.name, path)
            _moved_into_place(path)
    finally:
        if tmp_dir is not None:
            with held():
                _remove(tmp_dir)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Keep the files moved into place within the block only if the block completes.

    An exception, an interrupt included, removes them again (a file they replaced is not
    restored), with any temporary file a write left behind, so a run ends with all its
    files or none: never an output that is complete but was not verified. A signal that a
    library turned into an error of its own ends the block as `Interrupted`.
    """
    moved: list[tuple[Path, tuple[int, int]]] = []
    _records.append(moved)
    try:
        yield
        raise_if_interrupted()
    except BaseException as exc:
        signum = interrupted()
        with held():
            removed = [str(p) for p, identity in reversed(moved) if _remove_if_ours(p, identity)]
            if signum is not None:  # a signal between creating a temporary and its clean-up
                for leftover in list(_temporaries):
                    _remove(leftover)
        removed.reverse()
        if isinstance(exc, Interrupted):
            exc.removed += removed
        elif signum is not None:
            raise Interrupted(signum, removed) from exc
        raise
    finally:
        _records[:] = [r for r in _records if r is not moved]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
