"""The search page's API (serve/app.py over serve/service.py) with FastAPI's test client on a small
demo world, and `tvrerank serve`'s start-up checks through the CLI. The page in a real browser
against a real server: tests/test_serve_browser.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from tvrerank.cli import main
from tvrerank.extract.frames import sample_frames
from tvrerank.retrieve.retriever import Retriever
from tvrerank.serve.app import create_app
from tvrerank.serve.service import Busy, Gate, SearchService, StripCache

QUERY = "a red circle moves left"


def open_service(demo, run="run-top-m", gallery=None, **options) -> SearchService:
    retriever = Retriever(gallery or demo / "cache" / "test.h5", demo / "index" / "test", demo / run, device="cpu")
    return SearchService(retriever, **options)


@pytest.fixture(scope="module")
def service(served_demo):
    service = open_service(served_demo)
    yield service
    service.retriever.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


def test_search_is_one_line_of_retrieve_json(client, served_demo):
    result = CliRunner().invoke(main, ["retrieve", QUERY, "--gallery", str(served_demo / "cache" / "test.h5"),
                                       "--index", str(served_demo / "index" / "test"), "--reranker",
                                       str(served_demo / "run-top-m"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    response = client.get("/api/search", params={"q": QUERY})
    assert response.status_code == 200
    assert response.json() == line
    hits = line["results"]
    assert len(hits) == 10 and {hit["ranked_by"] for hit in hits} == {"fused"}
    stage1 = client.get("/api/search", params={"q": QUERY, "rerank": "false", "top": 12}).json()["results"]
    assert [hit["stage1_rank"] for hit in stage1] == list(range(1, 13))
    assert all(hit["rerank"] is None and hit["ranked_by"] == "stage1" for hit in stage1)
    by_id = {hit["video_id"]: hit for hit in stage1}
    for hit in hits:  # the re-ranked column's ranks of origin are the stage-1 column's places
        assert by_id[hit["video_id"]]["stage1_rank"] == hit["stage1_rank"]


def test_explain_matches_the_scores_and_the_selection(client, service):
    hit = client.get("/api/search", params={"q": QUERY}).json()["results"][0]
    data = client.get("/api/explain", params={"q": QUERY, "video_id": hit["video_id"]}).json()
    assert data["score"] == pytest.approx(hit["rerank"], abs=1e-4)  # the pair the search scored
    frames, (rows, cols) = data["frames"], data["grid"]
    assert frames == 12 and rows * cols == data["tokens_per_frame"] == 64 and data["frame_tokens"] == "top_m"
    assert len(data["kept_patches"]) == frames and all(len(kept) == 3 for kept in data["kept_patches"])
    assert all(0 <= patch < 64 for kept in data["kept_patches"] for patch in kept)
    for pick in data["video_picks"]:  # a picked patch is one the frame selector kept
        assert pick["patch"] is None or pick["patch"] in data["kept_patches"][pick["frame"]]
    assert sum(data["frame_weight"]) == pytest.approx(1, abs=1e-3)
    for t in range(frames):
        heat = np.array(data["patch_heat"][t])
        assert set(np.flatnonzero(heat)) <= set(data["kept_patches"][t])
        assert heat.sum() + data["global_attention"][t] == pytest.approx(1, abs=1e-3)


def test_explain_on_a_detail_world_carries_its_known_answer(detail_demo):
    """A detail world's gallery: each explain gives, per sampled frame, the patches that show the
    detail, as the cache's truth/detail records them (read here with h5py, not through the service)."""
    gallery = detail_demo / "cache" / "test.h5"
    with h5py.File(gallery, "r") as f:
        truth = f["truth/detail"][()]  # (N, T, P) bool
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["videos/id"][()]]
    service = open_service(detail_demo, run="run")
    try:
        client = TestClient(create_app(service))
        shown = 0
        for row, video_id in enumerate(ids):
            caption = client.get(f"/api/videos/{video_id}").json()["captions"][0]
            data = client.get("/api/explain", params={"q": caption, "video_id": video_id}).json()
            expected = [np.flatnonzero(frame).tolist() for frame in truth[row]]
            assert data["detail_patches"] == expected, video_id
            assert all(not patches for patches, valid in zip(expected, data["frame_valid"]) if not valid)
            shown += sum(map(len, data["detail_patches"]))
        assert shown == int(truth.sum()) > len(ids)  # every video shows its detail in some frames
    finally:
        service.retriever.close()


def test_explain_without_a_known_answer_has_no_detail(client):
    """The events world's cache (like every real gallery) records no detail: the key is absent."""
    data = client.get("/api/explain", params={"q": QUERY, "video_id": "test-000001"}).json()
    assert "kept_patches" in data and "detail_patches" not in data


