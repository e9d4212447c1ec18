"""cache/checksums.py: flipped bytes anywhere in tokens, embeddings or captions are found by
`cache check` and stop every command that reads them with one line naming the file."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_VIT, make_dataset

from tvrerank.cache.checksums import strings_digest
from tvrerank.cache.writer import PartStore
from tvrerank.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("checksums")
    annotations = make_dataset(root / "data", num_videos=5)
    cache = root / "cache.h5"
    assert run("extract", "--annotations", annotations, "--videos", annotations.parent, "--model", TINY_VIT,
               "--out", cache, "--frames", "4", "--workers", "0", "--device", "cpu", "--quiet").exit_code == 0
    assert run("index", cache, "--out", root / "index").exit_code == 0
    assert run("candidates", cache, "--index", root / "index", "--out", root / "cand.h5", "--k", "4").exit_code == 0
    (root / "train.json").write_text(json.dumps({"captions": 4, "negatives": 2, "in_batch": 1, "model": {
        "width": 16, "heads": 2, "layers": 1, "queries": 2, "video_keep": 4, "perturb_samples": 4}}))
    result = run("train", "--cache", cache, "--candidates", root / "cand.h5", "--out", root / "run", "--config",
                 root / "train.json", "--steps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root


def flip_chunk(path, dataset: str, chunk: int, nbytes: int = 4096) -> None:
    """XOR ``nbytes`` in the middle of one stored chunk of ``dataset``, its data only (the last 4
    bytes are the checksum: complementing a whole chunk with its checksum is fletcher32's blind spot)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    data = bytearray(path.read_bytes())
    size = info.size - 4
    count = min(nbytes, size)
    start = info.byte_offset + (size - count) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_copy(finished, tmp_path, dataset: str, chunk: int = 1):
    cache = tmp_path / "cache.h5"
    shutil.copy(finished / "cache.h5", cache)
    flip_chunk(cache, dataset, chunk)
    return cache


def test_a_sound_cache_checks_ok(finished):
    result = run("cache", "check", finished / "cache.h5")
    assert result.exit_code == 0 and "ok" in result.output and "note" not in result.output, result.output


@pytest.mark.parametrize("dataset, row", [("videos/tokens", 1), ("videos/frame_emb", None), ("texts/emb", None),
                                          ("texts/tokens", None), ("videos/status", None)])
def test_check_finds_flipped_bytes_in_every_array(finished, tmp_path, dataset, row):
    cache = damaged_copy(finished, tmp_path, dataset, chunk=1 if row is not None else 0)
    result = run("cache", "check", cache)
    assert result.exit_code == 1, result.output
    expected = f"{dataset}: rows {row} hold damaged bytes" if row is not None else f"{dataset}: rows"
    assert expected in result.output and "damaged bytes" in result.output, result.output


def test_check_finds_a_changed_caption(finished, tmp_path):
    cache = tmp_path / "cache.h5"
    data = (finished / "cache.h5").read_bytes()
    at = data.find(b"clip 1 caption 0")
    assert at > 0
    cache.write_bytes(data[:at] + b"clip 1 caption 9" + data[at + 16 :])  # same length: only the heap changes
    result = run("cache", "check", cache)
    assert result.exit_code == 1 and "texts/caption: its text does not match the checksum" in result.output


@pytest.mark.parametrize("command", [
    "retrieve --gallery {cache} --index {index} --reranker {run} --device cpu q",
    "eval --cache {cache} --candidates {cand} --reranker {run} --device cpu",
    "train --cache {cache} --candidates {cand} --out {tmp}/run3 --config {config} --steps 2 --device cpu",
    "gallery --gallery {cache} --reranker {run2} --device cpu",
])
def test_commands_reading_damaged_tokens_stop_naming_the_file(finished, tmp_path, command):
    cache = tmp_path / "cache.h5"
    shutil.copy(finished / "cache.h5", cache)
    with h5py.File(cache, "r") as f:
        chunks = f["videos/tokens"].id.get_num_chunks()
    for chunk in range(chunks):  # every video's tokens: whichever the command reads first is damaged
        flip_chunk(cache, "videos/tokens", chunk, nbytes=64)
    shutil.copytree(finished / "run", tmp_path / "run2")
    args = command.format(cache=cache, index=finished / "index", run=finished / "run", cand=finished / "cand.h5",
                          config=finished / "train.json", tmp=tmp_path, run2=tmp_path / "run2").split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"{cache}: videos/tokens holds damaged bytes" in result.output and "cache check" in result.output
    assert "Traceback" not in result.output


def test_a_damaged_part_names_the_part_file(tmp_path):
    annotations = make_dataset(tmp_path / "data", num_videos=4, broken=False)
    args = ("extract", "--annotations", annotations, "--videos", annotations.parent, "--model", TINY_VIT, "--out",
            tmp_path / "c.h5", "--frames", "2", "--workers", "0", "--device", "cpu", "--quiet", "--part-videos", "2")
    store = PartStore(tmp_path / "c.h5")
    # a run killed before assembly leaves its finished parts: simulate one, then damage a part
    from tvrerank.extract import runner

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    original, runner.assemble = runner.assemble, killed
    try:
        with pytest.raises(Killed):
            CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        runner.assemble = original
    part = store.part_path(0)
    assert part.exists()
    flip_chunk(part, "videos/tokens", 0, nbytes=64)
    result = run(*args)
    assert result.exit_code == 2 and str(part) in result.output and "delete that part file" in result.output
    part.unlink()  # as the message says: the same command then extracts that part again
    assert run(*args).exit_code == 0 and run("cache", "check", tmp_path / "c.h5").exit_code == 0


def test_a_cache_without_checksums_says_so(finished, tmp_path):
    old = tmp_path / "old.h5"
    def copy(name, obj):  # contiguous, no filters: as caches were written before checksums
        if isinstance(obj, h5py.Dataset):
            dst.create_dataset(name, data=obj[()], dtype=obj.dtype)

    with h5py.File(finished / "cache.h5", "r") as src, h5py.File(old, "w") as dst:
        dst.attrs.update({k: v for k, v in src.attrs.items() if k != "strings_sha256"})
        src.visititems(copy)
    result = run("cache", "check", old)
    assert result.exit_code == 0, result.output
    assert "carry no checksums" in result.output and "its strings carry no checksums" in result.output


def test_strings_digest_depends_on_every_character_and_the_boundaries():
    assert strings_digest(["ab", "c"]) != strings_digest(["a", "bc"]) != strings_digest(["abc"])
    assert strings_digest(["vidéo 😀"]) == strings_digest(np.array(["vidéo 😀"], dtype=object))
