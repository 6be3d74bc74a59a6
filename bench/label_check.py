"""The gate's label check on many crafted sets: false alarms on clean sets against the relabelled
and half-wrong sets it catches, for the label-check rules, read off one trained version.

For each repetition it trains a first version (ResNet-18, 32 px, the CPU, default settings) on
`per_class` Fashion-MNIST training images of each of the 10 classes, so that its holdout holds
per_class / 10 samples of each (the stream benchmark's classes have 4 to 12), and predicts every
test image once. Sets of 10 test images are then drawn from those predictions:

- clean: 10 images of a class, labelled as it;
- relabelled: 10 images of a class labelled as another class (every ordered pair);
- half wrong: 5 images of the class and 5 of other classes, all labelled as the class.

A relabelled pair is a look-alike pair when the version calls at least 10 % of the first class's
test images by the second. Rates are over all sets of a kind. The rules, each swept over its
threshold: the check this bench replaced (holdout only); the relabel factor with the agreement
test reading the holdout only (three Dirichlet priors); the service's check_labels reading the
holdout plus a record of 20 or 50 answers per class on unseen test images (what the lineage's
record gives the service; sets are drawn from the other test images); the same reading every
test answer (the limit of the rule on these answers); the nearest-mean test (where each image's
features lie among the means of the version's stored training images of each class), alone,
with the agreement test (the service's default) and with the relabel factor too; and the
model's own softmax log ratio of another class against the label (uncalibrated). The plot:
clean sets refused against look-alike relabelled sets refused.

    warmtune bench label-check --per-class 40 120 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from app.datasets import fashion_mnist
from app.model import model_from_state
from app.samples import Sample
from app.settings import Settings
from app.stores import Stores
from worker.gate import Answers, beta_binomial_cdf, check_labels, check_nearest, nearest_means, relabel_evidence
from worker.jobs import apply_pending_updates, replay_memory, stored_means
from worker.trainer import SampleTensors, predict_features, predict_logits

RESULTS = Path(__file__).parent / "results"
SET_SIZE = 10


def train_version(
    home: Path, per_class: int, seed: int, arch: str, image_size: int
) -> tuple[Answers, dict[str, list[str]], dict[str, list[str]], dict[str, torch.Tensor]]:
    """A first version's outcomes on its holdout, and its predictions, nearest class means (of its
    stored training images) and log-probabilities for every test image, by true class."""
    settings = Settings(home=home, arch=arch, image_size=image_size, seed=seed)
    stores = Stores(settings)
    data = fashion_mnist("train")
    rng = random.Random(seed)
    images, labels = [], []
    for label in data.classes:
        images += data.take(label, per_class, rng)
        labels += [label] * per_class
    stores.samples.add(images, labels)
    (step,) = apply_pending_updates(settings, stores=stores)
    meta = stores.snapshots.meta(step.model_version)
    model = model_from_state(meta.arch, stores.snapshots.weights(step.model_version))
    index = {c: i for i, c in enumerate(meta.classes)}
    device = torch.device("cpu")
    memory, holdout = replay_memory(stores, meta, index, image_size, settings.gate_holdout_per_class)
    known = Answers.of(predict_logits(model, holdout, device), holdout.labels, meta.classes)
    means = stored_means(settings, model, memory, device)
    test = fashion_mnist("test")
    predictions, nearest, log_probs = {}, {}, {}
    for label in meta.classes:
        samples = [Sample("test", i, label, data=png) for i, png in enumerate(test.by_class[label])]
        logits, features = predict_features(model, SampleTensors(samples, index, image_size), device)
        predictions[label] = list(Answers.of(logits, [label] * len(samples), meta.classes).predicted)
        nearest[label] = list(nearest_means(features, [label] * len(samples), means).predicted)
        log_probs[label] = torch.log_softmax(logits.float(), dim=1)
    return known, predictions, nearest, log_probs


def before_rule_p(known: Answers, s: dict) -> float:
    """The label check this bench replaced: the smaller p-value of its two beta-binomial tests
    (the images go to one other class more often than the version confuses the two; they agree
    with the label less often than its recall explains)."""
    label, answers = s["label"], s["answers"]
    hits, n = known.recall(label)
    wrong = Counter(p for p in answers if p != label)
    p_values = [beta_binomial_cdf(len(answers) - sum(wrong.values()), len(answers), hits, n)]
    if wrong:
        other, count = wrong.most_common(1)[0]
        mistaken = sum(t == label and p == other for t, p in zip(known.true, known.predicted, strict=True))
        p_values.append(1 - beta_binomial_cdf(count - 1, len(answers), mistaken, n))
    return min(p_values)


def draw_sets(predictions: dict[str, list[str]], sets_per_kind: int, rng: random.Random) -> list[dict]:
    """Sets as (true class, test image index) pairs with the label they are posted under."""
    classes = list(predictions)

    def some(label: str, count: int) -> list[tuple[str, int]]:
        return [(label, i) for i in rng.sample(range(max(RECORD_SIZES), len(predictions[label])), count)]

    drawn = []
    for x in classes:
        for _ in range(sets_per_kind):
            drawn.append({"kind": "clean", "label": x, "images": some(x, SET_SIZE)})
            others = [some(rng.choice([c for c in classes if c != x]), 1)[0] for _ in range(SET_SIZE // 2)]
            drawn.append({"kind": "half wrong", "label": x, "images": some(x, SET_SIZE // 2) + others})
        for y in classes:
            if y != x:
                confusion = predictions[x].count(y) / len(predictions[x])
                kind = "relabelled, look-alike" if confusion >= 0.1 else "relabelled"
                for _ in range(max(sets_per_kind // 4, 1)):
                    drawn.append({"kind": kind, "label": y, "images": some(x, SET_SIZE)})
    for s in drawn:
        s["answers"] = [predictions[c][i] for c, i in s["images"]]
    return drawn


def nearest_of(drawn: list[dict], nearest: dict[str, list[str]]) -> None:
    for s in drawn:
        s["nearest"] = [nearest[c][i] for c, i in s["images"]]


PRIORS = (0.1, 0.5, 1.0)
RECORD_SIZES = (20, 50)
FACTORS = (3, 10, 30, 100, 1000)
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)
SOFT_THRESHOLDS = (0, 5, 10, 20, 40)


def first_answers(predictions: dict[str, list[str]], per_class: int | None = None) -> Answers:
    """The version's answers on the first per_class test images of every class (all by default),
    as a record of answers on unseen images; sets are drawn from the other test images."""
    chosen = {c: ps[:per_class] for c, ps in predictions.items()}
    return Answers(tuple(c for c, ps in chosen.items() for _ in ps), tuple(p for ps in chosen.values() for p in ps))


def joined(a: Answers, b: Answers) -> Answers:
    return Answers(a.true + b.true, a.predicted + b.predicted)


def soft_relabel(log_probs: dict[str, torch.Tensor], classes: list[str], label: str, images: list[tuple[str, int]]) -> float:
    """max over other classes y of the sum over images of log p(y) - log p(label), the model's own probabilities."""
    rows = torch.stack([log_probs[c][i] for c, i in images])
    x = classes.index(label)
    gaps = (rows - rows[:, x : x + 1]).sum(dim=0)
    gaps[x] = -math.inf
    return float(gaps.max())


