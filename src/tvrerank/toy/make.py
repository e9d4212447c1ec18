"""``tvrerank toy make``: write the toy world as mp4 videos + generic JSONL captions (train/test).

Layout under DIR (paths in the JSONL are relative to DIR, so ``--videos DIR``)::

    DIR/train.jsonl  DIR/val.jsonl  DIR/test.jsonl  DIR/videos/{train,val,test}/NNNNNN.mp4
    DIR/scripts.json
    DIR/distractor-SSSSSS-EEEEEE.jsonl  DIR/distractor-SSSSSS-EEEEEE.json  DIR/videos/distractor/NNNNNN.mp4
                              (``make_distractors``: extra gallery videos, written later into a made world)

Two worlds (``ToyWorldConfig.world``, recorded in ``scripts.json``):

- ``events`` (the default): the test and validation splits are made of confuser groups
  (``world.confusers``): videos with the same objects that differ in event order, a direction or a
  small corner object.
- ``detail``: every video also shows a small glyph (``world.Detail``) in 2–5 of the clip's
  ``detail_segments`` segments; captions name it, and the test and validation confuser groups
  (``world.detail_confusers``) differ ONLY in it, so a first stage that cannot see it cannot
  separate them. ``scripts.json`` records the ground truth of each video: the rendered frames that
  show the glyph and the patches it covers on the toy encoder's grid (``world.TOY_GRID``) and on its
  2×2-pooled grid (``tvrerank toy truth`` carries it into a cache, per sampled frame).

The training split holds random scripts and confuser groups too; no script (what the captions
describe) is in two splits. Deterministic for a seed.

Distractors (``make_distractors``) are more videos of the same world for a larger gallery: drawn
as the training split is, never a script of any split (by script key) nor of another distractor,
with ids ``distractor-NNNNNN``. Deterministic for the world's seed and prefix-stable: distractors
0..n-1 are the same whatever range is written, so ranges can be added later.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tvrerank.errors import InputError
from tvrerank.toy.videos import write_video
from tvrerank.toy.world import (TOY_GRID, WORLDS, Detail, Event, Script, captions_for, confusers, detail_confusers,
                                detail_frames, detail_patches, random_detail_script, random_script, render)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorldConfig:
    videos: int = 240  # total; a quarter goes to the test split, an eighth to validation
    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.125
    group_size: int = 4
    frames: int = 24  # per video
    fps: int = 8
    size: int = 96  # pixels (the toy encoder sees 64)
    train_captions: int = 3  # paraphrases per training video (val/test videos get one, rotating)
    world: str = "events"  # events | detail (module docstring)
    detail_segments: int = 12  # the detail world's glyph shows in 2-5 of this many equal segments of a clip

    def __post_init__(self):
        if self.world not in WORLDS:
            raise InputError(f"toy world must be one of {', '.join(WORLDS)}, got {self.world!r}")


def _draw(rng: random.Random, config: ToyWorldConfig) -> Script:
    """A random script of the config's world."""
    if config.world == "detail":
        return random_detail_script(rng, segments=config.detail_segments)
    return random_script(rng)


def _group(script: Script, rng: random.Random, size: int, config: ToyWorldConfig) -> list[Script]:
    """A confuser group of the config's world around ``script``."""
    if config.world == "detail":
        return detail_confusers(script, rng, size, segments=config.detail_segments)
    return confusers(script, rng, size)


