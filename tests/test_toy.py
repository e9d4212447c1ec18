"""The toy world: determinism, confuser groups, disjoint splits, and the shipped toy encoder."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tvrerank.extract.models import SHIPPED_WEIGHTS
from tvrerank.toy import make as toy_make
from tvrerank.toy.make import (ToyWorldConfig, _scripts, distractor_scripts, fresh_scripts, make_distractors,
                               make_toy_world, world_script_keys)
from tvrerank.toy.world import captions_for, confusers, random_script, render


def test_scripts_render_deterministically_and_events_show_in_order():
    script = random_script(random.Random(3))
    a = render(script, num_frames=6, size=48, seed=1)
    assert a.shape == (6, 48, 48, 3) and np.array_equal(a, render(script, num_frames=6, size=48, seed=1))
    reversed_order = type(script)(tuple(reversed(script.events)), script.background_seed)
    b = render(reversed_order, num_frames=6, size=48, seed=1)
    assert not np.array_equal(a[0], b[0])  # the first event differs
    from tvrerank.toy.world import COLOURS

    def shows(frame, colour):  # pixels close to an object's colour
        return (np.abs(frame.astype(int) - COLOURS[colour]).sum(-1) < 60).sum() > 5

    assert shows(a[1], script.events[0].colour) and not shows(a[1], script.events[-1].colour)
    assert shows(b[1], script.events[-1].colour) and not shows(b[1], script.events[0].colour)


def test_confuser_groups_share_objects_and_differ_in_order_direction_or_detail():
    rng = random.Random(0)
    for _ in range(20):
        group = confusers(random_script(rng), rng, 4)
        objects = [sorted((e.colour, e.shape) for e in s.events) for s in group]
        assert all(o == objects[0] for o in objects)
        assert len({s.key() for s in group}) == len(group)


def test_captions_describe_events_in_order_with_paraphrases():
    script = random_script(random.Random(5))
    captions = captions_for(script, 3)
    assert len(set(captions)) == 3
    first, last = script.events[0], script.events[-1]
    for caption in captions:
        assert caption.index(first.colour) < caption.rindex(last.colour)


def test_splits_never_share_a_script():
    splits = _scripts(ToyWorldConfig(videos=120, seed=4))
    keys = {name: {s.key() for s, _ in scripts} for name, scripts in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert len(splits["test"]) % 4 == 0 and len(splits["val"]) % 4 == 0


def test_make_writes_videos_and_jsonl(tmp_path):
    out = make_toy_world(tmp_path, ToyWorldConfig(videos=24, seed=2, frames=8), progress=False)
    rows = {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "val", "test")}
    assert len(rows["test"]) == 8 and len(rows["val"]) == 4  # whole groups of 4
    assert len(rows["train"]) == 3 * 12  # three paraphrases per training video
    for row in rows["train"] + rows["test"]:
        assert (out / row["video"]).stat().st_size > 0
    again = make_toy_world(tmp_path / "again", ToyWorldConfig(videos=24, seed=2, frames=8), progress=False)
    assert (again / "test.jsonl").read_text() == (out / "test.jsonl").read_text()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return make_toy_world(tmp_path_factory.mktemp("world"), ToyWorldConfig(videos=24, seed=2, frames=4), progress=False)


def test_distractors_are_new_scripts_of_the_world_and_prefix_stable(small_world):
    world_keys = world_script_keys(small_world)
    assert len(world_keys) == 24  # every script of the train, val and test splits
    splits = _scripts(ToyWorldConfig(videos=24, seed=2))
    assert world_keys == {s.key() for scripts in splits.values() for s, _ in scripts}
    many = distractor_scripts(small_world, 60)
    keys = [s.key() for s in many]
    assert len(set(keys)) == 60 and not set(keys) & world_keys
    assert [s.key() for s in distractor_scripts(small_world, 7)] == keys[:7]


def test_fresh_scripts_skip_every_seen_key(monkeypatch):
    """Drawn scripts equal to a seen one (a test script) or to an earlier draw are skipped."""
    rng = random.Random(0)
    seen_scripts = [random_script(rng) for _ in range(3)]
    new = random_script(rng)
    draws = iter([[seen_scripts[0]], [seen_scripts[1], new], [new, seen_scripts[2]]])
    monkeypatch.setattr(toy_make, "_training_draw", lambda rng, config: next(draws, None) or [random_script(rng)])
    got = fresh_scripts(random.Random(1), 3, {s.key() for s in seen_scripts}, ToyWorldConfig())
    keys = [s.key() for s in got]
    assert keys[0] == new.key() and len(set(keys)) == 3 and not set(keys) & {s.key() for s in seen_scripts}


def test_make_distractors_writes_a_range_of_videos_with_their_own_ids(small_world):
    jsonl = make_distractors(small_world, start=2, stop=5, progress=False)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["video_id"] for r in rows] == ["distractor-000002", "distractor-000003", "distractor-000004"]
    assert all((small_world / r["video"]).stat().st_size > 0 for r in rows)
    records = json.loads(jsonl.with_suffix(".json").read_text())["distractor"]
    assert [toy_make.script_from_record(r).key() for r in records] == [
        s.key() for s in distractor_scripts(small_world, 5)[2:]]
    assert [r["caption"] for r in rows] == [captions_for(s, 3)[i % 3]
                                            for i, s in enumerate(distractor_scripts(small_world, 5)) if i >= 2]
    split_ids = {line and json.loads(line)["video_id"] for split in ("train", "val", "test")
                 for line in (small_world / f"{split}.jsonl").read_text().splitlines()}
    assert not split_ids & {r["video_id"] for r in rows}
    with pytest.raises(ValueError, match="start < stop"):
        make_distractors(small_world, start=5, stop=5, progress=False)


@pytest.mark.skipif(not SHIPPED_WEIGHTS[("tvr-toy", "toy")].is_file(), reason="toy weights not built yet")
def test_shipped_toy_encoder_retrieves_fresh_frames_far_above_chance():
    from tvrerank.extract.encoder import FrozenClipEncoder
    from tvrerank.toy.pretrain import zero_shot_accuracy

    weights = SHIPPED_WEIGHTS[("tvr-toy", "toy")]
    assert weights.stat().st_size <= 10 * 2**20
    encoder = FrozenClipEncoder(model="tvr-toy", pretrained="toy", device="cpu")
    accuracy = zero_shot_accuracy(encoder, count=256, seed=999)
    # chance is 1/256 = 0.4%
    assert accuracy >= 0.25, f"zero-shot frame->caption top-1 over 256 fresh frames: {accuracy:.1%}"


def test_toy_make_writes_the_same_bytes_in_any_process(tmp_path):
    """With torch imported first (as in the demo) or not (as `toy make`), under any load."""
    import subprocess
    import sys

    script = ("import sys\nif sys.argv[2] == 'torch':\n    import torch\n"
              "from tvrerank.toy.make import ToyWorldConfig, make_toy_world\n"
              "make_toy_world(sys.argv[1], ToyWorldConfig(videos=8, seed=3), progress=False)\n")
    for name, first in (("a", "none"), ("b", "torch")):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), first], check=True, timeout=120)
    videos = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.mp4"))
    assert len(videos) >= 8
    for video in videos:
        assert (tmp_path / "a" / video).read_bytes() == (tmp_path / "b" / video).read_bytes(), video


# --------------------------------------------------------------------------- the detail world
def test_detail_confusers_differ_only_in_the_detail():
    from tvrerank.toy.world import detail_confusers, random_detail_script

    rng = random.Random(0)
    for _ in range(20):
        group = detail_confusers(random_detail_script(rng), rng, 4)
        assert len({tuple(e.key() for e in s.events) for s in group}) == 1  # the same events
        assert len({(s.detail.colour, s.detail.shape) for s in group}) == 4  # four glyphs
        assert len({(s.detail.edge, s.detail.slot) for s in group}) == 1  # at one place
        assert len({s.key() for s in group}) == 4
        captions = [captions_for(s, 1)[0] for s in group]
        assert len(set(captions)) == 4
        assert all(f"{s.detail.colour} {s.detail.shape}" in c for s, c in zip(group, captions))


def test_the_detail_covers_the_patches_the_world_says():
    """Known answer at the pixel level: rendered with and without the glyph, the frame changes in exactly
    the cells of the 8 x 8 grid that ``detail_patches`` names (12-pixel cells of a 96-pixel frame)."""
    from tvrerank.toy.world import DETAIL_EDGES, DETAIL_SHAPES, DETAIL_SLOTS, Detail, detail_patches, render_still

    for edge in DETAIL_EDGES:
        for slot in range(DETAIL_SLOTS):
            for shape in DETAIL_SHAPES:
                detail = Detail("white", shape, edge, slot, 0.0, 1.0)
                a = render_still([], size=96, seed=1).astype(int)
                b = render_still([], size=96, seed=1, detail=detail).astype(int)
                changed = np.abs(a - b).sum(-1).reshape(8, 12, 8, 12).any(axis=(1, 3))  # (8, 8) cells
                assert np.flatnonzero(changed).tolist() == detail_patches(detail), (edge, slot, shape)
                assert len(detail_patches(detail)) == (1 if slot % 2 == 0 else 2)
                rows, cols = np.divmod(detail_patches(detail), 8)
                assert {"top": (rows == 0), "bottom": (rows == 7), "left": (cols == 0),
                        "right": (cols == 7)}[edge].all()
                pooled = detail_patches(detail, pool="2x2")
                assert sorted({(r // 2) * 4 + c // 2 for r, c in zip(rows, cols)}) == pooled


def test_detail_world_records_its_ground_truth(tmp_path):
    out = make_toy_world(tmp_path, ToyWorldConfig(videos=16, seed=3, world="detail"), progress=False)
    scripts = json.loads((out / "scripts.json").read_text())
    assert scripts["world"] == "detail" and scripts["config"]["world"] == "detail" and scripts["grid"] == [8, 8]
    rows = {json.loads(line)["video_id"]: json.loads(line)["caption"]
            for line in (out / "test.jsonl").read_text().splitlines()}
    for record in scripts["test"] + scripts["train"]:
        detail = record["detail"]
        assert 4 <= len(detail["frames"]) <= 10  # 2-5 of 12 segments of 24 frames
        assert detail["frames"] == list(range(detail["frames"][0], detail["frames"][-1] + 1))
        assert 1 <= len(detail["patches"]["none"]) <= 2 and 1 <= len(detail["patches"]["2x2"]) <= 2
        if record["video_id"] in rows:
            assert f"{detail['colour']} {detail['shape']}" in rows[record["video_id"]]
    groups = {}
    for record in scripts["test"]:
        groups.setdefault(record["group"], []).append(record)
    assert all(len({json.dumps(r["events"]) for r in g}) == 1 for g in groups.values())
    events = json.loads((make_toy_world(tmp_path / "events", ToyWorldConfig(videos=16, seed=3), progress=False)
                         / "scripts.json").read_text())
    assert events["world"] == "events" and "detail" not in events["test"][0]


def test_an_unknown_world_is_refused():
    from tvrerank.errors import InputError

    with pytest.raises(InputError, match="events, detail"):
        ToyWorldConfig(world="glyphs")


def test_detail_captions_fit_the_toy_encoders_context():
    """The glyph is named last: a caption cut at the toy encoder's 48 tokens would lose it."""
    import open_clip

    from tvrerank.toy.world import random_detail_script

    rng = random.Random(0)
    captions = [c for _ in range(1000) for c in captions_for(random_detail_script(rng), 3)]
    lengths = (open_clip.get_tokenizer("ViT-B-32")(captions, context_length=77) != 0).sum(1)
    assert int(lengths.max()) <= 48


def test_the_demo_writes_the_training_it_ran_for_train_config(served_demo, tmp_path):
    """OUT/training.json is the demo's exact TrainConfig, and `tvrerank train --config` takes it as is."""
    import json

    from click.testing import CliRunner

    from tvrerank.cli import main
    from tvrerank.toy.demo import DemoConfig, demo_training
    from tvrerank.train.loop import load_train_config

    recorded = served_demo / "training.json"
    demo = DemoConfig(out=str(served_demo), videos=48, steps=4, workers=0, token_dtype="int8")
    assert load_train_config(recorded) == demo_training(demo)
    assert json.loads(recorded.read_text())["optim"]["steps"] == 4
    result = CliRunner().invoke(main, ["train", "--cache", str(served_demo / "cache" / "train.h5"), "--candidates",
                                       str(served_demo / "candidates" / "train.h5"), "--out", str(tmp_path / "run"),
                                       "--config", str(recorded), "--steps", "2"])
    assert result.exit_code == 0, result.output
