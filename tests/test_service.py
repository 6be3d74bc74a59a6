"""The HTTP service for real: `warmtune serve` in its own process, driven over HTTP with httpx."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagegen import make_image, make_set
from service import Server, fast_env, start_server, upload, wait_for_update, wait_until_served

from bench.predict import batch_counts


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(fast_env(tmp_path / "home"), tmp_path / "server.log")
    yield s
    s.kill()


def post_set(client, counts: dict[str, int], seed: int, **headers: str) -> dict:
    images, labels = make_set(counts, seed=seed)
    r = client.post("/updates", **upload(images, labels), headers=headers)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/updates/{r.json()['update_id']}"
    return r.json()


def predict(client, images: list[bytes], **params) -> dict:
    r = client.post("/predict", **upload(images), params=params)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == str(r.json()["model_version"])
    return r.json()


def accuracy(client, label: str, seed: int, n: int = 10) -> float:
    images = [make_image(label, random.Random(seed + i)) for i in range(n)]
    answer = predict(client, images)
    return sum(p["label"] == label for p in answer["predictions"]) / n


def test_first_update_new_class_and_promote_back(server: Server):
    with server.client() as c:
        assert c.get("/readyz").status_code == 200  # ready for its first update
        r = c.post("/predict", **upload(make_set({"red": 1})[0]))
        assert r.status_code == 503 and "no model yet" in r.json()["detail"]

        first = post_set(c, {"red": 20, "green": 20}, seed=1)
        assert (first["status"], first["samples"], sorted(first["new_classes"])) == ("queued", 40, ["green", "red"])
        status = wait_for_update(c, first["update_id"])
        assert (status["status"], status["model_version"]) == ("applied", 1), status
        assert status["metrics"]["holdout_after"]["all"] >= 0.8 and status["metrics"]["first_version"] is True
        wait_until_served(c, 1)
        answer = predict(c, make_set({"red": 2, "green": 2}, seed=7)[0], top_k=2)
        assert answer["model_version"] == 1
        assert all({t["label"] for t in p["top_k"]} == {"red", "green"} for p in answer["predictions"])
        assert accuracy(c, "red", seed=100) >= 0.8

        blue = post_set(c, {"blue": 20}, seed=2)
        assert blue["new_classes"] == ["blue"]
        assert wait_for_update(c, blue["update_id"])["model_version"] == 2
        wait_until_served(c, 2)
        assert accuracy(c, "blue", seed=200) >= 0.8  # the grown head serves the new label
        models = c.get("/models").json()
        assert models["current"] == 2 and [v["classes"] for v in models["versions"]][1][-1] == "blue"

        promoted = c.post("/models/1/promote")
        assert promoted.status_code == 200 and promoted.json()["current"] == 1
        assert predict(c, make_set({"red": 1})[0])["model_version"] == 1  # served before the promote answered
        assert c.post("/models/9/promote").status_code == 404

        metrics = c.get("/metrics").text
        for name in [
            "warmtune_model_version 1.0",
            "warmtune_model_classes 2.0",
            "warmtune_swaps_total 3.0",
            "warmtune_swap_seconds_count",
            'warmtune_predict_requests_total{status="200",version="2"}',
            'warmtune_predict_requests_total{status="503",version="none"} 1.0',
            "warmtune_predict_latency_seconds_count",
            "warmtune_predict_batch_size_count",
            'warmtune_updates{status="applied"} 1.0',
            'warmtune_updates{status="orphaned"} 1.0',  # blue: applied only in version 2, which the promote left
            "warmtune_update_duration_seconds_count 2.0",
            "warmtune_update_queue_depth 0.0",
            'warmtune_holdout_accuracy{scope="all"}',
            'warmtune_last_step{status="applied"} 1.0',
            # the old names, kept for one release
            'warmtune_updates_total{status="applied"} 1.0',
            'warmtune_last_job{status="applied"} 1.0',
            "warmtune_last_job_timestamp_seconds",
        ]:
            assert name in metrics, name


def test_idempotent_retry_stores_once_and_a_reused_key_is_refused(server: Server, tmp_path: Path):
    key = {"Idempotency-Key": "batch-42"}
    with server.client() as c:
        a = post_set(c, {"red": 5, "green": 5}, seed=1, **key)
        b = post_set(c, {"red": 5, "green": 5}, seed=1, **key)
        assert {**a, "status": None} == {**b, "status": None} and b["status"] in ("queued", "running", "applied")
        wait_for_update(c, a["update_id"])
        assert post_set(c, {"red": 5, "green": 5}, seed=1, **key)["status"] == "applied"  # its status now, not "queued"

        other = c.post("/updates", **upload(*make_set({"red": 5, "green": 5}, seed=2)), headers=key)
        assert other.status_code == 409 and "was used for update set" in other.json()["detail"]
        broken = c.post("/updates", **upload([b"not an image"], ["red"]), headers=key)
        assert broken.status_code == 422
        assert len(list((tmp_path / "home" / "samples").glob("*.zip"))) == 1


def multipart(parts: list[tuple[str, str, bytes, str]]) -> dict:
    return {"files": [(field, (name, data, ctype)) for field, name, data, ctype in parts]}


def bad_inputs(good: bytes) -> list[tuple[str, str, dict, int, str]]:
    png = lambda data, name="x.png": ("images", name, data, "image/png")  # noqa: E731
    return [
        ("/predict", "not an image", multipart([png(b"hello, world", "notes.png")]), 422, "notes.png"),
        ("/predict", "truncated", multipart([png(good[: len(good) // 2], "cut.png")]), 422, "cut.png"),
        ("/predict", "zero bytes", multipart([png(b"", "empty.png")]), 422, "empty file"),
        ("/predict", "too many images", multipart([png(good)] * 9), 413, "more than 8 images"),
        ("/predict", "too many bytes", {"content": b"\0" * 300_000, "headers": {"content-type": "image/png"}}, 413, "over the limit"),
        ("/predict", "top_k zero", {**multipart([png(good)]), "params": {"top_k": 0}}, 422, "top_k"),
        ("/predict", "top_k too big", {**multipart([png(good)]), "params": {"top_k": 101}}, 422, "top_k"),
        ("/predict", "top_k not a number", {**multipart([png(good)]), "params": {"top_k": "many"}}, 422, "top_k"),
        ("/predict", "top_k a float", {**multipart([png(good)]), "params": {"top_k": "1e2"}}, 422, "top_k"),
        ("/predict", "top_k signed", {**multipart([png(good)]), "params": {"top_k": "-3"}}, 422, "top_k"),
        ("/predict", "wrong content type", {"json": {"image": "x"}}, 415, "multipart/form-data"),
        ("/predict", "no images", {"files": [("other", ("a.png", good, "image/png"))]}, 400, "no images"),
        ("/updates", "labels missing", multipart([png(good)]), 422, "1 images but 0 labels"),
        ("/updates", "more labels", {**multipart([png(good)]), "data": {"labels": ["red", "red"]}}, 422, "1 images but 2 labels"),
        ("/updates", "empty label", {**multipart([png(good)]), "data": {"labels": ["  "]}}, 422, "label"),
        ("/updates", "long label", {**multipart([png(good)]), "data": {"labels": ["x" * 101]}}, 422, "100"),
        ("/updates", "no images", {"data": {"labels": ["red"]}, "files": [("x", ("a", b"", "text/plain"))]}, 422, "at least one image"),
        ("/updates", "not an image", {**multipart([png(b"%PDF-1.4", "doc.pdf")]), "data": {"labels": ["red"]}}, 422, "doc.pdf"),
        ("/updates", "wrong content type", {"json": {"labels": ["red"]}}, 415, "multipart/form-data"),
        ("/updates", "too many images", {**multipart([png(good)] * 9), "data": {"labels": ["red"] * 9}}, 413, "8"),
        ("/updates/nonesuch", "unknown update", {"method": "GET"}, 404, "no update set"),
        ("/models/nonesuch/promote", "version not a number", {}, 422, "version"),
    ]


def test_bad_input_gets_a_4xx_naming_the_problem_and_nothing_is_stored(tmp_path: Path):
    env = fast_env(tmp_path / "home", WARMTUNE_MAX_IMAGES_PER_REQUEST="8", WARMTUNE_MAX_REQUEST_BYTES="200000")
    server = start_server(env, tmp_path / "server.log")
    good = make_set({"red": 1})[0][0]
    try:
        with server.client() as c:
            first = post_set(c, {"red": 4, "green": 4}, seed=1)
            wait_for_update(c, first["update_id"])
            wait_until_served(c, 1)
            for path, case, request, status, words in bad_inputs(good):
                method = request.pop("method", "POST")
                r = c.request(method, path, **request)
                assert r.status_code == status, (case, r.status_code, r.text)
                assert words in r.json()["detail"], (case, r.json())
            assert c.get("/healthz").status_code == 200 and predict(c, [good])["model_version"] == 1
            assert len(predict(c, [good], top_k=1)["predictions"][0]["top_k"]) == 1
            assert len(list((tmp_path / "home" / "samples").glob("*.zip"))) == 1
            assert "Traceback" not in server.output()
            # /predict reads its request itself (app.routes.predict.RequestRoute) and is documented all the same
            documented = c.get("/openapi.json").json()["paths"]["/predict"]["post"]
            assert [p["name"] for p in documented["parameters"]] == ["top_k"]
            assert "multipart/form-data" in documented["requestBody"]["content"]
            assert documented["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    finally:
        server.kill()


def test_keys_and_roles(tmp_path: Path):
    keys = {"reader": ["predict"], "labeller": ["annotate"], "boss": ["admin"]}
    server = start_server(fast_env(tmp_path / "home", WARMTUNE_API_KEYS=json.dumps(keys)), tmp_path / "server.log")
    images, labels = make_set({"red": 2}, seed=1)
    try:
        with server.client() as c:
            assert c.post("/updates", **upload(images, labels)).status_code == 401
            bearer = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
            assert c.post("/updates", **upload(images, labels), headers=bearer("wrong")).status_code == 401
            denied = c.post("/updates", **upload(images, labels), headers=bearer("reader"))
            assert denied.status_code == 403 and "annotate" in denied.json()["detail"]
            assert c.post("/updates", **upload(images, labels), headers=bearer("labeller")).status_code == 202
            assert c.post("/models/1/promote", headers=bearer("labeller")).status_code == 403
            assert c.get("/models", headers=bearer("boss")).status_code == 200
            assert c.get("/healthz").status_code == 200  # probes need no key
    finally:
        server.kill()


def test_a_version_that_fails_to_load_is_not_promoted_and_a_late_replica_says_why_it_is_not_ready(server: Server, tmp_path: Path):
    snapshots = tmp_path / "home" / "snapshots"
    with server.client() as c:
        for seed, counts in enumerate([{"red": 10, "green": 10}, {"blue": 10}], start=1):
            wait_for_update(c, post_set(c, counts, seed=seed)["update_id"])
        wait_until_served(c, 2)
        assert c.post("/models/1/promote").status_code == 200
        (snapshots / "2" / "model.safetensors").write_bytes(b"garbage")
        r = c.post("/models/2/promote")
        assert r.status_code == 409 and "version 2 cannot be loaded" in r.json()["detail"], r.text
        assert c.get("/models").json()["current"] == 1 and predict(c, make_set({"red": 1})[0])["model_version"] == 1
        # the current version's file goes bad too: this replica serves it from memory; a new one cannot load it
        (snapshots / "1" / "model.safetensors").write_bytes(b"garbage")
        assert predict(c, make_set({"red": 1})[0])["model_version"] == 1
    late = start_server(fast_env(tmp_path / "home"), tmp_path / "late.log")  # starts with nothing it can serve
    try:
        with late.client() as c:
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["model_version"] is None
            assert r.json()["detail"] == "version 1 failed to load; the server log says why"  # no exception text to anyone
            assert "warmtune_swap_failures_total 1.0" in c.get("/metrics").text
        assert re.search(r"could not load version 1; version None keeps serving", late.output())
        assert "SafetensorError" in late.output()
    finally:
        late.kill()


def test_concurrent_requests_share_forward_passes(server: Server):
    with server.client() as c:
        wait_for_update(c, post_set(c, {"red": 10, "green": 10}, seed=1)["update_id"])
        wait_until_served(c, 1)
    images = make_set({"red": 1}, seed=3)[0]

    def client_loop() -> None:
        with server.client() as c:
            for _ in range(20):
                predict(c, images)

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total, count = batch_counts(server.url)  # as the predict benchmark reads them
    assert total >= 160 and count < total  # some forward passes carried several requests


def test_retention_prunes_old_weights_keeps_pinned_ones_and_refuses_to_promote_a_pruned_version(tmp_path: Path):
    server = start_server(fast_env(tmp_path / "home", WARMTUNE_RETAIN_VERSIONS="1"), tmp_path / "server.log")
    try:
        with server.client() as c:
            wait_for_update(c, post_set(c, {"red": 10, "green": 10}, seed=1)["update_id"])
            assert c.post("/models/1/pin").json()["versions"][0]["pinned"] is True
            for seed, counts in ((2, {"blue": 10}), (3, {"red": 5})):
                wait_for_update(c, post_set(c, counts, seed=seed)["update_id"])
            versions = c.get("/models").json()["versions"]
            assert [(v["version"], v["has_weights"]) for v in versions] == [(1, True), (2, False), (3, True)]
            assert not (tmp_path / "home" / "snapshots" / "2" / "model.safetensors").exists()
            refused = c.post("/models/2/promote")
            assert refused.status_code == 409 and "version 2 has no weights any more" in refused.json()["detail"]
            assert c.post("/models/1/promote").status_code == 200
            wait_until_served(c, 1)
            assert c.get("/models").json()["current"] == 1
    finally:
        server.kill()


def test_a_batched_trigger_holds_small_sets_until_enough_samples_are_pending(tmp_path: Path):
    env = fast_env(tmp_path / "home", WARMTUNE_TRIGGER="batched", WARMTUNE_TRIGGER_SAMPLES="30", WARMTUNE_TRIGGER_WAIT_S="3600")
    server = start_server(env, tmp_path / "server.log")
    try:
        with server.client() as c:
            first = post_set(c, {"red": 10, "green": 10}, seed=1)["update_id"]
            for _ in range(3):  # three polls of the service (WARMTUNE_POLL_INTERVAL_S=0.5): it stays queued, not running
                time.sleep(0.5)
                assert c.get(f"/updates/{first}").json()["status"] == "queued"
            second = post_set(c, {"red": 5, "green": 5}, seed=2)["update_id"]
            statuses = [wait_for_update(c, u) for u in (first, second)]
            assert [(s["status"], s["model_version"]) for s in statuses] == [("applied", 1), ("applied", 1)]
    finally:
        server.kill()


def test_an_unreadable_set_is_quarantined_and_the_others_go_on(server: Server, tmp_path: Path):
    samples = tmp_path / "home" / "samples"
    with server.client() as c:
        first = post_set(c, {"red": 10, "green": 10}, seed=1)["update_id"]
        wait_for_update(c, first)
        damaged = "d" * 32
        (samples / f"{damaged}.zip").write_bytes(b"PK\x03\x04 not really a zip")  # a file damaged on disk
        (samples / f"{first}.zip").write_bytes((samples / f"{first}.zip").read_bytes()[:100])  # an applied set, truncated
        later = post_set(c, {"blue": 10}, seed=2)["update_id"]
        assert wait_for_update(c, later)["status"] == "applied"  # neither stops the lineage

        for update_id in (damaged, first):
            status = c.get(f"/updates/{update_id}").json()
            assert status["status"] == "quarantined" and "could not be read" in status["error"], status
            assert (samples / "quarantine" / f"{update_id}.zip").exists()  # moved aside, never deleted
            assert c.post(f"/updates/{update_id}/retry").status_code == 409
        assert 'warmtune_updates{status="quarantined"} 2.0' in c.get("/metrics").text
        assert "quarantined" in server.output()
