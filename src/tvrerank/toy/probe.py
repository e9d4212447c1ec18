"""Does a toy encoder's frame embedding carry the detail glyph, and do its patch tokens? A linear probe.

Frames of the detail world (1–3 objects, as in pretraining, plus one glyph each) go through the
encoder; a linear probe (ridge regression onto one-hot classes, fitted on two thirds of the frames,
scored on the rest) reads the glyph's colour (6 classes) and shape (3) from

- ``detail patch``: the patch token(s) the glyph covers (their mean, for a glyph on two patches),
- ``other patch``: a patch of the same edge that does not show it (a control: near chance),
- ``global``: the frame's pooled embedding, what stage 1 and a global-token re-ranker read.

The detail world needs the first high and the third near chance (``toy/pretrain.py``, world detail).
``cache_probe`` asks the same of a detail world's cache (frames decoded from the H.264 videos, as the
re-ranker reads them), over the sampled frames that show the glyph, split by video.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from tvrerank.toy.world import COLOURS, DETAIL_SHAPES, TOY_GRID, detail_patches, random_detail, render_still

TARGETS = {"colour": tuple(COLOURS), "shape": DETAIL_SHAPES}
FEATURES = ("detail patch", "other patch", "global")


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                          classes: int, ridge: float = 1.0) -> float:
    """Fit a linear map of train_x (N, D) onto one-hot train_y (N,) ints (ridge regression on
    standardised features, with a bias) and return its top-1 accuracy on test_x (M, D), test_y (M,)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))]).astype(np.float64)  # (N, D+1)
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))]).astype(np.float64)
    targets = np.eye(classes)[train_y]  # (N, classes)
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ targets)  # (D+1, classes)
    return float(((b @ weights).argmax(1) == test_y).mean())


@dataclass(frozen=True)
class ProbeFrames:
    frames: np.ndarray  # (N, S, S, 3) uint8 at the encoder's input size
    labels: dict[str, np.ndarray]  # target → (N,) int class
    detail_patches: list[list[int]]  # per frame, the glyph's patches on the toy grid
    other_patch: np.ndarray  # (N,) a patch of the same edge without the glyph


def probe_frames(count: int, *, image_size: int, seed: int = 4321, render_size: int = 96) -> ProbeFrames:
    """``count`` fresh frames, each with random objects and one detail glyph, resized as extraction does."""
    from PIL import Image

    from tvrerank.toy.pretrain import random_frame_scene

    rng = random.Random(seed)
    frames = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    labels = {name: np.empty(count, dtype=np.int64) for name in TARGETS}
    patches, others = [], np.empty(count, dtype=np.int64)
    for i in range(count):
        objects, _ = random_frame_scene(rng)
        detail = random_detail(rng)
        image = render_still(objects, size=render_size, seed=rng.randrange(1 << 30), detail=detail)
        frames[i] = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
        labels["colour"][i] = TARGETS["colour"].index(detail.colour)
        labels["shape"][i] = TARGETS["shape"].index(detail.shape)
        covered = detail_patches(detail, TOY_GRID, size=render_size)
        patches.append(covered)
        edge = {p for p in range(TOY_GRID[0] * TOY_GRID[1]) if _on_edge(p, detail.edge)} - set(covered)
        others[i] = rng.choice(sorted(edge))
    return ProbeFrames(frames, labels, patches, others)


def _on_edge(patch: int, edge: str) -> bool:
    row, col = divmod(patch, TOY_GRID[1])
    return {"top": row == 0, "bottom": row == TOY_GRID[0] - 1, "left": col == 0, "right": col == TOY_GRID[1] - 1}[edge]


def probe_features(encoder, data: ProbeFrames, *, batch: int = 256) -> dict[str, np.ndarray]:
    """The three feature sets of ``FEATURES`` for the frames: each (N, width)."""
    embeddings, tokens = [], []
    for start in range(0, len(data.frames), batch):
        emb, tok = encoder.encode_frames(data.frames[start : start + batch])  # (b, E), (b, P, D)
        embeddings.append(emb)
        tokens.append(tok)
    emb, tok = np.concatenate(embeddings), np.concatenate(tokens)
    if tok.shape[1] != TOY_GRID[0] * TOY_GRID[1]:
        raise ValueError(f"the probe needs the toy encoder's {TOY_GRID} grid, got {tok.shape[1]} tokens")
    detail = np.stack([tok[i, p].mean(0) for i, p in enumerate(data.detail_patches)])
    return {"detail patch": detail, "other patch": tok[np.arange(len(tok)), data.other_patch], "global": emb}


