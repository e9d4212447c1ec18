"""What the search page asks for, answered from one ``Retriever`` (no web framework here).

``SearchService`` turns queries into the JSON of ``retrieve --json``, describes gallery videos,
draws their sampled frames as one strip image, and explains a re-ranked hit. ``Gate`` bounds the
work in flight: the model runs one request at a time, and beyond a fixed number of waiting
requests the next one is refused (``Busy``: the app answers 503 with a retry hint) instead of
queueing without bound. The app (``serve/app.py``) maps these errors to HTTP statuses.

Frame strips are decoded with the extraction's own sampler (``extract.frames.sample_frames``) at the
cache's frame count, input size, interpolation and resize method, so each strip cell is the image the encoder saw
and the cache's patch grid lies on it. Encoded strips are kept in memory within a byte budget
(least recently used out first); a strip costs ~5-40 ms to decode and encode on the toy world
(benchmarks/bench_serve.py measures it).

A toy detail world's cache carries the known answer (``cache/truth.py``: which patches of which
sampled frames show the detail); the service reads it once, at start-up, and ``explain`` adds it as
``detail_patches`` so the page can outline it beside what the selectors kept. Other caches: absent.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anyio.to_thread
import numpy as np
import torch

from tvrerank.errors import InputError, MissingInput, TvrerankError, reason_of
from tvrerank.cache.identity import cache_video_ids_digest
from tvrerank.cache.schema import FAILED, OK, PENDING
from tvrerank.cache.rows import on_device
from tvrerank.cache.truth import read_truth
from tvrerank.extract.frames import VideoDecodeError, sample_frames, seconds_per_tick
from tvrerank.extract.preprocess import resize_options
from tvrerank.rerank.explain import explain_pair
from tvrerank.retrieve.gallery_store import reranker_digest
from tvrerank.retrieve.retriever import QueryError, Retriever, check_queries

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
STATUS_NAMES = {PENDING: "pending", OK: "ok", FAILED: "failed"}


class Busy(TvrerankError):
    """Too many requests in flight; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownVideo(TvrerankError, LookupError):
    """A video id that is not in the gallery."""


class Gate:
    """At most ``workers`` calls run at once (in a worker thread) and at most ``waiting`` wait;
    a call beyond that, or one that waits longer than ``timeout_s``, raises Busy at once.

    Admission is decided on the event loop, before any thread is taken, so a burst of requests
    cannot pile up in the server's thread pool either.
    """

    def __init__(self, name: str, *, workers: int = 1, waiting: int = 32, timeout_s: float = 30.0):
        self.name, self.workers, self.waiting, self.timeout_s = name, workers, waiting, timeout_s
        self._slots = asyncio.Semaphore(workers)
        self.inside = 0  # running + waiting

    async def run(self, fn: Callable, *args):
        if self.inside >= self.workers + self.waiting:
            raise Busy(f"the server is busy ({self.inside} {self.name} requests in flight); retry in a second")
        self.inside += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
            except asyncio.TimeoutError:
                raise Busy(f"the server is busy (waited {self.timeout_s:.0f} s for the {self.name}); "
                           "retry in a second") from None
            try:
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                self._slots.release()
        finally:
            self.inside -= 1


class StripCache:
    """Encoded images by key, least recently used out first, within ``budget`` bytes (thread-safe)."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self._items: OrderedDict[str, tuple[bytes, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, image: bytes, note: str | None) -> None:
        if len(image) > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= 0 if old is None else len(old[0])
            self._items[key] = (image, note)
            self.bytes += len(image)
            while self.bytes > self.budget:
                _, (dropped, _) = self._items.popitem(last=False)
                self.bytes -= len(dropped)


@dataclass(frozen=True)
class StripLayout:
    frames: int  # T cells, left to right
    image_size: int  # S: each cell is S x S pixels
    grid: tuple[int, int]  # the cache's token grid (rows, columns) over each cell


def clean_query(query: str | None, limit: int = MAX_QUERY_CHARS) -> tuple[str, str | None]:
    """A query as searched, and a warning when it had to be cut; raises QueryError when empty."""
    check_queries([query or ""], ["the query"])
    query = query.strip()
    if len(query) > limit:
        return query[:limit], f"the query was cut to its first {limit} characters"
    return query, None


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """(H, W, 3) uint8 RGB → JPEG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def known_detail(cache, layout: StripLayout) -> np.ndarray | None:
    """The cache's known answer, (N, T, P) bool: where sampled frame t of video n shows a detail world's
    detail; None for a cache without one (every real gallery), or one whose grid is not the cache's."""
    truth = read_truth(cache)
    if truth is None or truth.detail is None:
        return None
    if tuple(truth.grid) != tuple(layout.grid) or truth.detail.shape[1] != layout.frames:
        log.warning("%s: its known answer is on a %s grid of %d frames, not the cache's %s of %d; not shown "
                    "(tvrerank cache check names the problem)", cache.path, list(truth.grid), truth.detail.shape[1],
                    list(layout.grid), layout.frames)
        return None
    return truth.detail


