"""The prepared GPU suite: the project's benchmarks at GPU sizes, one command, one JSON and one table.

Runs, in this order (most telling first), each benchmark script of this folder as a subprocess
with GPU-sized options, keeps its whole output, and collects the ``name=value`` figures it prints:

1. extraction-bigg (``bench_extract.py``): 240 MSR-VTT-like clips (320x240, 8-10 s, written by the
   script, one process per core) with ViT-bigG-14, random weights, bf16: videos/s, the share of
   the run the GPU was busy (NVML), the device's time on frame batches over the pipeline's (CUDA
   events, ``device_busy``), and ``tower_ratio`` (pipeline frames/s over the bare tower's at the
   same batch size; goal >= 0.9);
2. training (``bench_train_cost.py``): a re-ranker step at the default width on ViT-bigG-14-shaped
   tokens (1280-wide, 256 per frame, 12 frames), bf16, from the cache vs with the bigG tower run on
   the frames (``cache_speedup``), and the cache's read rate (24 random videos);
3. retrieval (``bench_retrieve.py``): batch-1 latency with the ViT-bigG-14 text tower on the GPU,
   stage 1 alone vs re-ranked at K = 15 with the gallery store held on the GPU and each query's
   re-rank replayed as a CUDA graph (``rerank_overhead``; goal <= 0.1), beside the store read from
   the host and scored eagerly (``rerank_overhead_batched``);
4. extraction-b16: the same with ViT-B-16 on 480 clips (on 120 its pipeline lasts about a second,
   a third of it spent waiting for the first frames);
5. FAISS (``bench_index.py``): 1M x 1280 vectors, Flat and ``IVF1024,Flat`` (nprobe 32; the ``auto``
   choice at this size, IVF4096,PQ160x8, takes minutes to train on 16 cores), CPU queries/s, and the
   GPU's (faiss-gpu when installed; a torch exact top-k otherwise, for scale).

Each section has a time limit (180, 200, 180, 120 and 120 s), cut to what is left of ``--total-s``
(default 480 s), so a run ends within 8 minutes; a section with less than 30 s left is skipped and
said so.
``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` are rewritten after every section, so a run cut
short still leaves what it measured. With ``--smoke`` every section runs its script's
``--smoke`` size on the CPU (seconds; a test runs it).

On the GPU machine, beside its torch, in one command (faiss-gpu; ``nvidia-ml-py`` for the GPU busy
share if the machine lacks it):

    pip install -e '.[gpu]' nvidia-ml-py && python benchmarks/gpu_suite.py --out DIR

Offline, ``PYTHONPATH=src`` with wheels of open_clip_torch, ftfy, wcwidth, av and faiss-cpu or
faiss-gpu also works (``benchmarks/README.md`` has the command used on the project's device). The
last line is ``gpu_suite_sections=<done>/<all>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_SECTION_S = 30  # a section is not started with less time than this left
FIGURE = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)=(-?\d+(?:\.\d+)?)")


def sections(workers: int) -> list[tuple[str, str, list[str], int]]:
    """(name, script, GPU-size options, time limit in s), in the order they run."""
    def extraction(model: str, videos: int) -> list[str]:
        return ["--models", model, "--precision", "bf16", "--device", "cuda", "--videos", str(videos), "--workers",
                str(workers), "--batch-size", "256", "--skip-rss"]

    return [
        ("extraction-bigg", "bench_extract.py", extraction("ViT-bigG-14", 240), 180),
        ("training", "bench_train_cost.py", ["--model", "ViT-bigG-14", "--device", "cuda", "--precision", "bf16",
                                             "--repeats", "3", "--cache-videos", "192", "--videos-per-step", "96",
                                             "--tower-batch", "256", "--read-videos", "24"], 200),
        ("retrieval", "bench_retrieve.py", ["--model", "ViT-bigG-14", "--device", "cuda", "--videos", "200",
                                            "--queries", "100", "--e2e-queries", "10", "--factory", "Flat",
                                            "--max-token-gb", "8"], 180),
        ("extraction-b16", "bench_extract.py", extraction("ViT-B-16", 480), 120),
        ("faiss", "bench_index.py", ["--sizes", "1000000", "--dim", "1280", "--queries", "1000", "--factory",
                                     "IVF1024,Flat", "--search-params", "nprobe=32"], 120),
    ]


def figures_of(output: str) -> dict[str, float]:
    """Every ``name=value`` a script printed (the last value of a name wins)."""
    return {name: float(value) for name, value in FIGURE.findall(output)}


def device_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
        return f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}"
    except ImportError:
        return "torch not importable"


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU suite — {report['date']}", "", f"Device: {report['device']}; {report['cpus']} CPU cores; "
             f"Python {report['python']}.", "", "| section | status | seconds | figures |", "|---|---|---|---|"]
    for name, section in report["sections"].items():
        shown = ", ".join(f"`{k}={v:g}`" for k, v in section.get("figures", {}).items())
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', 0):.0f} | {shown} |")
    for name, section in report["sections"].items():
        if section.get("output"):
            lines += ["", f"## {name}: `{' '.join(section['command'])}`", "", "```", section["output"].rstrip(), "```"]
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-suite-out", help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--total-s", type=float, default=480, help="the whole run's limit: each section gets at most "
                        "what is left of it, and none starts with less than MIN_SECTION_S left")
    parser.add_argument("--only", help="comma-separated section names to run (default: all)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="decoding processes for extraction")
    parser.add_argument("--smoke", action="store_true", help="every section at its script's --smoke size, on CPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in sections(args.workers) if not args.only or s[0] in args.only.split(",")]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_line(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "smoke": args.smoke, "sections": {}}
    started, done = time.perf_counter(), 0
    for name, script, options, limit in chosen:
        command = [sys.executable, str(HERE / script), *(["--smoke"] if args.smoke else options)]
        left = args.total_s - (time.perf_counter() - started)
        if left < MIN_SECTION_S:
            report["sections"][name] = {"status": f"skipped ({left:.0f} s of --total-s left)", "command": command[1:]}
            write_report(out, report)
            continue
        limit = min(limit, left)
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        begin = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            output, status = result.stdout + result.stderr[-4000:], "ok" if result.returncode == 0 else \
                f"failed ({result.returncode})"
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            status = f"timed out after {limit:.0f} s"
        seconds = time.perf_counter() - begin
        done += status == "ok"
        report["sections"][name] = {"status": status, "seconds": seconds, "command": command[1:],
                                    "figures": figures_of(output), "output": output}
        print(output[-3000:], flush=True)
        write_report(out, report)
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    print(f"gpu_suite_sections={done}/{len(chosen)}")


if __name__ == "__main__":
    main()
