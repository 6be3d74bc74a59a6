"""Attacks on a real server, each answered as a client would see it (issue 12's review, as a table)."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagegen import make_set
from PIL import Image
from service import Server, fast_env, start_server, upload, wait_for_update, wait_until_served

KEYS = {"reader": ["predict"], "labeller": ["annotate"], "other-labeller": ["annotate"], "scraper": []}


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def ico_bomb() -> bytes:
    """An ICO whose directory says 16x16 and whose one entry is a 13000x13000 PNG (169 megapixels, a few hundred KB)."""
    png = encode(Image.new("1", (13000, 13000)), "PNG")
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def peak_rss_mb(server: Server) -> float:
    """The server process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def samples_stored(tmp_path: Path) -> int:
    return len(list((tmp_path / "home" / "samples").glob("*.zip")))


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[Server]:
    """No keys (loopback only), and a small per-request pixel budget."""
    env = fast_env(
        tmp_path / "home",
        WARMTUNE_MAX_REQUEST_PIXELS="5000",
        WARMTUNE_BODY_TIMEOUT_S="1",
        WARMTUNE_MAX_CONNECTIONS="8",
        WARMTUNE_HEADER_TIMEOUT_S="3",
    )
    s = start_server(env, tmp_path / "server.log")
    yield s
    s.kill()


def test_image_bombs_and_formats_outside_the_allow_list_cost_nothing(open_server: Server, tmp_path: Path):
    bomb = ico_bomb()
    tga = encode(Image.new("RGB", (8, 8)), "TGA")
    with open_server.client() as c:
        before = peak_rss_mb(open_server)
        r = c.post("/updates", **upload([bomb] * 4, ["red"] * 4))  # four in one set, as in the review
        assert r.status_code == 422 and "ICO file, not an image in a format we read" in r.json()["detail"], r.text
        # Opening one bomb with Pillow's ICO reader decodes 169 megapixels (168 MB); refused unopened, it costs none.
        assert peak_rss_mb(open_server) - before < 100, (before, peak_rss_mb(open_server))

        r = c.post("/updates", **upload([tga], ["red"]))
        assert r.status_code == 422 and "not an image in a format we read (PNG, JPEG" in r.json()["detail"]
        wait_for_update(c, c.post("/updates", **upload(*make_set({"red": 2, "green": 2}))).json()["update_id"])
        wait_until_served(c, 1)
        r = c.post("/predict", **upload([bomb]))
        assert r.status_code == 422 and "ICO file" in r.json()["detail"], r.text
        over = c.post("/predict", **upload(make_set({"red": 5})[0]))  # 5 x 32 x 32 > 5000 pixels
        assert over.status_code == 413 and "over 5000 pixels together" in over.json()["detail"]
        assert c.post("/predict", **upload(make_set({"red": 2})[0])).status_code == 200
    assert samples_stored(tmp_path) == 1


@pytest.mark.parametrize(
    "method,path,headers,words",
    [
        ("GET", "/models", {"Host": "attacker.example"}, "not a loopback name"),  # DNS rebinding
        ("POST", "/updates", {"Host": "127.0.0.1.attacker.example:8000"}, "not a loopback name"),
        ("POST", "/updates", {"Origin": "http://attacker.example"}, "cross-origin POST"),  # a form on a web page
        ("POST", "/models/1/promote", {"Origin": "null"}, "cross-origin POST"),  # a sandboxed page
    ],
)
def test_without_keys_web_pages_cannot_reach_the_service(open_server: Server, tmp_path: Path, method, path, headers, words):
    images, labels = make_set({"red": 1})
    with open_server.client() as c:
        r = c.request(method, path, headers=headers, **(upload(images, labels) if path == "/updates" else {}))
        assert r.status_code == 403 and words in r.json()["detail"], r.text
        # a loopback page, and a client that sends no Origin, are served
        same = c.post("/updates", **upload(images, labels), headers={"Origin": open_server.url})
        assert same.status_code == 202
    assert samples_stored(tmp_path) == 1


