"""`warmtune serve` at one concurrency under several configurations, one after another: images/s,
latency, server cores and the mean batch size (from /metrics), beside the bare loop's batches of
8, 16 and 32. For trying a setting or an interpreter knob before it goes into bench/predict.py.

Each configuration is NAME or NAME:KEY=VALUE,KEY=VALUE where a KEY is a WARMTUNE_ variable or
`switch` (the interpreter's GIL switch interval in seconds, sys.setswitchinterval):

    python -m bench.predict_configs --image-size 32 base wait3ms:WARMTUNE_MAX_BATCH_WAIT_MS=3 fast-gil:switch=0.0002
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from app.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from bench.predict import (
    BOUNDARY,
    bare_loop,
    batch_counts,
    free_port,
    load,
    make_home,
    multipart_body,
    started,
    stop,
    thread_env,
    wrk_script,
)


def start(home: Path, arch: str, image_size: int, settings: dict[str, str], switch: float) -> tuple[subprocess.Popen, int]:
    env = thread_env(1) | {"WARMTUNE_HOME": str(home), "WARMTUNE_ARCH": arch, "WARMTUNE_IMAGE_SIZE": str(image_size)}
    env |= {"WARMTUNE_DEVICE": "cpu"} | settings
    port = free_port()
    code = f"import sys; sys.setswitchinterval({switch}); from app.cli import main; main(['serve', '--port', '{port}'])"
    ready = f"http://127.0.0.1:{port}/readyz"
    return started([sys.executable, "-c", code], env, ready, lambda r: r.json().get("model_version") == 1), port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="NAME or NAME:KEY=VALUE,...")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configurations, alternating them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = fashion_mnist("test")
    images = [test.by_class[c][i] for i in range(26) for c in FASHION_MNIST_CLASSES][:256]
    for batch in (8, 16, 32):
        rate = bare_loop(args.arch, args.image_size, torch.device("cpu"), images, batch, args.seconds / 2)["images_per_s"]
        print(f"bare loop, batch {batch}: {rate:.0f} img/s", flush=True)
    home, scripts = make_home(args.arch, args.image_size), Path(tempfile.mkdtemp(prefix="warmtune-wrk-"))
    script = wrk_script(scripts, [multipart_body(i) for i in images], f"multipart/form-data; boundary={BOUNDARY}")
    try:
        for _ in range(args.repeats):
            for config in args.configs:
                name, _, pairs = config.partition(":")
                settings = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
                switch = float(settings.pop("switch", sys.getswitchinterval()))
                proc, port = start(home, args.arch, args.image_size, settings, switch)
                try:
                    p = load(f"http://127.0.0.1:{port}", proc.pid, script, args.concurrency, args.seconds, 2.0)
                    images_seen, passes = batch_counts(f"http://127.0.0.1:{port}")
                    batch = images_seen / passes
                finally:
                    stop(proc)
                print(
                    f"{name:24} {p['images_per_s']:6.0f} img/s, p50 {p['p50_ms']:5.1f} ms, p99 {p['p99_ms']:5.1f} ms, "
                    f"server {p['server_cores']:.2f} cores, mean batch {batch:.1f}, errors {p['errors']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(scripts, ignore_errors=True)


if __name__ == "__main__":
    main()