def _groups(rng: random.Random, count: int, size: int, seen: set, config: ToyWorldConfig) -> list[tuple[Script, int]]:
    """``count`` videos in whole confuser groups of ``size``, none already in ``seen``."""
    scripts: list[tuple[Script, int]] = []
    while len(scripts) < count:
        group = _group(_draw(rng, config), rng, size, config)
        if len(group) < size or any(s.key() in seen for s in group):
            continue
        scripts += [(s, len(scripts) // size) for s in group]
        seen |= {s.key() for s in group}
    return scripts


def _training_draw(rng: random.Random, config: ToyWorldConfig) -> list[Script]:
    """Scripts as the training split draws them: half the time a confuser group (hard negatives that differ
    in order, direction or a detail), else one random script."""
    if rng.random() < 0.5:
        return _group(_draw(rng, config), rng, config.group_size, config)
    return [_draw(rng, config)]


def _scripts(config: ToyWorldConfig) -> dict[str, list[tuple[Script, int | None]]]:
    """Scripts per split (with their confuser group, None for training), disjoint by script key."""
    rng = random.Random(config.seed)
    size = config.group_size

    def grouped(fraction: float) -> int:
        return max(size, round(config.videos * fraction / size) * size)

    seen: set = set()
    test = _groups(rng, grouped(config.test_fraction), size, seen, config)
    val = _groups(rng, grouped(config.val_fraction), size, seen, config)
    train: list[tuple[Script, int | None]] = []
    total = max(size, config.videos - len(test) - len(val))
    while len(train) < total:
        for script in _training_draw(rng, config):
            if script.key() not in seen and len(train) < total:
                train.append((script, None))
                seen.add(script.key())
    return {"train": train, "val": val, "test": test}


def detail_record(script: Script, config: ToyWorldConfig) -> dict:
    """A video's ground truth for ``scripts.json``: {} without a detail, else {"detail": the glyph,
    its rendered frames (of ``config.frames``) and its patches on the toy encoder's grid, row-major,
    unpooled and 2×2-pooled}."""
    if script.detail is None:
        return {}
    return {"detail": {**asdict(script.detail), "frames": detail_frames(script, config.frames),
                       "patches": {pool: detail_patches(script.detail, TOY_GRID, size=config.size, pool=pool)
                                   for pool in ("none", "2x2")}}}


def make_toy_world(out: str | Path, config: ToyWorldConfig = ToyWorldConfig(), *, progress: bool = True) -> Path:
    """Write the toy world under ``out``; returns ``out``. Existing files are overwritten."""
    from tqdm.auto import tqdm

    out = Path(out)
    splits = _scripts(config)
    records = {}
    bar = tqdm(total=sum(map(len, splits.values())), unit="video", desc="toy make", disable=not progress)
    for split, scripts in splits.items():
        lines, records[split] = [], []
        for i, (script, group) in enumerate(scripts):
            name = f"videos/{split}/{i:06d}.mp4"
            frames = render(script, num_frames=config.frames, size=config.size, seed=config.seed * 100_003 + i)
            write_video(out / name, frames, fps=config.fps)
            captions = captions_for(script, count=3)
            chosen = captions[: config.train_captions] if split == "train" else [captions[i % len(captions)]]
            video_id = f"{split}-{i:06d}"
            lines += [json.dumps({"video": name, "caption": c, "video_id": video_id}) for c in chosen]
            records[split].append({"video_id": video_id, "group": group,
                                   "events": [asdict(e) for e in script.events], **detail_record(script, config)})
            bar.update()
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    bar.close()
    (out / "scripts.json").write_text(json.dumps({"world": config.world, "grid": list(TOY_GRID), "config": asdict(config),
                                                  **records}, indent=1))
    log.info("toy world in %s: %s videos", out, ", ".join(f"{len(v)} {k}" for k, v in splits.items()))
    return out


DISTRACTOR_SPLIT = "distractor"
#: added to the frame-noise seed of distractor i, so no distractor shares its noise with a split's video
DISTRACTOR_NOISE_SEED = 1_000_000_007


def script_from_record(record: dict) -> Script:
    """A ``scripts.json`` record ({"events": [{kind, colour, shape, where}, ...], "detail": {...} in the
    detail world}) → its Script (background 0)."""
    detail = record.get("detail")
    detail = None if detail is None else Detail(**{k: v for k, v in detail.items() if k not in ("frames", "patches")})
    return Script(tuple(Event(**event) for event in record["events"]), detail=detail)


def world_config(world: str | Path) -> ToyWorldConfig:
    """The ToyWorldConfig a world folder was made with (its ``scripts.json``)."""
    path = Path(world) / "scripts.json"
    try:
        return ToyWorldConfig(**json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a toy world's scripts.json ({exc}); make the world with `tvrerank toy make`") \
            from None


def world_script_keys(world: str | Path) -> set:
    """The script keys of every split of a made world (from its ``scripts.json``)."""
    recorded = json.loads((Path(world) / "scripts.json").read_text())
    return {script_from_record(r).key() for split in ("train", "val", "test") for r in recorded.get(split, [])}


def fresh_scripts(rng: random.Random, count: int, seen: set, config: ToyWorldConfig) -> list[Script]:
    """The first ``count`` scripts ``_training_draw`` gives whose keys are not in ``seen`` (nor repeat each other)."""
    seen, scripts = set(seen), []
    while len(scripts) < count:
        for script in _training_draw(rng, config):
            if script.key() not in seen and len(scripts) < count:
                scripts.append(script)
                seen.add(script.key())
    return scripts


def distractor_scripts(world: str | Path, count: int) -> list[Script]:
    """Distractors 0..count-1 of a made world: none is a script of its splits; prefix-stable in ``count``."""
    config = world_config(world)
    return fresh_scripts(random.Random(f"distractors of toy world seed {config.seed}"), count,
                         world_script_keys(world), config)


def distractor_annotations(world: str | Path, start: int, stop: int) -> Path:
    """Where ``make_distractors`` writes the JSONL of distractors start..stop-1."""
    return Path(world) / f"{DISTRACTOR_SPLIT}-{start:06d}-{stop:06d}.jsonl"


def make_distractors(world: str | Path, *, start: int = 0, stop: int, progress: bool = True) -> Path:
    """Write distractors ``start``..``stop``-1 of the toy world in ``world`` (made by ``make_toy_world``):
    videos/distractor/NNNNNN.mp4, one caption each, ids ``distractor-NNNNNN`` → their JSONL (written
    last, with a ``.json`` of their scripts beside it; paths relative to ``world``, as the splits')."""
    from tqdm.auto import tqdm

    if not 0 <= start < stop:
        raise InputError(f"distractors {start}..{stop}: give 0 <= start < stop")
    world = Path(world)
    config = world_config(world)
    scripts = distractor_scripts(world, stop)[start:]
    lines, records = [], []
    for i, script in enumerate(tqdm(scripts, unit="video", desc="toy distractors", disable=not progress), start=start):
        name = f"videos/{DISTRACTOR_SPLIT}/{i:06d}.mp4"
        frames = render(script, num_frames=config.frames, size=config.size,
                        seed=DISTRACTOR_NOISE_SEED + config.seed * 100_003 + i)
        write_video(world / name, frames, fps=config.fps)
        video_id = f"{DISTRACTOR_SPLIT}-{i:06d}"
        lines.append(json.dumps({"video": name, "caption": captions_for(script, count=3)[i % 3], "video_id": video_id}))
        records.append({"video_id": video_id, "events": [asdict(e) for e in script.events]})
    out = distractor_annotations(world, start, stop)
    out.with_suffix(".json").write_text(json.dumps({"config": asdict(config), DISTRACTOR_SPLIT: records}, indent=1))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    log.info("%d distractors of the toy world in %s", len(scripts), out)
    return out
