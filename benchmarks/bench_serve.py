"""The search page under a bounded loopback load: a real `tvrerank serve`, concurrent clients.

Uses a finished demo folder (``--world DIR``), or builds one with the library's ``run_demo``
(``--videos``, default the demo's 360 toy videos; its test split is the gallery). Starts
``tvrerank serve DIR --port 0`` as its own process on 127.0.0.1 (never another host), waits for
the URL it prints, then:

1. one client, ``--queries`` searches one after another (the unloaded latency);
2. ``--clients`` clients (default 8) at once, each ``--queries`` searches (default 25) on its own
   keep-alive connection, as fast as answers come;
3. the frame strips of the first 10 hits of a query, first (decoded) and again (from memory).

A search is ``GET /api/search?q=...&rerank=true`` with a test caption of the gallery (top 10 of
K = 15), the page's own call. Latency is per request, client side, in ms. An error is any answer
other than 200 (a 503 "busy" included) or a failed connection; the target is 0 errors. The server
is stopped at the end (and on any failure). The last line is ``serve_p95_ms=<p95 under load>``.

    python benchmarks/bench_serve.py [--world DIR] [--videos 360] [--clients 8] [--queries 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

import numpy as np

from tvrerank.cache.reader import CacheReader
from tvrerank.toy.demo import DemoConfig, run_demo


def start_server(world: Path, threads: int) -> tuple[subprocess.Popen, str]:
    return serve_process([str(world), "--port", "0", "--host", "127.0.0.1", "--device", "cpu",
                          "--threads", str(threads)], timeout=180)


def serve_process(arguments: list[str], *, timeout: float) -> tuple[subprocess.Popen, str]:
    """``tvrerank serve ARGUMENTS`` in a child process → (the process, its URL once it says it listens)."""
    process = subprocess.Popen([sys.executable, "-m", "tvrerank.cli", "serve", *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + timeout
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
    raise SystemExit("tvrerank serve did not start:\n" + "".join(seen))


class Client:
    """One keep-alive connection; ``get`` returns (status, body, ms)."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        self.connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

    def get(self, path: str) -> tuple[int, bytes, float]:
        start = time.perf_counter()
        try:
            self.connection.request("GET", path)
            response = self.connection.getresponse()
            body = response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            status, body = 0, b""
        return status, body, (time.perf_counter() - start) * 1000


def search_path(query: str) -> str:
    return "/api/search?" + urlencode({"q": query, "top": 10, "rerank": "true"})


def load(url: str, queries: list[str], clients: int, per_client: int) -> tuple[list[float], list[int], float]:
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        client = Client(url)
        for i in range(per_client):
            status, _, ms = client.get(search_path(queries[(index * per_client + i) % len(queries)]))
            with lock:
                latencies.append(ms)
                statuses.append(status)

    start = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, statuses, time.perf_counter() - start


def row(name: str, latencies: list[float], statuses: list[int], seconds: float | None = None) -> str:
    errors = sum(status != 200 for status in statuses)
    p50, p95 = np.percentile(latencies, [50, 95])
    rate = f"{len(latencies) / seconds:8.1f}" if seconds else f"{'':>8}"
    return f"{name:<34} {len(latencies):>8} {p50:>8.1f} {p95:>8.1f} {max(latencies):>8.1f} {rate} {errors:>6}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="a finished `tvrerank demo` folder (default: build one)")
    parser.add_argument("--videos", type=int, default=360, help="toy videos when building the world")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=25, help="searches per client")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch/FAISS threads")
    parser.add_argument("--smoke", action="store_true", help="a tiny world, 2 clients x 3 queries")
    args = parser.parse_args()
    if args.smoke:
        args.videos, args.clients, args.queries = 48, 2, 3
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "demo"
            start = time.perf_counter()
            run_demo(DemoConfig(out=str(world), videos=args.videos, workers=0,
                                **({"steps": 4} if args.smoke else {})))
            print(f"world: a {args.videos}-video demo built in {time.perf_counter() - start:.0f} s")
        with CacheReader(world / "cache" / "test.h5") as cache:
            queries = [str(c) for c in cache.strings("texts/caption")]
            gallery = cache.num_videos
        process, url = start_server(world, args.threads)
        try:
            print(f"server: {url} (tvrerank serve {world}, --threads {args.threads}); gallery {gallery} videos, "
                  f"{len(queries)} test captions as queries; {os.cpu_count()} CPU cores on this machine")
            warm = Client(url)
            for query in queries[:3]:
                warm.get(search_path(query))
            print(f"{'':<34} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'req/s':>8} {'errors':>6}")
            single = load(url, queries, 1, args.queries)
            print(row("search, 1 client", *single))
            loaded = load(url, queries, args.clients, args.queries)
            print(row(f"search, {args.clients} clients at once", *loaded))
            client = Client(url)
            status, body, _ = client.get(search_path(queries[0]))
            hits = [hit["video_id"] for hit in json.loads(body)["results"]] if status == 200 else []
            for name in ("frame strip, first (decoded)", "frame strip, again (memory)"):
                timings = [client.get(f"/api/videos/{quote(video_id, safe='')}/frames") for video_id in hits]
                print(row(name, [ms for _, _, ms in timings], [s for s, _, _ in timings]))
        finally:
            process.terminate()
            process.wait(timeout=30)
    errors = sum(status != 200 for status in single[1] + loaded[1])
    print(f"errors={errors}")
    print(f"serve_p95_ms={np.percentile(loaded[0], 95):.1f}")


if __name__ == "__main__":
    main()
