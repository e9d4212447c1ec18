"""Careless and hostile input, table-driven: each row is a command, its exit code and a fragment of
its message; none may print a traceback or leave anything half-done.

``CASES`` need only placeholder files (the options are refused before anything is read);
``DAMAGED`` start from finished artifacts (a small extracted gallery, its index, candidates and a
trained run), damage a copy of one, and run a command on it. Rows are added as cases are handled
(the reliability review's 100-case probe is the list).
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import TINY_VIT, flip_tensor_bytes, make_dataset, synthetic_cache

from tvrerank.cli import main

EXTRACT_OPTIONS = "extract --annotations {file} --videos {dir} --model m --out {dir}/c.h5"
TRAIN_OPTIONS = "train --cache {file} --candidates {file} --out {dir}/run"
#: (case, command with {placeholders}, exit code, a fragment of the message)
CASES = [
    ("extract: negative batch size", EXTRACT_OPTIONS + " --batch-size -3", 2, "--batch-size"),
    ("extract: zero frames", EXTRACT_OPTIONS + " --frames 0", 2, "--frames"),
    ("extract: negative frames", EXTRACT_OPTIONS + " --frames -1", 2, "--frames"),
    ("extract: zero batch size", EXTRACT_OPTIONS + " --batch-size 0", 2, "--batch-size"),
    ("extract: negative part size", EXTRACT_OPTIONS + " --part-videos -1", 2, "--part-videos"),
    ("extract: zero text tokens", EXTRACT_OPTIONS + " --text-tokens 0", 2, "--text-tokens"),
    ("extract: negative workers", EXTRACT_OPTIONS + " --workers -1", 2, "--workers"),
    ("extract: one video_id for two files", EXTRACT_OPTIONS.replace("{file}", "{jsonl}"), 2,
     "video_id 'v1' is 'b.mp4' here but 'a.mp4' at"),
    ("plan: zero videos", "plan --model ViT-B-32 --videos 0", 2, "--videos"),
    ("candidates: negative k", "candidates {file} --index {dir} --out {dir}/x.h5 --k -5", 2, "--k"),
    ("retrieve: negative k", "retrieve --gallery {file} --index {dir} --reranker {dir} --k -5 q", 2, "--k"),
    ("retrieve: zero k", "retrieve --gallery {file} --index {dir} --reranker {dir} --k 0 q", 2, "--k"),
    ("retrieve: zero top", "retrieve --gallery {file} --index {dir} --reranker {dir} --top 0 q", 2, "--top"),
    ("candidates: zero k", "candidates {file} --index {dir} --out {dir}/x.h5 --k 0", 2, "--k"),
    ("train: negative workers", TRAIN_OPTIONS + " --workers -1", 2, "--workers"),
    ("train: zero captions in --config", TRAIN_OPTIONS + " --config {json}", 2, "'captions' must be an integer >= 2"),
    ("train: a layout field in --config's model", TRAIN_OPTIONS + " --config {json}", 2,
     "model options ['frames'] come from the cache"),
    ("train: broken JSON in --config", TRAIN_OPTIONS + " --config {json}", 2,
     "not a readable JSON file of training options"),
    ("retrieve: negative top", "retrieve --gallery {file} --index {dir} --reranker {dir} --top -2 q", 2, "--top"),
    ("train: zero steps", TRAIN_OPTIONS + " --steps 0", 2, "--steps"),
    ("train: negative steps", TRAIN_OPTIONS + " --steps -5", 2, "--steps"),
    ("train: zero steps in --config", TRAIN_OPTIONS + " --config {json}", 2, "'steps' must be an integer >= 1"),
    ("train: a number as text in --config", TRAIN_OPTIONS + " --config {json}", 2, "'lr' must be a number"),
    ("train: a bad model option in --config", TRAIN_OPTIONS + " --config {json}", 2,
     "'width' must be an integer >= 1"),
    ("train: an unknown model option in --config", TRAIN_OPTIONS + " --config {json}", 2,
     "unknown model options ['wdith']"),
    ("demo: negative seed", "demo --out {dir}/demo --seed -1", 2, "--seed"),
    ("toy make: too few videos", "toy make --out {dir}/toy --videos 2", 2, "--videos"),
    ("toy make: an unknown world", "toy make --out {dir}/toy --world glyphs", 2, "--world"),
    ("demo: an unknown world", "demo --out {dir}/demo --world glyphs", 2, "--world"),
    ("toy truth: a folder that is no toy world", "toy truth {dir} {file}", 2, "scripts.json: no such file"),
]


#: the --config file of a row, by case
CONFIGS = {
    "train: zero steps in --config": {"steps": 0},
    "train: a number as text in --config": {"lr": "fast"},
    "train: a bad model option in --config": {"model": {"width": -1}},
    "train: an unknown model option in --config": {"model": {"wdith": 64}},
    "train: a layout field in --config's model": {"model": {"frames": 4}},
    "train: zero captions in --config": {"captions": 0},
    "train: broken JSON in --config": '{\n  steps: 5,\n}',  # text, written as is
}


@pytest.mark.parametrize("case, command, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, command, code, fragment, tmp_path):
    (tmp_path / "f.txt").write_text("x\n")
    config = CONFIGS.get(case, {})
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (tmp_path / "ann.jsonl").write_text('{"video": "a.mp4", "caption": "one", "video_id": "v1"}\n'
                                        '{"video": "b.mp4", "caption": "two", "video_id": "v1"}\n')
    args = command.format(file=tmp_path / "f.txt", dir=tmp_path, json=tmp_path / "config.json",
                          jsonl=tmp_path / "ann.jsonl").split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert fragment in result.output, result.output
    if case in CONFIGS:
        assert str(tmp_path / "config.json") in result.output  # the file is named
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert not (tmp_path / "run" / "reranker.pt").exists() and not (tmp_path / "c.h5").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small finished pipeline: gallery cache, index, candidates, a trained run."""
    root = tmp_path_factory.mktemp("finished")
    annotations = make_dataset(root / "data", num_videos=5)
    runner = CliRunner()
    for args in (["extract", "--annotations", annotations, "--videos", annotations.parent, "--model", TINY_VIT,
                  "--out", root / "cache.h5", "--frames", "4", "--workers", "0", "--device", "cpu", "--quiet"],
                 ["index", root / "cache.h5", "--out", root / "index"],
                 ["candidates", root / "cache.h5", "--index", root / "index", "--out", root / "cand.h5", "--k", "4"]):
        assert runner.invoke(main, [str(a) for a in args]).exit_code == 0
    (root / "train.json").write_text(json.dumps({"captions": 4, "negatives": 2, "in_batch": 1, "checkpoint_every": 1,
                                                 "model": {"width": 16, "heads": 2, "layers": 1, "queries": 2,
                                                           "video_keep": 4, "perturb_samples": 4}}))
    result = runner.invoke(main, ["train", "--cache", str(root / "cache.h5"), "--candidates", str(root / "cand.h5"),
                                  "--out", str(root / "run"), "--config", str(root / "train.json"), "--steps", "2",
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root


def damaged(folder: str, file: str, keep: float):
    """A damage: copy artifact ``folder`` (index or run) into tmp_path, cut ``file`` to ``keep`` of its bytes."""
    def damage(finished, tmp_path) -> dict:
        shutil.copytree(finished / folder, tmp_path / folder)
        truncate(tmp_path / folder / file, keep)
        return {folder: tmp_path / folder}
    return damage


def truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def truncated_cache(finished, tmp_path) -> dict:
    shutil.copy(finished / "cache.h5", tmp_path / "cache.h5")
    truncate(tmp_path / "cache.h5", 0.5)
    return {"cache": tmp_path / "cache.h5"}


def other_frames(finished, tmp_path) -> dict:
    """The same videos extracted with 2 frames instead of 4."""
    args = EXTRACT.format(ann=finished / "data" / "captions.jsonl", data=finished / "data", tmp=tmp_path).split()
    assert CliRunner().invoke(main, [*args, "--device", "cpu", "--frames", "2"]).exit_code == 0
    return {"other": tmp_path / "c.h5"}


def latin1_queries(finished, tmp_path) -> dict:
    (tmp_path / "q.txt").write_bytes(b"a dog\nun caf\xe9\n")
    return {"queries": tmp_path / "q.txt"}


def flipped(folder: str, file: str, nbytes: int = 256):
    """A damage: copy artifact ``folder`` into tmp_path and XOR ``nbytes`` in the middle of ``file``."""
    def damage(finished, tmp_path) -> dict:
        shutil.copytree(finished / folder, tmp_path / folder)
        path = tmp_path / folder / file
        flip(path, path.stat().st_size // 2 - nbytes // 2, nbytes)
        return {folder: tmp_path / folder}
    return damage


def flip(path, start: int, nbytes: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + nbytes, len(data))):
        data[i] ^= mask
    path.write_bytes(bytes(data))


def flipped_weights(finished, tmp_path) -> dict:
    shutil.copytree(finished / "run", tmp_path / "run")
    flip_tensor_bytes(tmp_path / "run" / "reranker.pt")
    return {"run": tmp_path / "run"}


def flipped_candidates(finished, tmp_path) -> dict:
    """The candidate lists' stored scores with a low bit flipped: still finite, silently other numbers."""
    import h5py

    for name in ("cand.h5", "cand.h5.sha256"):
        shutil.copy(finished / name, tmp_path / name)
    with h5py.File(tmp_path / "cand.h5") as f:
        start, size = f["candidates/score"].id.get_offset(), f["candidates/score"].id.get_storage_size()
    flip(tmp_path / "cand.h5", start, size, mask=0x01)
    return {"cand": tmp_path / "cand.h5"}


def flipped_checkpoint(finished, tmp_path) -> dict:
    shutil.copytree(finished / "run", tmp_path / "run")
    flip_tensor_bytes(tmp_path / "run" / "checkpoint.pt")
    return {"run": tmp_path / "run"}


def swapped_rows(finished, tmp_path) -> dict:
    import numpy as np

    shutil.copytree(finished / "index", tmp_path / "index")
    rows = np.load(tmp_path / "index" / "video_rows.npy")
    rows[[0, 1]] = rows[[1, 0]]
    np.save(tmp_path / "index" / "video_rows.npy", rows)
    return {"index": tmp_path / "index"}


def other_build(finished, tmp_path) -> dict:
    """index.faiss of another gallery's index (40 vectors of the same width) beside this one's files."""
    from tvrerank.index.store import build_index_dir

    build_index_dir(synthetic_cache(tmp_path / "other.h5", videos=40, dim=32), tmp_path / "other-index")
    shutil.copytree(finished / "index", tmp_path / "index")
    shutil.copy(tmp_path / "other-index" / "index.faiss", tmp_path / "index" / "index.faiss")
    return {"index": tmp_path / "index"}


def removed(folder: str, file: str):
    def damage(finished, tmp_path) -> dict:
        shutil.copytree(finished / folder, tmp_path / folder)
        (tmp_path / folder / file).unlink()
        return {folder: tmp_path / folder}
    return damage


def edited_layout(finished, tmp_path) -> dict:
    """token_layout's token_dim written as 32.0 (a float; the shapes still compare equal)."""
    import h5py

    shutil.copy(finished / "cache.h5", tmp_path / "cache.h5")
    with h5py.File(tmp_path / "cache.h5", "a") as f:
        layout = json.loads(f.attrs["token_layout"])
        f.attrs["token_layout"] = json.dumps({**layout, "token_dim": float(layout["token_dim"])})
    return {"cache": tmp_path / "cache.h5"}


def a_file(finished, tmp_path) -> dict:
    (tmp_path / "f.txt").write_text("a file, not a folder\n")
    return {"file": tmp_path / "f.txt"}


def nothing(finished, tmp_path) -> dict:
    return {}


RETRIEVE = "retrieve --gallery {cache} --index {index} --reranker {run} --device cpu"
EXTRACT = "extract --annotations {ann} --videos {data} --model " + str(TINY_VIT) + " --out {tmp}/c.h5 --workers 0 --quiet"
#: (case, damage(finished, tmp_path) -> placeholders, command, exit code, message fragment)
DAMAGED = [
    ("index.faiss of zero bytes", damaged("index", "index.faiss", 0), "candidates {cache} --index {index} "
     "--out {tmp}/c.h5", 2, "index.faiss: not a readable FAISS index"),
    ("truncated index.faiss", damaged("index", "index.faiss", 0.5), RETRIEVE + " --no-rerank q", 2, "tvrerank index"),
    ("reranker.pt of zero bytes", damaged("run", "reranker.pt", 0), RETRIEVE + " q", 2,
     "reranker.pt: not a readable checkpoint"),
    ("truncated reranker.pt", damaged("run", "reranker.pt", 0.5), "eval --cache {cache} --candidates {cand} "
     "--reranker {run} --device cpu", 2, "reranker.pt: not a readable checkpoint"),
    ("gallery with a truncated reranker.pt", damaged("run", "reranker.pt", 0.5), "gallery --gallery {cache} "
     "--reranker {run} --device cpu", 2, "reranker.pt: not a readable checkpoint"),
    ("eval with a reranker.pt of zero bytes", damaged("run", "reranker.pt", 0), "eval --cache {cache} --candidates "
     "{cand} --reranker {run} --device cpu", 2, "reranker.pt: not a readable checkpoint"),
    ("eval on a cache sampled with other --frames", other_frames, "eval --cache {other} --candidates {cand} "
     "--reranker {run} --device cpu", 2, "sampling.frames 4 (it) vs 2"),
    ("train --val-cache sampled with other --frames", other_frames, "train --cache {cache} --candidates {cand} "
     "--val-cache {other} --val-candidates {cand} --out {tmp}/r --config {config} --steps 1 --device cpu", 2,
     "sampling.frames 4 (it) vs 2"),
    ("truncated checkpoint.pt on --resume", damaged("run", "checkpoint.pt", 0.3), "train --cache {cache} "
     "--candidates {cand} --out {run} --config {config} --steps 3 --device cpu --resume", 2,
     "checkpoint.pt: not a readable checkpoint"),
    ("--pretrained that is not a checkpoint", nothing, EXTRACT + " --device cpu --pretrained {ann}", 2,
     "not a checkpoint of"),
    ("--pretrained path that does not exist", nothing, EXTRACT + " --device cpu --pretrained {tmp}/gone/w.pt", 2,
     "gone/w.pt: no such file"),
    ("non-UTF-8 --queries-file", latin1_queries, RETRIEVE + " --queries-file {queries}", 2,
     "q.txt: line 2 is not UTF-8"),
    ("cache check of a truncated cache", truncated_cache, "cache check {cache}", 1, "not a readable HDF5 file"),
    ("index --factory Nonsense", nothing, "index {cache} --out {tmp}/i --factory Nonsense", 2,
     "--factory 'Nonsense': FAISS cannot build"),
    ("index --factory needing more vectors than the gallery", nothing,
     "index {cache} --out {tmp}/i --factory IVF256,Flat", 2, "cannot train it on"),
    ("extract --device bogus", nothing, EXTRACT + " --device bogus", 2, "--device 'bogus': not a device"),
    # issue 28: no artifact is used damaged
    ("index.faiss with 256 bytes flipped: candidates", flipped("index", "index.faiss"), "candidates {cache} --index "
     "{index} --out {tmp}/c.h5", 2, "index.faiss: not a readable FAISS index (its sha256 differs"),
    ("index.faiss with 256 bytes flipped: retrieve", flipped("index", "index.faiss"), RETRIEVE + " q", 2,
     "index.faiss: not a readable FAISS index (its sha256 differs"),
    ("video_rows.npy with two entries swapped: retrieve", swapped_rows, RETRIEVE + " --no-rerank q", 2,
     "video_rows.npy: not a readable row map (its sha256 differs"),
    ("reranker.pt with 256 bytes of weights flipped: eval", flipped_weights, "eval --cache {cache} --candidates "
     "{cand} --reranker {run} --device cpu", 2, "reranker.pt: not a readable checkpoint (its bytes differ from "
     "the sha256 in reranker.pt.sha256"),
    ("candidates file with its scores' low bits flipped: eval", flipped_candidates, "eval --cache {cache} "
     "--candidates {cand} --device cpu", 2, "cand.h5: not a readable candidates file (its bytes differ"),
    ("checkpoint.pt with 256 bytes of weights flipped: --resume", flipped_checkpoint, "train --cache {cache} "
     "--candidates {cand} --out {run} --config {config} --steps 3 --device cpu --resume", 2,
     "checkpoint.pt: not a readable checkpoint (its bytes differ"),
    ("cache check of a token_layout edited to a wrong type", edited_layout, "cache check {cache}", 1,
     "token_layout.token_dim: 32.0 is not an integer >= 1"),
    ("index.faiss from another build: retrieve", other_build, RETRIEVE + " --no-rerank q", 2,
     "config.json recorded"),
    ("index.faiss from another build: candidates", other_build, "candidates {cache} --index {index} --out {tmp}/c.h5",
     2, "not the file this index was built with"),
    ("truncated index config.json", damaged("index", "config.json", 0.5), "candidates {cache} --index {index} "
     "--out {tmp}/c.h5", 2, "config.json: not a readable index config"),
    ("missing video_rows.npy", removed("index", "video_rows.npy"), "candidates {cache} --index {index} "
     "--out {tmp}/c.h5", 2, "video_rows.npy: missing"),
    ("--annotations that is a folder", nothing, EXTRACT.replace("{ann}", "{data}") + " --device cpu", 2,
     "is a folder, not an annotation file"),
    ("index --out under a file", a_file, "index {cache} --out {file}/x", 2, "f.txt is a file, not a folder"),
    ("candidates --out under a file", a_file, "candidates {cache} --index {index} --out {file}/x/c.h5", 2,
     "f.txt is a file, not a folder"),
    ("extract --out under a file", a_file, EXTRACT.replace("{tmp}/c.h5", "{file}/c.h5") + " --device cpu", 2,
     "f.txt is a file, not a folder"),
    ("train --out under a file", a_file, "train --cache {cache} --candidates {cand} --out {file}/run --config {config} "
     "--steps 1 --device cpu", 2, "f.txt is a file, not a folder"),
]


@pytest.mark.parametrize("case, damage, command, code, fragment", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_artifacts_are_named(finished, tmp_path, case, damage, command, code, fragment):
    places = {"cache": finished / "cache.h5", "index": finished / "index", "run": finished / "run",
              "cand": finished / "cand.h5", "config": finished / "train.json", "ann": finished / "data" / "captions.jsonl",
              "data": finished / "data", "tmp": tmp_path}
    places.update(damage(finished, tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, command.format(**places).split())
    assert result.exit_code == code, (result.output, result.exception)
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


def test_a_truncated_gallery_store_is_skipped_with_a_warning(finished, tmp_path, caplog):
    shutil.copytree(finished / "run", tmp_path / "run")
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["gallery", "--gallery", str(finished / "cache.h5"), "--reranker", str(run),
                                "--device", "cpu"]).exit_code == 0
    (store,) = (run / "gallery").glob("*.h5")
    truncate(store, 0.5)
    result = runner.invoke(main, RETRIEVE.format(cache=finished / "cache.h5", index=finished / "index", run=run).split()
                           + ["--json", "clip 1 caption 0"])
    assert result.exit_code == 0, result.output
    assert "unreadable gallery store" in caplog.text and "tvrerank gallery" in caplog.text
    assert json.loads(result.output.splitlines()[-1])["results"]



@pytest.mark.parametrize("errno_name, fragment", [("ENOSPC", "no space left on device writing"),
                                                   ("EACCES", "choose a writable --out"),
                                                   ("EROFS", "choose a writable --out")])
def test_a_full_disk_or_an_unwritable_folder_is_one_line(finished, tmp_path, monkeypatch, errno_name, fragment):
    """Tests run as root, which may write anywhere: the failing write is simulated where the index
    is written (the same boundary catches extract, candidates, train and gallery)."""
    import errno
    import os

    from tvrerank.index import store

    def failing_save(path, *args, **kwargs):
        code = getattr(errno, errno_name)
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(store.np, "save", failing_save)
    result = CliRunner().invoke(main, ["index", str(finished / "cache.h5"), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "video_rows.npy" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "idx").exists()  # nothing half-written


def test_a_gpu_device_without_a_gpu_is_one_line(finished, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    places = {"ann": finished / "data" / "captions.jsonl", "data": finished / "data", "tmp": tmp_path,
              "cache": finished / "cache.h5", "index": finished / "index", "run": finished / "run"}
    for command in (EXTRACT + " --device cuda", RETRIEVE.replace("--device cpu", "--device cuda") + " q"):
        result = CliRunner().invoke(main, command.format(**places).split())
        assert result.exit_code == 2 and "torch sees no GPU here" in result.output, result.output
        assert isinstance(result.exception, SystemExit) and "--device cpu" in result.output


def test_a_nul_byte_in_a_caption_is_refused_before_the_model_loads(finished, tmp_path, monkeypatch):
    from tvrerank.extract import encoder

    shutil.copytree(finished / "data", tmp_path / "data")
    annotations = tmp_path / "data" / "captions.jsonl"
    lines = annotations.read_text().splitlines()
    lines[2] = json.dumps({"video": "videos/v1.mp4", "caption": "a dog\u0000runs"})
    annotations.write_text("\n".join(lines) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(encoder, "create_clip", no_model)
    result = CliRunner().invoke(main, EXTRACT.format(ann=annotations, data=tmp_path / "data", tmp=tmp_path).split()
                                + ["--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"{annotations}: line 3, field 'caption': holds a NUL byte" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no cache, no parts, no lock


def test_ranks_out_into_a_missing_folder_is_refused_before_evaluating(finished, tmp_path, monkeypatch):
    from tvrerank import evaluation

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated first")

    monkeypatch.setattr(evaluation, "stage1_evaluation", no_evaluation)
    ranks = tmp_path / "gone" / "ranks.csv"
    result = CliRunner().invoke(main, ["eval", "--cache", str(finished / "cache.h5"), "--candidates",
                                       str(finished / "cand.h5"), "--reranker", str(finished / "run"),
                                       "--device", "cpu", "--ranks-out", str(ranks)])
    assert result.exit_code == 2, result.output
    assert f"--ranks-out {ranks}: folder {ranks.parent} does not exist" in result.output
    assert not (tmp_path / "gone").exists()


def test_a_damaged_gallery_store_is_not_used(finished, tmp_path, caplog):
    """Low bits flipped in every stored token keep them finite: the store must be refused (a warning,
    scores computed without it), never used."""
    import h5py

    shutil.copytree(finished / "run", tmp_path / "run")
    run, runner = tmp_path / "run", CliRunner()
    query = RETRIEVE.format(cache=finished / "cache.h5", index=finished / "index", run=run).split() + \
        ["--json", "clip 1 caption 0"]
    without_store = runner.invoke(main, query)
    assert without_store.exit_code == 0, without_store.output
    assert runner.invoke(main, ["gallery", "--gallery", str(finished / "cache.h5"), "--reranker", str(run),
                                "--device", "cpu"]).exit_code == 0
    (store,) = (run / "gallery").glob("*.h5")
    with h5py.File(store) as f:
        name = max((k for k in f if f[k].dtype.kind == "f"), key=lambda k: f[k].size)
        start, size = f[name].id.get_offset(), f[name].id.get_storage_size()
    flip(store, start, size, mask=0x03)
    result = runner.invoke(main, query)
    assert result.exit_code == 0, result.output
    assert "not a readable gallery store" in caplog.text and f"{store.name}.sha256" in caplog.text
    assert json.loads(result.output.splitlines()[-1]) == json.loads(without_store.output.splitlines()[-1])


def test_artifacts_written_before_checksums_load_with_a_warning(finished, tmp_path, caplog):
    """An index whose config.json records no file digests, and a run without reranker.pt.sha256."""
    shutil.copytree(finished / "index", tmp_path / "index")
    shutil.copytree(finished / "run", tmp_path / "run")
    config = json.loads((tmp_path / "index" / "config.json").read_text())
    del config["files"]
    (tmp_path / "index" / "config.json").write_text(json.dumps(config))
    (tmp_path / "index" / "config.json.sha256").unlink()
    (tmp_path / "run" / "reranker.pt.sha256").unlink()
    result = CliRunner().invoke(main, RETRIEVE.format(cache=finished / "cache.h5", index=tmp_path / "index",
                                                      run=tmp_path / "run").split() + ["--json", "clip 1 caption 0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["results"]
    assert "an index built before checksums" in caplog.text
    assert "reranker.pt has no checksum" in caplog.text


def test_an_old_index_from_two_builds_is_refused_by_its_counts(finished, tmp_path):
    """Without digests (an index built before them), index.faiss of another build is still caught: its
    vector count differs from video_rows.npy's."""
    places = other_build(finished, tmp_path)
    config = json.loads((places["index"] / "config.json").read_text())
    del config["files"]
    (places["index"] / "config.json").write_text(json.dumps(config))
    (places["index"] / "config.json.sha256").unlink()
    result = CliRunner().invoke(main, ["candidates", str(finished / "cache.h5"), "--index", str(places["index"]),
                                       "--out", str(tmp_path / "c.h5")])
    assert result.exit_code == 2, result.output
    assert "its files are from different builds (index.faiss holds 40 vectors" in result.output
