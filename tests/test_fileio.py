"""Output folders and files never destroy or mix the user's files (issue 15 items 3, 4, 9, 11).

A folder is replaced as a whole or not at all; a folder mbconvert did not write is only replaced with
overwrite=True; an input is never an output; OS failures are one-line OutputErrors; killed runs leave nothing
that a later run does not clean up; temp files never follow a planted symlink.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mbconvert import fileio
from mbconvert.errors import MbconvertError, OutputError
from mbconvert.fileio import (MARKER, atomic_dir, atomic_torch_save, atomic_write_bytes, atomic_write_text,
                              check_output_dir, read_marker, sweep_stale, write_json)

ROOT = Path(__file__).resolve().parents[1]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (but the marker) with its text: what a reader of the folder sees."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def siblings(final: Path) -> list[str]:
    """Hidden leftovers of `final` in its parent folder."""
    return sorted(n for n in os.listdir(final.parent) if n.startswith(f".{final.name}."))


def write_folder(final: Path, files: dict[str, str], **kw) -> None:
    with atomic_dir(final, **kw) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


OLD = {"config.json": "old config", "model.safetensors": "old weights", "export/model.onnx": "old onnx"}
NEW = {"config.json": "new config", "model.safetensors": "new weights"}


@pytest.fixture
def out(tmp_path) -> Path:
    final = tmp_path / "out"
    write_folder(final, OLD, kind="model")
    return final


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ item 1: whole-folder replacement
def test_folder_is_replaced_as_a_whole_with_marker_and_usual_permissions(out):
    write_folder(out, NEW, kind="model")
    assert tree(out) == NEW  # nothing of the old folder is kept (no old export/)
    marker = read_marker(out)
    assert marker is not None and marker["tool"] == "mbconvert" and marker["kind"] == "model"
    assert marker["version"] == __import__("mbconvert").__version__
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask()
    assert siblings(out) == []


def test_keep_carries_named_entries_over_and_the_new_ones_win(out):
    write_folder(out, {**NEW, "report/report.json": "new report"}, keep=("export", "report", "config.json"))
    assert tree(out) == {**NEW, "export/model.onnx": "old onnx", "report/report.json": "new report"}


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", MARKER])
def test_keep_takes_plain_entry_names_only(out, bad):
    with pytest.raises(ValueError):
        write_folder(out, NEW, keep=(bad,))
    assert tree(out) == OLD


def test_failed_block_leaves_the_old_folder_and_no_temp(out):
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("conversion failed")
    assert tree(out) == OLD
    assert siblings(out) == []


@pytest.mark.parametrize("fail_at", [1, 2])
def test_crash_between_the_two_renames_leaves_the_old_folder(out, monkeypatch, fail_at):
    """Without RENAME_EXCHANGE the swap is two renames; whichever fails, the reader sees the old folder whole."""
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputError) as e:
        write_folder(out, NEW)
    monkeypatch.setattr(os, "rename", real_rename)
    assert "\n" not in str(e.value)
    assert tree(out) == OLD
    assert siblings(out) == []


def test_two_rename_fallback_swaps_when_renames_succeed(out, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    write_folder(out, NEW)
    assert tree(out) == NEW and siblings(out) == []


def test_exchange_swaps_in_one_step_where_the_os_has_it(out, monkeypatch):
    probe_a, probe_b = out.parent / "a", out.parent / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not fileio._exchange(probe_a, probe_b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")

    def no_rename(src, dst):
        raise AssertionError("the exchange path must not need os.rename")

    monkeypatch.setattr(os, "rename", no_rename)
    write_folder(out, NEW)
    assert tree(out) == NEW and siblings(out) == []


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from mbconvert import fileio
final, phase = Path(sys.argv[1]), sys.argv[2]
fileio._exchange = lambda a, b: False          # force the two-rename swap
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)        # killed right after the first rename
os.rename = rename
with fileio.atomic_dir(final) as tmp:
    (tmp / "config.json").write_text("new config")
    if phase == "write":
        os.kill(os.getpid(), signal.SIGKILL)    # killed while writing
    (tmp / "model.safetensors").write_text("new weights")
"""


@pytest.mark.parametrize("phase", ["write", "swap"])
def test_kill_9_leftovers_are_repaired_by_the_next_run(out, phase):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(out), phase], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert siblings(out), "the kill should have left a temp folder behind"
    if phase == "swap":
        assert not out.exists()  # between the renames: the old folder is parked aside
    sweep_stale(out)
    assert tree(out) == OLD and siblings(out) == []  # wholly old again, nothing left over
    write_folder(out, NEW)
    assert tree(out) == NEW and siblings(out) == []


