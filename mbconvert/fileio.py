"""Small file helpers: atomic output folders and files, safe torch loading, JSON writing."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import CorruptFileError, UnsafeFileError


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it into place only if the block succeeds.

    Existing files in `final` that the block did not write are kept (the new files replace same-named
    ones), so `mbconvert export out/` can add `out/export/` to a converted model folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the output should get the usual permissions
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(final)
        if not final.exists():
            os.replace(tmp, final)
        else:
            for item in tmp.iterdir():
                dest = final / item.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif dest.exists():
                    dest.unlink()
                os.replace(item, dest)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safe_torch_load(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; turn every failure into a one-line typed error."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise UnsafeFileError(
                f"{path}: refusing to unpickle code (the file needs more than weights_only=True allows); "
                "save a plain state dict with torch.save(model.state_dict()) or use .safetensors"
            ) from None
        raise CorruptFileError(f"{path}: not a readable PyTorch file ({_first_line(msg)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CorruptFileError(f"{path}: truncated or corrupt PyTorch file ({_first_line(str(e))})") from None
    return obj


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:200] if msg.strip() else "unknown error"
