"""Extraction throughput, where its time goes, how long the encoder waits on decoding, and peak memory.

Writes ``--videos`` H.264 videos (320x240, 8-10 s, 25-30 fps, x264's default GOP, moving shapes
on a static textured background) with one caption each in a generic JSONL file, then for each
model in ``--models`` (random weights; ``tiny`` is ``tests/data/models/tiny-vit.json``, other names are
open_clip architectures, e.g. the real ``ViT-B-32``):

1. ``run_extraction`` over all videos (``--workers`` decoding processes, the default pipeline):
   videos/s end to end (model build and final assembly included; the figure the CLI prints)
   and for the pipeline alone (from the first request for decoded frames to the end).
2. The decode wait, as the runner reports it in its summary (``ExtractionSummary``): the share
   of the pipeline's wall time spent blocked on decoded frames is what the GPU (on CPU: the
   encoder) sat waiting on decoding; the first wait, which includes the workers' start-up, is
   shown apart.
3. Stages side by side in this process, on the same videos, with the runner's part/batch layout:
   decode = ``sample_frames`` per video (one process, FFmpeg threads as each worker gets them);
   encode = ``PartEncoder`` over the parts, a whole part at a time (the runner feeds it video by
   video as they are decoded; the batches are the same) (preprocess, frame forward pass,
   projection, copy to host, captions), with ``encoder.preprocess`` and ``encode_texts`` also timed
   alone on the same inputs, and the encoding run a second time on the same parts (a first pass
   pays for the device's warm-up), on CUDA counting its synchronizing calls (torch's sync debug
   mode: any is a stall of the overlap);
   write = ``PartStore.write`` of the resulting parts into a temporary folder.

Finally peak RSS of ``tvrerank extract --workers 0`` (tiny model, CPU) in a fresh subprocess on
one 10 s and one 10 min video (160x120, 25 fps), read with ``os.wait4`` in a bare launcher
process (see ``LAUNCHER``); target: the long one within 1.5x of the short one. torch and
open_clip are imported before any timing. Per model it also reports the bare image tower's
throughput at the same batch size (``encode_frames`` on random frames) and ``tower_ratio``, the
pipeline's frames/s over it (goal on a GPU: >= 0.9 for ViT-bigG-14), and on an NVIDIA GPU the
share of the run the GPU was busy (NVML, sampled every 0.1 s) and, on CUDA, ``device_busy``: the
device's time on frame batches (CUDA events around each, ``ExtractionSummary.device_seconds``) over
the pipeline's. With ``tower_ratio`` it says where a gap is: a low ``device_busy`` means the GPU
waited on the host; a high one with a low ratio means each batch ran slower than alone. The last
line is ``videos_per_s_<model>=<x> tower_ratio_<model>=<x> [gpu_busy_<model>=<x>]
[device_busy_<model>=<x>] ... [rss_ratio=<x>]`` (end-to-end videos/s; model names lower-cased,
non-alphanumerics dropped).

    python benchmarks/bench_extract.py [--models tiny,ViT-B-32] [--videos 24] [--device auto]
        [--precision fp32] [--batch-size 64] [--workers 2] [--skip-rss]
    python benchmarks/bench_extract.py --models ViT-bigG-14 --precision bf16 --device cuda
    python benchmarks/bench_extract.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tvrerank.extract import runner
from tvrerank.extract.frames import sample_frames
from tvrerank.extract.mapper import PartEncoder
from tvrerank.toy.videos import write_video

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "models" / "tiny-vit.json"
FRAMES = 12
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}


# --------------------------------------------------------------------------- data
def moving_frames(num: int, width: int, height: int, seed: int):
    """A static textured background with two moving boxes; yields (H, W, 3) uint8 frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 128 // (width + height)], -1)
    background = np.clip(background + rng.integers(-20, 20, background.shape), 0, 255).astype(np.uint8)
    colours = list(COLOURS.values())
    first, second = colours[seed % 4], colours[(seed + 1) % 4]
    box = max(8, height // 6)
    for i in range(num):
        frame = background.copy()
        x = (i * 3 + seed * 17) % (width - box)
        y = int((height - box) * (0.5 + 0.4 * np.sin(i / 40 + seed)))
        frame[y : y + box, x : x + box] = first
        x2 = (width - box) - (i * 2 + seed * 11) % (width - box)
        frame[height // 5 : height // 5 + box, x2 : x2 + box] = second
        yield frame


def write_clip(path: Path, frames: int, fps: int, seed: int) -> Path:
    """One 320x240 clip of ``moving_frames``; runs in a worker process of ``make_dataset``."""
    return write_video(path, moving_frames(frames, 320, 240, seed=seed), fps=fps)


def make_dataset(root: Path, count: int, seed: int = 0, length: tuple[float, float] = (8, 10)
                 ) -> tuple[Path, list[Path], list[str]]:
    """``count`` videos of ``length`` seconds (range) under ``root/videos`` and ``root/captions.jsonl``,
    written by one process per core; (annotations, paths, captions)."""
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    clips = []
    for i in range(count):
        fps, seconds = int(rng.integers(25, 31)), float(rng.uniform(*length))
        clips.append((root / "videos" / f"v{i:04d}.mp4", int(fps * seconds), fps, i))
    (root / "videos").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
        paths = list(pool.map(write_clip, *zip(*clips)))
    captions = [f"a {names[i % 4]} box and a {names[(i + 1) % 4]} box move across a textured wall (clip {i})"
                for i in range(count)]
    annotations = root / "captions.jsonl"
    annotations.write_text("".join(json.dumps({"video": f"videos/{path.name}", "caption": caption}) + "\n"
                                   for path, caption in zip(paths, captions)))
    return annotations, paths, captions


def slug(name: str) -> str:
    """``ViT-B-32`` → ``vitb32``; a JSON path → its stem (``my-vit.json`` → ``myvit``)."""
    return re.sub(r"[^a-z0-9]", "", Path(name).stem.lower() if name.endswith(".json") else name.lower())


# --------------------------------------------------------------------------- 1+2: full run
class GpuBusy:
    """Samples GPU 0's utilisation through NVML every 0.1 s in a thread while in use; ``share`` is the mean
    busy fraction (None without an NVIDIA GPU or NVML)."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML, no GPU: nothing to sample
            self._handle = None

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)

    def __enter__(self) -> "GpuBusy":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def share(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def full_run(model: str, label: str, annotations: Path, out: Path, args, count: int) -> dict:
    """``run_extraction`` as the CLI runs it; prints its own timings; returns its figures."""
    from tvrerank.config import ExtractConfig

    config = ExtractConfig(
        annotations=(str(annotations),), format="jsonl", videos=str(annotations.parent), out=str(out),
        model=model, frames=FRAMES, batch_size=args.batch_size, workers=args.workers,
        device=args.device, precision=args.precision,
    )
    start = time.perf_counter()
    with GpuBusy() as busy:
        summary = runner.run_extraction(config, progress=False)
    wall = time.perf_counter() - start
    if summary.ok != count:
        import h5py

        with h5py.File(out, "r") as f:
            errors = sorted(set(f["videos/error"].asstr()[()]) - {""})
        raise SystemExit(f"extraction failed: {summary.line()}; errors: {errors[:3]}")
    pipeline, waited = summary.pipeline_seconds, summary.decode_wait_seconds
    print(f"  full run ({args.workers} workers): {wall:6.2f} s = {count / wall:6.2f} videos/s end to end; "
          f"pipeline {pipeline:6.2f} s = {count / pipeline:6.2f} videos/s")
    print(f"  waiting on decoded frames: {waited:6.2f} s = {waited / pipeline:6.1%} of the pipeline "
          f"(first item {summary.first_wait_seconds:.2f} s{' incl. worker start-up' if args.workers else ''}; "
          f"after it {(waited - summary.first_wait_seconds) / pipeline:.1%}); encoding "
          f"{summary.encode_seconds:6.2f} s = {summary.encode_seconds / pipeline:.1%}; rest (write hand-off) "
          f"{pipeline - waited - summary.encode_seconds:.2f} s")
    gpu = "n/a (no NVML)" if busy.share is None else f"{busy.share:.1%} (NVML, sampled every 0.1 s)"
    print(f"  decode_wait_share_{label}={waited / pipeline:.3f}; GPU busy during the run: {gpu}")
    device_busy = summary.device_seconds / pipeline if summary.device_seconds > 0 else None
    if device_busy is not None:  # CUDA events around every frame batch: where the gap to the bare tower is
        print(f"  device at work on frame batches: {summary.device_seconds:6.2f} s = {device_busy:.1%} of the "
              f"pipeline (CUDA events; below 1.0 the GPU waited on the host, at 1.0 each batch ran slower "
              f"than alone)")
    return {"videos_per_s": count / wall, "frames_per_s_pipeline": count * FRAMES / pipeline,
            "gpu_busy": busy.share, "device_busy": device_busy}


# --------------------------------------------------------------------------- 3: stages
def sync(encoder) -> None:
    """Wait for queued device work (CUDA only)."""
    import torch

    if encoder.device.type == "cuda":
        torch.cuda.synchronize(encoder.device)


def timed(fn, encoder) -> float:
    """Seconds ``fn()`` takes, the device synchronised after it."""
    start = time.perf_counter()
    fn()
    sync(encoder)
    return time.perf_counter() - start


@contextlib.contextmanager
def counting_syncs(encoder):
    """Collect the synchronizing CUDA calls made inside (torch's sync debug mode, "warn") as "file:line"
    strings into the yielded list; extraction's encoding should make none (waiting for a batch's
    result is an event, which the mode does not count). Yields None off CUDA."""
    import warnings

    import torch

    if encoder.device.type != "cuda":
        yield None
        return
    calls: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield calls
        finally:
            torch.cuda.set_sync_debug_mode("default")
    calls += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def tower_frames_per_s(encoder, batch_size: int, repeats: int = 5) -> float:
    """The bare image tower's throughput: ``encode_frames`` (preprocess, forward, float16 tokens to host,
    as extraction calls it) on random frames at the extractor's batch size, best of ``repeats`` after a warm-up."""
    size = encoder.config.image_size
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    encoder.encode_frames(frames, dtype=np.float16)
    best = min(timed(lambda: encoder.encode_frames(frames, dtype=np.float16), encoder) for _ in range(repeats))
    return batch_size / best


def stage_times(model: str, paths: list[Path], captions: list[str], args) -> float:
    """Decode / encode / write side by side in this process, each a plain call of the library; prints the
    breakdown. Preprocess and the caption encoding are timed again on their own (same inputs) to split
    them out of the encoding."""
    from tvrerank.cache.writer import PartStore
    from tvrerank.extract.encoder import FrozenClipEncoder

    encoder = FrozenClipEncoder(model=model, pretrained=None, precision=args.precision, device=args.device)
    layout, size = encoder.layout, encoder.config.image_size
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers else 0
    start = time.perf_counter()
    decoded = [(sample_frames(p, num_frames=FRAMES, image_size=size, threads=threads), "") for p in paths]
    decode = time.perf_counter() - start

    bytes_per_video = FRAMES * layout.tokens_per_frame * layout.token_dim * 2
    bounds = runner.part_bounds(len(paths), runner.auto_part_videos(FRAMES, args.batch_size, bytes_per_video))
    parts = []

    def encode_all():  # the runner's batches, the next one queued across part boundaries too
        encoding = PartEncoder(encoder, frames=FRAMES, batch_size=args.batch_size)
        for lo, hi in bounds:
            rows = np.arange(lo, hi)
            parts.extend(part for _, part in encoding.encode(lo, rows, decoded[lo:hi], rows, captions[lo:hi]))
        parts.extend(part for _, part in encoding.flush())

    encode = timed(encode_all, encoder)
    parts.clear()
    found = []

    def encode_all_counted():  # the timing's own synchronize stays outside the count
        with counting_syncs(encoder) as calls:
            encode_all()
        found.append(calls)

    encode_again = timed(encode_all_counted, encoder)  # the same parts again: what a first pass pays to warm up
    syncs = found[0]
    frames_in = np.concatenate([sample.frames[: sample.num_valid] for sample, _ in decoded])
    pre = timed(lambda: [encoder.preprocess(frames_in[i : i + args.batch_size])
                         for i in range(0, len(frames_in), args.batch_size)], encoder)
    text = timed(lambda: [encoder.encode_texts(captions[i : i + args.batch_size])
                          for i in range(0, len(captions), args.batch_size)], encoder)

    with tempfile.TemporaryDirectory() as tmp:
        store = PartStore(Path(tmp) / "stages.h5")
        store.folder.mkdir()
        start = time.perf_counter()
        for index, part in enumerate(parts):
            store.write(index, part)
        write = time.perf_counter() - start
        written = sum(p.stat().st_size for p in store.folder.iterdir())

    frames = len(frames_in)
    total = decode + encode + write
    print(f"  stages in one process ({frames} frames at {size}px, {len(bounds)} parts, batch {args.batch_size}, "
          f"{encoder.device.type} {args.precision}, decode threads {threads or 'auto'}):")
    for name, seconds in (("decode", decode), ("encode", encode), ("write", write)):
        print(f"    {name:<10} {seconds:7.3f} s  {seconds / total:6.1%}")
    print(f"      encoding includes preprocess (~{pre:.3f} s alone) and encode_texts (~{text:.3f} s alone for "
          f"{len(captions)} captions); parts written: {written / 2**20:.1f} MiB")
    forward = max(encode - pre - text, 1e-9)
    print(f"    encoder: {frames / forward:8.1f} frames/s (forward only, by difference), "
          f"{frames / (encode - text):8.1f} frames/s with preprocess; "
          f"decode {len(paths) / decode:.1f} videos/s in one process")
    if syncs is not None:
        print(f"    synchronizing CUDA calls while encoding (the second pass; torch's sync debug mode): {len(syncs)}"
              + (f", e.g. at {', '.join(sorted(set(syncs))[:4])}" if syncs else ""))
    print(f"    encoding again, the same parts: {encode_again:7.3f} s = {frames / encode_again:8.1f} frames/s "
          f"(first pass {frames / encode:8.1f} frames/s, captions included in both)")
    tower = tower_frames_per_s(encoder, args.batch_size, repeats=1 if args.smoke else 5)
    print(f"    bare tower (encode_frames on random frames, batch {args.batch_size}): {tower:8.1f} frames/s")
    return tower


# --------------------------------------------------------------------------- 4: peak RSS
# Linux carries the forking process's RSS high-water mark into the child's ru_maxrss across exec
# (and subprocess forks with vfork), so os.wait4 from this process, which holds the models, would
# report its own peak for both runs. A bare ``python -S`` launcher (~10 MiB) forks, execs and waits.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def peak_rss_mib(command: list[str], root: Path, name: str) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of ``command`` run in a fresh process; raises if it fails."""
    result, log = root / f"{name}.rusage", root / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as output:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(result), *command],
                       stdout=output, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    max_rss_kib, code = (int(v) for v in result.read_text().split())
    if code != 0:
        raise SystemExit(f"{name} failed ({code}):\n{log.read_text()}")
    return max_rss_kib / 1024, seconds  # ru_maxrss is in KiB on Linux


