"""``tvrerank toy make``: write the toy world as mp4 videos + generic JSONL captions (train/test).

Layout under DIR (paths in the JSONL are relative to DIR, so ``--videos DIR``)::

    DIR/train.jsonl  DIR/val.jsonl  DIR/test.jsonl  DIR/videos/{train,val,test}/NNNNNN.mp4
    DIR/scripts.json

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
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tvrerank.toy.videos import write_video
from tvrerank.errors import InputError
from tvrerank.toy.world import (TOY_GRID, WORLDS, Script, captions_for, confusers, detail_confusers, detail_frames,
                                detail_patches, random_detail_script, random_script, render)

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
        # half random scripts, half confuser groups: hard negatives that differ in order/direction
        candidates = _group(_draw(rng, config), rng, size, config) if rng.random() < 0.5 else [_draw(rng, config)]
        for script in candidates:
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
