"""The extraction's writer: finished parts written to ``CACHE.h5.parts/`` on a background thread.

``PartWriter`` takes each part the mapper finishes, puts its tokens in the cache's encoding
(``cache.writer.encoded_part``) and writes it (``cache.writer.PartStore``) while encoding goes on; the run assembles the final file from the parts (``cache.writer.assemble``) when
every part is done.
"""

from __future__ import annotations

import queue
import threading

from tvrerank.cache.writer import PartData, PartStore, encoded_part
from tvrerank.errors import TvrerankError


class ExtractionError(TvrerankError, RuntimeError):
    """A run that cannot start or finish; the message says what to do."""


class PartWriter:
    """Writes parts on a background thread so encoding goes on; re-raises its errors."""

    def __init__(self, store: PartStore, token_dtype: str = "float16"):
        self.store, self.token_dtype = store, token_dtype
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    index, part = item
                    self.store.write(index, encoded_part(part, self.token_dtype))
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

