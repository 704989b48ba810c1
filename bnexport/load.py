"""The load stage: a checkpoint becomes a `Source` that knows its format, its input specs
and an eval-mode reference callable, and gives the later stages one torch.export program.

Accepted formats (detected from the file's content, not its name):

* torch.export program (`torch.export.save`, .pt2): safe and self-describing.
* state_dict (`torch.save(model.state_dict())` or `.safetensors`) plus `--arch MODULE:CALLABLE`.
* whole pickled nn.Module (`torch.save(model)`): only with `trust_pickle=True`.
* TorchScript archive (`torch.jit.save`): converted to a torch.export program here (it needs
  input shapes), so the later stages see a program like any other.
* ONNX model (`bnexport.load_onnx`): folded by the ONNX engine; its reference is onnxruntime
  on the original file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from bnexport.errors import BadInputError, summarize_exception
from bnexport.inputs import InputSpec, example_inputs, parse_shape
from bnexport.load_onnx import load_onnx, npz_shapes, resolve_onnx_specs
from bnexport.source import (
    ONNX,
    Source,
    program_input_specs,
)
from bnexport.trace import TRAINING_MODE_WARNING, in_training_mode

PT2 = "torch.export program"
STATE_DICT = "state_dict"
SAFETENSORS = "safetensors state_dict"
PICKLED_MODULE = "pickled nn.Module"
TORCHSCRIPT = "TorchScript archive"

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _fail(message: str) -> BadInputError:
    return BadInputError(message)


def _check_file(path: Path) -> bytes:
    if not path.exists():
        raise _fail(f"The model file '{path}' does not exist. Check the path and try again.")
    if path.is_dir():
        raise _fail(
            f"'{path}' is a directory, not a model file. Pass the checkpoint file itself "
            "(.pt2, .pt/.pth, .safetensors or a TorchScript archive)."
        )
    if not os.access(path, os.R_OK):
        raise _fail(f"The model file '{path}' is not readable. Check its permissions.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise _fail(f"The model file '{path}' cannot be read ({exc.strerror}).") from None
    if not head:
        raise _fail(
            f"The model file '{path}' is empty (0 bytes). It was probably cut off while being "
            "saved; save the checkpoint again."
        )
    return head


def detect_format(path: Path) -> str:
    """Name the checkpoint format of `path`, or raise BadInputError naming what was found."""
    head = _check_file(path)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            raise _fail(
                f"The model file '{path}' looks like a PyTorch archive but is truncated or "
                "corrupt (its zip directory cannot be read). Save the checkpoint again."
            ) from None
        if any(n.endswith("archive_format") or "/models/" in n for n in names):
            return PT2
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n.endswith("data.pkl") for n in names):
            return STATE_DICT
        raise _fail(f"'{path}' is a zip archive but not a PyTorch checkpoint.")
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        size = path.stat().st_size
        if 0 < header_len < size:
            return SAFETENSORS
        if not _is_text(head[:8]):  # a length, not the first characters of a text
            raise _fail(
                f"'{path}' looks like a safetensors file, but its header claims {header_len} "
                f"bytes and the whole file has {size}: it is truncated or corrupt. Save or "
                "download the checkpoint again."
            )
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return STATE_DICT  # legacy (non-zip) torch.save
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return ONNX  # a ModelProto starts with its ir_version (field 1, varint)
    try:
        head.decode("utf-8")
        kind = "a text file"
    except UnicodeDecodeError:
        kind = "binary data of an unknown format"
    raise _fail(
        f"'{path}' is {kind}, not a model checkpoint. Accepted formats: a torch.export program "
        "(.pt2), a state_dict (.pt/.pth/.safetensors) with --arch, a TorchScript archive, "
        "a pickled nn.Module with --trust-pickle, or an ONNX model (.onnx)."
    )


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _check_archive(path: Path) -> None:
    """Refuse a zip-based checkpoint (.pt2, torch.save, TorchScript) whose members do not
    match the checksums the archive records: torch reads them without checking, so damaged
    weights would load as numbers."""
    try:
        with zipfile.ZipFile(path) as zf:
            damaged = zf.testzip()
    except Exception as exc:  # noqa: BLE001 - any failure to read a member is damage
        raise _fail(
            f"The model file '{path}' is a PyTorch archive that is truncated or corrupt "
            f"({summarize_exception(exc, 200)}). Save or download the checkpoint again."
        ) from None
    if damaged is not None:
        raise _fail(
            f"The model file '{path}' is corrupt: its member '{damaged}' does not match the "
            "checksum the archive records for it, so its contents changed after it was "
            "saved. Save or download the checkpoint again."
        )


def import_callable(spec: str):
    """Resolve 'package.module:callable' or 'path/to/file.py:callable'."""
    if ":" not in spec:
        raise _fail(
            f"--arch '{spec}' must be MODULE:CALLABLE, for example mypkg.nets:resnet50 or "
            "nets.py:build."
        )
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py") or os.sep in where:
            file = Path(where)
            if not file.is_file():
                raise FileNotFoundError(where)
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules.setdefault(file.stem, module)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except Exception as exc:  # noqa: BLE001 - any import failure gets the same answer
        raise _fail(
            f"--arch '{spec}': cannot import '{where}' ({summarize_exception(exc)}). Give an "
            "importable module (run from the directory that contains it) or a path to a .py file."
        ) from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise _fail(f"--arch '{spec}': '{where}' has no callable named '{name}'.")
    return fn


def build_arch(spec: str) -> nn.Module:
    fn = import_callable(spec)
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            f"--arch '{spec}' raised {summarize_exception(exc)} when called with no arguments. "
            "The callable must build the architecture without arguments."
        ) from None
    if not isinstance(model, nn.Module):
        raise _fail(
            f"--arch '{spec}' returned {type(model).__name__!r}, not a torch.nn.Module. Point it "
            "at a function or class that builds the model."
        )
    return model


def _is_tensor_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Find the state_dict inside common training-checkpoint containers."""
    if _is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                return obj[key]
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise _fail(
        f"The checkpoint holds no state_dict (found {keys}). Expected a dict of tensors, or one "
        f"under one of the keys {list(_CONTAINER_KEYS)}."
    )


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Load `state` strictly, stripping DataParallel/Lightning prefixes when that makes it fit."""
    expected = set(model.state_dict())
    for prefix in ("", *_PREFIXES):
        if prefix and not all(k.startswith(prefix) for k in state):
            continue
        candidate = {k[len(prefix) :]: v for k, v in state.items()}
        if set(candidate) == expected:
            state = candidate
            break
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise _fail(
            f"The state_dict does not fit the architecture from --arch '{arch}': "
            f"{'; '.join(parts)}. Check that --arch builds the same model that was trained."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise _fail(
            f"The state_dict does not fit the architecture from --arch '{arch}': {detail[:600]}"
        ) from None


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


class _PickleRefused(Exception):
    """torch's safe unpickler (weights_only) refused the file; `reason` is its own words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_WEIGHTS_ONLY_FAILED = "Weights only load failed"