def test_video_and_its_frame_strip(client, service, served_demo):
    video = client.get("/api/videos/test-000003").json()
    assert video["status"] == "ok" and video["exists"] and video["captions"] and video["duration"] > 0
    response = client.get("/api/videos/test-000003/frames")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "x-tvrerank-placeholder" not in response.headers
    strip = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    assert strip.shape == (64, 12 * 64, 3)  # the encoder's input size, one cell per sampled frame
    sampled = sample_frames(served_demo / "data" / video["path"], num_frames=12, image_size=64)
    assert np.abs(strip - np.concatenate(list(sampled.frames), axis=1)).mean() < 6  # JPEG, same frames
    assert client.get("/api/videos/test-000003/frames").content == response.content  # from memory


def test_bad_input_gets_a_json_error(client):
    for params in ({"q": ""}, {"q": "   \t "}, {}):
        response = client.get("/api/search", params=params)
        assert response.status_code == 400 and "empty" in response.json()["error"], params
    for params in ({"q": QUERY, "top": -2}, {"q": QUERY, "top": "many"}, {"q": QUERY, "rerank": "maybe"}):
        response = client.get("/api/search", params=params)
        assert response.status_code == 400 and response.json()["error"], params
    long = client.get("/api/search", params={"q": "red circle " * 400})
    assert long.status_code == 200 and "cut" in long.json()["warning"] and len(long.json()["query"]) == 1000
    assert "longer than the text encoder" in client.get("/api/search", params={"q": "red " * 60}).json()["warning"]
    assert client.get("/api/explain", params={"q": " ", "video_id": "test-000001"}).status_code == 400


def test_rerank_of_every_test_captions_own_stage1_top_k_is_search(client, service):
    """The target: an external first stage that returns our own stage-1 top K gets /api/search's order."""
    k = min(service.k, len(service.retriever.index_rows))
    captions = sorted(set(service.captions))
    assert len(captions) >= 12
    for caption in captions:
        stage1 = client.get("/api/search", params={"q": caption, "rerank": "false", "top": k}).json()["results"]
        ids = [hit["video_id"] for hit in stage1]
        assert len(ids) == k
        searched = client.get("/api/search", params={"q": caption, "top": k}).json()
        response = client.post("/api/rerank", json={"q": caption, "video_ids": ids[::-1]})  # order given: any
        assert response.status_code == 200, response.text
        assert response.json() == searched, caption
    top3 = client.post("/api/rerank", json={"q": captions[0], "video_ids": ids, "top": 3}).json()["results"]
    assert len(top3) == 3
    given = client.post("/api/rerank", json={"q": QUERY, "video_ids": ids[:2], "stage1": [0.1, 0.7]}).json()
    assert [hit["video_id"] for hit in sorted(given["results"], key=lambda h: h["stage1_rank"])] == ids[1::-1]


