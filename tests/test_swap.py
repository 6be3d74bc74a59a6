"""Zero failed requests across swaps: clients hammer /predict while three updates are applied."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from imagegen import make_set
from service import fast_env, start_server, upload, wait_for_update, wait_until_served


def test_predictions_never_fail_or_go_back_while_versions_swap(tmp_path: Path):
    server = start_server(fast_env(tmp_path / "home"), tmp_path / "server.log")
    stop = threading.Event()
    seen: list[list[tuple[int, int | None]]] = [[] for _ in range(4)]
    images = make_set({"red": 2, "green": 1}, seed=9)[0]

    def hammer(record: list[tuple[int, int | None]]) -> None:
        with server.client() as c:
            while not stop.is_set():
                try:
                    r = c.post("/predict", **upload(images))
                    record.append((r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as exc:  # a dropped connection is a failure too
                    record.append((0, repr(exc)))

    try:
        with server.client() as c:
            wait_for_update(c, c.post("/updates", **upload(*make_set({"red": 10, "green": 10}, seed=1))).json()["update_id"])
            wait_until_served(c, 1)
            threads = [threading.Thread(target=hammer, args=(record,)) for record in seen]
            for t in threads:
                t.start()
            for seed, counts in enumerate([{"blue": 10}, {"red": 10}, {"yellow": 10}], start=2):
                update = c.post("/updates", **upload(*make_set(counts, seed=seed))).json()
                assert wait_for_update(c, update["update_id"])["status"] == "applied"
            wait_until_served(c, 4)
            stop.set()
            for t in threads:
                t.join()
            versions = c.get("/models").json()["versions"]
    finally:
        stop.set()
        server.kill()

    existing = {v["version"] for v in versions}
    assert existing == {1, 2, 3, 4}
    for record in seen:
        assert record and all(status == 200 for status, _ in record), [r for r in record if r[0] != 200][:5]
        observed = [version for _, version in record]
        assert set(observed) <= existing
        assert observed == sorted(observed)  # never backwards without a promote
    assert len({v for record in seen for _, v in record}) >= 2  # the clients did see swaps
