"""warmtune's Label Studio backend over real HTTP, against a small stand-in for Label Studio's file
and export API (the real Label Studio runs in `make test-labelstudio`, integration/)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from imagegen import make_image
from service import Server, fast_env, free_port, start_server

from app.errors import InvalidLabelConfig, InvalidUpdate
from app.labelstudio.payloads import Annotation, annotation_label, parse_label_config, pre_annotation

CONFIG = (
    '<View><Image name="img" value="$picture"/>'
    '<Choices name="kind" toName="img"><Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>'
)
TOKEN = "0123456789abcdef0123456789abcdef01234567"
KEY, ADMIN = "ls-key", "admin-key"


class FakeLabelStudio(ThreadingHTTPServer):
    """Serves task images and the project export the way Label Studio does, to its token only."""

    def __init__(self, port: int) -> None:
        self.files: dict[str, bytes] = {}
        self.export: list[dict] = []
        self.delay_s = 0.0
        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: FakeLabelStudio

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        time.sleep(self.server.delay_s)
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self.answer(401, b"{}")
        if self.path.startswith("/api/projects/7/export"):
            return self.answer(200, json.dumps(self.server.export).encode())
        data = self.server.files.get(self.path)
        self.answer(200, data) if data is not None else self.answer(404, b"not found")

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def studio() -> Iterator[FakeLabelStudio]:
    s = FakeLabelStudio(free_port())
    yield s
    s.stop()


@pytest.fixture
def server(tmp_path: Path, studio: FakeLabelStudio) -> Iterator[Server]:
    env = fast_env(
        tmp_path / "home",
        WARMTUNE_LABELSTUDIO_URL=f"http://127.0.0.1:{studio.server_address[1]}",
        WARMTUNE_LABELSTUDIO_TOKEN=TOKEN,
        WARMTUNE_API_KEYS=json.dumps({KEY: ["predict", "annotate"], ADMIN: ["admin"]}),
        WARMTUNE_TRIGGER="batched",  # nothing trains here: the sets' statuses are what is checked
        WARMTUNE_TRIGGER_SAMPLES="1000",
        WARMTUNE_TRIGGER_WAIT_S="3600",
        WARMTUNE_LABELSTUDIO_RETRY_S="0.5",
    )
    s = start_server(env, tmp_path / "server.log")
    yield s
    s.kill()


def task(task_id: int, studio: FakeLabelStudio, colour: str = "red") -> dict:
    path = f"/data/upload/7/{task_id}.png"
    studio.files.setdefault(path, make_image(colour, random.Random(task_id)))
    return {"id": task_id, "data": {"picture": path}}


def annotation(annotation_id: int, task_id: int, label: str | None, at: str, **extra: object) -> dict:
    result = [{"from_name": "kind", "to_name": "img", "type": "choices", "value": {"choices": [label]}}] if label else []
    return {"id": annotation_id, "task": task_id, "result": result, "updated_at": at, **extra}


def event(action: str, annotation_: dict | None = None, task_: dict | None = None, **extra: object) -> dict:
    body = {"action": action, "project": {"id": 7, "label_config": CONFIG}, **extra}
    return body | ({"annotation": annotation_, "task": task_} if annotation_ else {})


def by_status(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    lines = [line for line in text.splitlines() if line.startswith("warmtune_updates{")]
    return {line.split('"')[1]: float(line.split()[-1]) for line in lines if float(line.split()[-1])}


def test_label_studio_connects_with_basic_auth_and_is_told_what_it_sent_wrong(server: Server):
    with server.client() as c:
        assert c.get("/labelstudio/health").json()["status"] == "UP"  # no key: Label Studio probes it first
        setup = {"project": "7.1700000000", "schema": CONFIG, "hostname": "http://ls", "access_token": "x"}
        assert c.post("/labelstudio/setup", json=setup).status_code == 401
        assert c.post("/labelstudio/setup", json=setup, auth=("label-studio", "wrong")).status_code == 401
        r = c.post("/labelstudio/setup", json=setup, auth=("label-studio", KEY))
        assert r.status_code == 200 and r.json() == {"model_version": ""}, r.text  # no version yet

        text_config = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
        r = c.post("/labelstudio/setup", json=setup | {"schema": text_config}, auth=("label-studio", KEY))
        assert r.status_code == 422 and "<Image" in r.json()["detail"]
        r = c.post("/labelstudio/setup", content=b"{not json", auth=("label-studio", KEY))
        assert r.status_code == 422
        # basic auth is for Label Studio's routes only (a browser remembers basic credentials)
        assert c.get("/models", auth=("label-studio", KEY)).status_code == 401
        assert c.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

        # before the first version, pre-annotation requests get no results, not an error
        r = c.post(
            "/labelstudio/predict",
            json={"tasks": [{"id": 1, "data": {"picture": "/x.png"}}], "label_config": CONFIG},
            auth=("label-studio", KEY),
        )
        assert r.status_code == 200 and r.json() == {"results": []}


def test_annotations_become_update_sets_and_an_edit_supersedes_the_old_label(server: Server, studio: FakeLabelStudio):
    headers = {"Authorization": f"Bearer {KEY}"}
    with server.client(headers=headers) as c:

        def send(body: dict) -> dict:
            r = c.post("/labelstudio/webhook", json=body)
            assert r.status_code == 200, r.text
            return r.json()["changes"]

        t1 = task(1, studio)
        assert send(event("ANNOTATION_CREATED", annotation(11, 1, "red", "2026-01-01T10:00:00Z"), t1)) == {"stored": 1}
        assert send(event("ANNOTATION_CREATED", annotation(11, 1, "red", "2026-01-01T10:00:00Z"), t1)) == {"unchanged": 1}
        assert by_status(server) == {"queued": 1}

        # an edit to green: the green set is stored, the red one withdrawn (one label per annotation)
        assert send(event("ANNOTATION_UPDATED", annotation(11, 1, "green", "2026-01-01T10:05:00Z"), t1)) == {"stored": 1}
        assert by_status(server) == {"queued": 1, "withdrawn": 1}
        # a late webhook of the older revision changes nothing (a time without a zone is UTC); an edit back restores the red set
        assert send(event("ANNOTATION_UPDATED", annotation(11, 1, "red", "2026-01-01T10:01:00"), t1)) == {"stale": 1}
        assert send(event("ANNOTATION_UPDATED", annotation(11, 1, "red", "2026-01-01T10:09:00Z"), t1)) == {"restored": 1}
        assert by_status(server) == {"queued": 1, "withdrawn": 1}

        # a skipped task adds nothing; a deleted annotation or task withdraws what it had added
        t2, t3 = task(2, studio, "blue"), task(3, studio, "green")
        skipped = annotation(12, 2, None, "2026-01-01T11:00:00Z", was_cancelled=True)
        assert send(event("ANNOTATION_CREATED", skipped, t2)) == {"unchanged": 1}
        send(event("ANNOTATION_CREATED", annotation(13, 3, "green", "2026-01-01T11:00:00Z"), t3))
        assert by_status(server) == {"queued": 2, "withdrawn": 1}
        assert send(event("ANNOTATIONS_DELETED", annotations=[{"id": 13}])) == {"withdrawn": 1}
        assert send(event("TASKS_DELETED", tasks=[{"id": 1}])) == {"withdrawn": 1}
        assert by_status(server) == {"withdrawn": 3}
        # a deletion is final: a late event of the deleted annotation brings nothing back
        assert send(event("ANNOTATION_UPDATED", annotation(13, 3, "blue", "2026-01-01T11:30:00Z"), t3)) == {"stale": 1}
        assert by_status(server) == {"withdrawn": 3}
        assert c.post("/labelstudio/webhook", json=event("PROJECT_UPDATED")).json()["ignored"] is True

        # what an annotator gets wrong is named
        two = annotation(14, 2, "red", "2026-01-01T12:00:00Z")
        two["result"][0]["value"]["choices"] = ["red", "blue"]
        r = c.post("/labelstudio/webhook", json=event("ANNOTATION_CREATED", two, t2))
        assert r.status_code == 422 and "one class per image" in r.json()["detail"]
        elsewhere = {"id": 2, "data": {"picture": "http://169.254.169.254/latest/meta-data"}}
        r = c.post("/labelstudio/webhook", json=event("ANNOTATION_CREATED", annotation(14, 2, "red", "2026-01-01T12:00:00Z"), elsewhere))
        assert r.status_code == 422 and "fetches images from there only" in r.json()["detail"]
        r = c.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": "x"}})
        assert r.status_code == 422
        string_value = annotation(14, 2, "red", "2026-01-01T12:00:00Z") | {
            "result": [{"type": "choices", "from_name": "kind", "value": "red"}]
        }
        r = c.post("/labelstudio/webhook", json=event("ANNOTATION_CREATED", string_value, t2))
        assert r.status_code == 422 and "value.choices" in r.json()["detail"]
        broken_url = {"id": 2, "data": {"picture": "http://[::1/x"}}
        r = c.post("/labelstudio/webhook", json=event("ANNOTATION_CREATED", annotation(14, 2, "red", "2026-01-01T12:00:00Z"), broken_url))
        assert r.status_code == 422 and "is not a URL" in r.json()["detail"]
        assert by_status(server) == {"withdrawn": 3}

        # several annotations in one event: a bad one is refused, the others are stored (and queued)
        t6 = task(6, studio, "red")
        bulk = event("ANNOTATIONS_CREATED", [two, annotation(18, 6, "red", "2026-01-01T12:00:00Z")], [t2, t6])
        r = c.post("/labelstudio/webhook", json=bulk)
        assert r.status_code == 422 and "one class per image" in r.json()["detail"]
        assert by_status(server) == {"queued": 1, "withdrawn": 3}


def wait_for(server: Server, counts: dict[str, float], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while by_status(server) != counts and time.monotonic() < deadline:
        time.sleep(0.2)
    assert by_status(server) == counts


def test_an_annotation_made_while_label_studio_is_unreachable_is_stored_when_it_is_back(server: Server, studio: FakeLabelStudio):
    port = studio.server_address[1]
    t4 = task(4, studio, "blue")
    files = dict(studio.files)
    studio.stop()
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        body = event("ANNOTATION_CREATED", annotation(15, 4, "blue", "2026-01-01T10:00:00Z"), t4)
        r = c.post("/labelstudio/webhook", json=body)
        assert r.status_code == 503 and "Label Studio did not answer" in r.json()["detail"]
        assert by_status(server) == {}  # nothing half-stored

        back = FakeLabelStudio(port)  # Label Studio is back: warmtune tries the annotation again by itself
        try:
            back.files = files
            wait_for(server, {"queued": 1})
            # an annotation deleted while its event was lost: the "train" button's catch-up withdraws it
            back.export = []
            r = c.post("/labelstudio/webhook", json=event("START_TRAINING"))
            assert r.status_code == 200 and r.json()["changes"] == {"withdrawn": 1}, r.text
            # and stores what is in Label Studio but missed
            t5 = task(5, back, "green")
            back.export = [t5 | {"annotations": [annotation(17, 5, "green", "2026-01-01T11:00:00Z")]}]
            assert c.post("/labelstudio/webhook", json=event("START_TRAINING")).json()["changes"] == {"stored": 1}
            assert by_status(server) == {"queued": 1, "withdrawn": 1}
        finally:
            back.stop()


def test_an_annotation_is_stored_after_label_studio_stops_waiting_for_the_webhook(server: Server, studio: FakeLabelStudio):
    """Label Studio waits 1 s for a webhook (its WEBHOOK_TIMEOUT) and never sends it again."""
    studio.delay_s = 2.0
    body = event("ANNOTATION_CREATED", annotation(16, 5, "blue", "2026-01-01T10:00:00Z"), task(5, studio, "blue"))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/labelstudio/webhook", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    wait_for(server, {"queued": 1})


def test_the_label_config_names_the_image_and_its_single_choice_classes():
    config = parse_label_config(CONFIG)
    assert (config.image_name, config.image_key, config.choices_name, config.classes) == (
        "img",
        "picture",
        "kind",
        ("red", "green", "blue"),
    )
    with pytest.raises(InvalidLabelConfig, match="several choices"):
        parse_label_config(CONFIG.replace('toName="img"', 'toName="img" choice="multiple"'))
    with pytest.raises(InvalidLabelConfig, match="not XML"):
        parse_label_config("<View><Image")
    with pytest.raises(InvalidLabelConfig, match="2 <Choices>"):
        parse_label_config(CONFIG.replace("</View>", '<Choices name="other" toName="img"><Choice value="x"/></Choices></View>'))
    radio = parse_label_config(
        CONFIG.replace('toName="img"', 'toName="img" choice="single-radio"').replace('value="red"', 'value="Red" alias="red"')
    )
    assert radio.classes == ("red", "green", "blue")  # results carry a choice's alias
    ok = Annotation(id=1, result=[{"type": "choices", "from_name": "kind", "value": {"choices": ["red"]}}])
    assert annotation_label(ok, config) == "red"
    assert annotation_label(ok.model_copy(update={"was_cancelled": True}), config) is None
    with pytest.raises(InvalidUpdate, match="a choice must be a string"):
        annotation_label(Annotation(id=2, result=[{"type": "choices", "from_name": "kind", "value": {"choices": [3]}}]), config)


def test_a_pre_annotation_is_the_best_ranked_of_the_project_choices_with_the_version():
    config = parse_label_config(CONFIG)
    best = pre_annotation([("yellow", 0.6), ("green", 0.3), ("red", 0.1)], config, 4)
    assert best["model_version"] == "4" and best["score"] == 0.3
    assert best["result"] == [{"from_name": "kind", "to_name": "img", "type": "choices", "value": {"choices": ["green"]}}]
    assert pre_annotation([("yellow", 1.0)], config, 4)["result"] == []  # the version knows none of the choices
