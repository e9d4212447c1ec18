"""A gallery split in 2 shards, each served by a real `tvrerank serve SHARD_DIR` on loopback, searched
through ``ShardedRetriever`` and through a real `tvrerank serve --shards` front (retrieve/sharded.py,
serve/front.py), against one server of the whole gallery."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from conftest import serve_process, stop
from fastapi.testclient import TestClient

from tvrerank.cli import main
from tvrerank.retrieve.retriever import Retriever
from tvrerank.retrieve.sharded import ShardedRetriever, ShardUnavailable
from tvrerank.serve.app import create_app
from tvrerank.serve.front import create_front_app
from tvrerank.serve.service import SearchService

QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def shard_urls(split_demo):
    started = []
    try:
        for shard in split_demo["shards"]:
            started.append(serve_process(shard, "--device", "cpu", "--threads", "1"))
        yield [url for _, url in started]
    finally:
        for process, _ in started:
            stop(process)


@pytest.fixture(scope="module")
def whole(split_demo):
    """One server of the whole gallery, with the same re-ranker and its whole store."""
    service = SearchService(Retriever(split_demo["gallery"], split_demo["index"], split_demo["run"], device="cpu"))
    yield service, TestClient(create_app(service))
    service.retriever.close()


def without_scores(answer: dict) -> dict:
    return {**answer, "results": [{key: value for key, value in hit.items() if key not in ("rerank", "score")}
                                  for hit in answer["results"]]}


def assert_same_ranking(front: dict, whole: dict) -> None:
    """The same ranked ids, stage-1 scores and ranks exactly; the re-ranker's and fused scores to float32
    rounding (a shard scores fewer pairs in one batch, and torch's CPU kernels round by batch shape: 1 ulp)."""
    assert without_scores(front) == without_scores(whole)
    for mine, theirs in zip(front["results"], whole["results"]):
        for key in ("rerank", "score"):
            assert (mine[key] is None) == (theirs[key] is None)
            if mine[key] is not None:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (key, mine, theirs)


def test_two_shards_rank_every_test_caption_as_the_whole_gallery(shard_urls, whole):
    service, client = whole
    captions = sorted(set(service.captions))
    assert len(captions) >= 12
    with ShardedRetriever(shard_urls) as sharded:
        assert sharded.searchable == len(service.retriever.index_rows) == 12 and sharded.k == service.k
        for caption in captions:
            for params in ({"top": 12}, {}, {"top": 3}, {"rerank": False, "top": 12}):
                expected = client.get("/api/search", params={"q": caption, **params}).json()
                assert_same_ranking(sharded.search(caption, **params), expected)


def test_the_serve_front_process_answers_as_the_whole_gallery(shard_urls, whole):
    service, client = whole
    process, url = serve_process("--shards", ",".join(shard_urls))
    try:
        info = json.loads(urllib.request.urlopen(url + "api/info", timeout=30).read())
        assert info["searchable"] == 12 and [s["shard"] for s in info["shards"]] == [1, 2]
        for caption in sorted(set(service.captions))[:4]:
            answer = json.loads(urllib.request.urlopen(url + "api/search?" + urlencode({"q": caption}),
                                                       timeout=30).read())
            assert_same_ranking(answer, client.get("/api/search", params={"q": caption}).json())
        with pytest.raises(urllib.error.HTTPError) as refused:  # a shard's 400 is passed on
            urllib.request.urlopen(url + "api/search?q=%20", timeout=30)
        assert refused.value.code == 400 and "empty" in json.loads(refused.value.read())["error"]
    finally:
        stop(process)


def free_url() -> str:
    """The URL of a loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


def test_a_shard_that_is_down_is_one_line_naming_it(shard_urls, split_demo):
    down = free_url()
    with pytest.raises(ShardUnavailable, match=f"^shard {down} is not answering") as refused:
        ShardedRetriever([shard_urls[0], down])
    assert "\n" not in str(refused.value)
    result = CliRunner().invoke(main, ["serve", "--shards", f"{shard_urls[0]},{down}", "--port", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines() == [f"error: {refused.value}"]
    # a shard that stops while the front runs: the front answers 502 naming it, and again once it is back
    process, second = serve_process(split_demo["shards"][1], "--device", "cpu", "--threads", "1")
    try:
        sharded = ShardedRetriever([shard_urls[0], second])
        client = TestClient(create_front_app(sharded))
        assert client.get("/api/search", params={"q": QUERY}).status_code == 200
    finally:
        stop(process)
    response = client.get("/api/search", params={"q": QUERY})
    assert response.status_code == 502 and response.json()["error"].startswith(f"shard {second} is not answering")
    sharded.close()


def test_the_front_refuses_urls_that_are_not_one_split(shard_urls, whole):
    for urls, expected in (([shard_urls[0], shard_urls[0]], "shard 2 of 2 is missing"),
                           ([shard_urls[1]], "serves shard 2 of 2, but 1 shard URLs are given")):
        with pytest.raises(Exception, match=expected):
            ShardedRetriever(urls)
    result = CliRunner().invoke(main, ["serve", "--shards", ",".join(shard_urls), "--gallery",
                                       str(whole[0].retriever.gallery)])
    assert result.exit_code == 2 and "give no folder" in result.output