def test_rerank_bad_input_is_a_4xx_naming_the_id(client, service):
    some = [str(v) for v in service.retriever.video_ids[:3]]
    cases = [({"q": QUERY, "video_ids": []}, "video_ids is empty"),
             ({"q": QUERY, "video_ids": [some[0], "nope"]}, "no video 'nope'"),
             ({"q": QUERY, "video_ids": [some[0], some[1], some[0]]}, f"video id '{some[0]}' is listed twice"),
             ({"q": " ", "video_ids": some}, "empty"),
             ({"q": QUERY, "video_ids": "x"}, "video_ids"),
             ({"q": QUERY}, "video_ids"),
             ({"q": QUERY, "video_ids": some, "stage1": [1.0]}, "stage1 must be 3 finite numbers")]
    for body, message in cases:
        response = client.post("/api/rerank", json=body)
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)
    small_k = TestClient(create_app(SearchService(service.retriever, k=2)))  # the gallery has fewer than 15
    response = small_k.post("/api/rerank", json={"q": QUERY, "video_ids": some})
    assert response.status_code == 400 and "3 ids, more than the re-ranker's K = 2" in response.json()["error"]
    broken = client.post("/api/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]


@pytest.mark.parametrize("path", [
    "/api/videos/nope", "/api/videos/nope/frames", "/api/explain?q=red&video_id=nope",
    "/api/videos/..%2F..%2F..%2Fetc%2Fpasswd", "/api/videos/..%2F..%2F..%2Fetc%2Fpasswd/frames",
    "/api/videos/%2Fetc%2Fpasswd/frames", "/api/videos/%252e%252e%252fetc%252fpasswd/frames",
    "/api/videos/../../../etc/passwd", "/static/..%2F..%2Fapp.py", "/static/%2e%2e/service.py",
    "/static/../../../pyproject.toml", "/etc/passwd", "/api/videos/test-000001/frames/../../../../etc/passwd",
])
def test_unknown_videos_and_path_like_parameters_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, path
    assert "error" in response.json() and "root:" not in response.text and "import" not in response.text


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text and "http" not in page.text
    assert "function explain" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_a_missing_or_escaping_video_gives_a_placeholder_strip(served_demo, tmp_path):
    gallery = tmp_path / "gallery.h5"
    shutil.copy(served_demo / "cache" / "test.h5", gallery)
    with h5py.File(gallery, "r+") as f:
        paths = f["videos/path"].asstr()[:]
        paths[0], paths[1] = "videos/test/gone.mp4", "../../../../../../../../etc/hostname"
        f["videos/path"][:] = list(paths)
    outside = tmp_path / "outside.mp4"  # a real video beside the root: never read through an escaping path
    shutil.copy(served_demo / "data" / "videos" / "test" / "000002.mp4", outside)
    with h5py.File(gallery, "r+") as f:
        paths = f["videos/path"].asstr()[:]
        paths[2], paths[3] = f"../{outside.name}", "fifo.mp4"
        f["videos/path"][:] = list(paths)
    videos_root = tmp_path / "root"
    shutil.copytree(served_demo / "data", videos_root)
    os.mkfifo(videos_root / "fifo.mp4")  # opening it would block the server: never opened
    index = tmp_path / "index"
    assert CliRunner().invoke(main, ["index", str(gallery), "--out", str(index)]).exit_code == 0
    retriever = Retriever(gallery, index, served_demo / "run-top-m", device="cpu")
    with retriever:
        client = TestClient(create_app(SearchService(retriever, videos_root=videos_root)))
        for video_id in ("test-000000", "test-000001", "test-000002", "test-000003"):
            response = client.get(f"/api/videos/{video_id}/frames")
            assert response.status_code == 200 and response.headers["x-tvrerank-placeholder"], video_id
            assert response.headers["cache-control"] == "no-store"  # the file may come back
            assert Image.open(io.BytesIO(response.content)).size == (12 * 64, 64)
            info = client.get(f"/api/videos/{video_id}").json()
            assert info["exists"] is False and info["duration"] is None
        assert "x-tvrerank-placeholder" not in client.get("/api/videos/test-000004/frames").headers


def test_any_decoding_failure_gives_a_placeholder(service, monkeypatch):
    import tvrerank.serve.service as module

    def broken(*args, **kwargs):
        raise RuntimeError("a PyAV error of a kind the sampler does not wrap")

    monkeypatch.setattr(module, "sample_frames", broken)
    response = TestClient(create_app(service)).get("/api/videos/test-000011/frames")
    assert response.status_code == 200 and "cannot be decoded" in response.headers["x-tvrerank-placeholder"]
    assert service.strips.get("test-000011") is None


def test_frames_of_a_cache_resized_by_an_unknown_method_are_placeholders_not_a_refusal(served_demo, monkeypatch):
    """A cache from a later version (another sampling.resize) still serves search; strips say why not."""
    import dataclasses

    service = open_service(served_demo)
    try:
        cache = service.retriever.cache
        monkeypatch.setattr(cache, "header", dataclasses.replace(
            cache.header, sampling=dataclasses.replace(cache.header.sampling, resize="future")))
        unknown = SearchService(service.retriever)
        response = TestClient(create_app(unknown)).get("/api/videos/test-000011/frames")
        assert response.status_code == 200
        assert "'future'" in response.headers["x-tvrerank-placeholder"]
        assert unknown.search(QUERY, top=3)["results"]
    finally:
        service.retriever.close()


def test_strips_revalidate_by_etag_and_other_hosts_are_refused(service):
    client = TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    first = client.get("/api/videos/test-000005/frames")
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    again = client.get("/api/videos/test-000005/frames", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert client.get("/api/videos/test-000005/frames", headers={"If-None-Match": '"other"'}).status_code == 200
    # a page whose name was rebound to 127.0.0.1 sends its own name as Host
    assert client.get("/api/search", params={"q": QUERY}, headers={"Host": "evil.example"}).status_code == 400


def test_busy_server_answers_503_with_a_retry_hint(service):
    client = TestClient(create_app(service))
    gate = service.model_gate
    gate.inside = gate.workers + gate.waiting  # as if that many requests were in flight
    try:
        response = client.get("/api/search", params={"q": QUERY})
    finally:
        gate.inside = 0
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "busy" in response.json()["error"]
    assert client.get("/api/search", params={"q": QUERY}).status_code == 200  # and it recovers


def test_gate_runs_one_at_a_time_and_refuses_beyond_its_queue():
    import threading
    import time

    async def scenario():
        gate = Gate("test", workers=1, waiting=2, timeout_s=5)
        running, most = [0], [0]
        lock = threading.Lock()

        def work():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return "done"

        results = await asyncio.gather(*(gate.run(work) for _ in range(5)), return_exceptions=True)
        return results, most[0]

    results, most = asyncio.run(scenario())
    assert most == 1  # one at a time
    assert results[:3] == ["done"] * 3 and all(isinstance(r, Busy) for r in results[3:])  # 1 running + 2 waiting


def test_strip_cache_keeps_within_its_budget():
    cache = StripCache(budget=10)
    cache.put("a", b"12345", None)
    cache.put("b", b"1234", "note")
    assert cache.get("a") == (b"12345", None)  # a is now the most recent
    cache.put("c", b"123", None)  # over budget: b (least recently used) goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.bytes == 8
    cache.put("huge", b"x" * 11, None)
    assert cache.get("huge") is None


def serve_cli(*args):
    return CliRunner().invoke(main, ["serve", *map(str, args)])


def test_serve_refuses_artifacts_that_do_not_belong_together(served_demo):
    mismatched = ["--gallery", served_demo / "cache" / "test.h5", "--index", served_demo / "index" / "train",
                  "--reranker", served_demo / "run", "--port", "0"]
    served = serve_cli(*mismatched)
    retrieved = CliRunner().invoke(main, ["retrieve", "q", *map(str, mismatched[:6])])
    assert served.exit_code == retrieved.exit_code == 2
    assert served.output.strip().splitlines()[-1] == retrieved.output.strip().splitlines()[-1]
    assert "index" in served.output and "Traceback" not in served.output


def test_serve_command_line(served_demo, tmp_path, monkeypatch):
    from tvrerank.serve import server

    assert "give a demo folder" in serve_cli().output
    assert "not a finished `tvrerank demo` folder" in serve_cli(tmp_path).output
    started = []
    monkeypatch.setattr(server, "run", lambda app, sock: started.append(sock.getsockname()))
    result = serve_cli(served_demo, "--port", "0")
    assert result.exit_code == 0, result.output
    assert f"at http://127.0.0.1:{started[0][1]}/" in result.output and "warning" not in result.output
    result = serve_cli(served_demo, "--port", "0", "--host", "0.0.0.0")
    assert result.exit_code == 0 and "no authentication" in result.output
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    with busy:
        result = serve_cli(served_demo, "--port", busy.getsockname()[1])
    assert result.exit_code == 2 and "pass another --port" in result.output and "Traceback" not in result.output


def test_the_demo_run_reads_global_tokens_and_the_explain_view_says_so(served_demo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(served_demo / "run", run)
    assert CliRunner().invoke(main, ["gallery", "--gallery", str(served_demo / "cache" / "test.h5"), "--reranker",
                                     str(run), "--device", "cpu"]).exit_code == 0
    with open_service(served_demo, run=run) as service:
        client = TestClient(create_app(service))
        assert client.get("/api/info").json()["frame_tokens"] == "global"
        hit = client.get("/api/search", params={"q": QUERY}).json()["results"][0]
        data = client.get("/api/explain", params={"q": QUERY, "video_id": hit["video_id"]}).json()
        assert service.retriever.store is not None  # the demo's run has a gallery store: explain scores from it
    assert data["kept_patches"] == [[]] * 12 and all(pick["patch"] is None for pick in data["video_picks"])
    assert sum(data["frame_weight"]) == pytest.approx(1, abs=1e-3)  # what the page tints each frame by
    assert data["score"] == pytest.approx(hit["rerank"], abs=1e-6)  # float16 store vs cache: ~1e-5 apart


def test_video_duration_reads_the_stream_time_base_as_the_sampler_does(tmp_path, monkeypatch):
    """With no container duration, the stream's duration in its time base (``frames.seconds_per_tick``: an
    ``av.AVRational`` without ``__float__`` from PyAV 19 on) gives the seconds."""
    import av
    from conftest import make_video

    from tvrerank.serve import service

    path = make_video(tmp_path / "v.mp4", num_frames=30, fps=10)
    assert service.video_duration(path) == pytest.approx(3.0, abs=0.11)

    class Rational:  # PyAV 19's time base: numerator and denominator, no float()
        numerator, denominator = 1, 10

    class Stream:
        duration, time_base = 30, Rational()

    class Container:
        duration = None

        class streams:  # noqa: N801
            video = [Stream()]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: Container())
    assert service.video_duration(path) == 3.0
