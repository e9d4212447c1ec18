"""Shared fixtures: tiny open_clip configs (random weights) and tiny generated videos."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import shutil
import struct
import subprocess
import sys
import threading
import time
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


def flip_tensor_bytes(path: Path, nbytes: int = 256) -> None:
    """XOR ``nbytes`` inside the largest tensor of a torch checkpoint (a zip whose records are stored
    uncompressed): the zip stays readable, so torch.load succeeds on the damaged weights."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = data[record.header_offset : record.header_offset + 30]  # the record's local file header
    start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    for i in range(start, start + min(nbytes, record.file_size)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def cli_output(*args) -> str:
    """``tvrerank ARGS`` through click's CliRunner (arguments made strings), asserted to exit 0 → its output."""
    from click.testing import CliRunner

    from tvrerank.cli import main

    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def kill_at_first_checkpoint(command: list[str], out: Path, result_file: str) -> None:
    """Start a training command and SIGKILL it as soon as out/checkpoint.pt exists: it must die before
    writing its result file."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (out / "checkpoint.pt").exists():
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (out / result_file).exists()


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
        make_video(videos / "long.mp4", num_frames=60, seed=9)
        (videos / BROKEN["truncated"]).write_bytes((videos / "long.mp4").read_bytes()[:1500])
        (videos / "long.mp4").unlink()
        write_audio_only(videos / BROKEN["audio"])
        rows += [{"video": f"videos/{name}", "caption": f"broken {kind}"} for kind, name in BROKEN.items()]
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def synthetic_cache(path: Path, *, videos: int = 40, captions_per_video: int = 2, dim: int = 16,
                    failed: tuple[int, ...] = (), seed: int = 0, frames: int = 4, tokens: int = 4,
                    model: str = "synthetic", stage1_noise: float = 0.6, token_dtype: str = "float16") -> Path:
    """A cache with random unit embeddings (no videos or model needed); captions near their video.

    The caption token features repeat (noisily) the patch tokens of their video's first frame, so a
    re-ranker that compares tokens can find the right video where the embeddings are too noisy.
    """
    from tvrerank.cache.encoding import encode_tokens
    from tvrerank.cache.schema import FAILED, OK, CacheHeader
    from tvrerank.cache.writer import create_cache
    from tvrerank.config import EncoderConfig, SamplingConfig, TokenLayout

    rng = np.random.default_rng(seed)
    layout = TokenLayout(grid=(2, tokens // 2), tokens_per_frame=tokens, token_dim=dim, text_token_dim=dim,
                         embed_dim=dim, text_tokens=8, token_dtype=token_dtype)
    header = CacheHeader(encoder=EncoderConfig(model=model, model_config={"embed_dim": dim}),
                         sampling=SamplingConfig(frames=frames), layout=layout, dataset={"format": "synthetic"})
    video_emb = rng.normal(size=(videos, dim))
    video_emb /= np.linalg.norm(video_emb, axis=1, keepdims=True)
    caption_video = np.repeat(np.arange(videos), captions_per_video).astype(np.int32)
    text_emb = video_emb[caption_video] + rng.normal(scale=stage1_noise, size=(len(caption_video), dim))
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    status = np.full(videos, OK, np.uint8)
    status[list(failed)] = FAILED
    with create_cache(path, header, video_ids=[f"v{i}" for i in range(videos)],
                      video_paths=[f"v{i}.mp4" for i in range(videos)],
                      captions=[f"caption {i}" for i in range(len(caption_video))],
                      caption_video=caption_video) as f:
        f["videos/status"][:] = status
        f["videos/error"][:] = ["broken" if s == FAILED else "" for s in status]
        f["videos/frame_mask"][:] = (status == OK)[:, None]
        f["videos/video_emb"][:] = np.where((status == OK)[:, None], video_emb, 0)
        f["videos/frame_emb"][:] = video_emb[:, None, :]
        video_tokens = rng.normal(size=(videos, frames, tokens, dim))
        text_tokens = rng.normal(size=(len(caption_video), 8, dim))
        text_tokens[:, 1 : 1 + tokens] = video_tokens[caption_video, 0] + rng.normal(
            scale=0.3, size=(len(caption_video), tokens, dim))
        f["texts/emb"][:] = text_emb
        f["texts/length"][:] = 1 + tokens
        for group, values in (("videos", video_tokens), ("texts", text_tokens)):
            codes, scale = encode_tokens(values.astype(np.float16), token_dtype)
            f[f"{group}/tokens"][:] = codes
            if scale is not None:
                f[f"{group}/token_scale"][:] = scale
    return path


#: a re-ranker that selects patches (the demo's reads global tokens only), for the search page's tests
TOP_M_RUN = {"captions": 4, "negatives": 3, "in_batch": 2, "eval_every": 0,
             "model": {"width": 32, "heads": 2, "layers": 1, "queries": 4, "frame_keep": 3, "video_keep": 8,
                       "perturb_samples": 4, "frame_tokens": "top_m"}}


@pytest.fixture(scope="session")
def served_demo(tmp_path_factory) -> Path:
    """A finished small demo (toy world, 48 videos: 12 test videos; int8 tokens) plus DIR/run-top-m, a re-ranker that
    keeps patches, trained on the demo's train split."""
    from click.testing import CliRunner

    from tvrerank.cli import main

    demo = tmp_path_factory.mktemp("served") / "demo"
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--out", str(demo), "--videos", "48", "--steps", "4", "--workers", "0",
                                  "--token-dtype", "int8"])  # the serving path reads 8-bit tokens
    assert result.exit_code == 0, result.output
    config = demo / "top-m.json"
    config.write_text(json.dumps(TOP_M_RUN))
    result = runner.invoke(main, ["train", "--cache", str(demo / "cache" / "train.h5"), "--candidates",
                                  str(demo / "candidates" / "train.h5"), "--out", str(demo / "run-top-m"),
                                  "--config", str(config), "--steps", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return demo


@pytest.fixture(scope="session")
def detail_demo_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished small demo on the detail world (48 videos: 12 test videos, each cache carrying the
    known answer; its re-ranker keeps top-M patches) and what `tvrerank demo` printed. Shared by the
    selector recalls' and the search page's tests: one build (~1-2 min on two cores) for all."""
    demo = tmp_path_factory.mktemp("detail") / "demo"
    output = cli_output("demo", "--out", demo, "--world", "detail", "--videos", 48, "--steps", 4, "--workers", 0)
    return demo, output


@pytest.fixture(scope="session")
def detail_demo(detail_demo_run) -> Path:
    """The folder of ``detail_demo_run``'s demo."""
    return detail_demo_run[0]


def without_host_values():
    """A context in which tensors carry shapes but no values (torch's FakeTensorMode; real inputs are
    faked on entry): any operator that needs a tensor's value on the host raises, e.g. ``.item()``,
    ``.tolist()``, ``nonzero``, boolean-mask indexing, ``repeat_interleave`` by a tensor. On a GPU each
    would synchronise, which a CUDA graph capture refuses. (A copy to the CPU, ``.cpu()``, is not
    caught here: on the CPU it is no operator at all.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.fixture(scope="session")
def split_demo(served_demo, tmp_path_factory) -> dict[str, Path]:
    """The served demo's test gallery split in 2 shards (`tvrerank split`): DIR/run, a copy of run-top-m with
    its gallery store, and DIR/shards/shard-{1,2}-of-2."""
    root = tmp_path_factory.mktemp("split")
    run = root / "run"
    shutil.copytree(served_demo / "run-top-m", run)
    gallery = served_demo / "cache" / "test.h5"
    cli_output("gallery", "--gallery", gallery, "--reranker", run, "--device", "cpu")
    cli_output("split", "--gallery", gallery, "--index", served_demo / "index" / "test", "--reranker", run,
               "--shards", 2, "--out", root / "shards", "--videos", served_demo / "data")
    return {"gallery": gallery, "index": served_demo / "index" / "test", "run": run,
            "shards": [root / "shards" / f"shard-{i}-of-2" for i in (1, 2)]}


def serve_process(*arguments, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A real `tvrerank serve ARGUMENTS` in a child process on a free loopback port → (process, its URL)."""
    process = subprocess.Popen([sys.executable, "-m", "tvrerank.cli", "serve", *map(str, arguments), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if match:
            return process, match.group(1)
    process.kill()
    process.wait()
    raise AssertionError("tvrerank serve did not start:\n" + "".join(seen))


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