def test_next_run_removes_only_dead_temps_of_the_same_output(out):
    keep_names = [f".out.tmp-{os.getppid()}-abc123",  # a live process may still be writing it
                  ".out.tmp-notapid", f".other.tmp-{dead_pid()}-abc123", "out.tmp-1-abc"]
    stale_names = [f".out.tmp-{dead_pid()}-x1y2z3", f".out.tmp-{os.getpid()}-qqqq11"]  # ours, not in use
    for name in keep_names + stale_names:
        (out.parent / name).mkdir()
        (out.parent / name / "f").write_text("x")
    write_folder(out, NEW)
    assert sorted(n for n in os.listdir(out.parent) if n != "out") == sorted(keep_names)


def test_stale_sweep_removes_a_planted_symlink_without_following_it(out, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    (out.parent / f".out.tmp-{dead_pid()}-abcdef").symlink_to(victim)
    write_folder(out, NEW)
    assert (victim / "precious").read_text() == "keep me" and siblings(out) == []


def test_a_symlink_to_a_folder_is_followed_and_kept(tmp_path):
    real = tmp_path / "disk" / "real-out"
    write_folder(real, OLD)
    link = tmp_path / "out"
    link.symlink_to(real)
    write_folder(link, NEW)
    assert link.is_symlink() and tree(real) == NEW


# ------------------------------------------------------------------ item 2: ownership
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_output_is_never_an_input(tmp_path, where, overwrite):
    student = tmp_path / "work" / "student"
    student.mkdir(parents=True)
    (student / "model.safetensors").write_text("the student's weights")
    out = {"same": student, "inside": student / "mobile", "contains": tmp_path / "work"}[where]
    with pytest.raises(OutputError, match="input"):
        check_output_dir(out, sources=[student], overwrite=overwrite)
    if where != "inside":  # a file source: its folder may hold other outputs, but never the file itself
        with pytest.raises(OutputError, match="input"):
            check_output_dir(out, sources=[student / "model.safetensors"], overwrite=overwrite)
    assert (student / "model.safetensors").read_text() == "the student's weights"


def test_a_symlinked_output_pointing_at_an_input_is_refused(tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (tmp_path / "out").symlink_to(student)
    with pytest.raises(OutputError, match="input"):
        check_output_dir(tmp_path / "out", sources=[str(student)], overwrite=True)


def _file(p: Path):
    p.write_text("the user's notes")


def _dangling(p: Path):
    p.symlink_to(p.parent / "gone")


def _foreign(p: Path):
    p.mkdir()
    (p / "thesis.tex").write_text("the user's thesis")


@pytest.mark.parametrize("make", [_file, _dangling, _foreign])
def test_what_mbconvert_did_not_write_needs_overwrite(tmp_path, make):
    out = tmp_path / "out"
    make(out)
    with pytest.raises(OutputError) as e:
        check_output_dir(out, sources=[tmp_path / "student.pt"])
    assert "overwrite" in str(e.value) and "\n" not in str(e.value)
    ran = []
    with pytest.raises(OutputError):
        with atomic_dir(out) as tmp:  # refused before the (expensive) block runs
            ran.append(tmp)
    assert ran == [] and siblings(out) == []
    assert check_output_dir(out, overwrite=True) == out
    write_folder(out, NEW, overwrite=True)
    assert out.is_dir() and not out.is_symlink() and tree(out) == NEW


def test_missing_empty_and_own_folders_need_no_overwrite(tmp_path, out):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(out) == out  # written by mbconvert: its marker says so
    write_folder(tmp_path / "empty", NEW)
    assert tree(tmp_path / "empty") == NEW


def test_a_forged_or_broken_marker_is_not_mbconvert_s(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("x")
    for text in ["not json", json.dumps({"tool": "other"}), json.dumps(["mbconvert"])]:
        (out / MARKER).write_text(text)
        assert read_marker(out) is None
        with pytest.raises(OutputError):
            check_output_dir(out)


# ------------------------------------------------------------------ item 3: OS errors as one line
def test_an_output_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out"
    for attempt in (lambda: check_output_dir(out), lambda: write_folder(out, NEW)):
        with pytest.raises(OutputError, match="not a folder") as e:
            attempt()
        assert isinstance(e.value, MbconvertError) and "\n" not in str(e.value)
    assert (tmp_path / "a-file").read_text() == "x"


def test_an_output_under_a_dangling_symlink_is_one_line(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match="dangling"):
        check_output_dir(tmp_path / "link" / "out")


def test_a_read_only_folder_is_refused_up_front(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # permission bits do not stop root: stand in for a read-only mount
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write") as e:
            check_output_dir(parent / "out")
        assert "\n" not in str(e.value)
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_or_read_only_disk_while_writing_is_one_line_and_changes_nothing(out, code):
    with pytest.raises(OutputError) as e:
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("new config")
            raise OSError(code, os.strerror(code))
    assert os.strerror(code).lower() in str(e.value).lower() and "\n" not in str(e.value)
    assert e.value.errno == code
    assert tree(out) == OLD and siblings(out) == []


def test_an_input_error_inside_the_block_is_not_called_an_output_error(out):
    with pytest.raises(FileNotFoundError):
        with atomic_dir(out):
            open(out.parent / "no-such-input.txt")
    assert tree(out) == OLD


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_refused_swap_is_one_line_and_changes_nothing(out, monkeypatch, code):
    def refuse(*args, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio, "_exchange", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OutputError) as e:
        write_folder(out, NEW)
    monkeypatch.undo()
    assert "\n" not in str(e.value) and tree(out) == OLD and siblings(out) == []


@pytest.mark.parametrize("writer", ["bytes", "text", "json", "torch"])
def test_a_full_disk_in_a_file_writer_keeps_the_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="No space left") as e:
        {"bytes": lambda: atomic_write_bytes(path, b"new"), "text": lambda: atomic_write_text(path, "new"),
         "json": lambda: write_json(path, {"a": 1}), "torch": lambda: atomic_torch_save({"a": 1}, path)}[writer]()
    monkeypatch.undo()
    assert isinstance(e.value, OSError)  # `except OSError` (e.g. the cache's) still catches it
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_a_file_writer_into_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(OutputError) as e:
        write_json(tmp_path / "nope" / "x.json", {})
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ item 5: atomic files
def test_file_writers_round_trip_with_usual_permissions_and_same_bytes(tmp_path):
    obj = {"b": [1, 2.5, "ü"], "a": torch.tensor([1.0, 2.0]), "p": Path("x")}
    write_json(tmp_path / "r.json", obj)
    first = (tmp_path / "r.json").read_bytes()
    write_json(tmp_path / "r.json", obj)
    assert (tmp_path / "r.json").read_bytes() == first
    assert json.loads(first) == {"b": [1, 2.5, "ü"], "a": [1.0, 2.0], "p": "x"}
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    atomic_torch_save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    for name in ("r.json", "s.pt", "t.txt"):
        assert ((tmp_path / name).stat().st_mode & 0o777) == 0o666 & ~umask()
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.pt", "t.txt"]


def test_write_json_turns_tensors_and_numpy_values_into_plain_json(tmp_path):
    import numpy as np

    obj = {"t": torch.tensor([[1, 2], [3, 4]]), "s": torch.tensor(0.5), "n": np.float32(2.0), "a": np.arange(3)}
    write_json(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text()) == {"t": [[1, 2], [3, 4]], "s": 0.5, "n": 2.0, "a": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})


def test_importing_the_gate_does_not_import_torch():
    """The gate reads two JSON reports in CI: importing it (and fileio, through report) must not load torch."""
    code = "import mbconvert.gating, mbconvert.fileio, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("writer", ["bytes", "json", "torch"])
def test_planted_symlinks_are_never_followed(tmp_path, writer):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    dest = folder / "recovery_state.pt"
    for name in (".recovery_state.pt.tmp", "recovery_state.tmp", ".recovery_state.pt.tmp-1-x"):
        (folder / name).symlink_to(victim)  # the fixed temp names of old versions, and a guess at ours
    dest.symlink_to(victim)
    {"bytes": lambda: atomic_write_bytes(dest, b"new"), "json": lambda: write_json(dest, {"a": 1}),
     "torch": lambda: atomic_torch_save({"a": 1}, dest)}[writer]()
    assert victim.read_text() == "precious"
    assert not dest.is_symlink() and dest.stat().st_size > 0


def test_a_killed_file_write_leaves_a_temp_the_next_write_removes(tmp_path):
    stale = tmp_path / f".state.pt.tmp-{dead_pid()}-abcd1234"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".state.pt.tmp-{os.getppid()}-abcd1234"
    live.write_bytes(b"being written")
    atomic_torch_save({"a": 1}, tmp_path / "state.pt")
    assert sorted(os.listdir(tmp_path)) == sorted(["state.pt", live.name])
