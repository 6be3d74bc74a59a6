"""`warmtune demo`: an embedded server, driven over HTTP as its users would drive it.

An annotator posts Fashion-MNIST update sets (a few initial classes, then new classes one by one)
while a client keeps calling /predict on held-out test images of the classes the served version
knows. After each swap the demo prints the version, its classes, the client's test accuracy on
it and the label-to-serve time the client saw (from the 202 to its first answer from a version
that includes the set).
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from tqdm import tqdm

from app.api import create_app
from app.datasets import LabelledImages, load_source
from app.queue import UpdateJob
from app.settings import Settings


@dataclass
class Tally:
    """What the client saw: per version, correct answers and total, and when it first saw it."""

    correct: dict[int, int] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)
    first_seen: dict[int, float] = field(default_factory=dict)
    failures: int = 0

    def add(self, version: int, hits: int, n: int) -> None:
        self.first_seen.setdefault(version, time.time())
        self.correct[version] = self.correct.get(version, 0) + hits
        self.total[version] = self.total.get(version, 0) + n

    def accuracy(self, version: int) -> tuple[float | None, int]:
        n = self.total.get(version, 0)
        return (self.correct[version] / n if n else None), n


def start_server(settings: Settings, update_job: UpdateJob) -> tuple[uvicorn.Server, str]:
    """uvicorn on a free loopback port, in a background thread."""
    server = uvicorn.Server(uvicorn.Config(create_app(update_job, settings), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def classes_of(client: httpx.Client, version: int) -> list[str]:
    return next(m["classes"] for m in client.get("/models").json()["versions"] if m["version"] == version)


def run_client(url: str, test: LabelledImages, stop: threading.Event, tally: Tally, batch: int = 8) -> None:
    """Predict held-out images of the classes the answering version knows, until stopped."""
    rng = random.Random(0)
    with httpx.Client(base_url=url, timeout=60) as client:
        while (version := client.get("/readyz").json()["model_version"]) is None:
            if stop.wait(0.2):
                return
        known = {version: classes_of(client, version)}
        while not stop.is_set():
            labels = [rng.choice(known[version]) for _ in range(batch)]
            images = [test.take(label, 1, rng)[0] for label in labels]
            try:
                answer = client.post("/predict", files=files(images)).raise_for_status().json()
            except httpx.HTTPError:  # a transport error or a 4xx/5xx answer
                tally.failures += 1
                continue
            version = answer["model_version"]
            tally.add(version, sum(p["label"] == t for p, t in zip(answer["predictions"], labels, strict=True)), batch)
            if version not in known:
                known[version] = classes_of(client, version)


def update_sets(
    train: LabelledImages, plan: list[list[str]], set_size: int, per_class: int, rng: random.Random
) -> Iterator[tuple[list[str], list[bytes], list[str]]]:
    """The annotator's work: for each stage of the plan, that stage's classes in sets of set_size images."""
    for stage in plan:
        pairs = [(image, label) for label in stage for image in train.take(label, per_class, rng)]
        rng.shuffle(pairs)
        for lo in range(0, len(pairs), set_size):
            part = pairs[lo : lo + set_size]
            yield stage, [p[0] for p in part], [p[1] for p in part]


def run_demo(
    settings: Settings,
    update_job: UpdateJob,
    data: str = "fashion-mnist",
    initial_classes: int = 3,
    new_classes: int = 4,
    per_class: int = 60,
    set_size: int = 20,
    seed: int = 0,
) -> Tally:
    logging.getLogger("worker").setLevel(logging.WARNING)
    logging.getLogger("app").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    train, test = load_source(data, "train"), load_source(data, "test")
    rng = random.Random(seed)
    order = rng.sample(train.classes, initial_classes + new_classes)
    plan = [order[:initial_classes]] + [[c] for c in order[initial_classes:]]
    sets = list(update_sets(train, plan, set_size, per_class, rng))

    server, url = start_server(settings, update_job)
    print(f"warmtune serving at {url} ({settings.arch} at {settings.image_size} px, home {settings.home})")
    print(
        f"annotator: {len(sets)} update sets of up to {set_size} images; first {', '.join(plan[0])}, then "
        + ", then ".join(c[0] for c in plan[1:])
    )
    stop, tally = threading.Event(), Tally()
    client = threading.Thread(target=run_client, args=(url, test, stop, tally), daemon=True)
    client.start()
    reported: set[int] = set()
    try:
        with httpx.Client(base_url=url, timeout=60) as annotator, tqdm(total=len(sets), unit="set") as bar:
            for stage in plan:
                posted = [(post_set(annotator, images, labels), time.time()) for s, images, labels in sets if s is stage]
                for update_id, sent_at in posted:
                    status = wait_final(annotator, update_id)
                    bar.update(1)
                    if status["status"] != "applied":
                        bar.write(f"update {update_id[:8]} {status['status']}: {status['error']}")
                        continue
                    version = status["model_version"]
                    if version in reported:
                        continue  # coalesced with an earlier set into one step
                    reported.add(version)
                    label_to_serve = wait_seen(tally, version) - sent_at
                    wait_count(tally, version, 120)
                    report(bar, annotator, tally, version, label_to_serve)
    finally:
        stop.set()
        client.join(timeout=30)
        server.should_exit = True
    print(f"client requests that failed: {tally.failures}")
    return tally


def post_set(client: httpx.Client, images: list[bytes], labels: list[str]) -> str:
    r = client.post("/updates", files=files(images), data={"labels": labels})
    r.raise_for_status()
    return r.json()["update_id"]


def wait_final(client: httpx.Client, update_id: str) -> dict:
    while (status := client.get(f"/updates/{update_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.2)
    return status


def wait_seen(tally: Tally, version: int, timeout: float = 30) -> float:
    """When the client first got an answer from this version or a later one."""
    deadline = time.time() + timeout
    while not any(v >= version for v in tally.first_seen) and time.time() < deadline:
        time.sleep(0.02)
    return min((t for v, t in tally.first_seen.items() if v >= version), default=time.time())


def wait_count(tally: Tally, version: int, count: int, timeout: float = 30) -> None:
    """Let the client answer count images on this version, unless a later one replaces it first."""
    deadline = time.time() + timeout
    while tally.total.get(version, 0) < count and max(tally.first_seen, default=0) <= version and time.time() < deadline:
        time.sleep(0.05)


def report(bar: tqdm, client: httpx.Client, tally: Tally, version: int, label_to_serve: float) -> None:
    classes = classes_of(client, version)
    accuracy, n = tally.accuracy(version)
    shown = f"{accuracy:6.1%} on {n:3d} test images" if accuracy is not None else "(no answers before the next swap)"
    bar.write(
        f"version {version}: {len(classes):2d} classes, client accuracy {shown}, "
        f"label-to-serve {label_to_serve:5.1f}s; classes: {', '.join(classes)}"
    )


def demo_settings(base: Settings, home: Path | None) -> Settings:
    """The user's settings, in a fresh home unless one is given."""
    return base.model_copy(update={"home": home or Path(tempfile.mkdtemp(prefix="warmtune-demo-"))})
