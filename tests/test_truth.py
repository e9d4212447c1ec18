"""toy/truth.py and cache/truth.py: a detail world's ground truth, per sampled frame, in the cache."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tvrerank.cache.inspect import check_cache
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.truth import DETAIL_DATASET, WORLD_ATTRIBUTE, read_truth
from tvrerank.cli import main
from tvrerank.errors import InputError, MissingInput
from tvrerank.extract.frames import sample_frames
from tvrerank.toy.make import ToyWorldConfig, make_toy_world
from tvrerank.toy.truth import attach_world_truth, sampled_frames
from tvrerank.toy.world import COLOURS, TOY_GRID, Detail, detail_pixels

FRAMES = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("detail")
    return make_toy_world(root / "world", ToyWorldConfig(videos=16, seed=5, world="detail", frames=FRAMES),
                          progress=False)


def records(world) -> dict[str, dict]:
    scripts = json.loads((world / "scripts.json").read_text())
    return {r["video_id"]: r for split in ("train", "val", "test") for r in scripts[split]}


def extract(world, out, *extra):
    args = ["extract", "--annotations", str(world / "test.jsonl"), "--videos", str(world), "--model", "tvr-toy",
            "--out", str(out), "--frames", "12", "--workers", "0", "--device", "cpu", "--quiet", *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def caches(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {pool: extract(world, root / f"{pool}.h5", "--pool", pool) for pool in ("1", "2")}


@pytest.mark.parametrize("sampled", [12, 8, 5])
def test_sampled_frames_are_the_frames_the_sampler_decodes(world, sampled):
    video = world / "videos" / "test" / "000000.mp4"
    decoded = sample_frames(video, num_frames=sampled, image_size=96)
    fps = json.loads((world / "scripts.json").read_text())["config"]["fps"]
    assert np.round(decoded.timestamps * fps).astype(int).tolist() == sampled_frames(FRAMES, sampled).tolist()


def test_the_glyph_is_in_the_decoded_frames_the_truth_names_and_nowhere_else(world):
    """Known answer at the pixel level: the glyph's colour at its pixels in each decoded sampled frame."""
    for video_id, record in records(world).items():
        if not video_id.startswith("test"):
            continue
        split, index = video_id.split("-")
        detail = Detail(**{k: record["detail"][k] for k in ("colour", "shape", "edge", "slot", "start", "end")})
        frames = sample_frames(world / "videos" / split / f"{index}.mp4", num_frames=12, image_size=96).frames
        pixels = detail_pixels(detail, 96)
        distance = np.abs(frames[:, pixels].astype(float) - COLOURS[detail.colour]).sum(-1).mean(-1)  # (12,)
        shows = np.isin(sampled_frames(FRAMES, 12), record["detail"]["frames"])
        assert 2 <= shows.sum() <= 5
        # H.264 and 4:2:0 chroma soften the 9-pixel glyph: the frames that show it are the ones whose pixels
        # there come closest to its colour
        assert distance[shows].max() < distance[~shows].min(), (video_id, distance, shows)


def test_truth_in_the_cache_per_sampled_frame_on_the_cache_grid(world, caches):
    by_id = records(world)
    for pool, grid in (("1", TOY_GRID), ("2", (4, 4))):
        cache = caches[pool]
        found = attach_world_truth(cache, world)
        assert found["world"] == "detail" and found["detail_frames"] > 0
        with CacheReader(cache) as reader:
            truth = read_truth(reader)
            ids = list(reader.strings("videos/id"))
            assert tuple(reader.header.layout.grid) == grid
        assert truth.world == "detail" and truth.grid == grid
        assert truth.detail.shape == (len(ids), 12, grid[0] * grid[1])
        for row, video_id in enumerate(ids):
            detail = by_id[video_id]["detail"]
            frames = np.isin(sampled_frames(FRAMES, 12), detail["frames"])
            assert truth.detail_frames()[row].tolist() == frames.tolist()
            patches = detail["patches"]["none" if pool == "1" else "2x2"]
            assert 1 <= len(patches) <= 2
            for t in np.flatnonzero(frames):
                assert np.flatnonzero(truth.detail[row, t]).tolist() == patches
        assert check_cache(cache) == []


