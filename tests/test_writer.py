"""The extraction's writer (``PartWriter``): parts written on a background thread, in the order given, and
its errors raised in the caller: a full disk or an unwritable folder as the OSError the CLI words, any other
failure as an ExtractionError naming what failed."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

from tvrerank.cache.writer import PartData
from tvrerank.extract.writer import ExtractionError, PartWriter


class Store:
    """A PartStore stand-in that records what it is asked to write, and on which thread."""

    def __init__(self, fail: BaseException | None = None):
        self.written, self.threads, self.fail = [], set(), fail

    def write(self, index: int, part: PartData) -> None:
        self.threads.add(threading.get_ident())
        if self.fail is not None:
            raise self.fail
        self.written.append(index)


def part() -> PartData:
    return PartData(video_rows=np.arange(1), videos={}, text_rows=np.arange(0), texts={})


def test_parts_are_written_in_order_on_another_thread():
    store = Store()
    writer = PartWriter(store)
    for index in (2, 0, 1):
        writer.put(index, part())
    writer.close()
    assert store.written == [2, 0, 1] and threading.get_ident() not in store.threads


@pytest.mark.parametrize("failure, raised", [(OSError(errno.ENOSPC, "No space left on device"), OSError),
                                              (ValueError("bad part"), ExtractionError)])
def test_a_failure_is_raised_in_the_caller(failure, raised):
    writer = PartWriter(Store(fail=failure))
    writer.put(0, part())
    with pytest.raises(raised) as error:
        writer.close()
    assert (error.value is failure) if raised is OSError else "writing a cache part failed: bad part" in str(error.value)
