"""Retrieval end to end through the CLI: query → the gallery's text encoder → FAISS → re-ranker."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VIT, make_dataset, synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.cli import main
from tvrerank.retrieve.gallery_store import FIELDS, FORMAT, GalleryStore, StoreFormatError, build_gallery_store
from tvrerank.retrieve.retriever import Retriever
from tvrerank.rerank.model import RerankerConfig
from tvrerank.rerank.variants import build_reranker

SMALL = {"captions": 4, "negatives": 2, "in_batch": 1, "eval_every": 2,
         "model": {"width": 16, "heads": 2, "layers": 1, "queries": 2, "video_keep": 4, "perturb_samples": 4}}


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    annotations = make_dataset(root / "data", num_videos=5)
    cache = root / "gallery.h5"
    assert invoke("extract", "--annotations", str(annotations), "--videos", str(annotations.parent), "--model",
                  str(TINY_VIT), "--out", str(cache), "--frames", "4", "--workers", "0", "--device", "cpu",
                  "--quiet").exit_code == 0
    assert invoke("index", str(cache), "--out", str(root / "index")).exit_code == 0
    assert invoke("candidates", str(cache), "--index", str(root / "index"), "--out", str(root / "cand.h5"),
                  "--k", "4").exit_code == 0
    (root / "train.json").write_text(json.dumps(SMALL))
    result = invoke("train", "--cache", str(cache), "--candidates", str(root / "cand.h5"), "--out",
                    str(root / "run"), "--config", str(root / "train.json"), "--steps", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root, cache


def retrieve(setup, *args, input=None):
    root, cache = setup
    return invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                  str(root / "run"), "--device", "cpu", *args, input=input)


def test_json_results_are_reranked_and_never_failed_videos(setup):
    result = retrieve(setup, "clip 1 caption 0", "un clip 😀 vidéo", "--top", "5", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [line["query"] for line in lines] == ["clip 1 caption 0", "un clip 😀 vidéo"]
    for line in lines:
        hits = line["results"]
        assert len(hits) == 5  # all 5 ok videos: 3 re-ranked, then 2 in stage-1 order
        assert all(hit["video_id"].startswith("v") for hit in hits)  # the broken files never come back
        assert all(hit["rerank"] is not None for hit in hits[:3]) and hits[3]["rerank"] is None
        assert [hit["ranked_by"] for hit in hits] == ["fused"] * 3 + ["stage1"] * 2
        scores = [hit["score"] for hit in hits[:3]]
        assert scores == sorted(scores, reverse=True)
        assert [hit["score"] for hit in hits[3:]] == [hit["stage1"] for hit in hits[3:]]
        assert hits[3]["stage1"] >= hits[4]["stage1"]


def test_table_output_and_stage_one_only(setup):
    table = retrieve(setup, "clip 2 caption 1", "--top", "3").output
    assert "query: clip 2 caption 1" in table and "rerank" in table and "videos/v" in table
    root, cache = setup
    plain = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--no-rerank",
                   "--device", "cpu", "--json", "clip 2 caption 1")
    hits = json.loads(plain.output.splitlines()[-1])["results"]
    assert all(hit["rerank"] is None for hit in hits)
    # "score" is always what the list is ordered by: here the stage-1 score
    assert all(hit["score"] == hit["stage1"] and hit["ranked_by"] == "stage1" for hit in hits)
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)


def test_threads_option_sets_torch_threads(setup):
    before = torch.get_num_threads()
    try:
        assert retrieve(setup, "clip 2 caption 1", "--threads", "1").exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert retrieve(setup, "clip 2 caption 1", "--threads", "0").exit_code == 2  # at least 1


def test_queries_from_a_file_and_stdin(setup, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("clip 0 caption 0\n\nclip 3 caption 1\n")
    from_file = retrieve(setup, "--queries-file", str(queries), "--json").output
    from_stdin = retrieve(setup, "--queries-file", "-", "--json", input=queries.read_text()).output
    assert from_file == from_stdin and from_file.count('"query"') == 2


def test_bad_queries_are_named(setup, caplog):
    result = retrieve(setup, "fine", "   ")
    assert result.exit_code == 2 and "query 2 (argument)" in result.output
    result = retrieve(setup, "--queries-file", "-", input="ok\n \t\n")
    assert result.exit_code == 2 and "stdin line 2" in result.output
    long_query = " ".join(["word"] * 100)
    assert retrieve(setup, long_query, "--top", "2").exit_code == 0
    assert "truncated" in caplog.text


def test_gallery_store_gives_the_same_results(setup):
    root, cache = setup
    without = Retriever(cache, root / "index", root / "run", device="cpu", use_store=False)
    before = without.search(["clip 4 caption 0", "clip 1 caption 1"], top=5, k=4)
    without.close()
    assert invoke("gallery", "--gallery", str(cache), "--reranker", str(root / "run"), "--device", "cpu").exit_code == 0
    with_store = Retriever(cache, root / "index", root / "run", device="cpu")
    assert with_store.store is not None
    after = with_store.search(["clip 4 caption 0", "clip 1 caption 1"], top=5, k=4)  # videos shared: gathered
    one_by_one = [with_store.search([query], top=5, k=4)[0] for query in ("clip 4 caption 0", "clip 1 caption 1")]
    with_store.close()
    for a, b in zip(before + before, after + one_by_one):
        assert [h.video_id for h in a.results] == [h.video_id for h in b.results]
        # the store keeps float16 tokens: scores move by float16 rounding only
        np.testing.assert_allclose([h.score for h in a.results], [h.score for h in b.results], atol=2e-2)


def test_gallery_store_records_are_memory_mapped_and_old_stores_are_ignored(setup, caplog, monkeypatch):
    import mmap

    class Mapped(mmap.mmap):  # records the read-ahead hint the store gives the kernel
        hints: list = []

        def madvise(self, *args):
            Mapped.hints.append(args)
            return super().madvise(*args)

    def mapping(array):
        while isinstance(array, np.ndarray):
            array = array.base
        return array.obj if isinstance(array, memoryview) else array

    monkeypatch.setattr(mmap, "mmap", Mapped)
    root, cache = setup
    assert invoke("gallery", "--gallery", str(cache), "--reranker", str(root / "run"), "--device", "cpu").exit_code == 0
    with CacheReader(cache) as reader:
        store = GalleryStore.find(root / "run", reader)
        rows = store.rows[[3, 0, 2]]  # any order: records come back in that order
        selected = store.read(rows, torch.device("cpu"))
        assert all(isinstance(mapping(store.arrays[name]), Mapped) for name in FIELDS)  # views of the file's bytes
        assert Mapped.hints == [(mmap.MADV_RANDOM,)]  # K scattered records per query: no read-ahead
        assert store.arrays["frame_tokens"].dtype == np.float16 and selected.frame_tokens.dtype == torch.float32
        with h5py.File(store.path, "r") as f:  # the same bytes h5py reads
            for name in FIELDS:
                np.testing.assert_array_equal(getattr(selected, name).numpy(), f[name][()][[3, 0, 2]])
        with pytest.raises(KeyError):
            store.read(np.array([reader.num_videos + 5]), torch.device("cpu"))
        store.close()
        with h5py.File(store.path, "r") as f:  # rewrite it as the version with chunked records did
            arrays, attrs = {name: f[name][()] for name in ("rows",) + FIELDS}, dict(f.attrs)
        with h5py.File(store.path, "w") as f:
            f["rows"] = arrays.pop("rows")
            for name, array in arrays.items():
                f.create_dataset(name, data=array, chunks=(1,) + array.shape[1:])
            f.attrs.update({k: v for k, v in attrs.items() if k != "format"})
        assert GalleryStore.find(root / "run", reader) is None and "rebuild it" in caplog.text
        with h5py.File(store.path, "r+") as f:  # marked current but still chunked: refused, not misread
            f.attrs["format"] = FORMAT
        with pytest.raises(StoreFormatError, match="chunked"):
            GalleryStore(store.path)
    assert invoke("gallery", "--gallery", str(cache), "--reranker", str(root / "run"), "--device", "cpu").exit_code == 0


def test_a_reranker_that_outputs_nan_is_refused(setup, tmp_path):
    root, cache = setup
    saved = torch.load(root / "run" / "reranker.pt", weights_only=True)
    saved["state_dict"]["head.3.bias"].fill_(float("nan"))
    (tmp_path / "nan-run").mkdir()
    torch.save(saved, tmp_path / "nan-run" / "reranker.pt")
    result = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                    str(tmp_path / "nan-run"), "--device", "cpu", "--no-store", "clip 1 caption 0")
    assert result.exit_code == 2 and "NaN/inf" in result.output and "Traceback" not in result.output


def test_a_gallery_without_ok_videos_has_no_store(tmp_path):
    cache = synthetic_cache(tmp_path / "failed.h5", videos=3, failed=(0, 1, 2))
    with pytest.raises(ValueError, match="no video extracted ok"):
        build_gallery_store(cache, tmp_path / "run", build_reranker(RerankerConfig()), device=torch.device("cpu"))


def test_an_index_or_reranker_for_another_gallery_is_refused(setup, tmp_path):
    root, cache = setup
    other = synthetic_cache(tmp_path / "other.h5", videos=6)
    assert invoke("index", str(other), "--out", str(tmp_path / "other-index")).exit_code == 0
    result = invoke("retrieve", "--gallery", str(cache), "--index", str(tmp_path / "other-index"), "--no-rerank",
                    "query")
    assert result.exit_code == 2 and "encoder.model synthetic (it) vs " in result.output


# --------------------------------------------------------------------------- external candidates
def test_rerank_of_the_first_stages_own_top_k_is_search(setup):
    root, cache = setup
    with Retriever(cache, root / "index", root / "run", device="cpu") as retriever:
        for query in ("clip 1 caption 0", "clip 3 caption 1"):
            (searched,) = retriever.search([query], top=4, k=4)
            stage1 = retriever.search([query], top=4, k=4, rerank=False)[0]
            ids = [hit.video_id for hit in stage1.results]
            given = retriever.rerank(query, ids[::-1], k=4)  # any order: stage-1 order is by score
            assert given == searched
            assert [hit.stage1_rank for hit in given.results] == [hit.stage1_rank for hit in searched.results]
            top2 = retriever.rerank(query, ids, k=4, top=2)
            assert top2.results == searched.results[:2]


def test_rerank_uses_the_callers_stage1_scores(setup):
    root, cache = setup
    with Retriever(cache, root / "index", root / "run", device="cpu") as retriever:
        result = retriever.rerank("clip 2 caption 0", ["videos/v0", "videos/v1", "videos/v2"], stage1=[0.1, 0.9, 0.5])
        by_id = {hit.video_id: hit for hit in result.results}
        assert {v: by_id[v].stage1_rank for v in by_id} == {"videos/v1": 1, "videos/v2": 2, "videos/v0": 3}
        assert by_id["videos/v1"].stage1 == pytest.approx(0.9) and all(hit.rerank is not None for hit in result.results)
        with pytest.raises(ValueError, match="stage1 must be 3 finite numbers"):
            retriever.rerank("q", ["videos/v0", "videos/v1", "videos/v2"], stage1=[0.1, float("nan"), 0.5])


@pytest.mark.parametrize("ids, message", [
    ([], "video_ids is empty"),
    (["videos/v0", "videos/v1", "videos/v0"], "video id 'videos/v0' is listed twice"),
    (["videos/v0", "nope"], "no video 'nope' in the gallery"),
    (["videos/v0", "videos/v1", "videos/v2", "videos/v3"], "4 ids, more than the re-ranker's K = 3"),
    ("videos/v0", "must be a list"),
])
def test_rerank_refuses_bad_candidate_lists_naming_the_id(setup, ids, message):
    from tvrerank.errors import TvrerankError

    root, cache = setup
    with Retriever(cache, root / "index", root / "run", device="cpu") as retriever:
        with pytest.raises(TvrerankError, match=message):
            retriever.rerank("clip 1 caption 0", ids, k=3)


def test_rerank_refuses_a_video_that_is_not_indexed(setup):
    from tvrerank.errors import TvrerankError

    root, cache = setup
    with Retriever(cache, root / "index", root / "run", device="cpu") as retriever:
        failed = [str(v) for row, v in enumerate(retriever.video_ids) if not retriever.indexed[row]]
        assert failed  # the fixture's broken files
        with pytest.raises(TvrerankError, match=f"video '{failed[0]}' is not searchable"):
            retriever.rerank("clip 1 caption 0", ["videos/v0", failed[0]])


def test_retrieve_candidates_file(setup, tmp_path):
    root, cache = setup
    with Retriever(cache, root / "index", root / "run", device="cpu") as retriever:
        expected = [retriever.rerank("clip 1 caption 0", ["videos/v2", "videos/v0", "videos/v1"], k=15).to_json(),
                    retriever.rerank("clip 4 caption 1", ["videos/v4", "videos/v3"], stage1=[0.2, 0.3], k=15).to_json()]
    good = tmp_path / "candidates.jsonl"
    good.write_text(json.dumps({"q": "clip 1 caption 0", "video_ids": ["videos/v2", "videos/v0", "videos/v1"]}) + "\n\n"
                    + json.dumps({"q": "clip 4 caption 1", "video_ids": ["videos/v4", "videos/v3"], "stage1": [0.2, 0.3]}) + "\n")
    result = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                    str(root / "run"), "--device", "cpu", "--candidates-file", str(good), "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert lines == expected
    from_stdin = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                        str(root / "run"), "--device", "cpu", "--candidates-file", "-", "--json",
                        input=good.read_text())
    assert from_stdin.output == result.output


@pytest.mark.parametrize("second_line, message", [
    ("{not json", "line 3: not JSON"),
    ('["videos/v0"]', "line 3: a JSON object is expected"),
    ('{"q": "", "video_ids": ["videos/v0"]}', 'line 3: "q" must be a non-empty string'),
    ('{"q": "x", "video_ids": "videos/v0"}', 'line 3: "video_ids" must be a list'),
    ('{"q": "x", "video_ids": ["videos/v0"], "stage1": [1, 2]}', 'line 3: "stage1" must be a list of 1 finite'),
    ('{"q": "x", "videos": ["videos/v0"]}', "line 3: unknown field 'videos'"),
    ('{"q": "x", "video_ids": ["videos/v0", "videos/v9"]}', "line 3: no video 'videos/v9' in the gallery"),
    ('{"q": "x", "video_ids": ["videos/v0", "videos/v0"]}', "line 3: video id 'videos/v0' is listed twice"),
    ('{"q": "x", "video_ids": []}', "line 3 is empty"),
])
def test_a_bad_candidates_line_is_named_by_file_and_line(setup, tmp_path, second_line, message):
    root, cache = setup
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"q": "clip 1 caption 0", "video_ids": ["videos/v0"]}) + "\n\n" + second_line + "\n")
    result = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                    str(root / "run"), "--device", "cpu", "--candidates-file", str(path), "--json")
    assert result.exit_code == 2 and f"{path} {message}" in result.output, result.output
    assert '"results"' not in result.output and "Traceback" not in result.output  # nothing scored
    extra = invoke("retrieve", "--gallery", str(cache), "--index", str(root / "index"), "--reranker",
                   str(root / "run"), "--candidates-file", str(path), "a query")
    assert extra.exit_code == 2 and "goes alone" in extra.output


def test_the_serving_path_never_imports_the_trainers():
    import subprocess
    import sys

    code = ("import sys, tvrerank.retrieve.retriever, tvrerank.retrieve.gallery_store, tvrerank.serve.service; "
            "print(sorted(m for m in sys.modules if m == 'tvrerank.training' or m.startswith('tvrerank.train') "
            "or m == 'tvrerank.firststage.train' or m == 'tvrerank.toy.pretrain'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
