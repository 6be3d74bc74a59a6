"""make compose-test: build the images on this machine and run the compose stack for real.

No image registry is reachable here, so the base is made from Debian's archive with debootstrap
(cached as a local image), warmtune is built on it from the Dockerfile (BASE_IMAGE), and Redis and
Prometheus come from Debian's packages on the same base. Then, over ports published on 127.0.0.1
only: wait for health, post an update set, see it served by two API replicas, kill the worker
container in the middle of the next update and see the restarted one finish it, check that
Prometheus scraped both replicas, and tear everything down (volumes too). Every wait has a
deadline; the first failure stops the run with what it saw.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from app.datasets import fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
BASE = "warmtune-base:bookworm"
PROJECT = "warmtune-compose-test"
COMPOSE = ["docker-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "deploy/compose-test/compose.yml")]
SERVICES = ["redis", "api", "worker", "prometheus"]  # Grafana's image needs a registry: not started here
WHEELS = Path("/opt/pypi-more/files")  # torch 2.14.1 and its CUDA wheels lie here on this machine kind
WHEELS_PORT = 48765  # fixed, so that the pip layer's cache key (its build arguments) stays the same
TOKEN = ROOT / "deploy/prometheus/warmtune-token"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*args: str, env: dict[str, str] | None = None, capture: bool = False) -> str:
    result = subprocess.run(args, env=env, text=True, capture_output=capture, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(args)}\n{result.stderr if capture else ''}")
    return result.stdout if capture else ""


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """check() until it returns something truthy; fail with what it last saw at the deadline."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
            last = result
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}; last saw {last!r}")


def mirror() -> str:
    """The Debian mirror apt uses here."""
    for sources in Path("/etc/apt/sources.list.d").glob("*.sources"):
        if match := re.search(r"^URIs:\s*(\S+/debian)\s*$", sources.read_text(), re.M):
            return match.group(1)
    return "http://deb.debian.org/debian"


