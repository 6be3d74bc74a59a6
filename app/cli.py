"""The warmtune command line. Settings come from WARMTUNE_* environment variables (listed in --help)."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

from app.settings import Settings, get_settings

log = logging.getLogger("warmtune")


def settings_help() -> str:
    lines = ["settings (environment variables, defaults in brackets):"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        lines.append(f"  WARMTUNE_{name.upper():<26} [{default}]  {field.description}")
    return "\n".join(lines)


def format_holdout(scores: dict | None) -> str:
    if not scores:
        return "-"
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return f"old {fmt(scores['old'])} new {fmt(scores['new'])} all {fmt(scores['all'])}"


def cmd_update(args: argparse.Namespace, settings: Settings) -> int:
    """Apply the pending update sets once and print what became of them."""
    from app.stores import Stores
    from worker.jobs import apply_pending_updates

    results = apply_pending_updates(settings)
    if not results:
        print("nothing pending")
    stores = Stores(settings)
    for r in results:
        version = r.model_version if r.status == "applied" else None
        classes = stores.snapshots.meta(version).classes if version else []
        print(
            f"{r.status:8} {len(r.update_ids)} set(s) -> version {version or '-'}  "
            f"holdout {format_holdout(r.metrics.get('holdout_after'))}  "
            f"{len(classes) or ''} {'classes: ' + ', '.join(classes) if classes else r.reason or ''}"
        )
    return 0 if all(r.status == "applied" for r in results) else 1


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Queue rejected, failed or orphaned update sets again: `warmtune update` applies them, or a service's next poll."""
    from app.stores import Stores

    stores = Stores(settings)
    for update_id in args.update_ids:
        stores.requeue(update_id, "retried from the command line")
        print(f"queued {update_id} again; `warmtune update` applies it now, a running service on its next poll")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Store update sets taken from Fashion-MNIST or an image folder, as an annotator would post them."""
    from app.datasets import load_source
    from app.stores import Stores

    source = load_source(args.data)
    classes = args.classes.split(",") if args.classes else source.classes
    rng = random.Random(args.seed)
    stores = Stores(settings)
    known = stores.classes()
    images: list[bytes] = []
    labels: list[str] = []
    for label in classes:
        chosen = source.take(label, args.per_class, rng)
        images += chosen
        labels += [label] * len(chosen)
    order = list(range(len(images)))
    rng.shuffle(order)
    size = args.set_size or len(order)
    for lo in range(0, len(order), size):
        part = order[lo : lo + size]
        update, _ = stores.samples.add([images[i] for i in part], [labels[i] for i in part], known_classes=known)
        print(f"stored update set {update.update_id}: {len(update)} samples, new classes {list(update.new_classes)}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the HTTP service (embedded update worker unless WARMTUNE_REDIS_URL is set)."""
    import uvicorn

    from app.api import create_app
    from app.auth import safe_host
    from app.http import http_protocol
    from app.images import limit_pillow
    from worker.jobs import apply_pending_updates

    limit_pillow(settings.max_image_pixels)  # process-wide: set where the process starts
    # Every torch call of the forward thread gives up the GIL and must take it back from the event
    # loop; at 0.2 ms instead of Python's 5 ms it served 1.14x the images at concurrency 32
    # (README, "Predict throughput").
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    host, warning = safe_host(args.host, settings.api_keys)
    if warning:
        log.warning(warning)
    uvicorn.run(
        create_app(apply_pending_updates, settings),
        host=host,
        port=args.port,
        log_level="info",
        limit_concurrency=settings.max_connections,
        http=http_protocol(settings.header_timeout_s),
        loop="uvloop",
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run an RQ worker for update jobs (distributed mode)."""
    from worker.rq import run_rq_worker

    if not settings.redis_url:
        print("warmtune worker needs WARMTUNE_REDIS_URL (without it, `warmtune serve` runs updates itself)")
        return 2
    run_rq_worker(settings)
    return 0


def cmd_experiment(args: argparse.Namespace, settings: Settings) -> int:
    """Reproduce the paper's studies on real data with the update engine; results go to --out."""
    from dataclasses import replace

    from app.datasets import load_source
    from app.model import select_device
    from worker.experiment import QUICK, STUDIES, Protocol, run_experiment

    device = str(select_device(settings.device))
    protocol = Protocol(arch=args.arch, image_size=args.image_size, seed=args.seed, device=device)
    if args.quick:
        protocol = replace(protocol, **QUICK)
    given = {k: v for k, v in vars(args).items() if k in Protocol.__dataclass_fields__ and v is not None}
    protocol = replace(protocol, **given)
    studies = list(STUDIES) if args.study == "all" else args.study.split(",")
    if unknown := [s for s in studies if s not in STUDIES]:
        raise SystemExit(f"unknown study {', '.join(unknown)}: choose from all, {', '.join(STUDIES)}")
    run_experiment(load_source(args.data, "train"), load_source(args.data, "test"), protocol, studies, args.out)
    print(f"wrote {args.out}/results.csv, results.md and {', '.join(s + '.png' for s in studies)} (beside earlier studies there)")
    return 0


BENCHMARKS = {
    "update-step": "bench.update_step",
    "predict": "bench.predict",
    "stream": "bench.stream",
    "history": "bench.history",
    "label-check": "bench.label_check",
    "sample-reads": "bench.sample_reads",
    "nearest-record": "bench.nearest_record",
}


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Run a benchmark module from bench/; its own flags follow the benchmark's name."""
    import importlib

    importlib.import_module(BENCHMARKS[args.name]).main(args.bench_args)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Stream Fashion-MNIST through an embedded server as an annotator and a client would."""
    from app.demo import demo_settings, run_demo
    from worker.jobs import apply_pending_updates

    overrides = {"arch": args.arch, "image_size": args.image_size}
    settings = demo_settings(settings.model_copy(update=overrides), args.home)
    tally = run_demo(
        settings,
        apply_pending_updates,
        args.data,
        args.initial_classes,
        args.new_classes,
        args.per_class,
        args.set_size,
        args.seed,
    )
    return 0 if tally.failures == 0 and tally.total else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmtune",
        description="Online model updates: warm-started fine-tuning with replay, atomic model swaps.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only without API keys)")
    serve.add_argument("--port", type=int, default=8000)

    sub.add_parser("worker", help="run an RQ worker for update jobs (needs WARMTUNE_REDIS_URL)")

    demo = sub.add_parser("demo", help="stream Fashion-MNIST through an embedded server, printing each swap")
    demo.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder of class sub-folders")
    demo.add_argument("--arch", default="resnet18", help="model (CPU-friendly default; alexnet wants a GPU)")
    demo.add_argument("--image-size", type=int, default=32)
    demo.add_argument("--initial-classes", type=int, default=3)
    demo.add_argument("--new-classes", type=int, default=4, help="classes that arrive one by one afterwards")
    demo.add_argument("--per-class", type=int, default=60, help="training images posted per class")
    demo.add_argument("--set-size", type=int, default=20, help="images per update set")
    demo.add_argument("--home", type=Path, default=None, help="WARMTUNE_HOME to use (default: a new temporary one)")
    demo.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)} (add --help after its name)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    exp = sub.add_parser("experiment", help="reproduce the paper's studies on Fashion-MNIST (or an image folder)")
    exp.add_argument("--study", default="all", help="all, or studies separated by commas (iterations,lambda,batchnorm,...)")
    exp.add_argument("--repeats", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    exp.add_argument("--arch", default="resnet18")
    exp.add_argument("--image-size", type=int, default=32)
    exp.add_argument("--quick", action="store_true", help="1 repetition, fewer images: under 20 minutes on 2 cores")
    exp.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder of class sub-folders")
    exp.add_argument("--out", type=Path, default=Path("experiments"))
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--initial-classes", type=int, default=None)
    exp.add_argument("--new-classes", type=int, default=None)
    exp.add_argument("--initial-per-class", type=int, default=None)
    exp.add_argument("--initial-epochs", type=int, default=None, help="most epochs of the first version")
    exp.add_argument("--sets-per-class", type=int, default=None)
    exp.add_argument("--set-size", type=int, default=None)
    exp.add_argument("--eval-per-class", type=int, default=None)

    sub.add_parser("update", help="apply the pending update sets once")

    retry = sub.add_parser("retry", help="queue rejected, failed or orphaned update sets again")
    retry.add_argument("update_ids", nargs="+", metavar="UPDATE_ID")

    ingest = sub.add_parser("ingest", help="store update sets from Fashion-MNIST or an image folder")
    ingest.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder of class sub-folders")
    ingest.add_argument("--classes", default="", help="comma-separated class names (default: all)")
    ingest.add_argument("--per-class", type=int, default=100, help="images per class")
    ingest.add_argument("--set-size", type=int, default=0, help="images per update set (default: one set)")
    ingest.add_argument("--seed", type=int, default=None, help="seed for choosing images")
    return parser


COMMANDS = {
    "serve": cmd_serve,
    "worker": cmd_worker,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "experiment": cmd_experiment,
    "update": cmd_update,
    "retry": cmd_retry,
    "ingest": cmd_ingest,
}


def main(argv: list[str] | None = None) -> int:
    from app.errors import WarmtuneError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args, get_settings())
    except WarmtuneError as exc:  # a refusal with a message, not a traceback
        print(f"warmtune {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