def detail_patches(detail: np.ndarray) -> list[list[int]]:
    """(T, P) bool → per frame, the patch indices (row-major on the token grid) that show the detail."""
    return [np.flatnonzero(frame).tolist() for frame in detail]


def placeholder_strip(layout: StripLayout, reason: str) -> np.ndarray:
    """A grey strip with a darker cross in each cell: what the page shows for a frame it cannot decode."""
    s = layout.image_size
    strip = np.full((s, s * layout.frames, 3), 150, dtype=np.uint8)
    diagonal = np.arange(s)
    for t in range(layout.frames):
        strip[diagonal, t * s + diagonal] = 90
        strip[diagonal, t * s + s - 1 - diagonal] = 90
    log.debug("placeholder strip: %s", reason)
    return strip


class SearchService:
    """The page's questions, answered from one gallery (see the module docstring)."""

    def __init__(self, retriever: Retriever, *, videos_root: str | Path | None = None, k: int = 15,
                 strip_budget: int = 64 << 20, waiting: int = 32):
        if retriever.reranker is None:
            raise InputError("the search page needs a trained re-ranker: pass --reranker RUN_DIR")
        self.retriever, self.k = retriever, k
        cache = retriever.cache
        self.layout = StripLayout(frames=cache.header.sampling.frames, image_size=cache.header.encoder.image_size,
                                  grid=tuple(cache.header.layout.grid))
        try:  # a method this version cannot reproduce leaves placeholder strips, not a refusal to serve
            self.resize_options, self.strip_refusal = resize_options(cache.header.encoder, cache.header.sampling), None
        except InputError as exc:
            self.resize_options, self.strip_refusal = {}, f"the frames cannot be shown: {exc}"
            log.warning("%s", self.strip_refusal)
        root = videos_root if videos_root is not None else cache.header.dataset.get("videos_root")
        if root is None:
            raise InputError(f"{retriever.gallery} does not record its videos folder; pass --videos DIR")
        self.videos_root = Path(root).resolve()
        if not self.videos_root.is_dir():
            raise MissingInput(f"the videos folder {self.videos_root} (recorded in {retriever.gallery}) does not "
                               "exist; pass --videos DIR")
        self.row_of = {str(video_id): row for row, video_id in enumerate(retriever.video_ids)}
        self.status = cache["videos/status"][:]
        self.errors = cache.strings("videos/error")
        self.captions = cache.strings("texts/caption")
        caption_video = cache["texts/video"][:]
        self._caption_order = np.argsort(caption_video, kind="stable")
        self._caption_video = caption_video[self._caption_order]
        self.detail = known_detail(cache, self.layout)  # (N, T, P) bool or None, read once
        self.strips = StripCache(strip_budget)
        self.gallery_ids_sha256 = cache_video_ids_digest(cache)
        self.gallery_tag = self.gallery_ids_sha256[:16]  # strips' ETags: another gallery, other tags
        self.reranker_sha256 = reranker_digest(retriever.reranker.run_dir)
        self.model_gate = Gate("search", workers=1, waiting=waiting)
        self.decode_gate = Gate("frame decoding", workers=2, waiting=waiting)

    def __enter__(self) -> "SearchService":
        return self

    def __exit__(self, *exc) -> None:
        self.retriever.close()

    # ----------------------------------------------------------------------- gallery
    def info(self) -> dict:
        header, model = self.retriever.cache.header, self.retriever.reranker.model.config
        return {"gallery": str(self.retriever.gallery), "videos": len(self.row_of),
                "searchable": int(len(self.retriever.index_rows)), "model": header.encoder.model, "k": self.k,
                "frames": self.layout.frames, "image_size": self.layout.image_size, "grid": list(self.layout.grid),
                "frame_tokens": model.frame_tokens, "fusion": self.retriever.reranker.fusion,
                # what a front over shards (retrieve/sharded.py) checks and fuses with
                "fusion_alpha": self.retriever.reranker.fusion_alpha, "shard": self.retriever.index_config.shard or None,
                "gallery_ids_sha256": self.gallery_ids_sha256, "reranker_sha256": self.reranker_sha256}

    def row(self, video_id: str) -> int:
        row = self.row_of.get(video_id)
        if row is None:
            raise UnknownVideo(f"no video {video_id!r} in the gallery")
        return row

    def video_file(self, row: int) -> Path | None:
        """The video's file inside the videos folder, or None when its recorded path leaves the folder."""
        path = (self.videos_root / str(self.retriever.video_paths[row])).resolve()
        if not path.is_relative_to(self.videos_root):
            log.warning("video row %d: its path %s lies outside %s; not read", row, path, self.videos_root)
            return None
        return path

    def captions_of(self, row: int) -> list[str]:
        lo, hi = np.searchsorted(self._caption_video, [row, row + 1])
        return [str(c) for c in self.captions[np.sort(self._caption_order[lo:hi])]]

    def video(self, video_id: str) -> dict:
        row = self.row(video_id)
        path = self.video_file(row)
        exists = path is not None and path.is_file()  # a FIFO or device would block the probe
        return {"video_id": video_id, "path": str(self.retriever.video_paths[row]),
                "status": STATUS_NAMES.get(int(self.status[row]), "unknown"), "error": str(self.errors[row]) or None,
                "exists": exists, "captions": self.captions_of(row),
                "duration": video_duration(path) if exists else None}

    def frames(self, video_id: str) -> tuple[bytes, str | None]:
        """The frame strip as JPEG, and why it is a placeholder (None when the frames are real)."""
        row = self.row(video_id)
        cached = self.strips.get(video_id)
        if cached is not None:
            return cached
        path, note = self.video_file(row), self.strip_refusal
        if note is None and (path is None or not path.is_file()):
            note = "the video file is missing"
        if note is None:
            try:
                sampled = sample_frames(path, num_frames=self.layout.frames, threads=1, **self.resize_options)
                strip = np.concatenate(list(sampled.frames), axis=1)  # (S, T·S, 3), padded slots black
            except VideoDecodeError as exc:
                note = f"the video cannot be decoded ({exc})"
            except Exception as exc:  # noqa: BLE001 - PyAV raises many types; one bad file never gives a 500
                log.warning("%s: decoding failed: %s", path, exc)
                note = f"the video cannot be decoded ({reason_of(exc)})"
        if note is not None:  # not kept: the file may be restored
            return encode_jpeg(placeholder_strip(self.layout, note)), note
        image = encode_jpeg(strip)
        self.strips.put(video_id, image, None)
        return image, None

    # ----------------------------------------------------------------------- model
    def search(self, query: str | None, *, top: int = 10, rerank: bool = True) -> dict:
        query, warning = clean_query(query)
        result = self.retriever.search([query], top=top, k=self.k, rerank=rerank)[0].to_json()
        warnings = [w for w in (warning, result.pop("warning", None)) if w]
        return {**result, "warning": "; ".join(warnings)} if warnings else result

    def rerank(self, query: str | None, video_ids, *, stage1=None, top: int | None = None) -> dict:
        """Another first stage's candidates (at most K ids of this gallery) re-ranked: the JSON of ``search``."""
        query, warning = clean_query(query)
        result = self.retriever.rerank(query, video_ids, stage1=stage1, k=self.k, top=top).to_json()
        warnings = [w for w in (warning, result.pop("warning", None)) if w]
        return {**result, "warning": "; ".join(warnings)} if warnings else result

    @torch.inference_mode()
    def explain(self, query: str | None, video_id: str) -> dict:
        query, warning = clean_query(query)
        row = self.row(video_id)
        if self.status[row] != OK:
            raise UnknownVideo(f"video {video_id!r} was not extracted ({STATUS_NAMES.get(int(self.status[row]))}): "
                               "nothing to explain")
        retriever, device = self.retriever, self.retriever.device
        _, text_tokens, lengths = retriever.encode_queries([query])
        video = on_device(retriever.rows.videos(np.array([row])), device)
        stored = None if retriever.store is None else retriever.store.read(np.array([row]), device)
        explanation = explain_pair(retriever.reranker.model, torch.from_numpy(text_tokens).to(device),
                                   torch.from_numpy(lengths.astype(np.int64)).to(device), video["tokens"],
                                   video["frame_emb"], video["frame_mask"], selected=stored)
        patches = retriever.cache.header.layout.tokens_per_frame
        out = {"query": query, "video_id": video_id, "frames": self.layout.frames,
               "image_size": self.layout.image_size, "grid": list(self.layout.grid), "tokens_per_frame": patches,
               "frame_tokens": retriever.reranker.model.config.frame_tokens, **explanation.to_json(patches)}
        if self.detail is not None:  # a detail world's known answer: per frame, the patches showing the detail
            out["detail_patches"] = detail_patches(self.detail[row])
        warning = "; ".join(w for w in (warning, retriever.truncation_warning(query)) if w)
        return {**out, "warning": warning} if warning else out


def video_duration(path: Path) -> float | None:
    """Seconds, from the container's header (no decoding); None when it does not say or cannot be read."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return round(container.duration / av.time_base, 3)
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration is not None and stream.time_base is not None:
                return round(stream.duration * seconds_per_tick(stream), 3)
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        log.debug("%s: no duration (%s)", path, exc)
    return None


__all__ = ["Busy", "Gate", "QueryError", "SearchService", "StripCache", "UnknownVideo", "clean_query"]