def build_base() -> None:
    """A minimal Debian with Python and pip, made once and kept as a local image."""
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode == 0:
        say(f"{BASE}: cached")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rootfs"
        packages = "python3,python3-pip,python3-venv,ca-certificates,curl"
        say(f"debootstrap bookworm from {mirror()} ({packages})")
        run("debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(root), mirror())
        # The machine's certificate authorities, so that pip and apt in the builds trust what the host trusts.
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()


def serve_wheels() -> tuple[ThreadingHTTPServer, str]:
    """The wheels on this disk over HTTP for pip in the build (host network): no multi-GB download."""
    handler = partial(QuietHandler, directory=str(WHEELS))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:  # taken: any port, and the pip layer is rebuilt
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def build_images() -> None:
    build_base()
    build = ["docker", "build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}"]
    wheels, url = serve_wheels()
    try:
        say("building warmtune:compose-test from the Dockerfile")
        run(*build, "--build-arg", f"PIP_EXTRA=--find-links {url}", "-t", "warmtune:compose-test", str(ROOT))
    finally:
        wheels.shutdown()
    for name in ("redis", "prometheus"):
        say(f"building warmtune-{name}:compose-test")
        here = ROOT / "deploy/compose-test"
        run(*build, "-t", f"warmtune-{name}:compose-test", "-f", str(here / f"{name}.Dockerfile"), str(here))


def port_of(service: str, port: int, index: int, env: dict[str, str]) -> str:
    address = run(*COMPOSE, "port", f"--index={index}", service, str(port), env=env, capture=True).strip()
    assert address.startswith("127.0.0.1:"), f"{service} published on {address}, not on loopback only"
    return f"http://{address}"


def post_set(api: str, admin: dict[str, str], images: list[bytes], labels: list[str]) -> str:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{api}/updates", files=files, data={"labels": labels}, headers=admin, timeout=60)
    response.raise_for_status()
    return response.json()["update_id"]


def status_of(api: str, admin: dict[str, str], update_id: str) -> dict:
    return httpx.get(f"{api}/updates/{update_id}", headers=admin, timeout=10).json()


def served_version(api: str, admin: dict[str, str], image: bytes) -> int:
    response = httpx.post(f"{api}/predict", files=[("images", ("x.png", image, "image/png"))], headers=admin, timeout=30)
    return int(response.headers.get("X-Model-Version", 0)) if response.status_code == 200 else 0


def exercise(env: dict[str, str], admin: dict[str, str]) -> None:
    apis = [port_of("api", 8000, i, env) for i in (1, 2)]
    prometheus = port_of("prometheus", 9090, 1, env)
    for api in apis:
        wait_for(f"{api}/healthz", lambda api=api: httpx.get(f"{api}/healthz", timeout=5).status_code == 200, 180)
    say(f"healthy: API replicas at {', '.join(apis)}; Prometheus at {prometheus}")

    data, rng = fashion_mnist("train"), random.Random(0)
    first = [(image, c) for c in ("Trouser", "Bag") for image in data.take(c, 30, rng)]
    update = post_set(apis[0], admin, [i for i, _ in first], [c for _, c in first])
    wait_for("the first set to be applied", lambda: status_of(apis[1], admin, update)["status"] == "applied", 300)
    for api in apis:
        wait_for(f"version 1 served by {api}", lambda api=api: served_version(api, admin, first[0][0]) >= 1, 60)
    say(f"set {update} applied and served as version 1 by both replicas")

    more = [(image, c) for c in ("Sneaker", "Trouser", "Bag") for image in data.take(c, 80, rng)]
    second = post_set(apis[1], admin, [i for i, _ in more], [c for _, c in more])
    wait_for("the worker to start on the second set", lambda: status_of(apis[0], admin, second)["status"] == "running", 120, 0.2)
    worker = run(*COMPOSE, "ps", "-q", "worker", env=env, capture=True).split()[0]
    run("docker", "kill", worker)
    say(f"killed the worker container {worker[:12]} while it trained on set {second}")
    assert status_of(apis[0], admin, second)["status"] in ("running", "queued")
    run(*COMPOSE, "up", "-d", "worker", env=env)
    final = wait_for(
        "the restarted worker to apply the second set",
        lambda: (s := status_of(apis[0], admin, second))["status"] == "applied" and s,
        600,
        2,
    )
    for api in apis:
        wait_for(f"version 2 served by {api}", lambda api=api: served_version(api, admin, more[0][0]) >= 2, 60)
    say(f"the restarted worker applied it: version {final['model_version']}, served by both replicas")

    def scraped() -> list:
        query = httpx.get(f"{prometheus}/api/v1/query", params={"query": "warmtune_model_version >= 2"}, timeout=10).json()
        return len(query["data"]["result"]) == 2 and query["data"]["result"]

    series = wait_for("Prometheus to scrape both replicas at version 2", scraped, 120, 3)
    say(f"Prometheus scraped {[s['metric']['instance'] for s in series]}")


def main() -> int:
    started = time.monotonic()
    if shutil.which("docker-compose") is None or shutil.which("debootstrap") is None:
        raise SystemExit("needs Debian's docker.io, docker-compose and debootstrap, and a running dockerd")
    build_images()
    built = time.monotonic()
    say(f"images built in {built - started:.0f} s")

    metrics_key, admin_key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "REDIS_PASSWORD": secrets.token_urlsafe(16),
        "WARMTUNE_API_KEYS": json.dumps({admin_key: ["admin"], metrics_key: ["predict"]}),
        "WARMTUNE_API_PUBLISH": "127.0.0.1::8000",
        "PROMETHEUS_PUBLISH": "127.0.0.1:",
    }
    token_was = TOKEN.read_bytes() if TOKEN.exists() else None
    TOKEN.write_text(metrics_key)
    try:
        run(*COMPOSE, "up", "-d", "--scale", "api=2", *SERVICES, env=env)
        exercise(env, {"Authorization": f"Bearer {admin_key}"})
    except BaseException:
        subprocess.run([*COMPOSE, "logs", "--tail=40"], env=env)
        raise
    finally:
        subprocess.run([*COMPOSE, "down", "-v", "--remove-orphans"], env=env, capture_output=True)
        if token_was is None:
            TOKEN.unlink(missing_ok=True)
        else:
            TOKEN.write_bytes(token_was)
    say(f"compose test passed: {time.monotonic() - built:.0f} s for the stack, {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
