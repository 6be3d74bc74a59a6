"""warmtune as the ML backend of a real Label Studio (`make test-labelstudio`).

Label Studio runs from its own virtualenv (WARMTUNE_TEST_LABELSTUDIO names its executable; the
make target installs it), with SQLite, a user and an API token made at start, on a free loopback
port. Everything below goes through Label Studio's own API, as a team's labelling would.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the unit tests' helpers for real warmtune processes
from service import Server, fast_env, free_port, start_server  # noqa: E402

from app.datasets import fashion_mnist  # noqa: E402

CLASSES = ["Trouser", "Bag", "Sneaker"]  # the project's choices; annotators label the first two
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices></View>"
)
PER_CLASS = 12
LS_KEY, ADMIN_KEY = "ls-" + secrets.token_hex(8), "admin-" + secrets.token_hex(8)
EMAIL, PASSWORD = "annotator@example.com", secrets.token_hex(8)


def wait(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    executable = os.environ["WARMTUNE_TEST_LABELSTUDIO"]
    data, port, token = tmp_path_factory.mktemp("label-studio"), free_port(), secrets.token_hex(20)
    env = {**os.environ, "USE_DEFAULT_BANNED_SUBNETS": "false"}  # its ML backend (warmtune) is on loopback
    args = [
        executable,
        "start",
        "--no-browser",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--username",
        EMAIL,
        "--password",
        PASSWORD,
        "--user-token",
        token,
        "--enable-legacy-api-token",
    ]
    log = open(data / "label-studio.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Token {token}"}, timeout=60)

    def up() -> bool:
        assert proc.poll() is None, (data / "label-studio.log").read_text()[-3000:]
        try:
            return client.get("/health").json().get("status") == "UP"
        except httpx.TransportError:
            return False

    try:
        wait("Label Studio health", up, timeout=600, every=1)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        client.close()


@pytest.fixture(scope="module")
def warmtune(label_studio: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("warmtune")
    env = fast_env(
        home / "home",
        WARMTUNE_LABELSTUDIO_URL=str(label_studio.base_url),
        WARMTUNE_LABELSTUDIO_TOKEN=label_studio.headers["Authorization"].split()[1],
        WARMTUNE_API_KEYS=json.dumps({LS_KEY: ["predict", "annotate"], ADMIN_KEY: ["admin"]}),
        # Each annotation is a set of one image: train once the first round is in, not per click.
        WARMTUNE_TRIGGER="batched",
        WARMTUNE_TRIGGER_SAMPLES=str(2 * PER_CLASS),
        WARMTUNE_TRIGGER_WAIT_S="3600",
    )
    server = start_server(env, home / "server.log")
    yield server
    server.kill()


def import_tasks(ls: httpx.Client, project: int, images: list[bytes]) -> list[int]:
    before = {t["id"] for t in tasks_of(ls, project)}
    files = {f"file{i}": (f"image{i}.png", data, "image/png") for i, data in enumerate(images)}
    r = ls.post(f"/api/projects/{project}/import", files=files)
    assert r.status_code == 201, r.text
    return sorted(t["id"] for t in tasks_of(ls, project) if t["id"] not in before)


def tasks_of(ls: httpx.Client, project: int) -> list[dict]:
    r = ls.get("/api/tasks", params={"project": project, "page_size": 1000})
    assert r.status_code == 200, r.text
    return r.json()["tasks"]


def annotate(ls: httpx.Client, task: int, label: str) -> int:
    result = [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    r = ls.post(f"/api/tasks/{task}/annotations", json={"result": result})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def updates_by_status(server: Server) -> dict[str, float]:
    with server.client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        text = c.get("/metrics").text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("warmtune_updates{")}


def served_version(server: Server) -> int | None:
    return httpx.get(server.url + "/readyz", timeout=10).json().get("model_version")


def test_labelling_in_label_studio_trains_warmtune_and_warmtune_pre_annotates(label_studio: httpx.Client, warmtune: Server):
    ls = label_studio
    source, rng = fashion_mnist("train"), random.Random(0)
    r = ls.post("/api/projects", json={"title": "warmtune test", "label_config": LABEL_CONFIG})
    assert r.status_code == 201, r.text
    project = r.json()["id"]
    labels = [c for c in CLASSES[:2] for _ in range(PER_CLASS)]
    tasks = import_tasks(ls, project, [img for c in CLASSES[:2] for img in source.take(c, PER_CLASS, rng)])
    assert len(tasks) == len(labels)

    # Connect warmtune: Label Studio checks /labelstudio/health and calls /labelstudio/setup with
    # basic auth (the key as password), and registers /labelstudio/webhook, which gets a bearer header.
    r = ls.post(
        "/api/ml",
        json={
            "url": f"{warmtune.url}/labelstudio",
            "project": project,
            "title": "warmtune",
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio",
            "basic_auth_pass": LS_KEY,
        },
    )
    assert r.status_code == 201, r.text
    backend = r.json()
    assert backend["state"] == "CO", backend  # connected: setup accepted the labelling config
    hooks = [h for h in ls.get("/api/webhooks", params={"project": project}).json() if h["url"].endswith("/labelstudio/webhook")]
    assert len(hooks) == 1, hooks
    r = ls.patch(f"/api/webhooks/{hooks[0]['id']}", json={"headers": {"Authorization": f"Bearer {LS_KEY}"}})
    assert r.status_code == 200, r.text

    # Annotators label two classes: every annotation becomes an update set, and version 1 is trained.
    annotations = [annotate(ls, task, label) for task, label in zip(tasks, labels, strict=True)]
    wait("version 1 served", lambda: served_version(warmtune) == 1, timeout=600)
    assert updates_by_status(warmtune)["applied"] == len(annotations)

    # An edited label supersedes the old one (withdrawn, the new one queued); a deleted annotation is withdrawn.
    r = ls.patch(
        f"/api/annotations/{annotations[0]}",
        json={"result": [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": ["Bag"]}}]},
    )
    assert r.status_code == 200, r.text
    assert ls.delete(f"/api/annotations/{annotations[-1]}").status_code == 204
    counts = wait("edit and delete seen", lambda: (c := updates_by_status(warmtune))["withdrawn"] == 2 and c, timeout=60)
    assert counts["applied"] == len(annotations) - 2 and counts["queued"] == 1, counts

    # An annotation whose event never reached warmtune (the webhook was off) is stored by Label
    # Studio's "train" button: START_TRAINING makes warmtune read the project's annotations back.
    assert ls.patch(f"/api/webhooks/{hooks[0]['id']}", json={"is_active": False}).status_code == 200
    annotate(ls, tasks[1], "Trouser")  # task 1 had no second annotation: a new one, unseen by warmtune
    assert ls.patch(f"/api/webhooks/{hooks[0]['id']}", json={"is_active": True}).status_code == 200
    assert updates_by_status(warmtune)["queued"] == 1
    r = ls.post(f"/api/ml/{backend['id']}/train", json={})
    assert r.status_code == 200, r.text
    wait("the missed annotation stored", lambda: updates_by_status(warmtune)["queued"] == 2, timeout=60)

    # New tasks get warmtune's pre-annotations, with the version that made them.
    test_labels = [c for c in CLASSES[:2] for _ in range(4)]
    new_tasks = import_tasks(ls, project, [img for c in CLASSES[:2] for img in fashion_mnist("test").take(c, 4, rng)])
    r = ls.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": False, "included": new_tasks}},
    )
    assert r.status_code == 200, r.text
    predicted = {}
    for task in new_tasks:
        predictions = ls.get(f"/api/tasks/{task}").json()["predictions"]
        assert [p["model_version"] for p in predictions] == ["1"], predictions
        predicted[task] = predictions[0]["result"][0]["value"]["choices"][0]
    right = sum(predicted[t] == label for t, label in zip(new_tasks, test_labels, strict=True))
    assert right >= 6, (predicted, test_labels)  # 8 test images of two classes; chance is 4
    if os.environ.get("WARMTUNE_SCREENSHOT"):  # for the README: a task as an annotator opens it
        shot = [Path(os.environ["WARMTUNE_TEST_LABELSTUDIO"]).with_name("python"), Path(__file__).with_name("screenshot.py")]
        page = f"/projects/{project}/data?task={new_tasks[-1]}"
        subprocess.run(
            [*shot, str(ls.base_url).rstrip("/"), EMAIL, PASSWORD, page, os.environ["WARMTUNE_SCREENSHOT"]], check=True, timeout=120
        )
