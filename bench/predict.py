"""Throughput and latency of POST /predict against a bare loop calling the same model directly.

The service runs as `warmtune serve` in its own process, serving a snapshot made for the
benchmark; clients are keep-alive connections posting one Fashion-MNIST test image (PNG) per request, at each
concurrency for a fixed time after a warm-up. The bare loop, in the same run, decodes,
preprocesses and classifies the same images in batches of 1, 8 and 32, with no HTTP: its best
batch size is the baseline. Micro-batching is measured on (max batch 32) and off (max batch 1).

The bare loop runs before and after the service points (the service stopped), and the better of
the two is the baseline, so load from others on a shared machine shows up as a gap between them
rather than silently in the ratio. CPU time is counted too: images per CPU-second of the server
process against the bare loop's, a figure that depends far less on what else the cores are doing.

    python -m bench.predict --arch resnet18 --image-size 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from app.images import image_to_pixels
from app.model import build_model, select_device
from app.serving import ServedModel, forward
from app.snapshots import SnapshotMeta, SnapshotStore

RESULTS = Path(__file__).parent / "results"


def make_home(arch: str, image_size: int) -> Path:
    """A WARMTUNE_HOME whose version 1 is an untrained model of the ten Fashion-MNIST classes."""
    home = Path(tempfile.mkdtemp(prefix="warmtune-bench-"))
    model = build_model(arch, len(FASHION_MNIST_CLASSES))
    meta = SnapshotMeta(
        version=0,
        parent=None,
        classes=FASHION_MNIST_CLASSES,
        arch=arch,
        image_size=image_size,
        base_weights="none",
        update_ids=[],
    )
    SnapshotStore(home / "snapshots").publish(model.state_dict(), meta)
    return home


def start_server(home: Path, arch: str, image_size: int, device: str, max_batch: int, port: int, threads: int | None) -> subprocess.Popen:
    env = {
        **os.environ,
        "WARMTUNE_HOME": str(home),
        "WARMTUNE_ARCH": arch,
        "WARMTUNE_IMAGE_SIZE": str(image_size),
        "WARMTUNE_DEVICE": device,
        "WARMTUNE_MAX_BATCH_SIZE": str(max_batch),
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("model_version") == 1:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("warmtune serve did not become ready")


def predict_request(port: int, image: bytes) -> bytes:
    """A complete HTTP/1.1 POST /predict with one image as multipart, built once and sent many times."""
    boundary = "warmtunebenchboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(port: int, requests: list[bytes], first: int, step: int, measure_from: float, stop_at: float) -> tuple[list[float], int]:
    """One keep-alive connection sending requests back to back; latencies after measure_from."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies, errors, k = [], 0, first
    while (sent := time.perf_counter()) < stop_at:
        writer.write(requests[k % len(requests)])
        k += step
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
        await reader.readexactly(length)
        if sent >= measure_from:
            latencies.append(time.perf_counter() - sent)
            errors += head[9:12] != b"200"
    writer.close()
    return latencies, errors


def load(port: int, pid: int, images: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
    """Images/s and latency percentiles of `concurrency` clients posting one image per request.

    The clients are raw asyncio connections with prebuilt requests, so the load generator costs
    little CPU beside the service on the same cores (an httpx client per thread costs far more).
    """
    requests = [predict_request(port, image) for image in images]

    cpu: dict[str, float] = {}

    async def count_cpu(measure_from: float, stop_at: float) -> None:
        await asyncio.sleep(measure_from - time.perf_counter())
        cpu["server"], cpu["client"] = -cpu_seconds(pid), -time.process_time()
        await asyncio.sleep(stop_at - time.perf_counter())
        cpu["server"] += cpu_seconds(pid)
        cpu["client"] += time.process_time()

    async def run() -> list[tuple[list[float], int]]:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds
        *results, _ = await asyncio.gather(
            *(client(port, requests, i, concurrency, measure_from, stop_at) for i in range(concurrency)),
            count_cpu(measure_from, stop_at),
        )
        return results

    results = asyncio.run(run())
    flat = sorted(x for latencies, _ in results for x in latencies)
    return {
        "images_per_s": len(flat) / seconds,
        "p50_ms": 1000 * flat[len(flat) // 2],
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))],
        "errors": sum(errors for _, errors in results),
        "server_cores": cpu["server"] / seconds,
        "client_cores": cpu["client"] / seconds,
        "images_per_server_cpu_s": len(flat) / cpu["server"],
    }