def _unpickler_reason(text: str) -> str:
    """The safe unpickler's own reason, without torch's advice around it: the first sentence
    after 'WeightsUnpickler error:', or on the first line, or of the first paragraph after
    torch's preamble."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = text.splitlines()[0].removeprefix(_WEIGHTS_ONLY_FAILED).strip(" .") if text else ""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    rest = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")]
    if found:
        reason = found.group(1)
    elif first and not first.startswith(("In PyTorch", "This file")):
        reason = first
    else:
        reason = rest[0] if rest else ""
    reason = " ".join(reason.split()).split(". ")[0].rstrip(".")
    return reason[:200]


def _torch_load(path: Path, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - a refusal of the safe unpickler, else damage
        refused = isinstance(exc, pickle.UnpicklingError) and weights_only
        if refused and str(exc).startswith(_WEIGHTS_ONLY_FAILED):
            raise _PickleRefused(_unpickler_reason(str(exc))) from None
        raise _fail(
            f"The checkpoint '{path}' is truncated or corrupt and cannot be loaded "
            f"({summarize_exception(exc, 200)}). Save it again."
        ) from None


def _pickle_refusal(path: Path, reason: str) -> BadInputError:
    why = f" ({reason})" if reason else ""
    return _fail(
        f"'{path}' is a pickle that the safe loader refuses{why}: loading it in full runs "
        "arbitrary code from the file, so bnexport does not. If you trust its source, add "
        "--trust-pickle. The safe formats need no trust: a torch.export program "
        "(torch.export.save, .pt2), or a state_dict (torch.save(model.state_dict()) or "
        ".safetensors) with --arch MODULE:CALLABLE."
    )


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False) -> Source:
    """Load a checkpoint in any accepted format, refusing unsafe pickles unless trusted."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == ONNX:
        return load_onnx(path)
    if zipfile.is_zipfile(path):
        _check_archive(path)
    if fmt == PT2:
        try:
            program = torch.export.load(path)
        except Exception as exc:  # noqa: BLE001
            raise _fail(
                f"The torch.export program '{path}' cannot be loaded "
                f"({summarize_exception(exc, 200)}). It may be truncated or saved by an "
                "incompatible torch."
            ) from None
        return Source(program, fmt, str(path), program_input_specs(program))
    if fmt == TORCHSCRIPT:
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise _fail(
                f"The TorchScript archive '{path}' cannot be loaded ({summarize_exception(exc)}). "
                "It may be corrupt."
            ) from None
        return Source(scripted, fmt, str(path))
    if fmt == SAFETENSORS:
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise _fail(
                f"The safetensors file '{path}' is corrupt or truncated "
                f"({summarize_exception(exc)})."
            ) from None
        return _from_state_dict(state, arch, path, fmt)
    try:
        obj = _torch_load(path, weights_only=True)
    except _PickleRefused as refused:
        if not trust_pickle:
            raise _pickle_refusal(path, refused.reason) from None
        obj = _load_trusted_pickle(path)
    if isinstance(obj, nn.Module):
        return Source(obj, PICKLED_MODULE, str(path))
    return _from_state_dict(unwrap_state_dict(obj), arch, path, STATE_DICT)


