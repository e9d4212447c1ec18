"""The extraction's reader: decoded frames of upcoming videos, sampled ahead in worker processes.

``DecodeQueue`` hands videos to a pool of decoding processes (``frames.sample_or_error``) with a
bounded look-ahead and yields their frames in row order, so decoding overlaps encoding; the run
(``runner.py``) sizes the look-ahead to a part plus two videos per worker, which keeps the next part
decoding while the encoder works on this one.
"""

from __future__ import annotations

import collections
import os
import multiprocessing
from functools import partial
from pathlib import Path
from typing import Iterator

from tvrerank.extract.frames import SampledFrames, sample_or_error


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

