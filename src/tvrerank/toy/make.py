"""``tvrerank toy make``: write the toy world as mp4 videos + generic JSONL captions (train/test).

Layout under DIR (paths in the JSONL are relative to DIR, so ``--videos DIR``)::

    DIR/train.jsonl  DIR/test.jsonl  DIR/videos/{train,test}/NNNNNN.mp4  DIR/scripts.json

The test split is made of confuser groups (``world.confusers``): videos with the same objects
that differ in event order, a direction or a small detail. The training split holds random
scripts and confuser groups too, never a script (event sequence) that is in the test split.
Deterministic for a seed.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tvrerank.toy.videos import write_video
from tvrerank.toy.world import Script, captions_for, confusers, random_script, render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorldConfig:
    videos: int = 240  # total; a quarter goes to the test split (whole confuser groups)
    seed: int = 0
    test_fraction: float = 0.25
    group_size: int = 4
    frames: int = 24  # per video
    fps: int = 8
    size: int = 96  # pixels (the toy encoder sees 64)
    train_captions: int = 3  # paraphrases per training video
    test_captions: int = 1


def _scripts(config: ToyWorldConfig) -> tuple[list[tuple[Script, int]], list[Script]]:
    """(test scripts with their group index, train scripts), disjoint by script key."""
    rng = random.Random(config.seed)
    test_count = max(config.group_size, round(config.videos * config.test_fraction / config.group_size)
                     * config.group_size)
    test, seen = [], set()
    while len(test) < test_count:
        group = confusers(random_script(rng), rng, config.group_size)
        if len(group) < config.group_size or any(s.key() in seen for s in group):
            continue
        test += [(s, len(test) // config.group_size) for s in group]
        seen |= {s.key() for s in group}
    train: list[Script] = []
    while len(train) < config.videos - test_count:
        # half random scripts, half confuser groups: hard negatives that differ in order/direction
        candidates = confusers(random_script(rng), rng, config.group_size) if rng.random() < 0.5 \
            else [random_script(rng)]
        for script in candidates:
            if script.key() not in seen and len(train) < config.videos - test_count:
                train.append(script)
                seen.add(script.key())
    return test, train


def make_toy_world(out: str | Path, config: ToyWorldConfig = ToyWorldConfig(), *, progress: bool = True) -> Path:
    """Write the toy world under ``out``; returns ``out``. Existing files are overwritten."""
    from tqdm.auto import tqdm

    out = Path(out)
    test, train = _scripts(config)
    splits = {"train": [(s, None) for s in train], "test": test}
    records = {}
    bar = tqdm(total=len(train) + len(test), unit="video", desc="toy make", disable=not progress)
    for split, scripts in splits.items():
        lines, records[split] = [], []
        per_video = config.train_captions if split == "train" else config.test_captions
        for i, (script, group) in enumerate(scripts):
            name = f"videos/{split}/{i:06d}.mp4"
            frames = render(script, num_frames=config.frames, size=config.size, seed=config.seed * 100_003 + i)
            write_video(out / name, frames, fps=config.fps)
            captions = captions_for(script, count=3)
            chosen = captions[:per_video] if split == "train" else [captions[i % len(captions)]]
            video_id = f"{split}-{i:06d}"
            lines += [json.dumps({"video": name, "caption": c, "video_id": video_id}) for c in chosen]
            records[split].append({"video_id": video_id, "group": group,
                                   "events": [asdict(e) for e in script.events]})
            bar.update()
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    bar.close()
    (out / "scripts.json").write_text(json.dumps({"config": asdict(config), **records}, indent=1))
    log.info("toy world: %d train and %d test videos in %s", len(train), len(test), out)
    return out
