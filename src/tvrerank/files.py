"""Writing artifacts so a kill or a failure never leaves a mix of old and new files.

A file is written under a temporary name in its own folder and renamed into place (``os.replace``
is atomic on one file system). A folder artifact (an index) is built in a temporary sibling folder
and swapped in: the old folder is moved aside, the new one renamed into place, the old one
removed. A kill between the two renames leaves the old folder under ``.NAME.old-PID`` and no
``NAME``, which every reader refuses by name: never a new file beside an old one.

Checksums: an artifact a later stage reads has a sidecar ``NAME.sha256`` (``sha256sum``'s format,
so ``sha256sum -c NAME.sha256`` checks it by hand), written with it (``write_checksum``,
``checksummed_file``) and verified before it is used (``verify_checksum``): damaged bytes are
refused in one line naming the file and what to rebuild, never used. An artifact written before
checksums existed (no sidecar) loads with a warning. The digest of a file is computed once per
process (cached by path, inode, size and modification time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from tvrerank.errors import CorruptFile, InputError, reason_of

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256 hex, this process's


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


def file_sha256(path: str | Path, *, block: int = 4 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in ``block``-sized pieces; computed once per process for
    a file that has not changed since (same path, inode, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(block):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding ``path``'s sha256: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _write_digests(path: Path, digests: list[str]) -> None:
    write_text_atomic(checksum_path(path), "".join(f"{digest}  {path.name}\n" for digest in digests))


def read_checksums(path: str | Path) -> list[str] | None:
    """The digests the sidecar of ``path`` accepts (one; two while a replacement is under way), None without one."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    return [line.split()[0].lower() for line in sidecar.read_text(errors="replace").splitlines() if line.split()]


def write_checksum(path: str | Path) -> str:
    """Write ``path``'s sidecar ``NAME.sha256`` (atomically); returns the digest."""
    path = Path(path)
    digest = file_sha256(path)
    _write_digests(path, [digest])
    return digest


@contextlib.contextmanager
def checksummed_file(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """``replaced_file`` that also replaces the sidecar checksum. The sidecar first accepts the old
    and the new digest, then the file is renamed, then the sidecar keeps the new digest only: a kill
    at any point leaves a file that its sidecar accepts."""
    path = Path(path)
    with replaced_file(path, tmp) as tmp_path:
        yield tmp_path
        new = file_sha256(tmp_path)
        old = file_sha256(path) if path.is_file() else None
        _write_digests(path, [new] + ([old] if old and old != new else []))
    _write_digests(path, [new])


def verify_checksum(path: str | Path, remedy: str, *, what: str = "file") -> None:
    """Refuse ``path`` (CorruptFile, one line naming it and ``remedy``) when its bytes differ from its
    sidecar's sha256; without a sidecar (written before checksums), log a warning and accept it."""
    path = Path(path)
    accepted = read_checksums(path)
    if accepted is None:
        log.warning("%s has no checksum (%s, written before checksums existed): used unverified; %s",
                    path, checksum_path(path).name, remedy)
        return
    if file_sha256(path) not in accepted:
        raise CorruptFile(f"{path}: not a readable {what} (its bytes differ from the sha256 in "
                          f"{checksum_path(path).name}: damaged or changed since it was written); {remedy}")


def check_writable(target: str | Path, option: str = "--out", *, create: bool = True) -> None:
    """Refuse an output path that cannot be written, in one line naming it, before any work and
    without writing anything: a file where a folder above it should be, a missing folder (unless
    ``create``: the command makes it), or a folder this process may not write (permissions, a
    read-only file system). ``target``: the file or folder the command writes."""
    target = Path(target).absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{option} {target}: {folder} is a file, not a folder; choose another {option}")
    if folder != target.parent and not create:
        raise InputError(f"{option} {target}: folder {target.parent} does not exist; create it or choose "
                         f"another {option}")
    for place in (folder, target) if target.is_dir() else (folder,):
        if not os.access(place, os.W_OK | os.X_OK):  # also false on a read-only file system, even for root
            raise InputError(f"{option} {target}: cannot write in {place} (no permission, or a read-only file "
                             f"system); choose a writable {option}")


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

    verify_checksum(path, remedy, what="checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError,
            pickle.UnpicklingError) as exc:
        raise CorruptFile(f"{path}: not a readable checkpoint ({reason_of(exc)}); {remedy}") from None


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file, so a kill never leaves a half-written ``path``; its sha256
    beside it (``NAME.sha256``), which ``read_torch_file`` verifies."""
    import torch

    with checksummed_file(path) as tmp:
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
