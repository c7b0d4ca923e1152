"""File helpers that never destroy or mix the user's files (whole-folder swaps, ownership checks, atomic files,
one-line OutputErrors, cleanup after killed runs). Safe loading of torch files is in mbconvert.safeload.

torch is imported only inside atomic_torch_save: importing this module (e.g. through mbconvert.report from the
gate) must stay cheap."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .errors import OutputError

MARKER = ".mbconvert"  # {"tool": "mbconvert", "version": ..., "kind": ...} in every folder atomic_dir writes
_LIVE: set[str] = set()  # temp paths this process is using now: the stale sweep leaves them alone
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # the disk, not the input, failed


# ----------------------------------------------------------------------------------------------- ownership
def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker `atomic_dir` left in `folder`; None when mbconvert did not write the folder."""
    path = Path(folder) / MARKER
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "mbconvert" else None


def check_output_dir(out: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False) -> Path:
    """Refuse, before any work is done, an output folder mbconvert must not write; returns Path(out).

    OutputError (one line) when:
    - `out` is, is inside, or contains one of `sources` (after resolving symlinks), even with overwrite=True:
      writing there would replace the inputs;
    - a parent of `out` is a file or a dangling symlink, or the nearest existing parent is not writable;
    - unless overwrite=True: `out` is a file, a dangling symlink, or a non-empty folder without mbconvert's marker.
    A missing or empty folder, or one mbconvert wrote (it has the marker), passes without overwrite. What a killed
    run left beside `out` is cleaned up first (sweep_stale), so the check sees what the next write will see.
    """
    out = Path(out)
    sweep_stale(out)
    real = Path(os.path.realpath(out))
    for src in sources:
        if src is None:
            continue
        s = Path(os.path.realpath(src))
        if real == s or s in real.parents or real in s.parents:
            how = "is" if real == s else "is inside" if s in real.parents else "contains"
            raise OutputError(f"{out}: the output {how} the input {src}; choose another output folder "
                              "(writing there would replace the input)")
    _check_target(out, overwrite)
    return out


def _check_target(final: Path, overwrite: bool) -> None:
    """The checks of check_output_dir that need no sources (atomic_dir repeats them)."""
    _check_parents(final)
    if os.path.islink(final) and not os.path.exists(final):
        if not overwrite:
            raise OutputError(f"{final}: is a dangling symlink (to {os.readlink(final)}); remove it, choose another "
                              "output folder, or pass --overwrite to replace the link")
    elif os.path.exists(final) and not os.path.isdir(final):
        if not overwrite:
            raise OutputError(f"{final}: is a file, not a folder; choose another output folder or pass --overwrite "
                              "to replace it")
    elif os.path.isdir(final) and not overwrite and read_marker(final) is None:
        with _as_output_error(final, "cannot read the folder"):
            foreign = bool(os.listdir(final))
        if foreign:
            raise OutputError(f"{final}: holds files mbconvert did not write; choose a new or empty folder, or pass "
                              "--overwrite to replace it")


def _check_parents(final: Path) -> None:
    """The nearest existing parent of `final` must be a writable folder (not a file, not a dangling link)."""
    p = Path(os.path.abspath(final)).parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not os.path.isdir(p):
        what = "a dangling symlink" if os.path.islink(p) else "a file"
        raise OutputError(f"{final}: {p} is {what}, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{final}: cannot write in {p} (permission denied or a read-only file system)")