def _load_trusted_pickle(path: Path):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise _fail(
            f"The pickled model '{path}' refers to code that cannot be imported here "
            f"({summarize_exception(exc)}). Run from the directory of the training code, or "
            "save a state_dict and use --arch."
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            f"The checkpoint '{path}' is truncated or corrupt and cannot be loaded "
            f"({summarize_exception(exc)})."
        ) from None


def _from_state_dict(state, arch: str | None, path: Path, fmt: str) -> Source:
    if arch is None:
        raise _fail(
            f"'{path}' is a {fmt} (weights only, no architecture). Add --arch MODULE:CALLABLE "
            "naming a function that builds the model, for example --arch mypkg.nets:resnet50 "
            "or --arch nets.py:build."
        )
    state = unwrap_state_dict(state)
    model = build_arch(arch)
    fit_state_dict(model, state, arch)
    return Source(model.eval(), fmt, str(path))


def torchscript_to_program(scripted, args: tuple) -> torch.export.ExportedProgram:
    """Convert a TorchScript module to a torch.export program for folding."""
    from torch._export.converter import TS2EPConverter

    try:
        return TS2EPConverter(scripted, args).convert()
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            f"This TorchScript archive could not be converted for folding "
            f"({summarize_exception(exc, 200)}). Export the model from its Python code with "
            "torch.export.save (or save its state_dict and use --arch) instead."
        ) from None


def _check_against_program(given: list[InputSpec], recorded: list[InputSpec]) -> None:
    if len(given) != len(recorded):
        raise _fail(
            f"The model takes {len(recorded)} input(s) ({', '.join(s.name for s in recorded)}) "
            f"but {len(given)} --input-shape flag(s) were given. Give one per input, or none "
            "to use the shapes the checkpoint records."
        )
    for g, r in zip(given, recorded):
        fixed = [
            (i, d)
            for i, d in enumerate(r.shape)
            if i > 0 or r.dynamic_batch is False or not r.batched
        ]
        if len(g.shape) != len(r.shape) or any(g.shape[i] != d for i, d in fixed):
            expected = ", ".join(
                "batch" if i == 0 and r.dynamic_batch and r.batched else str(d)
                for i, d in enumerate(r.shape)
            )
            raise _fail(
                f"The input shape {g.shape} does not fit input '{r.name}': the model expects "
                f"({expected}). Fix --input-shape, or leave it out to use the recorded shape."
            )


def resolve_input_specs(source: Source, shapes: list[str]) -> list[InputSpec]:
    """Input specs from --input-shape flags (checked against a program's own), else the
    checkpoint's."""
    recorded = source.input_specs or []
    if shapes and recorded:
        given = [
            InputSpec(r.name, parse_shape(t), r.dtype, r.dynamic_batch, r.batched)
            for t, r in zip(shapes, recorded)
        ] + [
            InputSpec(f"input_{i}", parse_shape(t))
            for i, t in enumerate(shapes[len(recorded) :], len(recorded))
        ]
        _check_against_program(given, recorded)
        return given
    if shapes:
        names = source.input_names
        return [
            InputSpec(names[i] if i < len(names) else f"input_{i}", parse_shape(text))
            for i, text in enumerate(shapes)
        ]
    if recorded:
        return recorded
    raise _fail(
        f"'{source.path}' is a {source.format}, which does not record its input shapes. Give "
        "one --input-shape per forward input, batch first, for example --input-shape "
        "1,3,224,224."
    )


def load_source(
    path: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shapes: list[str] = (),
    static_batch: bool = False,
    data: Path | None = None,
) -> Source:
    """Load any accepted model with its input specs resolved; TorchScript is converted to a
    torch.export program here, so every later stage sees a module, a program or an ONNX
    model. An ONNX model's open dims come from `input_shapes` (NAME=DIMS) or `data`."""
    source = load_model(path, arch=arch, trust_pickle=trust_pickle)
    if source.is_onnx:
        specs = resolve_onnx_specs(source.input_specs, list(input_shapes), npz_shapes(data))
    else:
        specs = resolve_input_specs(source, list(input_shapes))
    if static_batch and source.is_onnx:
        source.warnings.append(
            "--static-batch has no effect on an ONNX input: the folded file keeps the input "
            "dims the original declares"
        )
    elif static_batch:
        specs = [replace(s, dynamic_batch=False) for s in specs]
    source.input_specs = specs
    if source.format == TORCHSCRIPT:
        args = example_inputs(specs, dynamic=source.dynamic_batch)
        source.model = torchscript_to_program(source.model, args)
    elif isinstance(source.model, nn.Module) and in_training_mode(source.model):
        source.warnings.append(TRAINING_MODE_WARNING)
    return source
