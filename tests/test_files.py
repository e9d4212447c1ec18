"""Artifact writing (files.py): a failed or killed write never leaves a mix of old and new files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_cache

from tvrerank import files
from tvrerank.errors import CorruptFile, InputError
from tvrerank.files import (check_writable, checksum_path, checksummed_file, exclusive_lock, file_sha256,
                            read_checksums, replaced_folder, verify_checksum, write_checksum, write_text_atomic)
from tvrerank.index import store
from tvrerank.index.store import build_index_dir, load_index_dir


def test_a_failed_folder_write_leaves_the_old_folder_whole(tmp_path):
    out = tmp_path / "art"
    with replaced_folder(out, owned={"a", "b"}) as folder:
        (folder / "a").write_text("old a")
        (folder / "b").write_text("old b")
    with pytest.raises(RuntimeError), replaced_folder(out, owned={"a", "b"}) as folder:
        (folder / "a").write_text("new a")
        raise RuntimeError("killed between files")
    assert (out / "a").read_text() == "old a" and (out / "b").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary folder left
    with replaced_folder(out, owned={"a", "b"}) as folder:
        (folder / "a").write_text("new a")
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # replaced whole


def test_the_current_folder_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", ".."):
        with pytest.raises(InputError, match="current folder"), replaced_folder(out, owned={"a"}):
            pass
    with replaced_folder("index", owned={"a"}) as folder:  # a subfolder is fine
        (folder / "a").write_text("1")
    assert (tmp_path / "here" / "index" / "a").read_text() == "1"


def test_a_folder_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="mine.txt"), replaced_folder(tmp_path, owned={"index.faiss"}):
        pass
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_text_is_replaced_in_one_step(tmp_path):
    write_text_atomic(tmp_path / "m.json", "1")
    write_text_atomic(tmp_path / "m.json", "2")
    assert (tmp_path / "m.json").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_an_index_rebuild_that_fails_midway_keeps_the_old_index(tmp_path, monkeypatch):
    """A kill between index.faiss and config.json used to leave a new index beside an old config."""
    small = synthetic_cache(tmp_path / "small.h5", videos=10)
    large = synthetic_cache(tmp_path / "large.h5", videos=14, seed=1)
    build_index_dir(small, tmp_path / "index")
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.np, "save", killed)  # after index.faiss, before video_rows.npy and config.json
    with pytest.raises(KeyboardInterrupt):
        build_index_dir(large, tmp_path / "index")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()} == before
    index, config, rows = load_index_dir(tmp_path / "index")
    assert index.ntotal == config.count == len(rows) == 10 and np.array_equal(rows, np.arange(10))


def test_a_second_writer_is_refused_naming_the_process_that_holds_the_lock(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "cache.h5.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tvrerank.files import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, 'x'):\n    print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"process {holder.pid}"), exclusive_lock(lock, "cache.h5"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "cache.h5"):  # the killed holder left no stale lock
        assert lock.read_text() == str(__import__("os").getpid())
    assert not lock.exists()


def test_file_sha256_is_the_files_digest_computed_once_per_version(tmp_path, monkeypatch):
    import hashlib
    import os

    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 10_000)
    assert file_sha256(path, block=999) == hashlib.sha256(b"x" * 10_000).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    file_sha256(path)
    assert opened == []  # cached: the file was not read again
    stat = path.stat()
    path.write_bytes(b"y" * 10_000)  # same size; a new mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_sha256(path) == hashlib.sha256(b"y" * 10_000).hexdigest() and opened == [path]


def test_a_checksum_is_sha256sums_format_and_finds_one_flipped_byte(tmp_path):
    import subprocess

    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 64)
    digest = write_checksum(path)
    assert checksum_path(path).read_text() == f"{digest}  model.pt\n"
    assert subprocess.run(["sha256sum", "-c", "model.pt.sha256"], cwd=tmp_path, capture_output=True).returncode == 0
    verify_checksum(path, "train it again")
    data = bytearray(path.read_bytes())
    data[5000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match=r"model.pt: not a readable checkpoint \(its bytes differ from the sha256 "
                                          r"in model.pt.sha256.*; train it again$"):
        verify_checksum(path, "train it again", what="checkpoint")


def test_an_artifact_without_a_checksum_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.h5"
    path.write_bytes(b"written before checksums")
    verify_checksum(path, "rebuild it")
    assert "old.h5 has no checksum" in caplog.text and "rebuild it" in caplog.text


def test_a_checksummed_write_killed_at_any_step_leaves_a_file_its_checksum_accepts(tmp_path, monkeypatch):
    path = tmp_path / "cand.h5"
    with checksummed_file(path) as tmp:
        tmp.write_bytes(b"old")
    verify_checksum(path, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.h5", "cand.h5.sha256"]
    # killed before the rename: the sidecar accepts the old and the new digest, the old file is in place
    real_replace = files.os.replace

    def killed_at_the_rename(source, target):
        if str(target) == str(path):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt), checksummed_file(path) as tmp:
        tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and len(read_checksums(path)) == 2
    verify_checksum(path, "")
    with checksummed_file(path) as tmp:  # a finished write keeps the new digest only
        tmp.write_bytes(b"new")
    assert read_checksums(path) == [file_sha256(path)]
    with pytest.raises(RuntimeError), checksummed_file(path) as tmp:  # a failed write changes nothing
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert path.read_bytes() == b"new" and read_checksums(path) == [file_sha256(path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.h5", "cand.h5.sha256"]


def test_check_writable_names_a_file_in_the_way_and_writes_nothing(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match=r"--out .*f.txt/a/b: .*f.txt is a file, not a folder; choose another --out"):
        check_writable(tmp_path / "f.txt" / "a" / "b")
    check_writable(tmp_path / "new" / "deeper" / "run")  # folders it would create are fine (and not made here)
    with pytest.raises(InputError, match=r"--ranks-out .*: folder .*new does not exist"):
        check_writable(tmp_path / "new" / "ranks.csv", "--ranks-out", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_check_writable_names_a_folder_it_cannot_write(tmp_path, monkeypatch):
    """Tests run as root, who may write anywhere: the refusal is simulated where it is asked."""
    import os

    (tmp_path / "run").mkdir()
    locked = {tmp_path / "x", tmp_path / "run"}
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) not in locked and real_access(path, mode))
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match=r"--out .*/x/new/run: cannot write in .*/x \(no permission, or a read-only "
                                         r"file system\); choose a writable --out"):
        check_writable(tmp_path / "x" / "new" / "run")
    with pytest.raises(InputError, match=r"cannot write in .*/run "):  # an existing run folder is written into
        check_writable(tmp_path / "run")
    check_writable(tmp_path / "y" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "x"]
