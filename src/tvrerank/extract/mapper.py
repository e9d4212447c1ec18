"""The extraction's mapper: the frozen encoder over parts of videos, on the device.

``PartEncoder`` batches the frames of a part's videos through the encoder as they arrive (a batch
starts once its last frame is decoded, not the part's last video), plus the part's captions, with
the next batch queued on the device while the last one is stored, across parts too. Batches are
consecutive runs of a part's valid frames in row order whatever the order of arrival, and never
cross a part, so a resumed run computes every array exactly as an uninterrupted one.
``encode_part``: one part alone.
"""

from __future__ import annotations

import collections
from typing import Iterator, Sequence

import numpy as np

from tvrerank.cache.schema import FAILED, OK
from tvrerank.cache.writer import PartData
from tvrerank.extract.frames import SampledFrames


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

