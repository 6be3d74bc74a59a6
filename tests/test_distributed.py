"""Distributed mode for real: a Redis server, RQ workers and API replicas as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from imagegen import make_set
from service import Process, Server, fast_env, free_port, start, start_server, upload, wait_for_update, wait_until_served

from app.queue import enqueue_update_job, queued_key
from app.settings import Settings
from app.snapshots import SnapshotStore


def redis_answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False


def start_redis(port: int, workdir: Path, *options: str, url: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir), *options],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not redis_answers(url or f"redis://127.0.0.1:{port}/0"):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    return proc


@pytest.fixture
def shared_redis(tmp_path: Path) -> Iterator[str]:
    """The Redis on 127.0.0.1:6379 (make test starts one), or a private one if none answers."""
    url = "redis://127.0.0.1:6379/0"
    if redis_answers(url):
        yield url
        return
    proc = start_redis(free_port(), tmp_path)
    yield f"redis://127.0.0.1:{proc.args[2]}/0"
    proc.kill()


class Deployment:
    """API replicas and workers sharing one WARMTUNE_HOME and one Redis, with a queue of their own."""

    def __init__(self, tmp_path: Path, redis_url: str, **env: str) -> None:
        self.tmp_path = tmp_path
        self.home = tmp_path / "home"
        self.env = fast_env(
            self.home,
            WARMTUNE_REDIS_URL=redis_url,
            WARMTUNE_QUEUE_NAME=f"test-{uuid.uuid4().hex[:8]}",
            WARMTUNE_LOCK_LEASE_S="3",
            **env,
        )
        self.processes: list[Process] = []

    def api(self, name: str, **env: str) -> Server:
        server = start_server({**self.env, **env}, self.tmp_path / f"{name}.log")
        self.processes.append(server)
        return server

    def worker(self, name: str, **env: str) -> Process:
        process = start(["worker"], {**self.env, **env}, self.tmp_path / f"{name}.log")
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for p in self.processes:
            p.kill()

    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(self.home / "snapshots")


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Callable]:
    made: list[Deployment] = []

    def make(redis_url: str, **env: str) -> Deployment:
        made.append(Deployment(tmp_path, redis_url, **env))
        return made[-1]

    yield make
    for d in made:
        d.stop()


class Hammer:
    """A client calling /predict in a loop on a thread, recording every status."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.images = make_set({"red": 1}, seed=9)[0]
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with self.server.client() as c:
            while not self.stop.is_set():
                try:
                    self.statuses.append(c.post("/predict", **upload(self.images)).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                time.sleep(0.02)

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def post(client: httpx.Client, counts: dict[str, int], seed: int) -> dict:
    r = client.post("/updates", **upload(*make_set(counts, seed=seed)))
    assert r.status_code == 202, r.text
    return r.json()


def first_version(d: Deployment, api: Server) -> None:
    with api.client() as c:
        assert wait_for_update(c, post(c, {"red": 10, "green": 10}, seed=1)["update_id"])["status"] == "applied"
        wait_until_served(c, 1)


def test_an_update_posted_to_one_replica_is_served_by_the_other_through_the_announcement(deploy, shared_redis):
    d = deploy(shared_redis)
    # Pointer polling slowed to every 300 s: within the 30 s waited below, only the swap
    # announcement can make the second replica serve the new version (no latency is asserted).
    a, b = d.api("a", WARMTUNE_POLL_INTERVAL_S="300"), d.api("b", WARMTUNE_POLL_INTERVAL_S="300")
    d.worker("worker")
    first_version(d, a)
    wait_until_served(b.client(), 1, timeout=30)
    with a.client() as c:
        update = post(c, {"blue": 10}, seed=2)
        assert wait_for_update(c, update["update_id"])["model_version"] == 2
    wait_until_served(b.client(), 2, timeout=30)
    with b.client() as c:
        answer = c.post("/predict", **upload(make_set({"blue": 1}, seed=5)[0])).json()
        assert answer["model_version"] == 2


def test_a_burst_of_sets_is_coalesced_into_fewer_jobs_and_none_is_lost(deploy, shared_redis):
    d = deploy(shared_redis)
    api = d.api("api")
    d.worker("worker")
    with api.client() as c:
        ids = [post(c, {"red": 3, "green": 3}, seed=i)["update_id"] for i in range(20)]
        statuses = [wait_for_update(c, i) for i in ids]
    assert all(s["status"] == "applied" for s in statuses), [s["error"] for s in statuses]
    versions = d.snapshots().versions()
    assert len(versions) < 20  # fewer steps than sets
    assert sorted(u for v in versions for u in d.snapshots().meta(v).update_ids) == sorted(ids)  # each applied once
    jobs = redis.Redis.from_url(shared_redis)
    finished = jobs.zcard(f"rq:finished:{d.env['WARMTUNE_QUEUE_NAME']}")
    assert 1 <= finished < 20


def test_a_worker_killed_mid_update_leaves_nothing_half_done_and_the_next_applies_it(deploy, shared_redis):
    d = deploy(shared_redis)
    api = d.api("api")
    first = d.worker("first")
    first_version(d, api)
    slow = d.worker("slow", WARMTUNE_ITERATIONS="100000")  # would train for hours
    first.kill()  # leave the slow one to take the next job
    with api.client() as c, Hammer(api) as hammer:
        update = post(c, {"blue": 10}, seed=2)
        deadline = time.monotonic() + 60
        while c.get(f"/updates/{update['update_id']}").json()["status"] != "running":
            assert time.monotonic() < deadline, slow.output()
            time.sleep(0.1)
        time.sleep(1)
        slow.kill()  # SIGKILL in the middle of training
        assert c.get(f"/updates/{update['update_id']}").json()["status"] in ("running", "queued")
        d.worker("next")
        status = wait_for_update(c, update["update_id"], timeout=120)
    assert (status["status"], status["model_version"]) == ("applied", 2)
    store = d.snapshots()
    assert store.versions() == [1, 2] and store.current() == 2
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert hammer.statuses and set(hammer.statuses) == {200}


def test_an_update_posted_while_redis_is_down_is_applied_when_it_returns(deploy, tmp_path: Path):
    port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = start_redis(port, redis_dir)
    d = deploy(f"redis://127.0.0.1:{port}/0")
    api = d.api("api")
    d.worker("worker", WARMTUNE_POLL_INTERVAL_S="0.5")
    try:
        first_version(d, api)
        with api.client() as c, Hammer(api) as hammer:
            server.kill()
            server.wait()
            r = c.post("/updates", **upload(*make_set({"blue": 10}, seed=2)))
            assert r.status_code == 202 and r.json()["status"] == "queued"
            assert c.get(f"/updates/{r.json()['update_id']}").json()["status"] == "queued"
            time.sleep(2)
            server = start_redis(port, redis_dir)
            status = wait_for_update(c, r.json()["update_id"], timeout=120)
        assert (status["status"], status["model_version"]) == ("applied", 2)
        assert hammer.statuses and set(hammer.statuses) == {200}
    finally:
        server.kill()


def test_a_redis_with_an_acl_user_and_password_and_jobs_that_are_json(deploy, tmp_path: Path):
    port = free_port()
    url = f"redis://warmtune:s3cret@127.0.0.1:{port}/0"
    # the default user is off: a client without the password is refused
    server = start_redis(port, tmp_path, "--user", "default", "off", "--user", "warmtune", "on", ">s3cret", "~*", "&*", "+@all", url=url)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        d = deploy(url)
        api = d.api("api")
        with api.client() as c:
            update = post(c, {"red": 10, "green": 10}, seed=1)
        connection = redis.Redis.from_url(url)
        [job_id] = [j.decode() for j in connection.lrange(f"rq:queue:{d.env['WARMTUNE_QUEUE_NAME']}", 0, -1)]
        data = json.loads(zlib.decompress(connection.hget(f"rq:job:{job_id}", "data")))  # JSON, not a pickle
        assert data[0] == "worker.rq.run_update_job"

        d.worker("worker")
        with api.client() as c:
            assert wait_for_update(c, update["update_id"])["status"] == "applied"
            wait_until_served(c, 1, timeout=30)
    finally:
        server.kill()


def test_a_failed_enqueue_releases_the_queued_flag(shared_redis: str, tmp_path: Path):
    settings = Settings(home=tmp_path, redis_url=shared_redis, queue_name=f"test-{uuid.uuid4().hex}")
    connection = redis.Redis.from_url(shared_redis)
    queue_key = f"rq:queue:{settings.queue_name}"
    connection.set(queue_key, "not a list")  # RQ's push of the job id fails with WRONGTYPE
    try:
        with pytest.raises(redis.ResponseError):
            enqueue_update_job(connection, settings)
        assert not connection.exists(queued_key(settings))
        connection.delete(queue_key)
        assert enqueue_update_job(connection, settings)  # the next stored set queues a job at once
    finally:
        connection.delete(queue_key, queued_key(settings))


def test_compose_file_is_valid(tmp_path: Path):
    compose = Path(__file__).parent.parent / "docker-compose.yml"
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make install` installs Debian's docker-compose")
    env = {**os.environ, "WARMTUNE_API_KEYS": '{"key": ["admin"]}', "REDIS_PASSWORD": "a-password"}
    result = subprocess.run(["docker-compose", "-f", str(compose), "config"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    config = result.stdout
    for needed in (
        "redis:",
        "api:",
        "worker:",
        "WARMTUNE_REDIS_URL",
        "WARMTUNE_HOME",
        "healthcheck",
        "prometheus:",
        "grafana:",
        "--requirepass",
        "redis://:a-password@redis:6379/0",
    ):
        assert needed in config, needed
    assert "driver: nvidia" not in config  # the worker gets a GPU from docker-compose.gpu.yml
    for extra, needed in (("docker-compose.gpu.yml", "driver: nvidia"), ("deploy/compose-test/compose.yml", "127.0.0.1::8000")):
        both = ["docker-compose", "-f", str(compose), "-f", str(compose.parent / extra), "config"]
        merged = subprocess.run(both, capture_output=True, text=True, env={**env, "WARMTUNE_API_PUBLISH": "127.0.0.1::8000"})
        assert merged.returncode == 0 and needed in merged.stdout, merged.stderr
    unset = subprocess.run(
        ["docker-compose", "-f", str(compose), "config"],
        capture_output=True,
        text=True,
        env={k: v for k, v in env.items() if k != "REDIS_PASSWORD"},
    )
    assert unset.returncode != 0 and "REDIS_PASSWORD" in unset.stderr
