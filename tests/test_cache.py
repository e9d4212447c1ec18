"""The HDF5 cache: header round trip, crash-safe parts, assembly, info and check."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tvrerank.cache.checksums import seal
from tvrerank.cache.inspect import cache_info, check_cache
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import FAILED, OK, SCHEMA, CacheHeader, check_header
from tvrerank.cache.writer import PartData, PartStore, PlanMismatch, assemble
from tvrerank.config import EncoderConfig, SamplingConfig, TokenLayout

T, P, D, E, L = 3, 4, 6, 5, 8
LAYOUT = TokenLayout(space="joint", pool="none", text_tokens=L, grid=(2, 2), tokens_per_frame=P,
                     token_dim=D, text_token_dim=E, embed_dim=E)
HEADER = CacheHeader(
    encoder=EncoderConfig(model="tiny", model_config={"embed_dim": E}, pretrained=None, image_size=32),
    sampling=SamplingConfig(frames=T), layout=LAYOUT, dataset={"format": "jsonl"}, created="now",
)


def _part(rows, text_rows, failed=()) -> PartData:
    rng = np.random.default_rng(int(rows[0]))
    n, m = len(rows), len(text_rows)
    emb = rng.normal(size=(n, E)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    status = np.array([FAILED if r in failed else OK for r in rows], np.uint8)
    return PartData(
        video_rows=np.asarray(rows),
        videos={
            "status": status,
            "error": np.array(["broken" if s == FAILED else "" for s in status], dtype=object),
            "frame_mask": np.repeat((status == OK)[:, None], T, axis=1),
            "frame_emb": rng.normal(size=(n, T, E)).astype(np.float16),
            "video_emb": np.where((status == OK)[:, None], emb, 0).astype(np.float16),
            "tokens": rng.normal(size=(n, T, P, D)).astype(np.float16),
        },
        text_rows=np.asarray(text_rows),
        texts={"emb": rng.normal(size=(m, E)).astype(np.float16),
               "tokens": rng.normal(size=(m, L, E)).astype(np.float16),
               "length": np.full(m, 4, np.int16)},
    )


def _build(tmp_path, failed=()):
    out = tmp_path / "c.h5"
    store = PartStore(out)
    store.start({"plan": 1})
    parts = [_part([0, 1], [0, 1, 2], failed), _part([2], [3], failed)]
    for index, part in enumerate(parts):
        store.write(index, part)
    assemble(store, 2, out, HEADER, video_ids=["a", "b", "c"], video_paths=["a.mp4", "b.mp4", "c.mp4"],
             captions=["a1", "a2", "b1", "c1"], caption_video=np.array([0, 0, 1, 2], np.int32))
    return out, parts


def test_header_round_trips_through_attributes():
    attrs = HEADER.to_attrs()
    assert attrs["schema"] == SCHEMA
    back = CacheHeader.from_attrs(attrs)
    assert back == HEADER and back.fingerprint() == HEADER.fingerprint()
    with pytest.raises(ValueError, match="schema"):
        CacheHeader.from_attrs({"schema": "other/9"})


def test_a_cache_and_artifacts_from_before_the_resize_field_still_belong_together(tmp_path):
    """Caches written before ``sampling.resize`` read as libswscale; so do fingerprints recorded from them."""
    import json

    from tvrerank.cache.identity import cache_mismatch

    old_attrs = HEADER.to_attrs()
    old_attrs["sampling"] = json.dumps({"frames": T, "strategy": "uniform"})
    old = CacheHeader.from_attrs(old_attrs)
    assert old.sampling.resize == "libswscale"

    class OldCache:
        header, path = old, tmp_path / "old.h5"

    recorded = old.fingerprint()
    recorded["sampling"] = {"frames": T, "strategy": "uniform"}  # what an artifact made then holds
    assert cache_mismatch(OldCache, fingerprint=recorded) is None
    torchvision = {**recorded, "sampling": {**recorded["sampling"], "resize": "torchvision"}}
    assert "sampling.resize torchvision" in cache_mismatch(OldCache, fingerprint=torchvision)


def test_parts_are_chunked_as_the_cache_is_with_a_checksum(tmp_path):
    import h5py

    from tvrerank.cache.schema import chunks_for

    store = PartStore(tmp_path / "c.h5")
    store.start({"plan": 1})
    part = _part([0, 1], [0, 1, 2], ())
    store.write(0, part)
    with h5py.File(store.part_path(0), "r") as f:
        tokens = f["videos/tokens"]
        assert tokens.chunks == chunks_for("videos/tokens", tokens.shape, tokens.dtype) == (1,) + tokens.shape[1:]
        assert tokens.fletcher32 and f["texts/emb"].fletcher32


def test_parts_assemble_into_a_complete_cache(tmp_path):
    out, parts = _build(tmp_path)
    with CacheReader(out) as cache:
        assert cache.header == HEADER
        assert cache.num_videos == 3 and cache.num_captions == 4
        np.testing.assert_array_equal(cache["videos/tokens"][2], parts[1].videos["tokens"][0])
        np.testing.assert_array_equal(cache["texts/emb"][0:3], parts[0].texts["emb"])
        assert cache["videos/tokens"].chunks == (1, T, P, D)  # one video per chunk
        assert list(cache.strings("texts/caption")) == ["a1", "a2", "b1", "c1"]
    assert check_cache(out) == []


def test_part_store_finds_finished_parts_and_refuses_another_plan(tmp_path):
    store = PartStore(tmp_path / "c.h5")
    store.start({"a": 1})
    store.write(1, _part([2], [3]))
    (store.folder / "part-000000.h5.tmp").write_bytes(b"half written")  # a killed write
    assert store.finished(3) == {1}
    store.start({"a": 1})  # same plan: fine
    with pytest.raises(PlanMismatch, match="a"):
        store.start({"a": 2})


def test_info_reports_counts_and_layout(tmp_path):
    out, _ = _build(tmp_path, failed=(1,))
    info = cache_info(out)
    assert (info["videos_ok"], info["videos_failed"], info["captions"]) == (2, 1, 4)
    assert (info["frames"], info["tokens_per_frame"], info["token_dim"], info["embed_dim"]) == (T, P, D, E)
    assert info["shapes"]["videos/tokens"][0] == [3, T, P, D]
    assert info["bytes_on_disk"] == out.stat().st_size


@pytest.mark.parametrize("damage, message", [
    (lambda f: f["videos/tokens"].__setitem__((0, 0, 0, 0), np.nan), "NaN or inf"),
    (lambda f: f["texts/emb"].__setitem__((1, 0), np.inf), "NaN or inf"),
    (lambda f: f["videos/status"].__setitem__(1, 0), "pending"),
    (lambda f: f["videos/error"].__setitem__(1, ""), "no error message"),
    (lambda f: f["texts/video"].__setitem__(0, 7), "outside"),
    (lambda f: f["videos/frame_mask"].__setitem__(0, np.zeros(T, bool)), "no valid frame"),
    (lambda f: f["videos/video_emb"].__setitem__(0, np.full(E, 3.0)), "normalised"),
])
def test_check_finds_each_problem(tmp_path, damage, message):
    out, _ = _build(tmp_path, failed=(1,))
    with h5py.File(out, "r+") as f:
        damage(f)
        seal(f)  # as if written that way (the writer records the strings' digests when it closes)
    problems = check_cache(out)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("attribute, edit, problem", [
    ("token_layout", {"token_dim": 32.0}, "token_layout.token_dim: 32.0 is not an integer >= 1"),
    ("token_layout", {"tokens_per_frame": "4"}, "token_layout.tokens_per_frame: '4' is not an integer >= 1"),
    ("token_layout", {"grid": "2x2"}, "token_layout.grid: '2x2' is not a list of two integers >= 1"),
    ("token_layout", {"token_dtype": "int4"}, "token_layout.token_dtype: 'int4' is not one of float16, int8, float8"),
    ("token_layout", {"text_tokens": 0}, "token_layout.text_tokens: 0 is not an integer >= 1"),
    ("sampling", {"frames": True}, "sampling.frames: True is not an integer >= 1"),
    ("encoder", {"std": [0.2, 0.0, 0.2]}, "encoder.std: [0.2, 0.0, 0.2] is not a list of 3 positive numbers"),
    ("encoder", {"model": None}, "encoder.model: None is not a non-empty string"),
    ("encoder", {"fill_color": 300}, "encoder.fill_color: 300 is not an integer >= 0 and <= 255"),
    ("dataset", "[1, 2]", "dataset: [1, 2] is not a JSON object"),
])
def test_every_header_attribute_is_checked_by_type_and_range(tmp_path, attribute, edit, problem):
    import json

    out, _ = _build(tmp_path)
    assert check_header(h5py.File(out, "r").attrs) == []
    with h5py.File(out, "r+") as f:
        f.attrs[attribute] = edit if isinstance(edit, str) else json.dumps({**json.loads(f.attrs[attribute]), **edit})
    assert problem in check_cache(out)[0]
    with pytest.raises(ValueError, match="bad cache header: " + problem.replace("[", r"\[").replace("]", r"\]")):
        CacheReader(out)  # every command refuses it, not only `cache check`


def test_check_rejects_files_that_are_not_caches(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert "schema" in check_cache(other)[0]
    text = tmp_path / "text.h5"
    text.write_text("hello")
    assert "not a readable HDF5" in check_cache(text)[0]
    out, _ = _build(tmp_path)
    with h5py.File(out, "r+") as f:
        del f["texts/length"]
    assert check_cache(out) == ["missing dataset texts/length"]


def test_read_rows_equals_fancy_indexing(tmp_path):
    from tvrerank.cache.reader import read_rows

    with h5py.File(tmp_path / "x.h5", "w") as f:
        data = f.create_dataset("d", data=np.arange(50 * 3).reshape(50, 3), chunks=(1, 3))
        rows = np.array([0, 1, 2, 7, 9, 10, 49])
        np.testing.assert_array_equal(read_rows(data, rows), data[()][rows])
        shuffled = np.array([9, 10, 0, 1, 2, 49, 7])  # unique rows in any order come back in that order
        np.testing.assert_array_equal(read_rows(data, shuffled), data[()][shuffled])
        assert read_rows(data, np.array([], dtype=int)).shape == (0, 3)
