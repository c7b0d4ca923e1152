"""Safe loading of PyTorch files: tell a file's format by its bytes, unpickle with weights_only=True, and refuse
tensors the file does not back (expanded or overlapping views, declared sizes far beyond the file's) before
anything is materialised. Every failure is a one-line CorruptFileError or UnsafeFileError."""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import CorruptFileError, UnsafeFileError


def weights_format(path: str | os.PathLike) -> str | None:
    """'safetensors', 'torch' (a zip archive or a legacy pickle) or None, from the file's first bytes, whatever
    its name says. A safetensors file is an 8-byte little-endian header length followed by a JSON object."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03",
                                                                                          b"\x04", b"\x05")):
        return "torch"
    return None


_UNSAFE_MARKERS = ("GLOBAL", "Can only create new object", "Can only build", "reduce for unrecognized function",
                   "TorchScript")
MAX_DECLARED_RATIO, DECLARED_SLACK = 4, 16 << 20  # tensors may share storage (tied weights), within reason


def safe_torch_load(path: str | os.PathLike):
    """torch.load with weights_only=True; every failure is a one-line typed error.

    A zip file is memory-mapped first, so every tensor's declared size can be checked against the bytes the
    file really holds before anything is copied: weights_only accepts stride-0 views, and a 2 kB file can
    declare a 16 GiB tensor (torch.zeros(1).expand(...)). Only then are the tensors copied out of the map."""
    path = Path(path)
    kind = weights_format(path)
    if kind != "torch":
        raise CorruptFileError(f"{path}: " + ("a safetensors file, not a PyTorch file" if kind
                                              else "not a PyTorch or safetensors file"))
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    # torch.load reads any path named *.safetensors as safetensors: give it the open file then (no mmap, but
    # storages are still only as large as the file's records; the views are checked below all the same)
    mapped = zipped and not path.name.endswith(".safetensors")
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": the refusal says it
            obj = torch.load(path if mapped else f, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if any(m in msg for m in _UNSAFE_MARKERS) or _imports_code(path, zipped):
            raise UnsafeFileError(
                f"{path}: refusing to unpickle code (the file needs more than weights_only=True allows); "
                "save a plain state dict with torch.save(model.state_dict()) or use .safetensors"
            ) from None
        raise CorruptFileError(f"{path}: not a readable PyTorch file ({_weights_only_reason(msg)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, MemoryError, OverflowError) as e:
        if "TorchScript" in str(e):
            raise UnsafeFileError(f"{path}: a TorchScript archive (code), not a state dict; refusing to load it") from None
        raise CorruptFileError(f"{path}: truncated or corrupt PyTorch file ({_first_line(str(e))})") from None
    check_declared_sizes(obj, path)
    return _copy_out_of_map(obj) if mapped else obj


def check_declared_sizes(obj, path: Path) -> None:
    """Refuse tensors whose materialised size the file does not back: expanded (stride-0) or overlapping views,
    views reaching past their storage, and (shared storage) declared bytes far beyond the file's size."""
    declared = 0
    for name, t in _tensors(obj):
        if t.layout != torch.strided:
            raise CorruptFileError(f"{path}: {name} is a {t.layout} tensor; expected dense weights")
        if t.numel() == 0:
            continue
        if not _dense_view(t):
            raise CorruptFileError(f"{path}: {name} is an expanded or overlapping view (shape {tuple(t.shape)}, "
                                   f"strides {t.stride()}); refusing to materialise it")
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
            raise CorruptFileError(f"{path}: {name} reaches past the bytes its storage holds")
        declared += t.numel() * t.element_size()
    size = path.stat().st_size
    if declared > MAX_DECLARED_RATIO * size + DECLARED_SLACK:
        raise CorruptFileError(f"{path}: its tensors declare {declared >> 20} MiB, far more than the file's "
                               f"{size >> 10} KiB (views of shared storage); refusing to materialise them")


def _dense_view(t: torch.Tensor) -> bool:
    """No two indices share memory: sorted by stride, each dimension steps over the whole previous span."""
    span = 1
    for stride, n in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < span:
            return False
        span = stride * n
    return True


def _tensors(obj) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in nested containers (iterative: pickles can nest deeply)."""
    stack, seen = [("", obj)], set()
    while stack:
        name, o = stack.pop()
        if isinstance(o, torch.Tensor):
            yield name or "the tensor", o
        elif isinstance(o, (dict, list, tuple, set, frozenset)) and id(o) not in seen:
            seen.add(id(o))
            items = o.items() if isinstance(o, dict) else enumerate(o)
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in items)


def _copy_out_of_map(obj):
    """Point every tensor at a private copy of its storage, so nothing stays tied to the memory-mapped file
    (which may be replaced later); the structure, views and Parameters are kept as they are."""
    copies: dict[tuple[int, int], torch.UntypedStorage] = {}
    done: set[int] = set()
    with torch.no_grad():
        for _, t in _tensors(obj):
            if id(t) in done:
                continue
            done.add(id(t))
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in copies:
                copies[key] = storage.clone()
            copy = copies[key]
            t.set_(copy, t.storage_offset(), t.shape, t.stride())
    return obj


def _imports_code(path: Path, zipped: bool, limit: int = 64 << 20) -> bool:
    """Whether the file's pickle(s) import anything beyond torch's tensor rebuilding (read with pickletools,
    nothing executed): tells a code-carrying pickle the weights-only unpickler could not parse (e.g. protocol 4
    frames) from a corrupt one."""
    try:
        if zipped:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")][:1]
                data = z.open(names[0]).read(limit) if names else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    imports, strings, pos = [], [], 0
    while pos < len(data):
        end = len(data)
        try:
            for op, arg, at in pickletools.genops(data[pos:]):
                if op.name in ("GLOBAL", "INST"):
                    imports.append(str(arg).split(" ")[0])
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    imports.append(strings[-2])
                elif isinstance(arg, str):
                    strings.append(arg)
                end = at
            pos += end + 1
        except Exception:  # corrupt bytes: judge by what was read so far
            break
    return any(m.split(".")[0] not in ("torch", "collections", "_codecs") for m in imports)


def _weights_only_reason(msg: str) -> str:
    """The unpickler's own reason inside torch's long weights_only message."""
    m = re.search(r"^\s*((?:Unsupported|Trying|Can only|Invalid)\b.*)$", msg, re.MULTILINE)
    return m.group(1).strip()[:200] if m else _first_line(msg)


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:200] if msg.strip() else "unknown error"