def bare_loop(arch: str, image_size: int, device: torch.device, images: list[bytes], batch: int, seconds: float) -> dict[str, float]:
    """Images/s (and per CPU-second) of decode + preprocess + forward in batches, the steps the service runs, without HTTP."""
    model = build_model(arch, len(FASHION_MNIST_CLASSES)).to(device).eval()
    served = ServedModel(1, FASHION_MNIST_CLASSES, image_size, model, device)
    done, k = 0, 0
    forward(served, torch.zeros(batch, 3, image_size, image_size, dtype=torch.uint8))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        chunk = [images[(k + j) % len(images)] for j in range(batch)]
        pixels = torch.stack([image_to_pixels(data, image_size, 2**62) for data in chunk])
        forward(served, pixels)
        done, k = done + batch, k + batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": done / (time.perf_counter() - start), "images_per_cpu_s": done / (time.process_time() - cpu)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per point")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-batch", type=int, default=32, help="the service's WARMTUNE_MAX_BATCH_SIZE with batching on")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the bare loop and the service (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    levels = [int(c) for c in args.concurrency.split(",")]
    test = fashion_mnist("test")
    images = [test.by_class[c][i] for i in range(26) for c in FASHION_MNIST_CLASSES][:256]
    print(
        f"/predict vs bare loop: {args.arch} at {args.image_size}px on {device}, {torch.get_num_threads()} torch threads, "
        f"one image per request; load average {os.getloadavg()[0]:.1f}"
    )

    def measure_bare(when: str) -> dict[int, dict[str, float]]:
        bare = {b: bare_loop(args.arch, args.image_size, device, images, b, args.seconds) for b in (1, 8, 32)}
        print(
            f"bare loop {when}: "
            + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s ({v['images_per_cpu_s']:.0f}/CPU-s)" for b, v in bare.items())
        )
        return bare

    bare_before = measure_bare("before")
    home = make_home(args.arch, args.image_size)
    service: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for mode, max_batch in (("batching on", args.max_batch), ("batching off", 1)):
            port = free_port()
            proc = start_server(home, args.arch, args.image_size, str(device), max_batch, port, args.threads)
            try:
                service[mode] = {}
                for n in levels if mode == "batching on" else [max(levels)]:
                    point = service[mode][n] = load(port, proc.pid, images, n, args.seconds, args.warmup)
                    print(
                        f"{mode:12} concurrency {n:3d}: {point['images_per_s']:7.1f} img/s, p50 {point['p50_ms']:6.1f} ms, "
                        f"p99 {point['p99_ms']:6.1f} ms, server {point['server_cores']:.2f} cores, "
                        f"client {point['client_cores']:.2f} cores, errors {point['errors']}"
                    )
            finally:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    bare_after = measure_bare("after")

    bare = {b: max(bare_before[b], bare_after[b], key=lambda v: v["images_per_s"]) for b in bare_before}
    best_batch = max(bare, key=lambda b: bare[b]["images_per_s"])
    best, best_cpu = bare[best_batch]["images_per_s"], bare[best_batch]["images_per_cpu_s"]
    drift = max(bare_before[best_batch]["images_per_s"], bare_after[best_batch]["images_per_s"]) / min(
        bare_before[best_batch]["images_per_s"], bare_after[best_batch]["images_per_s"]
    )
    for mode in service.values():
        for point in mode.values():
            point["ratio_to_bare_best"] = point["images_per_s"] / best
            point["cpu_ratio_to_bare_best"] = point["images_per_server_cpu_s"] / best_cpu

    print(
        "\nbare loop, better of before/after: "
        + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s" for b, v in bare.items())
        + f"; best batch {best_batch}, {best / bare[1]['images_per_s']:.1f}x batch 1"
    )
    if drift > 1.25:
        print(f"warning: the bare loop's best ran {drift:.2f}x faster one time than the other; the machine's load changed")
    print(f"{'':12} {'concurrency':>11} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x bare':>7} {'x bare/CPU-s':>12}")
    for name, mode in service.items():
        for n, point in mode.items():
            print(
                f"{name:12} {n:11d} {point['images_per_s']:7.1f} {point['p50_ms']:7.1f} {point['p99_ms']:7.1f} "
                f"{point['ratio_to_bare_best']:7.2f} {point['cpu_ratio_to_bare_best']:12.2f}"
            )
    top = max(levels)
    gain = service["batching on"][top]["images_per_s"] / service["batching off"][top]["images_per_s"]
    ratio = service["batching on"][top]["ratio_to_bare_best"]
    print(f"at concurrency {top}: service {ratio:.2f}x the bare loop's best (target 0.7x); batching on/off {gain:.2f}x (target 2x)")
    result = {
        "arch": args.arch,
        "image_size": args.image_size,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "max_batch": args.max_batch,
        "seconds": args.seconds,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "bare": bare,
        "bare_before": bare_before,
        "bare_after": bare_after,
        "bare_best_batch": best_batch,
        "service": service,
        "ratio_to_bare_best": ratio,
        "batching_gain": gain,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"predict-{args.arch}-{args.image_size}-{device.type}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