def detail_probe(encoder, *, count: int = 1500, seed: int = 4321) -> dict:
    """Linear-probe accuracy of the glyph's colour and shape from each feature set →
    {feature: {target: accuracy}}, plus "chance": {target: 1 / classes} and "frames"."""
    data = probe_frames(count, image_size=encoder.config.image_size, seed=seed)
    features = probe_features(encoder, data)
    cut = 2 * count // 3
    result: dict = {"frames": count, "chance": {t: 1 / len(c) for t, c in TARGETS.items()}}
    for name in FEATURES:
        x = features[name]
        result[name] = {target: linear_probe_accuracy(x[:cut], y[:cut], x[cut:], y[cut:], classes=len(TARGETS[target]))
                        for target, y in data.labels.items()}
    return result


def format_probe(result: dict) -> str:
    """The probe's accuracies as a small table."""
    lines = [f"{'linear probe (' + str(result['frames']) + ' frames)':<28} " + " ".join(f"{t:>8}" for t in TARGETS)]
    for name in FEATURES:
        lines.append(f"{name:<28} " + " ".join(f"{100 * result[name][t]:>7.1f}%" for t in TARGETS))
    lines.append(f"{'chance':<28} " + " ".join(f"{100 * result['chance'][t]:>7.1f}%" for t in TARGETS))
    return "\n".join(lines)


def cache_probe(cache_path, world_dir, *, train_fraction: float = 2 / 3, seed: int = 0) -> dict:
    """``detail_probe`` on a detail world's cache (with ``toy truth``'s ground truth): one sample per
    sampled frame that shows the glyph; the probe is fitted on ``train_fraction`` of the videos and scored
    on the others (a video's frames share its glyph). "other patch" is a patch of the frame the glyph is
    not on."""
    from tvrerank.cache.encoding import decode_tokens
    from tvrerank.cache.reader import CacheReader
    from tvrerank.cache.truth import read_truth
    from tvrerank.errors import InputError
    from tvrerank.toy.truth import load_world
    import torch

    world = load_world(world_dir)
    records = {r["video_id"]: r for split in ("train", "val", "test") for r in world.get(split, [])}
    with CacheReader(cache_path) as cache:
        truth = read_truth(cache)
        if truth is None or truth.detail is None:
            raise InputError(f"{cache_path}: no detail ground truth; run `tvrerank toy truth {world_dir} {cache_path}`")
        ids = list(cache.strings("videos/id"))
        rows, frames = np.nonzero(truth.detail.any(-1))  # (S,) each
        scale = "videos/token_scale" in cache.file
        features = {name: [] for name in FEATURES}
        rng = np.random.default_rng(seed)
        for row in np.unique(rows):
            stored = cache["videos/tokens"][row]  # (T, P, D) in the stored encoding
            tokens = decode_tokens(torch.from_numpy(np.ascontiguousarray(stored)),
                                   torch.from_numpy(cache["videos/token_scale"][row]) if scale else None).numpy()
            emb = cache["videos/frame_emb"][row].astype(np.float32)
            for t in frames[rows == row]:
                on = truth.detail[row, t]
                features["detail patch"].append(tokens[t, on].mean(0))
                features["other patch"].append(tokens[t, rng.choice(np.flatnonzero(~on))])
                features["global"].append(emb[t])
    labels = {target: np.array([TARGETS[target].index(records[ids[r]]["detail"][target]) for r in rows])
              for target in TARGETS}
    videos = np.unique(rows)
    train_videos = rng.permutation(videos)[: int(len(videos) * train_fraction)]
    train = np.isin(rows, train_videos)
    result: dict = {"frames": int(len(rows)), "videos": int(len(videos)),
                    "chance": {t: 1 / len(c) for t, c in TARGETS.items()}}
    for name in FEATURES:
        x = np.stack(features[name]).astype(np.float32)
        result[name] = {t: linear_probe_accuracy(x[train], y[train], x[~train], y[~train], classes=len(TARGETS[t]))
                        for t, y in labels.items()}
    return result
