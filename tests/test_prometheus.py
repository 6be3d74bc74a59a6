"""deploy/prometheus and deploy/grafana: the rules pass promtool's own tests, and a real Prometheus
scraping a live warmtune that has swapped versions returns data for every dashboard query."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
from imagegen import make_set
from service import fast_env, free_port, start_server, upload, wait_for_update, wait_until_served

DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "warmtune.json"
KEY = "prometheus-test-key"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_the_shipped_config_and_rules_are_valid_and_every_alert_fires_and_clears():
    assert promtool("check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")).returncode == 0
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = [line.split("alert:", 1)[1].strip() for line in RULES.read_text().splitlines() if "- alert:" in line]
    tests = (DEPLOY / "prometheus" / "rules_test.yml").read_text()
    assert alerts and all(f"alertname: {a}" in tests for a in alerts), "every alert has a promtool test"
    tested = promtool("test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def start_prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen, str]:
    (tmp_path / "token").write_text(KEY)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "warmtune",
                "authorization": {"credentials_file": str(tmp_path / "token")},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    assert promtool("check", "config", str(tmp_path / "prometheus.yml")).returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(tmp_path / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_for(check, what: str, timeout: float = 60) -> None:
    """Poll check() until it is true; a Prometheus still starting is not yet: connection refused,
    or a plain-text 503 "Service Unavailable" while its storage opens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.TransportError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} after {timeout} s")


def test_a_real_prometheus_scrapes_a_live_service_and_every_dashboard_query_returns_data(tmp_path):
    env = fast_env(tmp_path / "home", WARMTUNE_API_KEYS=json.dumps({KEY: ["admin"]}))
    server = start_server(env, tmp_path / "server.log")
    prometheus, url = start_prometheus(tmp_path, server.url.removeprefix("http://"))
    try:
        wait_for(lambda: query(url, 'up{job="warmtune"} == 1'), "Prometheus did not scrape warmtune with its key")
        client = server.client(headers={"Authorization": f"Bearer {KEY}"})
        for version, (images, labels) in enumerate([make_set({"red": 20, "green": 20}, seed=1), make_set({"blue": 20}, seed=2)], 1):
            update = client.post("/updates", **upload(images, labels)).json()
            assert wait_for_update(client, update["update_id"])["status"] == "applied"
            wait_until_served(client, version, timeout=60)
            for _ in range(5):
                assert client.post("/predict", **upload(images[:2])).status_code == 200
        assert client.post("/predict", files=[("images", ("x.png", b"not an image", "image/png"))]).status_code == 422

        wait_for(lambda: query(url, "max(warmtune_model_version) == 2"), "Prometheus did not see version 2")
        # Rates need two scrapes after the last requests; recording rules one evaluation more.
        wait_for(lambda: all(query(url, expr) for _, expr in dashboard_queries()), "some dashboard query returned nothing")
        for title, expr in dashboard_queries():
            assert query(url, expr), (title, expr)
        p95 = float(query(url, "warmtune:label_to_serve_seconds:p95_1h")[0]["value"][1])
        assert math.isfinite(p95) and p95 > 0
        # the refused image is counted by status; the recording rule shows it once two scrapes saw it
        statuses = lambda: {r["metric"]["status"] for r in query(url, "warmtune:predict_requests:rate5m")}  # noqa: E731
        wait_for(lambda: {"200", "422"} <= statuses(), "the 422 never reached the predict-rate rule")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.kill()
