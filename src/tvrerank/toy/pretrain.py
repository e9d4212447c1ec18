"""``tvrerank toy pretrain``: train the toy encoder (open_clip ``tvr-toy``) contrastively on single toy frames.

Frames come from the same renderer as the toy videos (textured noisy background, shapes at the
same places and sizes, moving shapes anywhere along their paths), rendered at the videos' size
and resized to the encoder's input like extraction does. Each frame's caption names its objects
with colour, shape, position and size ("a small red circle in the top left corner and a blue
square"). The encoder never sees whole videos or the video captions of any split.

``world="detail"`` pretrains the detail world's encoder: half the frames also show a detail glyph
(``world.Detail``, at a random edge position) that their captions never name, as web captions rarely
name small details; the frame embedding then has no reason to carry it, while the patch tokens,
which carry what their patch shows, do (``toy/probe.py`` measures both). Shipped as
``--pretrained toy-detail``::

    tvrerank toy pretrain --world detail --out src/tvrerank/extract/weights/tvr-toy-detail.safetensors

Deterministic for a seed (on the same machine and thread count). The result is saved as float16
safetensors, which open_clip loads like any checkpoint::

    tvrerank toy pretrain --out src/tvrerank/extract/weights/tvr-toy.safetensors --steps 4000
    tvrerank extract --model tvr-toy --pretrained toy ...
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tvrerank.errors import InputError
from tvrerank.toy.world import WORLDS, Detail, Event, frame_caption, random_detail, random_event, render_still
from tvrerank.training import OptimConfig, build_optimizer, lr_at, resolve_optim, set_lr

log = logging.getLogger(__name__)


#: the toy encoder's optimisation defaults (``PretrainConfig.optim``): cosine to 0, no clipping
PRETRAIN_OPTIM = OptimConfig(steps=1500, lr=1e-3, min_lr_ratio=0.0, warmup=100, weight_decay=0.1, grad_clip=0.0)


@dataclass(frozen=True)
class PretrainConfig:
    optim: OptimConfig = PRETRAIN_OPTIM  # steps, lr, schedule, weight decay (tvrerank.training)
    batch_size: int = 128
    seed: int = 0
    render_size: int = 96  # toy videos are 96 px
    bank_size: int = 20000  # distinct frames rendered up front and reused
    threads: int = 0  # torch threads (0: torch's default)
    world: str = "events"  # detail: half the frames show an uncaptioned detail glyph
    detail_rate: float = 0.5  # detail world: the share of frames that show a glyph
    init: str = ""  # tvr-toy weights to start from (a shipped tag such as "toy", or a file); "": seeded random

    def __post_init__(self):
        resolve_optim(self, PRETRAIN_OPTIM)
        if self.world not in WORLDS:
            raise InputError(f"toy world must be one of {', '.join(WORLDS)}, got {self.world!r}")


def random_frame_scene(rng: random.Random) -> tuple[list[tuple[Event, float]], str]:
    """1–3 objects as (event, progress) and the frame's caption naming each of them."""
    count = rng.choice([1, 1, 2, 2, 3])
    used: set = set()
    objects = []
    for _ in range(count):
        kind = rng.choice(["appear", "move", "corner"])
        if kind == "corner" and any(e.kind == "corner" for e, _ in objects):
            kind = "appear"
        event = random_event(rng, kind, used)
        used.add((event.colour, event.shape))
        objects.append((event, rng.random() if kind == "move" else 1.0))
    caption = " and ".join(frame_caption(e, rng) for e, _ in objects)
    return objects, caption


def frame_bank(config: PretrainConfig, image_size: int, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered frames resized to ``image_size`` (PIL's bicubic, which extraction's resize
    matches within a grey level) and captions (never naming a detail glyph)."""
    frames, captions, _ = frame_bank_with_details(config, image_size, count, seed)
    return frames, captions


def frame_bank_with_details(config: PretrainConfig, image_size: int, count: int,
                            seed: int) -> tuple[np.ndarray, list[str], list[Detail | None]]:
    """``frame_bank`` and each frame's detail glyph (None: none; always None in the events world)."""
    from PIL import Image

    rng = random.Random(seed)
    frames = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    captions, details = [], []
    for i in range(count):
        objects, caption = random_frame_scene(rng)
        detail = None
        if config.world == "detail" and rng.random() < config.detail_rate:
            detail = random_detail(rng)
        image = render_still(objects, size=config.render_size, seed=rng.randrange(1 << 30), detail=detail)
        frames[i] = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
        captions.append(caption)
        details.append(detail)
    return frames, captions, details


def pretrain(config: PretrainConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Train tvr-toy from seeded random weights (or ``config.init``'s); writes float16 safetensors to ``out``."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from tvrerank.extract.encoder import FrozenClipEncoder

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    encoder = FrozenClipEncoder(model="tvr-toy", pretrained=config.init or None, device="cpu")  # "": seeded random
    clip = encoder.clip.train()
    for parameter in clip.parameters():
        parameter.requires_grad_(True)
    size = encoder.config.image_size
    start = time.perf_counter()
    frames, captions = frame_bank(config, size, config.bank_size, config.seed)
    log.info("rendered %d frames in %.0fs", len(frames), time.perf_counter() - start)
    tokens = encoder.tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    optimizer = build_optimizer(clip, config.optim)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.optim.steps), desc="toy pretrain", disable=not progress)
    history = []
    for step in bar:
        set_lr(optimizer, lr_at(step, config.optim))
        batch = torch.randint(0, len(frames), (config.batch_size,), generator=generator)
        images = encoder.preprocess(frames[batch.numpy()])
        image_features, text_features, logit_scale = clip(images, tokens[batch])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        history.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.3f}")
    clip.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()}
    metadata = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in asdict(config).items()}
    save_file(state, str(out), metadata=metadata)
    return {"final_loss": float(np.mean(history[-50:])), "seconds": time.perf_counter() - start,
            "bytes": out.stat().st_size}


def zero_shot_accuracy(encoder, *, count: int = 256, seed: int = 12345, render_size: int = 96) -> float:
    """Top-1 frame→caption retrieval among ``count`` fresh frames and their captions (chance 1/count)."""
    config = PretrainConfig(render_size=render_size)
    frames, captions = frame_bank(config, encoder.config.image_size, count, seed)
    frame_emb, _ = encoder.encode_frames(frames)
    text_emb, _, _ = encoder.encode_texts(captions)
    scores = frame_emb @ text_emb.T  # (count, count)
    hits = [captions[int(np.argmax(row))] == captions[i] for i, row in enumerate(scores)]
    return float(np.mean(hits))
