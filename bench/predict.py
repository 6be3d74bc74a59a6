"""Throughput and latency of POST /predict against a bare loop calling the same model directly.

The service runs as `warmtune serve` in its own process, serving a snapshot made for the
benchmark; clients are keep-alive connections posting one Fashion-MNIST test image (PNG) per request, at each
concurrency for a fixed time after a warm-up. The bare loop, in the same run, decodes,
preprocesses and classifies the same images in batches of 1, 8 and 32, with no HTTP: its best
batch size is the baseline. Micro-batching is measured on (max batch 32) and off (max batch 1).

    python -m bench.predict --arch resnet18 --image-size 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from app.images import decode_image, pixel_transform, to_pixels
from app.model import build_model, select_device
from app.serving import ServedModel, forward
from app.snapshots import SnapshotMeta, SnapshotStore

RESULTS = Path(__file__).parent / "results"


def make_home(arch: str, image_size: int) -> Path:
    """A WARMTUNE_HOME whose version 1 is an untrained model of the ten Fashion-MNIST classes."""
    home = Path(tempfile.mkdtemp(prefix="warmtune-bench-"))
    model = build_model(arch, len(FASHION_MNIST_CLASSES))
    meta = SnapshotMeta(
        version=0, parent=None, classes=FASHION_MNIST_CLASSES, arch=arch, image_size=image_size,
        base_weights="none", update_ids=[],
    )
    SnapshotStore(home / "snapshots").publish(model.state_dict(), meta)
    return home


def start_server(home: Path, arch: str, image_size: int, device: str, max_batch: int, port: int) -> subprocess.Popen:
    env = {
        **os.environ, "WARMTUNE_HOME": str(home), "WARMTUNE_ARCH": arch, "WARMTUNE_IMAGE_SIZE": str(image_size),
        "WARMTUNE_DEVICE": device, "WARMTUNE_MAX_BATCH_SIZE": str(max_batch),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + image + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


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


def load(port: int, images: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
    """Images/s and latency percentiles of `concurrency` clients posting one image per request.

    The clients are raw asyncio connections with prebuilt requests, so the load generator costs
    little CPU beside the service on the same cores (an httpx client per thread costs far more).
    """
    requests = [predict_request(port, image) for image in images]

    async def run() -> list[tuple[list[float], int]]:
        start = time.perf_counter()
        return await asyncio.gather(
            *(client(port, requests, i, concurrency, start + warmup, start + warmup + seconds) for i in range(concurrency))
        )

    results = asyncio.run(run())
    flat = sorted(x for latencies, _ in results for x in latencies)
    return {
        "images_per_s": len(flat) / seconds,
        "p50_ms": 1000 * flat[len(flat) // 2],
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))],
        "errors": sum(errors for _, errors in results),
    }


def bare_loop(arch: str, image_size: int, device: torch.device, images: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of decode + preprocess + forward in batches, the same steps the service runs, without HTTP."""
    model = build_model(arch, len(FASHION_MNIST_CLASSES)).to(device).eval()
    served = ServedModel(1, FASHION_MNIST_CLASSES, image_size, model, device)
    transform = pixel_transform(image_size)
    done, k = 0, 0
    forward(served, torch.zeros(batch, 3, image_size, image_size, dtype=torch.uint8))  # warm-up
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [images[(k + j) % len(images)] for j in range(batch)]
        pixels = torch.stack([to_pixels(decode_image(data, 2**62), transform) for data in chunk])
        forward(served, pixels)
        done, k = done + batch, k + batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


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
    args = parser.parse_args(argv)
    device = select_device(args.device)
    levels = [int(c) for c in args.concurrency.split(",")]
    test = fashion_mnist("test")
    images = [test.by_class[c][i] for i in range(26) for c in FASHION_MNIST_CLASSES][:256]
    print(f"/predict vs bare loop: {args.arch} at {args.image_size}px on {device}, one image per request")

    bare = {b: bare_loop(args.arch, args.image_size, device, images, b, args.seconds) for b in (1, 8, 32)}
    best = max(bare.values())
    print("bare loop: " + ", ".join(f"batch {b}: {v:.0f} img/s" for b, v in bare.items()))

    home = make_home(args.arch, args.image_size)
    service: dict[str, dict[int, dict[str, float]]] = {}
    for mode, max_batch in (("batching on", args.max_batch), ("batching off", 1)):
        port = free_port()
        proc = start_server(home, args.arch, args.image_size, str(device), max_batch, port)
        try:
            wanted = levels if mode == "batching on" else [max(levels)]
            service[mode] = {}
            for n in wanted:
                point = load(port, images, n, args.seconds, args.warmup)
                service[mode][n] = point
                print(
                    f"{mode:12} concurrency {n:3d}: {point['images_per_s']:7.1f} img/s, p50 {point['p50_ms']:6.1f} ms, "
                    f"p99 {point['p99_ms']:6.1f} ms, {point['images_per_s'] / best:.2f}x bare best, errors {point['errors']}"
                )
        finally:
            proc.kill()
            proc.wait()

    top = max(levels)
    gain = service["batching on"][top]["images_per_s"] / service["batching off"][top]["images_per_s"]
    ratio = service["batching on"][top]["images_per_s"] / best
    print(f"at concurrency {top}: service {ratio:.2f}x the bare loop's best; batching on/off {gain:.2f}x")
    result = {
        "arch": args.arch, "image_size": args.image_size, "device": str(device), "cpu_count": os.cpu_count(),
        "max_batch": args.max_batch,
        "bare_images_per_s": bare, "service": service, "ratio_to_bare_best": ratio, "batching_gain": gain,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"predict-{args.arch}-{args.image_size}-{device.type}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
