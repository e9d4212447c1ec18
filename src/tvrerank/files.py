"""Writing artifacts so a kill or a failure never leaves a mix of old and new files.

A file is written under a temporary name in its own folder and renamed into place (``os.replace``
is atomic on one file system). A folder artifact (an index) is built in a temporary sibling folder
and swapped in: the old folder is moved aside, the new one renamed into place, the old one
removed. A kill between the two renames leaves the old folder under ``.NAME.old-PID`` and no
``NAME``, which every reader refuses by name: never a new file beside an old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from tvrerank.errors import CorruptFile, InputError, reason_of


@contextlib.contextmanager
def replaced_file(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed to ``path`` in one
    step, on failure removed (``path`` untouched). ``tmp``: a fixed temporary name instead of one
    per process, for large files a killed run must not leave behind one copy per attempt."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with replaced_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def replaced_folder(out: str | Path, *, owned: set[str]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``out``, on failure it is removed and
    ``out`` is untouched. An existing ``out`` may only hold the files in ``owned`` (it is replaced whole)."""
    out = Path(out).resolve()
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise InputError(f"--out {out} is the current folder or holds it, and would be replaced whole; "
                         "give a subfolder (e.g. --out index)")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder; choose another --out")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
        if foreign:
            raise InputError(f"{out} holds other files ({', '.join(foreign[:3])}); it would be replaced whole: "
                             "choose a new or empty --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, holding this process's id) for the block; if another
    process holds it, refuse naming that process. The lock ends with the process, so a killed run
    never leaves a stale lock behind; the file is removed when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(f"{what} is being written by process {holder} (lock {path}); wait for it to finish "
                             "or stop it, then run the same command again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a waiting run cannot have locked it
    finally:
        handle.close()


def read_torch_file(path: Path, *, map_location="cpu", weights_only: bool = True, remedy: str):
    """``torch.load`` that names the file (and ``remedy``) when it is truncated, empty or not a checkpoint."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError,
            pickle.UnpicklingError) as exc:
        raise CorruptFile(f"{path}: not a readable checkpoint ({reason_of(exc)}); {remedy}") from None


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file, so a kill never leaves a half-written ``path``."""
    import torch

    with replaced_file(path) as tmp:
        torch.save(obj, tmp)


def require_space(path: str | Path, needed: int, what: str) -> None:
    """Raise ENOSPC (the CLI's one-line "no space left on device writing PATH") unless the file
    system of ``path`` has ``needed`` bytes free. For writers that cannot fail cleanly mid-write:
    HDF5 that runs out of space cannot close its file, and the process then dies at exit."""
    import errno

    free = shutil.disk_usage(Path(path).parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs about {needed / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB are free", str(path))
