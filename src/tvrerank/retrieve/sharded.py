"""Search a gallery split into shards (``tvrerank split``), each served by its own ``tvrerank serve SHARD_DIR``.

``ShardedRetriever`` talks to the shards' HTTP APIs, as ``faiss.IndexShards`` searches its sub-indexes:

1. stage 1 on every shard at once (``GET /api/search?rerank=false&top=depth``: each shard's top by
   stage-1 score), merged by score into the global stage-1 list (the same list one index of the whole
   gallery gives when each shard's search is exact);
2. its first K sent, each id to the shard that returned it, with its stage-1 score (``POST
   /api/rerank``), all shards at once: each re-ranks the ids it holds with the one re-ranker;
3. the re-ranker scores of all K fused and ordered here, by the run's fusion over the whole K list
   (``retriever.ranked_hits``, the rule ``search`` uses). The fused scores of different shards are not
   comparable (the tuned fusion standardises each list over its own candidates), their re-ranker
   scores are (one model), so the front fuses, not the shards.

On construction every shard's ``/api/info`` is read and checked: each a shard, 1..N each once, all of
one gallery and one re-ranker with one K. A shard that does not answer is a ``ShardUnavailable``
naming its URL; an answer that is an error (a bad query) is a ``ShardRefused`` with its status.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Sequence
from urllib.parse import urlencode

import numpy as np

from tvrerank.errors import InputError, TvrerankError, reason_of
from tvrerank.retrieve.retriever import ranked_hits

log = logging.getLogger(__name__)

SAME = ("gallery_ids_sha256", "reranker_sha256", "fusion", "fusion_alpha", "k")  # one value on every shard


class ShardUnavailable(TvrerankError):
    """A shard server that does not answer (down, or not a tvrerank server)."""


class ShardRefused(TvrerankError):
    """A shard's answer is an HTTP error (``status``), e.g. a bad query: its message is passed on."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Shard:
    """One shard server's API at ``url`` (``http://host:port/``)."""

    def __init__(self, url: str, *, timeout: float = 60.0):
        self.url = url if url.endswith("/") else url + "/"
        self.timeout = timeout

    def call(self, path: str, body: dict | None = None) -> dict:
        """GET ``path`` (or POST ``body`` as JSON) → the JSON answer; ShardUnavailable / ShardRefused."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path.lstrip("/"), data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error") or str(exc)
            except ValueError:
                message = str(exc)
            raise ShardRefused(f"shard {self.url}: {message}", 502 if exc.code >= 500 else exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timed out, not JSON
            reason = reason_of(getattr(exc, "reason", exc))
            raise ShardUnavailable(f"shard {self.url} is not answering ({reason}); start it with `tvrerank serve "
                                   "SHARD_DIR`, or leave it out of --shards") from None


class ShardedRetriever:
    """Search the union of the shards at ``urls`` (see the module docstring)."""

    def __init__(self, urls: Sequence[str], *, timeout: float = 60.0):
        if not urls:
            raise InputError("--shards: give the URL of each shard server, comma-separated")
        self.shards = [Shard(url, timeout=timeout) for url in urls]
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="shard")
        try:
            self.infos = self._each(lambda shard: shard.call("/api/info"))
            self._check_shards()
        except BaseException:
            self.close()
            raise
        first = self.infos[0]
        self.k, self.fusion = first["k"], (first["fusion"], first["fusion_alpha"])
        self.searchable = sum(info["searchable"] for info in self.infos)

    def _check_shards(self) -> None:
        """Every server a shard of one split (1..N each once), of one gallery, re-ranker and K."""
        shards = len(self.shards)
        for shard, info in zip(self.shards, self.infos):
            if not info.get("shard"):
                raise InputError(f"--shards: {shard.url} serves a whole gallery, not a shard; serve each shard folder "
                                 "of `tvrerank split` (`tvrerank serve SHARD_DIR`)")
            if info["shard"]["shards"] != shards:
                raise InputError(f"--shards: {shard.url} serves shard {info['shard']['shard']} of "
                                 f"{info['shard']['shards']}, but {shards} shard URLs are given; give one URL per "
                                 "shard of the split")
            for key in SAME:
                if info.get(key) != self.infos[0].get(key):
                    raise InputError(f"--shards: {shard.url} and {self.shards[0].url} differ in {key} "
                                     f"({info.get(key)} vs {self.infos[0].get(key)}): not shards of one split")
        numbers = sorted(info["shard"]["shard"] for info in self.infos)
        if numbers != list(range(1, shards + 1)):
            missing = sorted(set(range(1, shards + 1)) - set(numbers))
            raise InputError(f"--shards: shards {', '.join(map(str, numbers))} of {shards} are given; shard "
                             f"{', '.join(map(str, missing))} of {shards} is missing (a shard given twice?)")

    def _each(self, call, items=None) -> list:
        """``call(shard)`` (or ``call(shard, item)``) on every shard at once → their answers, in shard order."""
        if items is None:
            return list(self._pool.map(call, self.shards))
        return list(self._pool.map(call, self.shards, items))

    def __enter__(self) -> "ShardedRetriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def info(self) -> dict:
        first = self.infos[0]
        return {"gallery": first["gallery"], "videos": first["videos"], "searchable": self.searchable,
                "model": first["model"], "k": self.k, "fusion": first["fusion"],
                "shards": [{"url": shard.url, "shard": info["shard"]["shard"], "searchable": info["searchable"]}
                           for shard, info in zip(self.shards, self.infos)]}

    def search(self, query: str | None, *, top: int = 10, rerank: bool = True) -> dict:
        """One query over every shard → the JSON of ``/api/search`` (the same as one server of the whole
        gallery gives, when each shard's stage 1 is exact)."""
        k = min(self.k, self.searchable)
        depth = min(max(top, k), self.searchable)
        answers = self._each(lambda shard: shard.call("/api/search?" + urlencode(
            {"q": query or "", "rerank": "false", "top": depth})))
        merged = sorted(((hit["stage1"], number, place, hit) for number, answer in enumerate(answers)
                         for place, hit in enumerate(answer["results"])), key=lambda item: -item[0])[:depth]
        stage1 = np.array([hit["stage1"] for *_, hit in merged], dtype=np.float32)  # (depth,) as FAISS gave them
        ids, paths = [hit["video_id"] for *_, hit in merged], [hit["path"] for *_, hit in merged]
        scores = None
        if rerank:
            head = [(number, hit) for _, number, _, hit in merged[:k]]
            reranked = self._each(lambda shard, mine: self._rerank(shard, answers[0]["query"], mine),
                                  [[hit for number, hit in head if number == i] for i in range(len(self.shards))])
            by_id = {video_id: score for part in reranked for video_id, score in part.items()}
            scores = np.array([by_id[video_id] for video_id in ids[:k]], dtype=np.float32)  # (K,)
        hits = ranked_hits(stage1, ids, paths, k, top, scores, self.fusion if rerank else None)
        out = {"query": answers[0]["query"], "results": [asdict(hit) for hit in hits]}
        return out if "warning" not in answers[0] else {**out, "warning": answers[0]["warning"]}

    @staticmethod
    def _rerank(shard: Shard, query: str, hits: list[dict]) -> dict[str, float]:
        """The shard's re-ranker scores of its own stage-1 hits → {video id: score}."""
        if not hits:
            return {}
        answer = shard.call("/api/rerank", {"q": query, "video_ids": [hit["video_id"] for hit in hits],
                                            "stage1": [hit["stage1"] for hit in hits]})
        return {hit["video_id"]: hit["rerank"] for hit in answer["results"]}
