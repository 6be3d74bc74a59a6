"""The cost of a long life: update steps, GET /updates/{id} and a /metrics scrape against the size of the history.

With --steps N it runs N real update steps of 10 Fashion-MNIST images each (ResNet-18, 32 px,
the CPU, default settings otherwise) after a first version of 10 classes, and records each
step's time (and its load, train and evaluate parts), the process's RSS and the disk used.

For each size it builds a WARMTUNE_HOME of V versions and S update sets (one 8x8 PNG each, all
applied, S/V per version; the versions' weights are tiny except the current one, a real
ResNet-18 at 32 px so that the server serves), starts `warmtune serve` on it and times N
requests of each kind: the server's CPU per request (from /proc, so the client costs nothing)
and the wall-clock latency seen by a client on the same machine.

    python -m bench.history --sizes 10:100 100:1000 1000:10000
    python -m bench.history --steps 300
    python -m bench.history --steps 1000 --set consolidate_growth=0   # the paper's step only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
from PIL import Image

from app.datasets import LabelledImages, fashion_mnist
from app.model import build_model
from app.samples import UpdateSet
from app.settings import Settings
from app.snapshots import SnapshotMeta
from app.stores import Stores

RESULTS = Path(__file__).parent / "results"


def tiny_png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_history(home: Path, versions: int, sets: int) -> list[str]:
    """A home with this many versions and applied sets; returns the set ids."""
    settings = Settings(home=home, arch="resnet18", image_size=32)
    stores = Stores(settings)
    ids = [stores.samples.add([tiny_png(i)], ["a" if i % 2 else "b"])[0].update_id for i in range(sets)]
    per_version = max(sets // versions, 1)
    tiny = {"w": torch.zeros(1)}
    for v in range(versions):
        chunk = ids[v * per_version : (v + 1) * per_version] if v < versions - 1 else ids[v * per_version :]
        state = build_model("resnet18", 2).state_dict() if v == versions - 1 else tiny
        meta = SnapshotMeta(
            version=0,
            parent=v or None,
            classes=["a", "b"],
            arch="resnet18",
            image_size=32,
            base_weights="none",
            update_ids=chunk,
            metrics={"holdout_after": {"all": 1.0}},
        )
        stores.snapshots.publish(state, meta)
    return ids


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_requests(client: httpx.Client, pid: int, paths: list[str]) -> dict[str, float]:
    """Server CPU ms per request and client latency p50/p95 ms over these requests."""
    for path in paths[:5]:  # warm caches, as a server that has been running would have
        client.get(path).raise_for_status()
    latencies = []
    cpu = cpu_seconds(pid)
    for path in paths:
        start = time.perf_counter()
        client.get(path).raise_for_status()
        latencies.append(time.perf_counter() - start)
    cpu = cpu_seconds(pid) - cpu
    q = statistics.quantiles(latencies, n=20)
    return {"server_cpu_ms": 1000 * cpu / len(paths), "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * q[18]}


def measure(versions: int, sets: int, requests: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        clock = time.perf_counter()
        ids = build_history(home, versions, sets)
        built = time.perf_counter() - clock
        port = 20000 + os.getpid() % 10000
        env = {
            **os.environ,
            "WARMTUNE_HOME": str(home),
            "WARMTUNE_ARCH": "resnet18",
            "WARMTUNE_IMAGE_SIZE": "32",
            "WARMTUNE_DEVICE": "cpu",
            "WARMTUNE_POLL_INTERVAL_S": "3600",  # the poll loop's own scans stay out of the figures
        }
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=2).json().get("model_version") == versions:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"server did not serve version {versions}: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
            with httpx.Client(base_url=url, timeout=30) as client:
                step = max(len(ids) // requests, 1)
                lookups = time_requests(client, server.pid, [f"/updates/{u}" for u in ids[::step][:requests]])
                scrapes = time_requests(client, server.pid, ["/metrics"] * requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
    row = {"versions": versions, "sets": sets, "build_s": built, "get_update": lookups, "metrics": scrapes}
    print(json.dumps(row), flush=True)
    return row


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_version(home: Path, extra: dict[str, str]) -> tuple[Settings, Stores, LabelledImages, random.Random]:
    """A home whose version 1 knows all ten classes (20 images each), so later steps add no class."""
    from worker.jobs import apply_pending_updates

    data = fashion_mnist("train")
    rng = random.Random(0)
    settings = Settings(home=home, arch="resnet18", image_size=32, device="cpu", seed=0, **extra)
    stores = Stores(settings)
    stores.samples.add([i for c in data.classes for i in data.take(c, 20, rng)], [c for c in data.classes for _ in range(20)])
    apply_pending_updates(settings)
    return settings, stores, data, rng


def add_set(stores: Stores, data: LabelledImages, rng: random.Random, set_size: int, labels: list[str] | None = None) -> UpdateSet:
    """A set of set_size new images, of these labels or of labels drawn at random."""
    labels = labels or [rng.choice(data.classes) for _ in range(set_size)]
    return stores.samples.add([data.take(c, 1, rng)[0] for c in labels], labels)[0]


def timed_labels(data: LabelledImages, steps: int, set_size: int) -> list[list[str]]:
    """The labels of the timed steps' sets, the same at every history size: a set's labels decide
    its holdout split, so its training samples and the fine-tune's iterations (update-size), and a
    step of 8 iterations costs about 8/7 of one of 7."""
    plan = random.Random(1)
    return [[plan.choice(data.classes) for _ in range(set_size)] for _ in range(steps)]


def timed_step(settings: Settings, stores: Stores) -> dict:
    """Apply what is pending, as the service's worker does (its stores kept from job to job)."""
    from worker.jobs import apply_pending_updates

    clock = time.perf_counter()
    results = apply_pending_updates(settings, stores=stores)  # a reconsidered set may add a step
    seconds = time.perf_counter() - clock
    m = results[-1].metrics
    return {
        "status": ",".join(r.status for r in results),
        "seconds": seconds,
        "load_s": m.get("load_seconds"),
        "train_s": m.get("train_seconds"),
        "evaluate_s": m.get("evaluate_seconds"),
        "rss_mb": rss_mb(),
        "disk_mb": disk_bytes(settings.home) / 1e6,
        "samples_old": m.get("samples_old"),
        "iterations": m.get("iterations"),
        "consolidated": bool(m.get("consolidated")),
    }