def refused_by_check(known: Answers, factor: float):
    """The service's check_labels at the default alpha and this factor."""
    alpha = Settings.model_fields["gate_label_alpha"].default

    def refused(s: dict) -> bool:
        incoming = Answers((s["label"],) * len(s["answers"]), tuple(s["answers"]))
        return not check_labels(known, incoming, alpha, factor).passed

    return refused


def refused_by_nearest(share: float):
    """The service's nearest-mean test at this share."""

    def refused(s: dict) -> bool:
        return not check_nearest(Answers((s["label"],) * len(s["nearest"]), tuple(s["nearest"])), share).passed

    return refused


def rule_families(known: Answers, predictions: dict[str, list[str]], log_probs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Each family of rules as {threshold: refused(set) -> bool}."""
    classes = list(predictions)
    alpha = Settings.model_fields["gate_label_alpha"].default
    families: dict[str, dict] = {"before: one-class confusion + agreement, holdout": {alpha: lambda s: before_rule_p(known, s) < alpha}}
    for prior in PRIORS:
        families[f"relabel factor + agreement, holdout, prior {prior}"] = {
            k: (
                lambda k, prior: (
                    lambda s: relabel_evidence(known, s["label"], s["answers"], prior)[1] >= math.log(k) or refused_by_check(known, 0)(s)
                )
            )(k, prior)
            for k in FACTORS
        }
    for n in RECORD_SIZES:
        families[f"relabel factor + agreement, holdout + {n} unseen per class"] = {
            k: refused_by_check(joined(known, first_answers(predictions, n)), k) for k in FACTORS
        }
    families["relabel factor + agreement, every test answer (the limit)"] = {
        k: refused_by_check(first_answers(predictions), k) for k in FACTORS
    }
    families["nearest stored mean"] = {share: refused_by_nearest(share) for share in SHARES}
    record = joined(known, first_answers(predictions, max(RECORD_SIZES)))
    families["nearest stored mean + agreement, holdout + 50 unseen per class"] = {
        share: (lambda share: lambda s: refused_by_check(record, 0)(s) or refused_by_nearest(share)(s))(share) for share in SHARES
    }
    families["nearest stored mean + relabel factor 10 + agreement, holdout + 50 unseen per class"] = {
        share: (lambda share: lambda s: refused_by_check(record, 10)(s) or refused_by_nearest(share)(s))(share) for share in SHARES
    }
    families["softmax log ratio (uncalibrated)"] = {
        t: (lambda t: lambda s: soft_relabel(log_probs, classes, s["label"], s["images"]) >= t)(t) for t in SOFT_THRESHOLDS
    }
    return families


def rates(drawn: list[dict], refused) -> dict[str, float]:
    kinds = dict.fromkeys(s["kind"] for s in drawn)
    return {k: sum(refused(s) for s in drawn if s["kind"] == k) / sum(s["kind"] == k for s in drawn) for k in kinds}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["per_class"] for r in report["runs"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        runs = [r for r in report["runs"] if r["per_class"] == size]
        for family in runs[0]["refused"]:
            thresholds = list(runs[0]["refused"][family])
            mean = lambda t, kind: sum(r["refused"][family][t][kind] for r in runs) / len(runs)  # noqa: E731
            xs = [mean(t, "clean") for t in thresholds]
            ys = [mean(t, "relabelled, look-alike") for t in thresholds]
            ax.plot(xs, ys, marker="o", label=family)
        ax.set_xscale("symlog", linthresh=0.001)
        ax.set_xlabel("clean sets refused")
        ax.set_ylabel("look-alike relabelled sets refused")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{size} training images per class ({size // 10} holdout), {len(runs)} version(s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="warmtune bench label-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[40, 120])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sets", type=int, default=100, help="clean and half-wrong sets per class")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    report: dict = {"args": vars(args), "runs": []}
    path = RESULTS / f"label-check-{args.arch}-{args.image_size}.json"
    for per_class in args.per_class:
        for seed in range(args.repeats):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as home:
                known, predictions, nearest, log_probs = train_version(Path(home), per_class, seed, args.arch, args.image_size)
            drawn = draw_sets(predictions, args.sets, random.Random(seed))
            nearest_of(drawn, nearest)
            families = rule_families(known, predictions, log_probs)
            run = {
                "per_class": per_class,
                "seed": seed,
                "holdout_per_class": dict(Counter(known.true)),
                "holdout_accuracy": known.accuracy(),
                "test_accuracy": first_answers(predictions).accuracy(),
                "sets": Counter(s["kind"] for s in drawn),
                "refused": {name: {t: rates(drawn, rule) for t, rule in rules.items()} for name, rules in families.items()},
                "seconds": time.perf_counter() - start,
            }
            report["runs"].append(run)
            print(f"{per_class} per class, seed {seed}: holdout {run['holdout_accuracy']:.2f}, test {run['test_accuracy']:.2f}")
            for name, by_threshold in run["refused"].items():
                for t, r in by_threshold.items():
                    print(f"  {name:64s} {t:>6g}  " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
    plot(report, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
