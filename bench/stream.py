"""The learning loop as its users see it: a Fashion-MNIST stream posted over HTTP to `warmtune serve`.

The server runs with the default learning settings (only arch, image size and home are set,
unless --set says otherwise). The annotator posts 3 initial classes as one set, then each other
class in sets of 10, each followed by a set of 10 images of classes already known. The poisoned
run adds, at known positions, sets of one known class labelled as another known class. At the
end a client asks /predict for test images of every class. The upper bound is the same model
trained once on every clean image of the stream (joint training: the first-version training,
with its epoch budget).

    warmtune bench stream --arch resnet18 --image-size 32
    warmtune bench stream --arch alexnet --image-size 64 --runs clean
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.datasets import LabelledImages, fashion_mnist
from app.model import model_from_state, select_device
from app.samples import Sample
from app.settings import Settings
from app.stores import Stores
from worker.gate import Answers, check_nearest
from worker.jobs import NEAREST, apply_pending_updates
from worker.trainer import SampleTensors, evaluate

RESULTS = Path(__file__).parent / "results"


@dataclass
class PostedSet:
    kind: str  # initial, new, known, poisoned
    labels: list[str]
    images: list[bytes] = field(repr=False)
    note: str = ""
    update_id: str = ""
    posted_at: float = 0.0
    served_after_s: float | None = None


def plan_stream(
    train: LabelledImages, seed: int, initial: int, initial_per_class: int, per_new_class: int, set_size: int, poisoned: bool
) -> list[PostedSet]:
    """The annotator's sets in posting order; the clean sets are the same with and without poison."""
    rng = random.Random(seed)
    order = rng.sample(train.classes, len(train.classes))
    pool = {c: train.take(c, 10_000, rng) for c in order}  # shuffled images per class, drawn without repeats

    def draw(label: str, n: int) -> list[bytes]:
        taken, pool[label] = pool[label][:n], pool[label][n:]
        return taken

    first = [(image, c) for c in order[:initial] for image in draw(c, initial_per_class)]
    rng.shuffle(first)
    sets = [PostedSet("initial", [c for _, c in first], [i for i, _ in first])]
    poison_rng = random.Random(seed + 1)
    for new in order[initial:]:
        known = [c for c in order[: order.index(new)]]
        for k in range(per_new_class // set_size):
            sets.append(PostedSet("new", [new] * set_size, draw(new, set_size)))
            mix = [rng.choice(known) for _ in range(set_size)]
            sets.append(PostedSet("known", mix, [draw(c, 1)[0] for c in mix]))
            if poisoned and k == 1:
                source, wrong = poison_rng.sample(known, 2)
                sets.append(PostedSet("poisoned", [wrong] * set_size, draw(source, set_size), f"{source} labelled {wrong}"))
    return sets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer within 120 s; see {log_path}")


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def wait_settled(client: httpx.Client, update_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/updates/{update_id}").raise_for_status().json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"update {update_id} not settled after {timeout:.0f} s")


def wait_served(client: httpx.Client, version: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = client.get("/readyz").json().get("model_version")
        if served is not None and served >= version:
            return
        time.sleep(0.05)
    raise TimeoutError(f"version {version} not served after {timeout:.0f} s")


def predict_accuracy(client: httpx.Client, test: dict[str, list[bytes]], batch: int = 32) -> dict[str, float]:
    """Per class, the share of its test images /predict labels correctly."""
    accuracy = {}
    for label, images in test.items():
        hits = 0
        for lo in range(0, len(images), batch):
            answer = client.post("/predict", files=files(images[lo : lo + batch]), params={"top_k": 1}).raise_for_status()
            hits += sum(p["label"] == label for p in answer.json()["predictions"])
        accuracy[label] = hits / len(images)
    return accuracy


def run_stream(sets: list[PostedSet], test: dict[str, list[bytes]], env: dict[str, str], home: Path, step_timeout: float) -> dict:
    """Post every set, one after the other, and wait for each to settle and (if applied) to be served."""
    proc, url = start_server(env, home.parent / f"{home.name}.log")
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            started = time.monotonic()
            for n, s in enumerate(sets, 1):
                s.posted_at = time.monotonic()
                answer = client.post("/updates", files=files(s.images), data={"labels": s.labels}).raise_for_status()
                s.update_id = answer.json()["update_id"]
                status = wait_settled(client, s.update_id, step_timeout)
                if status["status"] == "applied":
                    wait_served(client, status["model_version"], 60)
                    s.served_after_s = time.monotonic() - s.posted_at
                print(
                    f"  set {n:2d}/{len(sets)} {s.kind:8} {s.note or ','.join(sorted(set(s.labels)))[:40]:40} -> "
                    f"{status['status']}{' v' + str(status['model_version']) if status['model_version'] else ''}"
                    f"  {time.monotonic() - started:6.0f}s",
                    flush=True,
                )
            # Reconsidered sets may still be queued: wait until nothing is left to do.
            final = {s.update_id: wait_settled(client, s.update_id, step_timeout * 3) for s in sets}
            accuracy = predict_accuracy(client, test)
            version = client.get("/readyz").json()["model_version"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"final": final, "accuracy": accuracy, "version": version, "seconds": time.monotonic() - started}


def joint_bound(sets: list[PostedSet], test: dict[str, list[bytes]], settings: Settings) -> dict[str, float]:
    """The same model trained once on every clean image of the stream, scored by the same evaluator."""
    stores = Stores(settings)
    clean = [s for s in sets if s.kind != "poisoned"]
    stores.samples.add([i for s in clean for i in s.images], [label for s in clean for label in s.labels])
    [result] = apply_pending_updates(settings)
    meta = stores.snapshots.meta(result.model_version)
    model = model_from_state(meta.arch, stores.snapshots.weights(meta.version))
    samples = [Sample("test", i, label, data) for label, images in test.items() for i, data in enumerate(images)]
    tensors = SampleTensors(samples, {c: i for i, c in enumerate(meta.classes)}, meta.image_size)
    scores = evaluate(model, tensors, select_device(settings.device))
    return {label: scores.correct[label] / scores.total[label] for label in test}


def summarize(sets: list[PostedSet], outcome: dict) -> dict:
    final = outcome["final"]
    status = {s.update_id: final[s.update_id]["status"] for s in sets}
    retried = [s for s in sets if any(a["status"] == "requeued" for a in final[s.update_id]["attempts"])]
    poisoned = [s for s in sets if s.kind == "poisoned"]
    clean = [s for s in sets if s.kind != "poisoned"]
    caught = sum(status[s.update_id] == "rejected" for s in poisoned)
    false_alarms = [s for s in clean if status[s.update_id] == "rejected"]
    served = [s.served_after_s for s in sets if s.served_after_s is not None]
    corroborated = [s for s in sets if corroborated_in(s.update_id, final[s.update_id]["attempts"])]
    accuracy = outcome["accuracy"]
    set_log = set_log_of(sets, final, status)
    return {
        "final_accuracy": statistics.fmean(accuracy.values()),
        "per_class": accuracy,
        "version": outcome["version"],
        "sets": len(sets),
        "applied": sum(v == "applied" for v in status.values()),
        "rejected": sum(v == "rejected" for v in status.values()),
        "retried": len(retried),
        # applied without their label checks, with other sets refused on the same label (WARMTUNE_GATE_CORROBORATE)
        "corroborated": {
            "clean": sum(s.kind != "poisoned" for s in corroborated),
            "poisoned": sum(s.kind == "poisoned" for s in corroborated),
        },
        "clean_sets_rejected": [f"{s.kind} {','.join(sorted(set(s.labels)))}" for s in false_alarms],
        "poisoned_sets": len(poisoned),
        "gate_precision": caught / (caught + len(false_alarms)) if poisoned and caught + len(false_alarms) else None,
        "gate_recall": caught / len(poisoned) if poisoned else None,
        "label_to_serve_p50_s": statistics.median(served) if served else None,
        "label_to_serve_p95_s": statistics.quantiles(served, n=20)[-1] if len(served) >= 2 else None,
        "seconds": outcome["seconds"],
        "set_log": set_log,
        "first_nearest_check_by_share": first_checks_by_share(set_log),
    }


def corroborated_in(update_id: str, attempts: list[dict]) -> bool:
    """Whether a version applied the set as corroborated (see worker/jobs.py: corroborate)."""
    return any(
        a["status"] == "applied" and any(update_id in ids for ids in (a["metrics"].get("corroborated") or {}).values()) for a in attempts
    )


def set_log_of(sets: list[PostedSet], final: dict, status: dict[str, str]) -> list[dict]:
    """Every set's kind, labels, final status, attempts and what the nearest-mean test read at each."""
    return [
        {
            "kind": s.kind,
            "update_id": s.update_id,
            "labels": s.note or ",".join(sorted(set(s.labels))),
            "status": status[s.update_id],
            "attempts": [f"{a['status']}: {a['reason'] or ''}"[:300] for a in final[s.update_id]["attempts"]],
            # where the gate's nearest-mean test found the set's images, at each attempt that read them
            "nearest_means": [a["metrics"].get(NEAREST, {}).get(s.update_id) for a in final[s.update_id]["attempts"]],
        }
        for s in sets
    ]


def first_checks_by_share(set_log: list[dict], shares: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)) -> dict:
    """Of the sets the nearest-mean test read, how many clean and poisoned ones the first check
    that read them would have refused at each share (the counts it read, judged by the service's
    rule): what another WARMTUNE_GATE_RELABEL_SHARE would have done there. Later checks depend on
    what the first one did, so they are left out."""
    firsts = [(entry["kind"], next((c for c in entry["nearest_means"] if c is not None), None)) for entry in set_log]
    firsts = [(kind == "poisoned", counts) for kind, counts in firsts if counts]
    sweep = {"clean_checked": sum(not p for p, _ in firsts), "poisoned_checked": sum(p for p, _ in firsts)}
    for share in shares:
        refused = [p for p, counts in firsts if not check_nearest(answers_of(counts), share).passed]
        sweep[f"{share:g}"] = {"clean_refused": refused.count(False), "poisoned_refused": refused.count(True)}
    return sweep


def answers_of(counts: dict[str, dict[str, int]]) -> Answers:
    """Nearest-mean counts (by label, then by class) back as the answers they count."""
    pairs = [(label, nearest) for label, by_class in counts.items() for nearest, n in by_class.items() for _ in range(n)]
    return Answers(tuple(t for t, _ in pairs), tuple(p for _, p in pairs))


def print_run(name: str, r: dict) -> None:
    print(f"\n{name}: final accuracy {r['final_accuracy']:.3f} over {len(r['per_class'])} classes, version {r['version']}")
    print("  per class: " + ", ".join(f"{c} {a:.2f}" for c, a in r["per_class"].items()))
    print(
        f"  sets {r['sets']}: applied {r['applied']}, rejected {r['rejected']}, retried {r['retried']}; "
        f"clean sets rejected: {r['clean_sets_rejected'] or 'none'}; applied as corroborated: "
        f"{r['corroborated']['clean']} clean, {r['corroborated']['poisoned']} poisoned"
    )
    if r["poisoned_sets"]:
        print(f"  gate on {r['poisoned_sets']} poisoned sets: precision {r['gate_precision']}, recall {r['gate_recall']}")
    sweep = r["first_nearest_check_by_share"]
    print(
        f"  first nearest-mean checks ({sweep['clean_checked']} clean sets, {sweep['poisoned_checked']} poisoned) refused at share "
        + ", ".join(f"{k}: {v['clean_refused']} clean, {v['poisoned_refused']} poisoned" for k, v in sweep.items() if isinstance(v, dict))
    )
    p50, p95 = r["label_to_serve_p50_s"], r["label_to_serve_p95_s"]
    print(f"  label-to-serve p50 {p50 and f'{p50:.1f}'} s, p95 {p95 and f'{p95:.1f}'} s; whole run {r['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--runs", default="clean,poisoned", help="clean, poisoned or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initial-classes", type=int, default=3)
    parser.add_argument("--initial-per-class", type=int, default=80)
    parser.add_argument("--per-new-class", type=int, default=40, help="images of each later class, in sets of --set-size")
    parser.add_argument("--set-size", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--no-joint", action="store_true", help="skip the joint-training upper bound")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another WARMTUNE_ setting (studies only)")
    parser.add_argument("--step-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="keep the servers' homes and logs in this folder, to read afterwards")
    args = parser.parse_args(argv)

    logging.getLogger("worker").setLevel(logging.WARNING)  # the joint bound trains in this process
    logging.getLogger("httpx").setLevel(logging.WARNING)
    train, test_source = fashion_mnist("train"), fashion_mnist("test")
    rng = random.Random(args.seed + 7)
    test = {c: test_source.take(c, args.test_per_class, rng) for c in test_source.classes}
    extra = dict(kv.split("=", 1) for kv in args.set)
    device = select_device(extra.get("device", "auto"))
    base_env = {"WARMTUNE_ARCH": args.arch, "WARMTUNE_IMAGE_SIZE": str(args.image_size), "WARMTUNE_LOG_EVERY": "1000000"}
    base_env |= {f"WARMTUNE_{k.upper()}": v for k, v in extra.items()}
    report: dict = {
        "arch": args.arch,
        "image_size": args.image_size,
        "device": str(device),
        "seed": args.seed,
        "settings": extra,
        "cpu_threads": os.cpu_count(),
        "runs": {},
    }
    print(f"stream benchmark: {args.arch} at {args.image_size} px on {device}; settings {extra or 'default'}")
    with tempfile.TemporaryDirectory(prefix="warmtune-stream-") as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for name in args.runs.split(","):
            sets = plan_stream(
                train,
                args.seed,
                args.initial_classes,
                args.initial_per_class,
                args.per_new_class,
                args.set_size,
                poisoned=name == "poisoned",
            )
            print(f"\n{name} run: {len(sets)} sets", flush=True)
            home = scratch / name
            outcome = run_stream(sets, test, {**os.environ, **base_env, "WARMTUNE_HOME": str(home)}, home, args.step_timeout)
            report["runs"][name] = summarize(sets, outcome)
            print_run(name, report["runs"][name])
            write_report(report, args.out)  # after each run, so a long benchmark cut short keeps what it measured
        if not args.no_joint:
            sets = plan_stream(train, args.seed, args.initial_classes, args.initial_per_class, args.per_new_class, args.set_size, False)
            values = {"arch": args.arch, "image_size": args.image_size, "log_every": 10**9, **extra}
            settings = Settings(**values, home=scratch / "joint")
            per_class = joint_bound(sets, test, settings)
            report["joint"] = {"final_accuracy": statistics.fmean(per_class.values()), "per_class": per_class}
            print(
                f"\njoint training (upper bound): {report['joint']['final_accuracy']:.3f}; "
                + ", ".join(f"{c} {a:.2f}" for c, a in per_class.items())
            )
            for name, run in report["runs"].items():
                print(f"  {name} run vs bound: {run['final_accuracy'] - report['joint']['final_accuracy']:+.3f}")
    path = write_report(report, args.out)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return report


def write_report(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"stream-{report['arch']}-{report['image_size']}-{report['device'].split(':')[0]}-seed{report['seed']}.json"
    path.write_text(json.dumps(report, indent=2))
    plot_per_class(report, path.with_suffix(".png"))
    return path


def plot_per_class(report: dict, path: Path) -> None:
    """Final test accuracy per class: each run beside the joint-training bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {f"{name} run": run["per_class"] for name, run in report["runs"].items()}
    if "joint" in report:
        series["joint training (bound)"] = report["joint"]["per_class"]
    classes = list(next(iter(series.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for k, (name, per_class) in enumerate(series.items()):
        mean = statistics.fmean(per_class.values())
        ax.bar([i + k * width for i in range(len(classes))], [per_class[c] for c in classes], width, label=f"{name}: {mean:.3f}")
    ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    ax.axhline(0.3, color="red", linestyle="--", linewidth=0.8, label="target per class")
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(classes))], classes, rotation=20)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"stream benchmark: {report['arch']} at {report['image_size']} px on {report['device']}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