def run_steps(steps: int, set_size: int, out: Path, extra: dict[str, str]) -> list[dict]:
    """N update steps of set_size images, with these settings besides the defaults; one row per step."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings, stores, data, rng = first_version(Path(tmp) / "home", extra)
        for step in range(1, steps + 1):
            add_set(stores, data, rng, set_size)
            rows.append({"step": step, **timed_step(settings, stores)})
            if step % 10 == 0:
                print(json.dumps(rows[-1]), flush=True)
                out.write_text(json.dumps({"set_size": set_size, "settings": extra, "rows": rows}, indent=1))
    return rows


def fast_forward(stores: Stores, sets: int, data: LabelledImages, rng: random.Random, set_size: int) -> None:
    """Apply this many more sets without training: a version per set with the current weights and the
    record of answers a step would leave; the weights of all but the last are a placeholder, as
    retention would have pruned them."""
    from worker.jobs import RECORD

    current = stores.snapshots.meta(stores.snapshots.current())
    weights = stores.snapshots.weights(current.version)
    for k in range(sets):
        update = add_set(stores, data, rng, set_size)
        meta = current.model_copy(
            update={
                "version": 0,
                "parent": stores.snapshots.current(),
                "update_ids": [update.update_id],
                "metrics": {RECORD: {label: {label: n} for label, n in Counter(update.labels).items()}},
            }
        )
        stores.snapshots.publish(weights if k == sets - 1 else {"w": torch.zeros(1)}, meta)
    stores.snapshots.prune(stores.settings.retain_versions, stores.settings.retain_seconds)


def run_at_sizes(sizes: list[int], steps: int, set_size: int, out: Path, extra: dict[str, str]) -> list[dict]:
    """Real update steps at each history size (applied sets), the history between them applied
    without training (fast_forward): the cost of a step at 1000 sets in minutes, not hours. The
    timed steps' sets have the same labels at every size (timed_labels), so they do the same work."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings, stores, data, rng = first_version(Path(tmp) / "home", extra)
        applied = 0
        plan = timed_labels(data, steps, set_size)
        for size in sizes:
            fast_forward(stores, size - applied, data, rng, set_size)
            for step in range(steps):
                add_set(stores, data, rng, set_size, plan[step])
                rows.append({"history": size, "step": step, **timed_step(settings, stores)})
            applied = size + steps
            window = [r for r in rows if r["history"] == size]
            print(f"{size} sets: median step {statistics.median(r['seconds'] for r in window):.3f} s", flush=True)
            out.write_text(json.dumps({"set_size": set_size, "settings": extra, "steps_per_size": steps, "rows": rows}, indent=1))
    return rows


