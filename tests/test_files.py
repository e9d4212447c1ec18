"""Artifact writing (files.py): a failed or killed write never leaves a mix of old and new files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_cache

from tvrerank.errors import InputError
from tvrerank.files import exclusive_lock, replaced_folder, write_text_atomic
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
