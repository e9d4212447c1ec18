"""The extraction run: annotations → decoded frames (worker processes) → frozen encoder → cache parts → cache.

reader → mapper → writer, each replaceable:

- reader: ``DecodeQueue`` samples frames of upcoming videos in worker processes (bounded
  look-ahead, results in row order), so decoding overlaps encoding;
- mapper: ``PartEncoder`` batches the frames of several videos through the encoder as they
  arrive (a batch starts once its last frame is decoded, not the part's last video), plus the
  part's captions, with the next batch queued on the device while the last one is stored, across
  parts too (``encode_part``: one part alone);
- writer: a background thread writes each finished part to ``CACHE.h5.parts/`` (see
  ``tvrerank.cache.writer``), and ``assemble`` makes the final file at the end.

Parts are fixed ranges of video rows, and batches are formed inside a part only, so a run
that was killed and resumed computes every array exactly as an uninterrupted run would.
Memory is bounded by four parts (one encoding, one being finished, one queued for the writer and
one being written; a part holds at most ~512 MiB of tokens) plus the look-ahead, whatever the
number or length of videos.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tvrerank.cache.identity import cache_mismatch, fingerprint_differences, video_ids_digest
from tvrerank.cache.schema import FAILED, OK, CacheHeader
from tvrerank.errors import TvrerankError
from tvrerank.cache.writer import PartData, PartStore, assemble
from tvrerank.config import ExtractConfig, SamplingConfig
from tvrerank.extract.annotations import Caption, read_annotations
from tvrerank.extract.frames import SampledFrames, resize_options, sample_or_error
from tvrerank.files import exclusive_lock

log = logging.getLogger(__name__)


class ExtractionError(TvrerankError, RuntimeError):
    """A run that cannot start or finish; the message says what to do."""


@dataclass(frozen=True)
class VideoTable:
    """Videos in first-appearance order and captions grouped by video (stable)."""

    video_ids: list[str]
    video_paths: list[str]
    captions: list[str]
    caption_video: np.ndarray  # (M,) int32 row in video_ids

    @classmethod
    def from_captions(cls, captions: Sequence[Caption]) -> "VideoTable":
        rows: dict[str, int] = {}
        paths: list[str] = []
        for caption in captions:
            if caption.video_id not in rows:
                rows[caption.video_id] = len(rows)
                paths.append(caption.video_path)
        order = sorted(range(len(captions)), key=lambda i: rows[captions[i].video_id])
        return cls(
            video_ids=list(rows),
            video_paths=paths,
            captions=[captions[i].text for i in order],
            caption_video=np.array([rows[captions[i].video_id] for i in order], dtype=np.int32),
        )

    def shard(self, index: int, count: int, part_videos: int = 1) -> tuple["VideoTable", int, int]:
        """The contiguous ``index``-th of ``count`` slices; also its video and caption offsets.

        Slices start on multiples of ``part_videos``, so every shard's parts are parts of the
        unsharded run too: merged shards hold exactly the arrays one run would write.
        """
        n = len(self.video_ids)
        parts = -(-n // part_videos)
        start = min(n, parts * index // count * part_videos)
        stop = min(n, parts * (index + 1) // count * part_videos)
        first, last = np.searchsorted(self.caption_video, [start, stop])
        table = VideoTable(
            video_ids=self.video_ids[start:stop],
            video_paths=self.video_paths[start:stop],
            captions=self.captions[first:last],
            caption_video=self.caption_video[first:last] - start,
        )
        return table, start, int(first)

    def digest(self) -> str:
        payload = json.dumps([self.video_ids, self.video_paths, self.captions]).encode()
        return hashlib.sha256(payload).hexdigest()


def shard_from_env() -> tuple[int, int]:
    """(rank, world size) under torchrun / SLURM-style launchers; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_path(out: str | Path, index: int, count: int) -> Path:
    """``cache.h5`` → ``cache.shard-0-of-2.h5`` (unchanged when count is 1)."""
    out = Path(out)
    if count == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def part_bounds(num_videos: int, part_videos: int) -> list[tuple[int, int]]:
    return [(s, min(s + part_videos, num_videos)) for s in range(0, num_videos, part_videos)]


# --------------------------------------------------------------------------- reader
def _decode_worker_setup(threads: int) -> None:
    """A decoding process resizes frames with torch on its share of the cores, not on all of them.

    Importing torch here, as the pool starts, overlaps its ~1.5 s with the encoder's loading instead
    of delaying the first decoded video."""
    import torch

    torch.set_num_threads(max(1, threads))


