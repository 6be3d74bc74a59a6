"""`warmtune serve` at one concurrency under several configurations, one after another: images/s,
latency, server cores and the mean batch size (from /metrics), beside the bare loop's batches of
8, 16 and 32. For trying a setting or an interpreter knob before it goes into bench/predict.py.

Each configuration is NAME or NAME:KEY=VALUE,KEY=VALUE where a KEY is a WARMTUNE_ variable,
`switch` (the interpreter's GIL switch interval in seconds, sys.setswitchinterval) or `tree` (a
checkout whose code serves, to compare two commits in one run; the default is this one):

    python -m bench.predict_configs --image-size 32 base wait3ms:WARMTUNE_MAX_BATCH_WAIT_MS=3 fast-gil:switch=0.0002
    python -m bench.predict_configs --repeats 4 old:tree=/tmp/old new

With --repeats > 1 it ends with each configuration's paired differences from the first (the
rounds alternate them, so the machine's drift is shared): images/s, the server's cores, its CPU-ms
per image and p99, each a mean over rounds with its 95 % t-interval.
"""

from __future__ import annotations

import argparse
import json
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


def start(
    home: Path, arch: str, image_size: int, settings: dict[str, str], switch: float, tree: str | None
) -> tuple[subprocess.Popen, int]:
    env = thread_env(1) | {"WARMTUNE_HOME": str(home), "WARMTUNE_ARCH": arch, "WARMTUNE_IMAGE_SIZE": str(image_size)}
    env |= {"WARMTUNE_DEVICE": "cpu"} | settings
    port = free_port()
    code = f"import sys; sys.setswitchinterval({switch}); from app.cli import main; main(['serve', '--port', '{port}'])"
    ready = f"http://127.0.0.1:{port}/readyz"
    # python -c puts the working directory first on sys.path, so the server imports the tree's app
    return started([sys.executable, "-c", code], env, ready, lambda r: r.json().get("model_version") == 1, cwd=tree), port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="NAME or NAME:KEY=VALUE,...")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configurations, alternating them")
    parser.add_argument("--out", type=Path, help="also write every point, as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = fashion_mnist("test")
    images = [test.by_class[c][i] for i in range(26) for c in FASHION_MNIST_CLASSES][:256]
    for batch in (8, 16, 32):
        rate = bare_loop(args.arch, args.image_size, torch.device("cpu"), images, batch, args.seconds / 2)["images_per_s"]
        print(f"bare loop, batch {batch}: {rate:.0f} img/s", flush=True)
    home, scripts = make_home(args.arch, args.image_size), Path(tempfile.mkdtemp(prefix="warmtune-wrk-"))
    script = wrk_script(scripts, [multipart_body(i) for i in images], f"multipart/form-data; boundary={BOUNDARY}")
    points: dict[str, list[dict]] = {}
    try:
        for _ in range(args.repeats):
            for config in args.configs:
                name, _, pairs = config.partition(":")
                settings = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
                switch, tree = float(settings.pop("switch", sys.getswitchinterval())), settings.pop("tree", None)
                proc, port = start(home, args.arch, args.image_size, settings, switch, tree)
                try:
                    p = load(f"http://127.0.0.1:{port}", proc.pid, script, args.concurrency, args.seconds, 2.0)
                    images_seen, passes = batch_counts(f"http://127.0.0.1:{port}")
                    batch = images_seen / passes
                finally:
                    stop(proc)
                points.setdefault(name, []).append(
                    p | {"mean_batch": batch, "cpu_ms_per_image": 1000 * p["server_cores"] / p["images_per_s"]}
                )
                print(
                    f"{name:24} {p['images_per_s']:6.0f} img/s, p50 {p['p50_ms']:5.1f} ms, p99 {p['p99_ms']:5.1f} ms, "
                    f"server {p['server_cores']:.2f} cores, mean batch {batch:.1f}, errors {p['errors']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(scripts, ignore_errors=True)
    print_paired(points)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "points": points}, indent=1))


def print_paired(points: dict[str, list[dict]]) -> None:
    """Each configuration against the first, round by round: mean difference and its 95 % t-interval."""
    from worker.experiment import interval_95

    base, *others = points
    for name in others:
        if len(points[name]) < 2:
            continue
        pairs = list(zip(points[base], points[name], strict=False))
        parts = []
        for key, unit in (
            ("images_per_s", "img/s"),
            ("server_cores", "server cores"),
            ("cpu_ms_per_image", "CPU-ms/img"),
            ("p99_ms", "ms p99"),
        ):
            mean, half = interval_95([b[key] - a[key] for a, b in pairs])
            parts.append(f"{mean:+.3g} {unit} ({mean - half:+.3g} to {mean + half:+.3g})")
        print(f"{name} - {base}, {len(pairs)} rounds: " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    main()
