"""cache/rows.py: the same arrays from memory and from disk, in the order asked, in worker processes, and
8-bit tokens handed out as stored and decoded on the device."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from conftest import synthetic_cache

from tvrerank.cache.encoding import decode_tokens
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import CacheRows, on_device
from tvrerank.errors import InputError


@pytest.mark.parametrize("token_dtype", ["float16", "int8", "float8"])
def test_in_memory_and_on_disk_rows_are_equal(tmp_path, token_dtype):
    cache = synthetic_cache(tmp_path / "c.h5", videos=12, captions_per_video=2, token_dtype=token_dtype)
    on_disk, in_memory = CacheRows(cache, memory_budget=0), CacheRows(cache, memory_budget=1 << 30)
    forced_off, forced_on = CacheRows(cache, in_memory="off"), CacheRows(cache, memory_budget=0, in_memory="on")
    assert on_disk.place == forced_off.place == {"videos": "file", "texts": "file"}
    assert in_memory.place == forced_on.place == {"videos": "host", "texts": "host"}
    rows, captions = np.array([7, 2, 3, 11]), np.array([0, 5, 6])  # any order, runs and gaps
    with CacheReader(cache) as reader:  # what the file holds, each field as the readers must hand it out
        expected = {"tokens": reader["videos/tokens"][()][rows],  # as stored
                    "frame_emb": reader["videos/frame_emb"][()][rows].astype(np.float32),
                    "frame_mask": reader["videos/frame_mask"][()][rows],
                    "text_tokens": reader["texts/tokens"][()][captions],
                    "text_length": reader["texts/length"][()][captions].astype(np.int64)}
        if token_dtype == "float16":  # caption tokens are float32 on the host, as they always were
            expected["text_tokens"] = expected["text_tokens"].astype(np.float32)
        else:
            expected["token_scale"] = reader["videos/token_scale"][()][rows]
            expected["text_token_scale"] = reader["texts/token_scale"][()][captions]
    for source in (on_disk, in_memory, forced_on, pickle.loads(pickle.dumps(on_disk))):  # as a worker gets it
        got = {**source.videos(rows), **source.texts(captions)}
        assert sorted(got) == sorted(expected)
        for name, array in expected.items():
            assert got[name].dtype == torch.from_numpy(array).dtype, name
            np.testing.assert_array_equal(got[name].numpy(), array, err_msg=name)
        decoded = on_device(got, torch.device("cpu"))
        assert "token_scale" not in decoded and "text_token_scale" not in decoded
        scale = None if token_dtype == "float16" else got["token_scale"]
        torch.testing.assert_close(decoded["tokens"].float(), decode_tokens(got["tokens"], scale), rtol=0, atol=0)


def test_8bit_rows_decode_close_to_the_float16_ones(tmp_path):
    """The same synthetic cache in each encoding: decoded tokens point where the float16 ones do."""
    caches = {d: synthetic_cache(tmp_path / f"{d}.h5", videos=6, token_dtype=d) for d in ("float16", "int8", "float8")}
    rows = np.arange(6)
    reference = on_device(CacheRows(caches["float16"]).videos(rows), torch.device("cpu"))["tokens"].float()
    for token_dtype, floor in (("int8", 0.9999), ("float8", 0.999)):
        tokens = on_device(CacheRows(caches[token_dtype]).videos(rows), torch.device("cpu"))["tokens"]
        cosine = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1)
        assert cosine.min() > floor, (token_dtype, cosine.min())


def test_auto_says_what_it_chose_and_a_bad_setting_is_refused(tmp_path, caplog):
    cache = synthetic_cache(tmp_path / "c.h5", videos=12)
    with caplog.at_level(logging.INFO, logger="tvrerank.cache.rows"):
        CacheRows(cache, memory_budget=100)
    assert "exceed the memory budget" in caplog.text
    with pytest.raises(InputError, match="in_memory must be one of auto, on, off"):
        CacheRows(cache, in_memory="yes")