def report_sizes(rows: list[dict]) -> list[dict]:
    """Medians of each size's steps, and the whole step against the smallest size's."""
    sizes = sorted({r["history"] for r in rows})
    medians = {
        n: {
            k: statistics.median(r[k] for r in rows if r["history"] == n and r[k] is not None)
            for k in ("seconds", "load_s", "train_s", "evaluate_s")
        }
        for n in sizes
    }
    print("| applied sets | whole step | training | gate evaluation after | loading | x the smallest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        m = medians[n]
        ratio = m["seconds"] / medians[sizes[0]]["seconds"]
        print(f"| {n} | {m['seconds']:.2f} s | {m['train_s']:.2f} s | {m['evaluate_s']:.3f} s | {m['load_s']:.3f} s | {ratio:.2f}x |")
    return rows


def step_ratio(path: Path, sizes: tuple[int, int] = (10, 1000)) -> float:
    """A --at run's median step at the larger of these history sizes over its median step at the smaller."""
    rows = json.loads(path.read_text())["rows"]
    if missing := [n for n in sizes if not any(r["history"] == n for r in rows)]:
        raise SystemExit(f"{path} has no steps at {missing} applied sets")
    small, large = (statistics.median(r["seconds"] for r in rows if r["history"] == n) for n in sizes)
    return large / small


def report_ratios(runs: list[Path], paired_with: list[Path]) -> list[float]:
    """Each run's ratio, their mean with its 95 % t-interval, and with --paired-with (runs of other
    code, the i-th made beside the i-th of runs) the paired differences."""
    from worker.experiment import interval_95

    ratios = [step_ratio(p) for p in runs]
    for path, ratio in zip(runs, ratios, strict=True):
        print(f"{path.name}: {ratio:.3f}x")
    mean, half = interval_95(ratios)
    print(f"{len(ratios)} runs: mean {mean:.3f}x (95 % t-interval {mean - half:.3f} to {mean + half:.3f})")
    if paired_with:
        others = [step_ratio(p) for p in paired_with]
        mean, half = interval_95([r - o for r, o in zip(ratios, others, strict=True)])
        print(f"paired with {len(others)} other runs: difference {mean:+.3f} (95 % t-interval {mean - half:+.3f} to {mean + half:+.3f})")
    return ratios


def plot_steps(rows: list[dict], path: Path) -> None:
    """Step time and its parts, RSS and disk against the step number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in (("seconds", "whole step"), ("train_s", "training"), ("evaluate_s", "gate evaluation"), ("load_s", "loading")):
        left.plot(steps, [r[key] for r in rows], label=name, linewidth=0.8)
    left.set(xlabel="update step (10 images each)", ylabel="seconds", title="Step time (ResNet-18, 32 px, CPU)")
    left.legend()
    right.plot(steps, [r["rss_mb"] for r in rows], label="RSS (MB)")
    right.plot(steps, [r["disk_mb"] for r in rows], label="disk (MB)")
    right.set(xlabel="update step", title="Memory and disk (retention: 10 versions)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10:100", "100:1000", "1000:10000"], help="VERSIONS:SETS")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=0, help="run this many update steps instead of the lookups")
    parser.add_argument(
        "--at",
        default="",
        help="history sizes (applied sets, e.g. 10,100,1000): real steps at each, the history between them applied without training",
    )
    parser.add_argument("--steps-at", type=int, default=20, help="real steps at each size of --at")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="summarise --at results (the step at 1000 sets over 10) instead of running",
    )
    parser.add_argument("--paired-with", nargs="+", type=Path, default=[], metavar="FILE", help="with --ratios: runs to pair them with")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another setting for --steps")
    args = parser.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.set)
    if args.ratios:
        return report_ratios(args.ratios, args.paired_with)
    if args.at:
        return report_sizes(
            run_at_sizes([int(n) for n in args.at.split(",")], args.steps_at, 10, args.out or RESULTS / "history-at.json", extra)
        )
    if args.steps:
        out = args.out or RESULTS / "history-steps.json"
        rows = run_steps(args.steps, 10, out, extra)
        plot_steps(rows, out.with_suffix(".png"))
        return rows
    args.out = args.out or RESULTS / "history-lookups.json"
    rows = [measure(*map(int, size.split(":")), args.requests) for size in args.sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))
    return rows


if __name__ == "__main__":
    main()