def extract_command(video: Path, root: Path) -> list[str]:
    """``tvrerank extract`` of ``video`` alone (tiny model, CPU, decoding in the same process)."""
    annotations = root / f"{video.stem}.jsonl"
    annotations.write_text(json.dumps({"video": video.name, "caption": "a box moves"}) + "\n")
    return [sys.executable, "-m", "tvrerank.cli", "extract", "--annotations", str(annotations),
            "--format", "jsonl", "--videos", str(video.parent), "--model", str(TINY),
            "--out", str(root / f"{video.stem}.h5"), "--workers", "0", "--device", "cpu", "--quiet"]


def rss_check(root: Path) -> float:
    """Peak RSS of extracting a 10 s vs a 10 min video; prints both; returns long/short."""
    print("peak RSS of `tvrerank extract --workers 0` (tiny model, CPU, 160x120 25 fps), fresh process each:")
    peaks = {}
    for seconds in (10, 600):
        start = time.perf_counter()
        frames = moving_frames(seconds * 25, 160, 120, seed=seconds)
        video = write_video(root / f"rss-{seconds}s.mp4", frames, fps=25)
        made = time.perf_counter() - start
        peak, took = peak_rss_mib(extract_command(video, root), root, video.stem)
        peaks[seconds] = peak
        print(f"  {seconds:4d} s video ({video.stat().st_size / 2**20:5.1f} MiB, written in {made:5.1f} s): "
              f"peak RSS {peak:7.1f} MiB, extract took {took:5.1f} s")
    imports, _ = peak_rss_mib([sys.executable, "-c", "import torch, open_clip, av, h5py, tvrerank.cli"],
                              root, "imports")
    ratio = peaks[600] / peaks[10]
    print(f"  10 min - 10 s: {peaks[600] - peaks[10]:+.1f} MiB; for scale, importing torch, open_clip, av "
          f"and h5py alone peaks at {imports:.1f} MiB")
    print(f"  rss_ratio={ratio:.3f} (target <= 1.5)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,ViT-B-32", help="comma-separated; tiny = tests/data/models/tiny-vit.json")
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10 s vs 10 min peak-RSS check")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs: the tiny "
                        "model, 3 one-second videos, CPU, no RSS check")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.videos, args.device, args.workers, args.skip_rss = "tiny", 3, "cpu", 0, True
    sys.stdout.reconfigure(line_buffering=True)  # keep order with warnings on stderr when piped
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # open_clip's "initialized randomly" on the root logger
        handler.addFilter(lambda record: "initialized randomly" not in record.getMessage())
    logging.getLogger("tvrerank.extract.models").setLevel(logging.ERROR)  # our own random-weights warning

    start = time.perf_counter()
    import open_clip  # noqa: F401  (imported up front so no model's figures carry the import)
    import torch

    print(f"imported torch {torch.__version__} and open_clip in {time.perf_counter() - start:.1f} s "
          "(not counted below)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        annotations, paths, captions = make_dataset(tmp / "data", args.videos,
                                                    length=(1, 1.2) if args.smoke else (8, 10))
        print(f"wrote {args.videos} videos (320x240, {'~1' if args.smoke else '8-10'} s, 25-30 fps, "
              f"{sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs; random weights")
        for name in args.models.split(","):
            model, label = (str(TINY) if name == "tiny" else name), slug(name)
            kind = Path(model).name if model.endswith(".json") else "open_clip architecture"
            print(f"{name} ({kind}, device {args.device}, {args.precision}):")
            results[label] = full_run(model, label, annotations, tmp / f"{label}.h5", args, args.videos)
            tower = stage_times(model, paths, captions, args)
            results[label]["tower_ratio"] = results[label]["frames_per_s_pipeline"] / tower
            print(f"  tower_ratio_{label}={results[label]['tower_ratio']:.2f} (pipeline frames/s over the bare "
                  "tower's; 1.0: the encoder never waits)")
        ratio = None if args.skip_rss else rss_check(tmp)
    fields = [f"videos_per_s_{label}={figures['videos_per_s']:.2f} tower_ratio_{label}={figures['tower_ratio']:.2f}"
              + ("" if figures["gpu_busy"] is None else f" gpu_busy_{label}={figures['gpu_busy']:.3f}")
              + ("" if figures["device_busy"] is None else f" device_busy_{label}={figures['device_busy']:.3f}")
              for label, figures in results.items()]
    print(" ".join(fields + ([f"rss_ratio={ratio:.3f}"] if ratio is not None else [])))


if __name__ == "__main__":
    main()