# ----------------------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, kind: str = "output", keep: Iterable[str] = (),
               overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; when the block succeeds it replaces `final` AS A WHOLE.

    - A reader sees the old `final` or the new one, never a mix: the swap is one renameat2(RENAME_EXCHANGE) where
      the OS has it, else two renames (old -> .NAME.old-PID-X, new -> NAME; the old is put back if the second
      fails). A kill -9 between the two is repaired by the next call (see sweep_stale).
    - Nothing of the old folder is kept by default. `keep` names top-level entries (e.g. ("export", "report")) to
      carry over from the old folder when the block did not write them: hard-linked (or copied) into the temp
      folder before the swap, so they survive in the new folder and the swap stays whole.
    - The new folder gets the marker (MARKER: tool, version, kind) and the usual permissions (0777 & ~umask); its
      files are fsynced before the swap.
    - Unless overwrite=True, OutputError before the block runs when `final` is a file, a dangling symlink, or a
      non-empty folder without the marker. A symlink to a folder is followed: the target is replaced, the link kept.
    - On any failure the temp folder is removed and `final` is untouched; a full/read-only disk inside the block
      and every failed step of ours become one-line OutputErrors (other exceptions pass through unchanged).
    - Stale temp siblings of killed earlier runs (.NAME.tmp-PID-*, the PID gone) are removed first.
    """
    final = _resolve_target(final)
    keep = _plain_names(keep)
    sweep_stale(final)
    _check_target(final, overwrite)
    tmp = _make_temp_dir(final)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _DISK_ERRNOS and not isinstance(e, OutputError):
                raise _output_error(final, f"{os.strerror(e.errno)} while writing (nothing was changed)", e) from None
            raise
        _check_target(final, overwrite)  # the folder may have changed while the block ran
        with _as_output_error(final, "could not put the new folder in place"):
            _carry_over(final, tmp, keep)
            atomic_write_text(tmp / MARKER, _marker_text(kind))
            _fsync_tree(tmp)
            _swap(tmp, final)
    finally:
        _LIVE.discard(str(tmp))
        _remove(tmp)


def sweep_stale(final: str | os.PathLike) -> list[Path]:
    """Clean up what killed runs left for `final`; returns the removed paths.

    When `final` is missing but a killed swap parked the old folder aside (.NAME.old-PID-X), that folder is put
    back first. Then every sibling named exactly .NAME.tmp-PID-X or .NAME.old-PID-X whose process is gone (or is
    this process, not using it) is removed; a symlink is unlinked, never followed. Call it before reading a folder
    that a killed run may have been replacing.
    """
    final = Path(os.path.abspath(final))
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")
    try:
        names = sorted(os.listdir(final.parent))
    except OSError:
        return []
    stale = [(m.group(1), final.parent / n) for n in names
             if (m := pattern.fullmatch(n)) and _abandoned(int(m.group(2)), final.parent / n)]
    parked = [p for what, p in stale if what == "old" and os.path.isdir(p) and not os.path.islink(p)]
    if parked and not os.path.lexists(final):
        newest = max(parked, key=lambda p: os.lstat(p).st_ctime_ns)
        with contextlib.suppress(OSError):
            os.rename(newest, final)
    removed = [p for _, p in stale if os.path.lexists(p)]
    for p in removed:
        _remove(p)
    return removed


def _abandoned(pid: int, path: Path) -> bool:
    """True when the process that made `path` is gone (or is this one and no longer uses it)."""
    if pid == os.getpid():
        return str(path) not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        pass
    return False


def _resolve_target(final: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(final))
    if path.is_symlink() and path.is_dir():
        path = Path(os.path.realpath(path))
    if not path.name:
        raise OutputError(f"{final}: not a folder that can be replaced")
    return path


def _plain_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    for n in names:
        if not isinstance(n, str) or n in ("", ".", "..", MARKER) or "/" in n or os.sep in n:
            raise ValueError(f"keep= takes top-level entry names, not {n!r}")
    return names


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-"


def _make_temp_dir(final: Path) -> Path:
    with _as_output_error(final, "cannot create the output folder"):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
        _LIVE.add(str(tmp))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the usual permissions
    return tmp


def _carry_over(final: Path, tmp: Path, keep: tuple[str, ...]) -> None:
    if not keep or not os.path.isdir(final):
        return
    for name in keep:
        src, dst = final / name, tmp / name
        if os.path.lexists(dst) or not os.path.lexists(src):
            continue  # what the block wrote wins
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _marker_text(kind: str) -> str:
    from . import __version__

    return json.dumps({"tool": "mbconvert", "version": __version__, "kind": kind}, sort_keys=True) + "\n"


def _swap(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final` in one step for readers; afterwards `tmp` holds the old content (or nothing)."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
    elif not _exchange(tmp, final):
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(6)}")
        _LIVE.add(str(old))
        try:
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            try:
                os.rename(old, tmp)  # the caller removes it under its temp name
            except OSError:
                _remove(old)
        finally:
            _LIVE.discard(str(old))
    _fsync(final.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _remove(path) -> None:
    """Delete a file, a link (never followed) or a folder; best effort."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for path in [os.path.join(root, name) for name in files] + [root]:
            if not os.path.islink(path):
                _fsync(path)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # fsync unsupported here: nothing to wait for
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: a unique temp file in the same folder, fsync, rename over `path`."""
    return _write_atomically(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (as atomic_write_bytes)."""
    return _write_atomically(path, lambda f: f.write(text.encode(encoding)))


def read_json(path: str | os.PathLike, error: type[Exception], missing: str = "no such file"):
    """The JSON value in `path`, or one line as `error` (missing: `path: {missing}`; unreadable: what is wrong)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = getattr(e, "msg", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise error(f"{path}: not valid JSON ({detail})") from None


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write JSON atomically (indent 2, UTF-8, a final newline; tensors and numbers become plain JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save(obj, path), atomically (the one place mbconvert writes a .pt file)."""
    import torch

    return _write_atomically(path, lambda f: torch.save(obj, f))


def _write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """The temp file is made by mkstemp (O_CREAT|O_EXCL: never follows or reuses a planted path) and named
    .NAME.tmp-PID-X, so a later write of the same path removes it if this process is killed. If `path` is a
    symlink, the link is replaced, its target untouched. OSError -> one-line OutputError (still an OSError)."""
    path = Path(path)
    sweep_stale(path)
    tmp = None
    try:
        with _as_output_error(path, "cannot write"):
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
            _LIVE.add(tmp)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp is not None:
            _LIVE.discard(tmp)
            if os.path.lexists(tmp):
                _remove(tmp)
    return path


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy across threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _as_output_error(path, what: str) -> Iterator[None]:
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise _output_error(path, f"{what}: {_reason(e)}", e) from None


def _output_error(path, message: str, cause: OSError) -> OutputError:
    err = OutputError(f"{path}: {message}")
    err.errno = cause.errno
    return err


def _reason(e: OSError) -> str:
    text = e.strerror or str(e).strip().split("\n")[0][:200]
    return text or type(e).__name__


def _json_default(o):
    """Tensors and numpy arrays/scalars by duck typing (.tolist(), .item()), so that no torch import is needed."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
