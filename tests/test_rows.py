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
    rows, captions = np.array([7, 2, 3, 11]), np.array([0, 5, 6])  # any order, runs and gaps
    with CacheReader(cache) as reader:  # what the file holds, each field as the readers must hand it out
        expected = {"tokens": reader["videos/tokens"][()][rows],  # float16, as stored
                    "frame_emb": reader["videos/frame_emb"][()][rows].astype(np.float32),
                    "frame_mask": reader["videos/frame_mask"][()][rows],
                    "text_tokens": reader["texts/tokens"][()][captions].astype(np.float32),
                    "text_length": reader["texts/length"][()][captions].astype(np.int64)}
    for source in (on_disk, in_memory, pickle.loads(pickle.dumps(on_disk))):  # as a DataLoader worker gets it
        got = {**source.videos(rows), **source.texts(captions)}
        assert sorted(got) == sorted(expected)
        for name, array in expected.items():
            assert got[name].dtype == torch.from_numpy(array).dtype, name
            np.testing.assert_array_equal(got[name].numpy(), array, err_msg=name)
