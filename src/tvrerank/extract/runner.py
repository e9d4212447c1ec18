"""The extraction run: annotations → decoded frames (worker processes) → frozen encoder → cache parts → cache.

reader → mapper → writer, a module each, wired here (``_extract``, ``_pipeline``):

- reader (``reader.py``): ``DecodeQueue`` samples frames of upcoming videos in worker processes
  (bounded look-ahead, results in row order), so decoding overlaps encoding;
- mapper (``mapper.py``): ``PartEncoder`` batches the frames of several videos through the encoder
  as they arrive, plus the part's captions, with the next batch queued on the device while the last
  one is stored, across parts too;
- writer (``writer.py``): a background thread writes each finished part to ``CACHE.h5.parts/``
  (see ``tvrerank.cache.writer``), and ``assemble`` makes the final file at the end.

Parts are fixed ranges of video rows, and batches are formed inside a part only, so a run
that was killed and resumed computes every array exactly as an uninterrupted run would.
Memory is bounded by four parts (one encoding, one being finished, one queued for the writer and
one being written; a part holds at most ~512 MiB of tokens) plus the look-ahead, whatever the
number or length of videos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tvrerank.cache.encoding import check_token_dtype
from tvrerank.cache.identity import cache_mismatch, fingerprint_differences, video_ids_digest
from tvrerank.cache.schema import FAILED, OK, CacheHeader, dataset_specs, spec_bytes
from tvrerank.cache.writer import PartStore, assemble
from tvrerank.config import ExtractConfig, SamplingConfig
from tvrerank.extract.annotations import Caption, read_annotations
from tvrerank.extract.mapper import PartEncoder
from tvrerank.extract.preprocess import resize_options
from tvrerank.extract.reader import DecodeQueue
from tvrerank.extract.writer import ExtractionError, PartWriter
from tvrerank.files import exclusive_lock

log = logging.getLogger(__name__)


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
    """reader → mapper → writer over the parts not done yet, then the final file."""
    from tvrerank.extract.encoder import FrozenClipEncoder

    encoder = FrozenClipEncoder(
        model=config.model, pretrained=config.pretrained, token_space=config.token_space,
        token_pool=config.token_pool, text_tokens=config.text_tokens, precision=config.precision,
        device=config.device,
    )
    sampling = SamplingConfig(frames=config.frames, resize=config.resize)
    frame_options = resize_options(encoder.config, sampling)  # refuses a resize it cannot do, before any part
    layout = dataclasses.replace(encoder.layout, token_dtype=check_token_dtype(config.token_dtype, "--token-dtype"))
    bytes_per_video = frame_token_bytes(layout) * config.frames
    part_videos = config.part_videos or auto_part_videos(config.frames, config.batch_size, bytes_per_video)
    table, video_offset, caption_offset = table.shard(config.shard_index, config.shard_count, part_videos)
    header = cache_header(config, encoder.config, sampling, layout, video_offset, caption_offset)
    if out.exists():
        return _finished_already(out, header, table, started)
    parts = PartStore(out)
    parts.start(json.loads(json.dumps({"fingerprint": header.fingerprint(), "table": table.digest(),
                                       "part_videos": part_videos, "shard": [config.shard_index, config.shard_count]})))
    bounds = part_bounds(len(table.video_ids), part_videos)
    done = parts.finished(len(bounds))
    todo = [i for i in range(len(bounds)) if i not in done]
    if done:
        log.info("resuming %s: %d of %d parts already done", out, len(done), len(bounds))
    videos_root = Path(config.videos)
    items = ((row, videos_root / table.video_paths[row]) for i in todo for row in range(*bounds[i]))
    decoded = decode.run(items, look_ahead=part_videos + 2 * config.workers, num_frames=config.frames,
                         **frame_options)
    mapper = PartEncoder(encoder, frames=config.frames, batch_size=config.batch_size)
    timings = _pipeline(decoded, mapper, PartWriter(parts, layout.token_dtype), [(i, bounds[i]) for i in todo], table,
                        desc=f"extract {out.name}", progress=progress)
    assemble(parts, len(bounds), out, header, video_ids=table.video_ids, video_paths=table.video_paths,
             captions=table.captions, caption_video=table.caption_video)
    parts.remove()
    return _summarise(out, time.perf_counter() - started, resumed_parts=len(done), **timings)


def frame_token_bytes(layout) -> int:
    """Bytes of one frame's cached patch tokens, their scales included (from the cache's dataset specs)."""
    specs = dataset_specs(1, 0, layout, 1)
    return sum(spec_bytes(*specs[name]) for name in ("videos/tokens", "videos/token_scale") if name in specs)


def cache_header(config: ExtractConfig, encoder, sampling: SamplingConfig, layout, video_offset: int,
                 caption_offset: int) -> CacheHeader:
    """The header of the cache (or shard) this run writes: the encoder, sampling, layout and dataset."""
    return CacheHeader(
        encoder=encoder, sampling=sampling, layout=layout,
        dataset={
            "annotations": [str(Path(a)) for a in config.annotations],
            "format": config.format,
            "videos_root": str(Path(config.videos)),
            "shard": {"index": config.shard_index, "count": config.shard_count,
                      "video_offset": video_offset, "caption_offset": caption_offset},
        },
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _pipeline(decoded, mapper: PartEncoder, writer: PartWriter, todo: list[tuple[int, tuple[int, int]]],
              table: VideoTable, *, desc: str, progress: bool) -> dict:
    """Each part of ``todo`` ((index, (first row, end row))) through the mapper, its videos as the reader
    decodes them, finished parts to the writer → where the time went (``ExtractionSummary``'s timings)."""
    from tqdm.auto import tqdm

    waits, encode_seconds, pipeline_start = [], 0.0, time.perf_counter()
    bar = tqdm(total=sum(stop - start for _, (start, stop) in todo), unit="video", desc=desc, disable=not progress)

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
        for index, (start, stop) in todo:
            first, last = np.searchsorted(table.caption_video, [start, stop])
            timed_step(mapper.open, index, np.arange(start, stop), np.arange(first, last), table.captions[first:last])
            for row in range(start, stop):
                waited = time.perf_counter()
                done_row, frames, error = next(decoded)
                waits.append(time.perf_counter() - waited)
                if done_row != row:  # never attribute one video's frames to another
                    raise RuntimeError(f"decoded video {done_row} arrived for row {row}")
                timed_step(mapper.add, frames, error)  # a batch goes to the encoder as soon as it is whole
            timed_step(mapper.close)
        timed_step(mapper.flush)
    except BaseException:
        # a failing batch (e.g. out of GPU memory) leaves the part before it with its last batch queued:
        # store and write that part, so a rerun resumes after it
        with contextlib.suppress(Exception):
            hand_on(mapper.flush())
        raise
    finally:
        bar.close()
        writer.close()
    return {"pipeline_seconds": time.perf_counter() - pipeline_start, "decode_wait_seconds": sum(waits),
            "first_wait_seconds": waits[0] if waits else 0.0, "encode_seconds": encode_seconds,
            "device_seconds": mapper.device_seconds}


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
