"""cache/rows.py: the same arrays from memory and from disk, in the order asked, in worker processes."""

from __future__ import annotations

import pickle

import numpy as np
import torch
from conftest import synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import CacheRows


def test_in_memory_and_on_disk_rows_are_equal(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", videos=12, captions_per_video=2)
    on_disk, in_memory = CacheRows(cache, memory_budget=0), CacheRows(cache, memory_budget=1 << 30)
    assert not on_disk._in_memory["videos"] and in_memory._in_memory["videos"] and in_memory._in_memory["texts"]
    rows = np.array([7, 2, 3, 11])  # any order, runs and gaps
    with CacheReader(cache) as reader:
        expected_tokens = reader["videos/tokens"][()][rows]  # float16, as stored
    for source in (on_disk, in_memory, pickle.loads(pickle.dumps(on_disk))):  # as a DataLoader worker gets it
        videos, texts = source.videos(rows), source.texts(np.array([0, 5, 6]))
        np.testing.assert_array_equal(videos["tokens"].numpy(), expected_tokens)
        assert videos["tokens"].dtype == torch.float16 and videos["frame_emb"].dtype == torch.float32
        assert videos["frame_mask"].dtype == torch.bool and texts["text_length"].dtype == torch.int64
        for name, value in videos.items():
            assert torch.equal(value, on_disk.videos(rows)[name]), name
        for name, value in texts.items():
            assert torch.equal(value, on_disk.texts(np.array([0, 5, 6]))[name]), name
