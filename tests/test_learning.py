"""The learning loop over real HTTP: new classes are learned, bad labels refused, and no accepted set is lost."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagegen import make_image, make_set, poisoned_set
from service import Server, fast_env, start_server, upload, wait_for_update, wait_until_served


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(fast_env(tmp_path / "home"), tmp_path / "server.log")
    yield s
    s.kill()


def post(client, images: list[bytes], labels: list[str]) -> str:
    r = client.post("/updates", **upload(images, labels))
    assert r.status_code == 202, r.text
    return r.json()["update_id"]


def accuracy(client, label: str, n: int = 20) -> float:
    images = [make_image(label, random.Random(1000 + i)) for i in range(n)]
    r = client.post("/predict", **upload(images))
    assert r.status_code == 200, r.text
    return sum(p["label"] == label for p in r.json()["predictions"]) / n


def statuses(client, update_ids: list[str]) -> dict[str, str]:
    return {u: client.get(f"/updates/{u}").json()["status"] for u in update_ids}


def test_a_new_class_in_sets_of_ten_is_learned_a_relabelled_set_refused_and_retried(server: Server):
    with server.client() as c:
        first = post(c, *make_set({"red": 30, "green": 30, "blue": 30}, seed=1))
        assert wait_for_update(c, first)["status"] == "applied"

        yellow = []
        for k in range(3):
            yellow.append(post(c, *make_set({"yellow": 10}, seed=10 + k)))
            status = wait_for_update(c, yellow[-1])
            assert status["status"] == "applied", status
        slip = post(c, *poisoned_set("green", "red", 20, seed=20))  # green images labelled red
        refused = wait_for_update(c, slip)
        assert refused["status"] == "rejected"
        assert "labels contradict the current version" in refused["error"] and "'red'" in refused["error"], refused["error"]
        assert [a["status"] for a in refused["attempts"]] == ["rejected"]

        wait_until_served(c, refused["attempts"][0]["model_version"])
        assert accuracy(c, "yellow") >= 0.6  # chance is 0.25
        assert accuracy(c, "green") >= 0.6

        # retried by an annotator: tried again, refused again, both attempts on record
        r = c.post(f"/updates/{slip}/retry")
        assert r.status_code == 202 and r.json()["attempts"][-1]["status"] == "requeued"
        again = wait_for_update(c, slip)
        assert [a["status"] for a in again["attempts"]] == ["rejected", "requeued", "rejected"]
        assert again["attempts"][1]["reason"] == "retried on request"

        r = c.post(f"/updates/{first}/retry")
        assert r.status_code == 409 and "is applied" in r.json()["detail"]
        assert c.post(f"/updates/{'0' * 32}/retry").status_code == 404


def test_a_promote_back_and_forth_leaves_every_set_applied_or_visibly_orphaned(server: Server):
    with server.client() as c:
        first = post(c, *make_set({"red": 20, "green": 20}, seed=1))
        wait_for_update(c, first)
        blue = post(c, *make_set({"blue": 20}, seed=2))
        more_red = post(c, *make_set({"red": 10}, seed=3))
        for u in (blue, more_red):
            wait_for_update(c, u)
        versions = [v["version"] for v in c.get("/models").json()["versions"]]
        latest = versions[-1]

        assert c.post("/models/1/promote").status_code == 200
        after_rollback = {u: c.get(f"/updates/{u}").json() for u in (first, blue, more_red)}
        assert after_rollback[first]["status"] == "applied"
        for u in (blue, more_red):
            assert after_rollback[u]["status"] == "orphaned" and "retry it" in after_rollback[u]["error"]
        assert 'warmtune_updates{status="orphaned"} 2.0' in c.get("/metrics").text

        assert c.post(f"/models/{latest}/promote").status_code == 200  # forward again: nothing orphaned
        assert statuses(c, [first, blue, more_red]) == dict.fromkeys([first, blue, more_red], "applied")

        # back to version 1, and blue applied again on that lineage by a retry
        assert c.post("/models/1/promote").status_code == 200
        assert c.post(f"/updates/{blue}/retry").status_code == 202
        status = wait_for_update(c, blue)
        assert status["status"] == "applied" and status["model_version"] > latest
        meta = next(v for v in c.get("/models").json()["versions"] if v["version"] == status["model_version"])
        assert meta["parent"] == 1 and blue in meta["update_ids"]
        assert statuses(c, [first, blue, more_red]) == {first: "applied", blue: "applied", more_red: "orphaned"}
