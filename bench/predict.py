"""Throughput and latency of POST /predict against a bare loop calling the same model directly,
and against LitServe serving the same model on the same images.

Each server runs in its own process (tree), serving a snapshot made for the benchmark: `warmtune
serve`, with micro-batching on (max batch 32) and off (max batch 1), and LitServe
(bench/litserve_peer.py) with the same decode, preprocessing and forward pass, its batching at
the same max batch and each of a few batch timeouts. The load is wrk, one C thread (it costs
the servers little beside them on the same cores), with N keep-alive connections each posting
one Fashion-MNIST test image per request, cycling over 256 images; warmtune gets them as
multipart (its documented form), LitServe as base64 JSON (its examples' form; see the peer).
Each point runs for a fixed time after a warm-up.

The bare loop, in the same run, decodes, preprocesses and classifies the same images in batches
of 1, 8 and 32, with no HTTP: its best batch size is the baseline. It runs before and after the
servers, and the better of the two counts, so load from others on a shared machine shows up as
a gap between them rather than silently in the ratio. CPU time is counted too: images per
CPU-second of the server's processes against the bare loop's, a figure that depends far less on
what else the cores are doing.

    warmtune bench predict --arch resnet18 --image-size 64 --threads 1
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import torch

from app.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from app.images import image_to_pixels
from app.model import build_model, select_device
from app.serving import ServedModel, forward, serving_model
from app.snapshots import SnapshotMeta, SnapshotStore

RESULTS = Path(__file__).parent / "results"
BOUNDARY = "warmtunebenchboundary"


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


def thread_env(threads: int | None) -> dict[str, str]:
    return {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def start_warmtune(home: Path, arch: str, image_size: int, device: str, max_batch: int, port: int, threads: int | None) -> subprocess.Popen:
    env = thread_env(threads) | {
        "WARMTUNE_HOME": str(home),
        "WARMTUNE_ARCH": arch,
        "WARMTUNE_IMAGE_SIZE": str(image_size),
        "WARMTUNE_DEVICE": device,
        "WARMTUNE_MAX_BATCH_SIZE": str(max_batch),
    }
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    return started(command, env, f"http://127.0.0.1:{port}/readyz", lambda r: r.json().get("model_version") == 1)


def start_litserve(home: Path, device: str, max_batch: int, batch_timeout: float, port: int, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.litserve_peer", "--home", str(home), "--port", str(port), "--device", device]
    command += ["--max-batch", str(max_batch), "--batch-timeout", str(batch_timeout)]
    return started(command, thread_env(threads), f"http://127.0.0.1:{port}/health", lambda r: r.text == "ok")


def started(
    command: list[str], env: dict[str, str], ready_url: str, ready: Callable[[httpx.Response], bool], cwd: str | None = None
) -> subprocess.Popen:
    """A server process (in a session of its own, with its children) once ready_url says it is ready."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if ready(httpx.get(ready_url, timeout=1)):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{' '.join(command[1:4])} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    """End a server started by started(), with the worker processes it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def multipart_body(image: bytes) -> bytes:
    """One image as the multipart body of a POST /predict (the boundary is in CONTENT_TYPES)."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def json_body(image: bytes) -> bytes:
    """One image as LitServe's examples send it: base64 in a JSON object."""
    return json.dumps({"image": base64.b64encode(image).decode()}).encode()