def test_a_label_of_two_megabytes_is_a_422_naming_the_limit(open_server: Server, tmp_path: Path):
    images, _ = make_set({"red": 1})
    with open_server.client() as c:
        r = c.post("/updates", **upload(images, ["x" * 2 * 1024 * 1024]))
    assert r.status_code == 422 and "labels are at most 100 characters" in r.json()["detail"]
    assert samples_stored(tmp_path) == 0


def stalled_connection(server: Server, body_sent: bytes = b"") -> socket.socket:
    """A connection that sent a request's headers (declaring a 100 KB body) and then stops."""
    port = int(server.url.rsplit(":", 1)[1])
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /updates HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    )
    conn.sendall(head.encode() + body_sent)
    return conn


def read_answer(conn: socket.socket) -> str:
    """An HTTP answer read off a raw connection (its socket timeout bounds the wait)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_client_that_trickles_its_body_gets_408_and_the_connections_are_capped(open_server: Server, tmp_path: Path):
    conn = stalled_connection(open_server, b"--xyz\r\n")
    with conn:
        answer = read_answer(conn)  # the server answers by itself once the body deadline passes
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer

    idle = [socket.create_connection(("127.0.0.1", int(open_server.url.rsplit(":", 1)[1])), timeout=30) for _ in range(8)]
    try:
        with open_server.client() as c:
            assert c.get("/models").status_code == 503  # over WARMTUNE_MAX_CONNECTIONS: refused, not queued
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server notices the closed connections on its own time
        with open_server.client() as c:
            if c.get("/models").status_code == 200:
                break
        time.sleep(0.2)
    else:
        raise AssertionError("still refusing after the idle connections closed")
    assert samples_stored(tmp_path) == 0


def test_a_client_that_trickles_its_headers_gets_408_and_is_disconnected(open_server: Server):
    port = int(open_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET /models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
        for _ in range(150):  # a header byte every 0.2 s: 30 s at most, ten times the deadline
            try:
                conn.sendall(b"a")
            except OSError:  # the server closed the connection
                break
            time.sleep(0.2)
        answer = read_answer(conn)
        assert answer.startswith("HTTP/1.1 408") and "headers did not arrive within 3 s" in answer, answer
        assert conn.recv(1) == b""  # and the connection is closed


def test_a_kept_alive_connection_gets_a_new_head_deadline_for_each_request(open_server: Server):
    port = int(open_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        for _ in range(2):  # two whole requests on one connection are served, not cut off
            conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert read_answer(conn).startswith("HTTP/1.1 200")
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")  # then a head that never ends
        assert read_answer(conn).startswith("HTTP/1.1 408")


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(fast_env(tmp_path / "home", WARMTUNE_API_KEYS=json.dumps(KEYS)), tmp_path / "server.log")
    yield s
    s.kill()


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_with_keys_every_route_but_the_probes_needs_a_key(keyed_server: Server, path: str):
    with keyed_server.client() as c:
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get(path, headers={"Authorization": "Bearer nonsense"}).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer scraper"}).status_code == 200  # any valid key
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_idempotency_keys_are_scoped_to_the_api_key(keyed_server: Server, tmp_path: Path):
    mine, theirs = make_set({"red": 2}, seed=1), make_set({"green": 2}, seed=2)
    with keyed_server.client() as c:
        first = c.post("/updates", **upload(*mine), headers={"Authorization": "Bearer labeller", "Idempotency-Key": "42"})
        # another annotator picking the same predictable key neither collides nor pre-claims it
        second = c.post("/updates", **upload(*theirs), headers={"Authorization": "Bearer other-labeller", "Idempotency-Key": "42"})
        assert first.status_code == second.status_code == 202
        assert first.json()["update_id"] != second.json()["update_id"]
    assert samples_stored(tmp_path) == 2