class DecodeQueue:
    """Frames of videos in order, sampled ahead in ``workers`` processes (0: in this process).

    The pool starts on construction, so workers boot while the encoder loads.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._threads = max(1, (os.cpu_count() or 1) // max(1, workers)) if workers else 0
        self._pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_decode_worker_setup, initargs=(self._threads,)) if workers else None

    def run(
        self, items: Iterator[tuple[int, Path]], *, look_ahead: int, **sample_options
    ) -> Iterator[tuple[int, SampledFrames | None, str]]:
        """Yield (row, frames or None, error) for each (row, path) in order, with up to ``look_ahead``
        videos handed to the workers before the one yielded.

        New videos are handed out only as results are taken, so while the caller encodes a part the
        workers decode what is already queued: a look-ahead above a part's videos keeps the whole next
        part decoding meanwhile (a smaller one left the encoder waiting at every part's start).
        """
        look_ahead = max(1, look_ahead)
        sample = partial(sample_or_error, threads=self._threads, **sample_options)
        if self._pool is None:
            for row, path in items:
                yield (row, *sample(path))
            return
        pending: collections.deque = collections.deque()
        for row, path in items:
            pending.append((row, self._pool.apply_async(sample, (path,))))
            if len(pending) >= look_ahead:
                done_row, result = pending.popleft()
                yield (done_row, *result.get())
        while pending:
            done_row, result = pending.popleft()
            yield (done_row, *result.get())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


# --------------------------------------------------------------------------- mapper
def _batched(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


class _OpenPart:
    """One part being encoded: its arrays, filled batch by batch as its videos arrive, and its captions'
    queued encoding. Batches are consecutive runs of ``batch_size`` of the part's valid frames in row
    order, whatever the order of arrival, so a batch is ready as soon as its last frame is."""

    def __init__(self, key, encoder, video_rows, text_rows, texts, *, frames: int, batch_size: int):
        layout = encoder.layout
        n, t, p, d, e = len(video_rows), frames, layout.tokens_per_frame, layout.token_dim, layout.embed_dim
        self.key, self.batch_size = key, batch_size
        self.video_rows, self.text_rows = np.asarray(video_rows, dtype=np.int64), np.asarray(text_rows, dtype=np.int64)
        self.decoded: list[tuple[SampledFrames | None, str]] = []
        self.mask = np.zeros((n, t), dtype=bool)
        self.frame_emb = np.zeros((n, t, e), dtype=np.float16)
        self.tokens = np.zeros((n, t, p, d), dtype=np.float16)
        self.where = np.zeros((0, 2), dtype=np.int64)  # (F, 2) (video, slot) of every valid frame so far, in order
        self.submitted = self.unstored = 0  # frames handed to the encoder; batches not yet stored
        self.complete = False  # every video has arrived
        # queued first: the captions are small, and their result is only read when the part is done
        self.texts = [(window, encoder.submit_texts(texts[window], dtype=np.float16))
                      for window in _batched(len(texts), batch_size)]
        self.num_texts, self.text_shape = len(texts), (layout.text_tokens, layout.text_token_dim)

    def add(self, sample: SampledFrames | None, error: str) -> None:
        video = len(self.decoded)
        self.decoded.append((sample, error))
        if sample is not None:
            self.mask[video] = sample.mask
            slots = np.flatnonzero(sample.mask)
            self.where = np.concatenate([self.where, np.stack([np.full_like(slots, video), slots], axis=1)])

    def ready_windows(self) -> Iterator[slice]:
        """The batches whose frames have all arrived and that were not handed out yet (each once)."""
        while len(self.where) - self.submitted >= self.batch_size or (self.complete and self.submitted < len(self.where)):
            window = slice(self.submitted, min(self.submitted + self.batch_size, len(self.where)))
            self.submitted, self.unstored = window.stop, self.unstored + 1
            yield window

    @property
    def done(self) -> bool:
        return self.complete and self.submitted == len(self.where) and self.unstored == 0

    def pixels(self, window: slice) -> np.ndarray:
        return np.stack([self.decoded[v][0].frames[s] for v, s in self.where[window]])  # (N, S, S, 3)

    def store(self, window: slice, pending) -> None:
        emb, tokens = pending.result()
        self.frame_emb[self.where[window, 0], self.where[window, 1]] = emb
        self.tokens[self.where[window, 0], self.where[window, 1]] = tokens
        self.unstored -= 1

    def finish(self) -> PartData:
        mask = self.mask
        counts = np.maximum(mask.sum(1, keepdims=True), 1)
        mean = (self.frame_emb.astype(np.float32) * mask[..., None]).sum(1) / counts
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        video_emb = np.where(norms > 0, mean / np.maximum(norms, 1e-12), 0).astype(np.float16)
        text_emb = np.zeros((self.num_texts, self.frame_emb.shape[-1]), dtype=np.float16)
        text_tokens = np.zeros((self.num_texts, *self.text_shape), dtype=np.float16)
        lengths = np.zeros(self.num_texts, dtype=np.int16)
        for window, pending in self.texts:
            text_emb[window], text_tokens[window], lengths[window] = pending.result()
        return PartData(
            video_rows=self.video_rows,
            videos={
                "status": np.array([OK if sample is not None else FAILED for sample, _ in self.decoded], dtype=np.uint8),
                "error": np.array([error for _, error in self.decoded], dtype=object),
                "frame_mask": mask,
                "frame_emb": self.frame_emb,
                "video_emb": video_emb,
                "tokens": self.tokens,
            },
            text_rows=self.text_rows,
            texts={"emb": text_emb, "tokens": text_tokens, "length": lengths},
        )


class PartEncoder:
    """Encodes parts in order, their frames in batches as the videos arrive, with the next batch always
    queued on the device before the last one is stored, across parts too: on a GPU the host's work
    (stacking frames, copying tokens into the part, finishing a part and handing it on) overlaps the next
    forward pass, and the first batch of a part starts before the part's last video is decoded.

    ``open`` a part, ``add`` its videos in row order, ``close`` it; each gives back the parts it
    finished (often the previous one), ``flush`` the rest, in order. ``encode`` is all three at once.
    """

    def __init__(self, encoder, *, frames: int, batch_size: int):
        self.encoder, self.frames, self.batch_size = encoder, frames, batch_size
        self._open: collections.deque[_OpenPart] = collections.deque()
        self._queued = None  # (part, window, pending) of the batch on the device
        self.device_seconds = 0.0  # the device's time on the frame batches stored so far (CUDA only)

    def open(self, key, video_rows: np.ndarray, text_rows: np.ndarray, texts: Sequence[str]) -> None:
        """A new part (its captions are queued on the encoder now); its videos follow with ``add``."""
        self._open.append(_OpenPart(key, self.encoder, video_rows, text_rows, texts, frames=self.frames,
                                    batch_size=self.batch_size))

    def add(self, sample: SampledFrames | None, error: str) -> list[tuple[object, PartData]]:
        """The next video of the part opened last."""
        self._open[-1].add(sample, error)
        return self._submit_ready()

    def close(self) -> list[tuple[object, PartData]]:
        """The part opened last has all its videos."""
        self._open[-1].complete = True
        return self._submit_ready() + self._finished()

    def encode(self, key, video_rows: np.ndarray, decoded: Sequence[tuple[SampledFrames | None, str]],
               text_rows: np.ndarray, texts: Sequence[str]) -> list[tuple[object, PartData]]:
        """A whole part at once: ``open``, ``add`` each video, ``close``."""
        self.open(key, video_rows, text_rows, texts)
        finished = []
        for sample, error in decoded:
            finished += self.add(sample, error)
        return finished + self.close()

    def flush(self) -> list[tuple[object, PartData]]:
        return self._store_queued() + self._finished()

    def _submit_ready(self) -> list[tuple[object, PartData]]:
        part, finished = self._open[-1], []
        for window in part.ready_windows():
            submitted = part, window, self.encoder.submit_frames(part.pixels(window), dtype=np.float16)
            finished += self._store_queued()
            self._queued = submitted
        return finished

    def _store_queued(self) -> list[tuple[object, PartData]]:
        if self._queued is None:
            return []
        part, window, pending = self._queued
        self._queued = None
        part.store(window, pending)
        self.device_seconds += pending.device_seconds() or 0.0
        return self._finished()

    def _finished(self) -> list[tuple[object, PartData]]:
        done = []
        while self._open and self._open[0].done:
            part = self._open.popleft()
            done.append((part.key, part.finish()))
        return done


def encode_part(
    encoder,
    video_rows: np.ndarray,
    decoded: Sequence[tuple[SampledFrames | None, str]],
    text_rows: np.ndarray,
    texts: Sequence[str],
    *,
    frames: int,
    batch_size: int,
) -> PartData:
    """Encode one part: the valid frames of all its videos in batches, and its captions."""
    encoding = PartEncoder(encoder, frames=frames, batch_size=batch_size)
    (_, part), = encoding.encode(None, video_rows, decoded, text_rows, texts) + encoding.flush()
    return part


# --------------------------------------------------------------------------- writer
class PartWriter:
    """Writes parts on a background thread so encoding goes on; re-raises its errors."""

    def __init__(self, store: PartStore):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self.store.write(*item)
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def put(self, index: int, part: PartData) -> None:
        self._check()
        self._queue.put((index, part))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if isinstance(self._error, OSError):  # a full disk or an unwritable folder: the CLI words it
            raise self._error
        if self._error is not None:
            raise ExtractionError(f"writing a cache part failed: {self._error}") from self._error


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ExtractionSummary:
    out: str
    videos: int
    ok: int
    failed: int
    captions: int
    seconds: float
    resumed_parts: int = 0
    already_done: bool = False
    # where this run's time went (0 when nothing was extracted): the pipeline (from the first request for
    # decoded frames to the last part handed to the writer), the time blocked waiting on decoded frames
    # (the first wait, which includes the decoding workers' start-up, apart) and the time in the encoder
    pipeline_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    first_wait_seconds: float = 0.0
    encode_seconds: float = 0.0
    # the device's time on frame batches, copies included (CUDA events; 0 elsewhere): over the pipeline's
    # time, the share of it the GPU was at work on frames
    device_seconds: float = 0.0

    def line(self) -> str:
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{self.out}: {self.videos} videos ({self.ok} ok, {self.failed} failed), "
            f"{self.captions} captions in {self.seconds:.1f}s ({rate:.2f} videos/s)"
        )
        if self.resumed_parts:
            text += f"; resumed, {self.resumed_parts} parts were already done"
        return text + (" (already complete)" if self.already_done else "")


def _summarise(out: Path, seconds: float, **extra) -> ExtractionSummary:
    import h5py

    with h5py.File(out, "r") as f:
        status = f["videos/status"][()]
        return ExtractionSummary(
            out=str(out), videos=len(status), ok=int((status == OK).sum()),
            failed=int((status == FAILED).sum()), captions=f["texts/caption"].shape[0],
            seconds=seconds, **extra,
        )


def auto_part_videos(frames: int, batch_size: int, bytes_per_video: int) -> int:
    """Videos per part: enough frames for a few full batches, at most ~512 MiB of tokens."""
    wanted = max(8, -(-4 * batch_size // max(frames, 1)))
    return max(1, min(wanted, (512 << 20) // max(bytes_per_video, 1)))


def run_extraction(config: ExtractConfig, *, progress: bool = True) -> ExtractionSummary:
    """Extract one cache (or one shard of it) as ``config`` says; resumes an unfinished run."""
    started = time.perf_counter()
    table = VideoTable.from_captions(read_annotations(config.annotations, config.format, config.videos))
    out = shard_path(config.out, config.shard_index, config.shard_count)
    with exclusive_lock(out.with_name(out.name + ".lock"), str(out)):  # two runs never share the parts folder
        if config.overwrite:
            PartStore(out).remove()
            out.unlink(missing_ok=True)
        # the decoding workers boot while the encoder loads
        decode = DecodeQueue(config.workers)
        try:
            return _extract(config, table, out, decode, started, progress)
        finally:
            decode.close()


def _extract(config: ExtractConfig, table: VideoTable, out: Path, decode: DecodeQueue, started: float,
             progress: bool) -> ExtractionSummary:
    from tqdm.auto import tqdm

    from tvrerank.extract.encoder import FrozenClipEncoder

    encoder = FrozenClipEncoder(
        model=config.model, pretrained=config.pretrained, token_space=config.token_space,
        token_pool=config.token_pool, text_tokens=config.text_tokens, precision=config.precision,
        device=config.device,
    )
    layout = encoder.layout
    sampling = SamplingConfig(frames=config.frames, resize=config.resize)
    frame_options = resize_options(encoder.config, sampling)  # refuses a resize it cannot do, before any part
    bytes_per_video = config.frames * layout.tokens_per_frame * layout.token_dim * 2
    part_videos = config.part_videos or auto_part_videos(config.frames, config.batch_size, bytes_per_video)
    table, video_offset, caption_offset = table.shard(config.shard_index, config.shard_count, part_videos)
    header = CacheHeader(
        encoder=encoder.config,
        sampling=sampling,
        layout=layout,
        dataset={
            "annotations": [str(Path(a)) for a in config.annotations],
            "format": config.format,
            "videos_root": str(Path(config.videos)),
            "shard": {"index": config.shard_index, "count": config.shard_count,
                      "video_offset": video_offset, "caption_offset": caption_offset},
        },
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if out.exists():
        return _finished_already(out, header, table, started)
    parts = PartStore(out)
    parts.start(json.loads(json.dumps({
        "fingerprint": header.fingerprint(),
        "table": table.digest(),
        "part_videos": part_videos,
        "shard": [config.shard_index, config.shard_count],
    })))

    bounds = part_bounds(len(table.video_ids), part_videos)
    done = parts.finished(len(bounds))
    todo = [i for i in range(len(bounds)) if i not in done]
    if done:
        log.info("resuming %s: %d of %d parts already done", out, len(done), len(bounds))
    videos_root = Path(config.videos)
    items = ((row, videos_root / table.video_paths[row]) for i in todo for row in range(*bounds[i]))
    results = decode.run(items, look_ahead=part_videos + 2 * config.workers, num_frames=config.frames,
                         **frame_options)
    writer = PartWriter(parts)
    parts_encoder = PartEncoder(encoder, frames=config.frames, batch_size=config.batch_size)
    waits, encode_seconds, pipeline_start = [], 0.0, time.perf_counter()
    bar = tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), unit="video", desc=f"extract {out.name}",
               disable=not progress)

    def hand_on(finished: list) -> None:  # parts the encoder finished, to the writer
        for done_index, part in finished:
            writer.put(done_index, part)
            bar.update(len(part.video_rows))

    def timed_step(step, *args) -> None:  # a call of the encoder's, timed; the parts it finished go on
        nonlocal encode_seconds
        encoding = time.perf_counter()
        finished = step(*args)
        encode_seconds += time.perf_counter() - encoding
        hand_on(finished or [])

    try:
        for index in todo:
            start, stop = bounds[index]
            first, last = np.searchsorted(table.caption_video, [start, stop])
            timed_step(parts_encoder.open, index, np.arange(start, stop), np.arange(first, last),
                       table.captions[first:last])
            for row in range(start, stop):
                waited = time.perf_counter()
                done_row, frames, error = next(results)
                waits.append(time.perf_counter() - waited)
                if done_row != row:  # never attribute one video's frames to another
                    raise RuntimeError(f"decoded video {done_row} arrived for row {row}")
                timed_step(parts_encoder.add, frames, error)  # a batch goes to the encoder as soon as it is whole
            timed_step(parts_encoder.close)
        timed_step(parts_encoder.flush)
    except BaseException:
        # a failing batch (e.g. out of GPU memory) leaves the part before it with its last batch queued:
        # store and write that part, so a rerun resumes after it
        with contextlib.suppress(Exception):
            hand_on(parts_encoder.flush())
        raise
    finally:
        bar.close()
        writer.close()
    timings = {"pipeline_seconds": time.perf_counter() - pipeline_start, "decode_wait_seconds": sum(waits),
               "first_wait_seconds": waits[0] if waits else 0.0, "encode_seconds": encode_seconds,
               "device_seconds": parts_encoder.device_seconds}

    assemble(
        parts, len(bounds), out, header, video_ids=table.video_ids, video_paths=table.video_paths,
        captions=table.captions, caption_video=table.caption_video,
    )
    parts.remove()
    return _summarise(out, time.perf_counter() - started, resumed_parts=len(done), **timings)


def _finished_already(out: Path, header: CacheHeader, table: VideoTable, started: float) -> ExtractionSummary:
    from tvrerank.cache.reader import CacheReader

    with CacheReader(out) as cache:
        reason = None
        if cache.header.fingerprint() != header.fingerprint():
            reason = "; ".join(fingerprint_differences(header.fingerprint(), cache.header.fingerprint(), out.name,
                                                       label="this run"))
        elif cache_mismatch(cache, fingerprint=header.fingerprint(), video_ids_sha256=video_ids_digest(table.video_ids)):
            reason = "other videos"
        elif list(cache.strings("texts/caption")) != table.captions:
            reason = "other captions"
    if reason is not None:
        raise ExtractionError(
            f"{out} already exists and was made with {reason}; pass --overwrite to replace it or choose another --out"
        )
    log.info("%s is already complete", out)
    PartStore(out).remove()
    return _summarise(out, time.perf_counter() - started, already_done=True)


def merge_after_torchrun(config: ExtractConfig, seconds: float) -> ExtractionSummary | None:
    """Under torchrun: wait for every rank, then rank 0 joins the shards into ``config.out``.

    Returns the merged cache's summary on rank 0 and None on the other ranks.
    """
    import torch.distributed as dist

    from tvrerank.cache.merge import merge_shards

    dist.init_process_group("gloo", timeout=dt.timedelta(days=2))
    try:
        dist.barrier()
        summary = None
        if dist.get_rank() == 0:
            shards = [shard_path(config.out, i, config.shard_count) for i in range(config.shard_count)]
            summary = _summarise(merge_shards(shards, config.out), seconds)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return summary