def wrk_script(folder: Path, bodies: list[bytes], content_type: str) -> Path:
    """A wrk script posting the bodies in turn to /predict, each request built once per wrk thread."""
    for i, body in enumerate(bodies):
        (folder / f"{i}.bin").write_bytes(body)
    script = folder / "post.lua"
    script.write_text(
        f"""
local requests, k = {{}}, 0
init = function(args)
  for i = 0, {len(bodies) - 1} do
    local f = io.open("{folder}/" .. i .. ".bin", "rb")
    requests[i] = wrk.format("POST", "/predict", {{["Content-Type"] = "{content_type}"}}, f:read("*all"))
    f:close()
  end
end
request = function()
  k = (k + 1) % {len(bodies)}
  return requests[k]
end
"""
    )
    return script


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) and failed requests of one wrk run: one wrk thread, which
    costs the server little (it is C and event-driven), `concurrency` keep-alive connections."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    failed += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "images_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": to_ms(percentiles["50"]),
        "p99_ms": to_ms(percentiles["99"]),
        "errors": failed,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants, all threads (Linux /proc)."""
    proc = Path(f"/proc/{pid}")
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = (int(c) for task in proc.glob("task/*") for c in (task / "children").read_text().split())
    return total + sum(cpu_seconds(child) for child in children)


def load(url: str, pid: int, script: Path, concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
    """Images/s, latency percentiles and server CPU of `concurrency` clients posting one image per request."""
    wrk(url, script, concurrency, warmup)
    cpu = -cpu_seconds(pid)
    point = wrk(url, script, concurrency, seconds)
    cpu += cpu_seconds(pid)
    return point | {"server_cores": cpu / seconds, "images_per_server_cpu_s": point["images_per_s"] * seconds / cpu}


def bare_loop(
    arch: str, image_size: int, device: torch.device, images: list[bytes], batch: int, seconds: float, decode: bool = True
) -> dict[str, float]:
    """Images/s (and per CPU-second) of decode + preprocess + forward in batches, the steps the service runs, without HTTP.

    With decode=False the images are decoded beforehand and only the forward pass is timed: the
    most a server whose forward passes hold `batch` images can answer with one forward thread,
    however cheap its HTTP and decoding on the other cores.
    """
    model = serving_model(build_model(arch, len(FASHION_MNIST_CLASSES)), device, image_size)  # as the service prepares it
    served = ServedModel(1, FASHION_MNIST_CLASSES, image_size, model, device)
    decoded = None if decode else [image_to_pixels(data, image_size, 2**62) for data in images]
    done, k = 0, 0
    forward(served, torch.zeros(batch, 3, image_size, image_size, dtype=torch.uint8))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        chunk = range(k, k + batch)
        if decoded is None:
            pixels = torch.stack([image_to_pixels(images[i % len(images)], image_size, 2**62) for i in chunk])
        else:
            pixels = torch.stack([decoded[i % len(decoded)] for i in chunk])
        forward(served, pixels)
        done, k = done + batch, k + batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": done / (time.perf_counter() - start), "images_per_cpu_s": done / (time.process_time() - cpu)}


def batch_counts(url: str) -> tuple[float, float]:
    """The sum and count of warmtune_predict_batch_size in the server's /metrics: images and forward passes so far."""
    metrics = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"^warmtune_predict_batch_size_sum (\S+)", metrics, re.MULTILINE).group(1))
    count = float(re.search(r"^warmtune_predict_batch_size_count (\S+)", metrics, re.MULTILINE).group(1))
    return total, count


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
    parser.add_argument("--max-batch", type=int, default=32, help="most images per forward pass, warmtune's and LitServe's")
    parser.add_argument("--litserve-timeouts", default="0,0.01", help="LitServe batch_timeout values to try (seconds)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the bare loop and the servers (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="the results file (default: bench/results/predict-ARCH-SIZE-DEVICE.json)")
    parser.add_argument("--ratios", type=Path, nargs="+", help="summarise these results files over runs instead of running")
    args = parser.parse_args(argv)
    if args.ratios:
        return summarise(args.ratios)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    test = fashion_mnist("test")
    images = [test.by_class[c][i] for i in range(26) for c in FASHION_MNIST_CLASSES][:256]
    print(
        f"/predict vs bare loop vs LitServe: {args.arch} at {args.image_size}px on {device}, {torch.get_num_threads()} torch threads, "
        f"one image per request, wrk as the load; load average {os.getloadavg()[0]:.1f}"
    )

    def measure_bare(when: str) -> dict[int, dict[str, float]]:
        bare = {b: bare_loop(args.arch, args.image_size, device, images, b, args.seconds) for b in (1, 8, 32)}
        print(
            f"bare loop {when}: "
            + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s ({v['images_per_cpu_s']:.0f}/CPU-s)" for b, v in bare.items())
        )
        return bare

    def measure_forward_only(when: str) -> dict[int, dict[str, float]]:
        rates = {b: bare_loop(args.arch, args.image_size, device, images, b, args.seconds / 2, decode=False) for b in (8, 16, 32)}
        print(f"forward pass alone {when}: " + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s" for b, v in rates.items()))
        return rates

    bare_before = measure_bare("before")
    forward_before = measure_forward_only("before")
    home = make_home(args.arch, args.image_size)
    scripts = Path(tempfile.mkdtemp(prefix="warmtune-wrk-"))
    (scripts / "multipart").mkdir()
    (scripts / "json").mkdir()
    multipart = wrk_script(scripts / "multipart", [multipart_body(i) for i in images], f"multipart/form-data; boundary={BOUNDARY}")
    as_json = wrk_script(scripts / "json", [json_body(i) for i in images], "application/json")
    where = (str(device), args.max_batch)
    servers: dict[str, tuple[Callable[[int], subprocess.Popen], Path, list[int]]] = {
        "warmtune": (lambda port: start_warmtune(home, args.arch, args.image_size, *where, port, args.threads), multipart, levels),
        "warmtune, batching off": (
            lambda port: start_warmtune(home, args.arch, args.image_size, str(device), 1, port, args.threads),
            multipart,
            [top],
        ),
    }
    for timeout in (float(t) for t in args.litserve_timeouts.split(",")):
        start = partial(start_litserve, home, str(device), args.max_batch, timeout, threads=args.threads)
        servers[f"LitServe, batch timeout {timeout:g} s"] = (lambda port, start=start: start(port=port), as_json, levels)
    service: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for name, (start, script, concurrencies) in servers.items():
            port = free_port()
            proc = start(port)
            try:
                service[name] = {}
                for n in concurrencies:
                    url = f"http://127.0.0.1:{port}"
                    counted = batch_counts(url) if name.startswith("warmtune") else None
                    point = service[name][n] = load(url, proc.pid, script, n, args.seconds, args.warmup)
                    if counted:  # forward passes of this point only (its warm-up included)
                        images_after, passes_after = batch_counts(url)
                        point["mean_batch"] = (images_after - counted[0]) / (passes_after - counted[1])
                    print(
                        f"{name:30} concurrency {n:3d}: {point['images_per_s']:7.1f} img/s, p50 {point['p50_ms']:6.1f} ms, "
                        f"p99 {point['p99_ms']:6.1f} ms, server {point['server_cores']:.2f} cores, errors {point['errors']}"
                    )
            finally:
                stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(scripts, ignore_errors=True)
    bare_after = measure_bare("after")
    forward_after = measure_forward_only("after")
    forward_only = {b: max(forward_before[b], forward_after[b], key=lambda v: v["images_per_s"]) for b in forward_before}

    bare = {b: max(bare_before[b], bare_after[b], key=lambda v: v["images_per_s"]) for b in bare_before}
    best_batch = max(bare, key=lambda b: bare[b]["images_per_s"])
    best, best_cpu = bare[best_batch]["images_per_s"], bare[best_batch]["images_per_cpu_s"]
    drift = max(bare_before[best_batch]["images_per_s"], bare_after[best_batch]["images_per_s"]) / min(
        bare_before[best_batch]["images_per_s"], bare_after[best_batch]["images_per_s"]
    )
    for points in service.values():
        for point in points.values():
            point["ratio_to_bare_best"] = point["images_per_s"] / best
            point["cpu_ratio_to_bare_best"] = point["images_per_server_cpu_s"] / best_cpu
    peer = max((name for name in service if name.startswith("LitServe")), key=lambda name: service[name][top]["images_per_s"])

    print(
        "\nbare loop, better of before/after: "
        + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s" for b, v in bare.items())
        + f"; best batch {best_batch}, {best / bare[1]['images_per_s']:.1f}x batch 1"
    )
    if drift > 1.25:
        print(f"warning: the bare loop's best ran {drift:.2f}x faster one time than the other; the machine's load changed")
    print(f"{'':30} {'concurrency':>11} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x bare':>7} {'x bare/CPU-s':>12}")
    for name, points in service.items():
        for n, point in points.items():
            print(
                f"{name:30} {n:11d} {point['images_per_s']:7.1f} {point['p50_ms']:7.1f} {point['p99_ms']:7.1f} "
                f"{point['ratio_to_bare_best']:7.2f} {point['cpu_ratio_to_bare_best']:12.2f}"
            )
    ours, theirs = service["warmtune"][top], service[peer][top]
    print(
        f"warmtune's forward passes at concurrency {top} held {ours['mean_batch']:.1f} images on average; the forward pass alone: "
        + ", ".join(f"batch {b}: {v['images_per_s']:.0f} img/s" for b, v in forward_only.items())
        + f"; 1.2x {peer} is {1.2 * theirs['images_per_s']:.0f} img/s"
    )
    gain = ours["images_per_s"] / service["warmtune, batching off"][top]["images_per_s"]
    vs_peer = ours["images_per_s"] / theirs["images_per_s"]
    print(
        f"at concurrency {top}: warmtune {ours['ratio_to_bare_best']:.2f}x the bare loop's best (target 0.8x), "
        f"{vs_peer:.2f}x {peer} (target 1.2x), p99 {ours['p99_ms']:.1f} ms vs {theirs['p99_ms']:.1f} ms; batching on/off {gain:.2f}x"
    )
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
        "forward_only": forward_only,
        "forward_only_before": forward_before,
        "forward_only_after": forward_after,
        "service": service,
        "peer": peer,
        "ratio_to_bare_best": ours["ratio_to_bare_best"],
        "ratio_to_peer": vs_peer,
        "batching_gain": gain,
    }
    out = args.out or RESULTS / f"predict-{args.arch}-{args.image_size}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def summarise(paths: list[Path]) -> dict:
    """The target ratios of several runs, each run's and their mean with its 95 % t-interval: warmtune
    against the bare loop's best and against LitServe at the highest concurrency, and p99 warmtune − LitServe."""
    from worker.experiment import interval_95

    rows = []
    for path in paths:
        run = json.loads(path.read_text())
        top = max(run["service"]["warmtune"], key=int)
        p99 = run["service"]["warmtune"][top]["p99_ms"] - run["service"][run["peer"]][top]["p99_ms"]
        rows.append({"file": str(path), "x_bare": run["ratio_to_bare_best"], "x_peer": run["ratio_to_peer"], "p99_minus_peer_ms": p99})
        print(f"{path}: {rows[-1]['x_bare']:.2f}x bare, {rows[-1]['x_peer']:.2f}x {run['peer']}, p99 {p99:+.1f} ms against it")
    summary: dict = {"runs": rows}
    for key, what in (("x_bare", "x the bare loop's best"), ("x_peer", "x LitServe"), ("p99_minus_peer_ms", "ms p99 - LitServe's")):
        mean, half = interval_95([r[key] for r in rows])
        summary[key] = {"mean": mean, "low": mean - half, "high": mean + half}
        print(f"{len(rows)} runs: {mean:.2f} {what} (95 % t-interval {mean - half:.2f} to {mean + half:.2f})")
    return summary


if __name__ == "__main__":
    main()