def test_cache_check_refuses_truth_that_does_not_fit(world, caches, tmp_path):
    import shutil

    cache = tmp_path / "c.h5"
    shutil.copyfile(caches["1"], cache)
    attach_world_truth(cache, world)
    with h5py.File(cache, "r+") as f:
        mask = f["videos/frame_mask"][()]
        mask[0, -1] = False
        f["videos/frame_mask"][...] = mask
        detail = f[DETAIL_DATASET][()]
        detail[0, -1, 0] = True
        f[DETAIL_DATASET][...] = detail
    assert any("padded frames show the detail" in p for p in check_cache(cache))
    with h5py.File(cache, "r+") as f:
        del f[DETAIL_DATASET]
        f.create_dataset(DETAIL_DATASET, data=np.zeros((2, 12, 64), dtype=bool))
    assert any(f"{DETAIL_DATASET}: shape" in p for p in check_cache(cache))
    with h5py.File(cache, "r+") as f:
        del f[DETAIL_DATASET]
        f.attrs[WORLD_ATTRIBUTE] = json.dumps({"world": "detail", "grid": [4, 4]})
    problems = check_cache(cache)
    assert any("grid" in p for p in problems) and any(f"missing dataset {DETAIL_DATASET}" in p for p in problems)
    with h5py.File(cache, "r+") as f:
        f.attrs[WORLD_ATTRIBUTE] = "{not json"
    assert any(f"{WORLD_ATTRIBUTE}: not JSON" in p for p in check_cache(cache))
    with h5py.File(cache, "r+") as f:
        del f.attrs[WORLD_ATTRIBUTE]
    with CacheReader(cache) as reader:  # a cache without known answers reads as before
        assert read_truth(reader) is None
    assert check_cache(cache) == []


def test_an_events_world_records_its_name_and_no_detail(tmp_path):
    world = make_toy_world(tmp_path / "events", ToyWorldConfig(videos=16, seed=1, frames=FRAMES), progress=False)
    cache = extract(world, tmp_path / "e.h5")
    assert CliRunner().invoke(main, ["toy", "truth", str(world), str(cache)]).exit_code == 0
    with CacheReader(cache) as reader:
        truth = read_truth(reader)
    assert truth.world == "events" and truth.detail is None
    assert check_cache(cache) == []


def test_truth_is_refused_for_a_cache_of_another_world_or_a_folder_that_is_no_world(world, caches, tmp_path):
    other = make_toy_world(tmp_path / "other", ToyWorldConfig(videos=16, seed=9, world="detail", frames=FRAMES),
                           progress=False)  # the same video ids, other videos and captions
    before = caches["1"].read_bytes()
    with pytest.raises(InputError, match="not in the world"):
        attach_world_truth(caches["1"], other)
    (other / "scripts.json").write_text((other / "scripts.json").read_text().replace('"test-000000"', '"x"'))
    with pytest.raises(InputError, match="not in the world"):
        attach_world_truth(caches["1"], other)
    with pytest.raises(MissingInput, match="scripts.json"):
        attach_world_truth(caches["1"], tmp_path)
    assert caches["1"].read_bytes() == before  # nothing changed, nothing left behind
    assert sorted(p.name for p in caches["1"].parent.iterdir()) == ["1.h5", "2.h5"]
    result = CliRunner().invoke(main, ["toy", "truth", str(tmp_path), str(caches["1"])])
    assert result.exit_code == 2 and "scripts.json" in result.output and "Traceback" not in result.output


def test_compact_carries_the_truth_pooled_as_its_tokens(world, caches, tmp_path):
    """A compacted, 2x2-pooled copy of the unpooled cache knows what the cache extracted with --pool 2 knows."""
    attach_world_truth(caches["1"], world)
    attach_world_truth(caches["2"], world)
    out = tmp_path / "compact.h5"
    result = CliRunner().invoke(main, ["cache", "compact", str(caches["1"]), "--out", str(out), "--pool", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    with CacheReader(out) as compact, CacheReader(caches["2"]) as pooled:
        a, b = read_truth(compact), read_truth(pooled)
    assert a.grid == b.grid == (4, 4) and a.world == "detail"
    assert np.array_equal(a.detail, b.detail)
    assert check_cache(out) == []
