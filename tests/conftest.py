"""Shared fixtures: tiny open_clip configs (random weights) and tiny generated videos."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tvrerank.toy.videos import write_video

DATA = Path(__file__).parent / "data"
ANNOTATIONS = DATA / "annotations"
TINY_VIT = DATA / "models" / "tiny-vit.json"  # 32 px, patch 8: a 4x4 grid, width 48, embed 32
TINY_VIT_ODD = DATA / "models" / "tiny-vit-odd.json"  # 40 px, patch 8: a 5x5 grid
TINY_TIMM = DATA / "models" / "tiny-timm.json"  # a timm ViT tower (vit_tiny_patch16_224)


def moving_frames(num: int, height: int = 40, width: int = 56, seed: int = 0, shade: int = 0):
    """Frames with a bar that moves one step per frame, so every frame differs."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    background[..., 0] = shade
    for i in range(num):
        frame = background.copy()
        frame[:, (i * 3) % width] = 255
        frame[(i * 2) % height, :, 1] = 255
        yield frame


def make_video(path: Path, num_frames: int = 30, *, fps: float = 10, height: int = 40, width: int = 56,
               seed: int = 0, shade: int = 0, **kwargs) -> Path:
    return write_video(path, moving_frames(num_frames, height, width, seed, shade), fps=fps, **kwargs)


def set_display_rotation(path: Path, matrix: tuple[int, ...]) -> None:
    """Patch the mp4 track header's display matrix (FFmpeg reads rotation from it)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    offset = at + 4 + 4 + (20 if version == 0 else 32) + 8 + 8
    data[offset : offset + 36] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


BROKEN = {
    "missing": "missing.mp4",
    "empty": "empty.mp4",
    "text": "text.mp4",
    "truncated": "truncated.mp4",
    "audio": "audio.m4a",
}


def make_dataset(root: Path, num_videos: int = 6, *, broken: bool = True, captions_per_video: int = 2) -> Path:
    """Videos under root/videos, broken files beside them, and root/captions.jsonl; returns the JSONL."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_videos):
        make_video(videos / f"v{i}.mp4", num_frames=12 + 4 * i, seed=i, shade=40 * i % 256)
        rows += [{"video": f"videos/v{i}.mp4", "caption": f"clip {i} caption {k}"} for k in range(captions_per_video)]
    if broken:
        (videos / BROKEN["empty"]).write_bytes(b"")
        (videos / BROKEN["text"]).write_text("this is not a video\n")
        good = (videos / "v0.mp4").read_bytes()
        make_video(videos / "long.mp4", num_frames=60, seed=9)
        (videos / BROKEN["truncated"]).write_bytes((videos / "long.mp4").read_bytes()[:1500])
        (videos / "long.mp4").unlink()
        write_audio_only(videos / BROKEN["audio"])
        assert good
        rows += [{"video": f"videos/{name}", "caption": f"broken {kind}"} for kind, name in BROKEN.items()]
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")
