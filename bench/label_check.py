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
test images by the second. Rates are over all sets of a kind; the rules' thresholds are swept.

    python -m bench.label_check --per-class 40 120 --repeats 2
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
from app.ledger import Ledger
from app.model import model_from_state
from app.samples import Sample
from app.settings import Settings
from worker.gate import Outcomes, beta_binomial_cdf, relabel_evidence
from worker.jobs import apply_pending_updates, replay_memory
from worker.trainer import SampleTensors, predict_logits

RESULTS = Path(__file__).parent / "results"
SET_SIZE = 10


def train_version(
    home: Path, per_class: int, seed: int, arch: str, image_size: int
) -> tuple[Outcomes, dict[str, list[str]], dict[str, torch.Tensor]]:
    """A first version's outcomes on its holdout, and its predictions and log-probabilities for
    every test image, by true class."""
    settings = Settings(home=home, arch=arch, image_size=image_size, seed=seed)
    ledger = Ledger(settings)
    data = fashion_mnist("train")
    rng = random.Random(seed)
    images, labels = [], []
    for label in data.classes:
        images += data.take(label, per_class, rng)
        labels += [label] * per_class
    ledger.samples.add(images, labels)
    (step,) = apply_pending_updates(settings, ledger=ledger)
    meta = ledger.snapshots.meta(step.version)
    model = model_from_state(meta.arch, ledger.snapshots.weights(step.version))
    index = {c: i for i, c in enumerate(meta.classes)}
    device = torch.device("cpu")
    _, holdout = replay_memory(ledger, meta, index, image_size, settings.gate_holdout_per_class, seed)
    known = Outcomes.of(predict_logits(model, holdout, device), holdout.labels, meta.classes)
    test = fashion_mnist("test")
    predictions, log_probs = {}, {}
    for label in meta.classes:
        samples = [Sample("test", i, label, data=png) for i, png in enumerate(test.by_class[label])]
        logits = predict_logits(model, SampleTensors(samples, index, image_size), device)
        predictions[label] = list(Outcomes.of(logits, [label] * len(samples), meta.classes).predicted)
        log_probs[label] = torch.log_softmax(logits.float(), dim=1)
    return known, predictions, log_probs


def current_rule_p(known: Outcomes, label: str, answers: list[str]) -> float:
    """The smaller p-value of the two beta-binomial tests of check_labels (confusion, agreement)."""
    hits, n = known.recall(label)
    wrong = Counter(p for p in answers if p != label)
    p_values = [beta_binomial_cdf(len(answers) - sum(wrong.values()), len(answers), hits, n)]
    if wrong:
        other, count = wrong.most_common(1)[0]
        mistaken = sum(t == label and p == other for t, p in zip(known.true, known.predicted, strict=True))
        p_values.append(1 - beta_binomial_cdf(count - 1, len(answers), mistaken, n))
    return min(p_values)


def agreement_p(known: Outcomes, label: str, answers: list[str]) -> float:
    hits, n = known.recall(label)
    return beta_binomial_cdf(sum(a == label for a in answers), len(answers), hits, n)


def draw_sets(predictions: dict[str, list[str]], sets_per_kind: int, rng: random.Random) -> list[dict]:
    """Sets as (true class, test image index) pairs with the label they are posted under."""
    classes = list(predictions)

    def some(label: str, count: int) -> list[tuple[str, int]]:
        return [(label, i) for i in rng.sample(range(len(predictions[label])), count)]

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
    return drawn


PRIORS = (0.1, 0.5, 1.0)
RECORD_SIZES = (20, 50)
FACTORS = (10, 30, 100, 1000)


def oracle(predictions: dict[str, list[str]], per_class: int | None = None) -> Outcomes:
    """The first per_class test predictions of every class (all by default) as if they were the
    holdout: the profiles a larger record of unseen images would show."""
    chosen = {c: ps[:per_class] for c, ps in predictions.items()}
    return Outcomes(tuple(c for c, ps in chosen.items() for _ in ps), tuple(p for ps in chosen.values() for p in ps))


def soft_relabel(log_probs: dict[str, torch.Tensor], classes: list[str], label: str, images: list[tuple[str, int]]) -> float:
    """max over other classes y of the sum over images of log p(y) - log p(label), the model's own probabilities."""
    rows = torch.stack([log_probs[c][i] for c, i in images])
    x = classes.index(label)
    gaps = (rows - rows[:, x : x + 1]).sum(dim=0)
    gaps[x] = -math.inf
    return float(gaps.max())


def score_sets(known: Outcomes, drawn: list[dict], predictions: dict[str, list[str]], log_probs: dict[str, torch.Tensor]) -> None:
    big = oracle(predictions)
    record = {n: oracle(predictions, n) for n in RECORD_SIZES}
    classes = list(predictions)
    for s in drawn:
        s["answers"] = [predictions[c][i] for c, i in s["images"]]
        s["log_bf oracle"] = relabel_evidence(big, s["label"], s["answers"], 0.5)[1]
        s["p_agreement oracle"] = agreement_p(big, s["label"], s["answers"])
        for n, seen in record.items():
            s[f"log_bf {n}"] = relabel_evidence(seen, s["label"], s["answers"], 0.5)[1]
            s[f"p_agreement {n}"] = agreement_p(seen, s["label"], s["answers"])
        s["soft"] = soft_relabel(log_probs, classes, s["label"], s["images"])
        s["p_current"] = current_rule_p(known, s["label"], s["answers"])
        s["p_agreement"] = agreement_p(known, s["label"], s["answers"])
        for prior in PRIORS:
            s[f"log_bf {prior}"] = relabel_evidence(known, s["label"], s["answers"], prior)[1]


def rates(drawn: list[dict], refused) -> dict[str, float]:
    kinds = dict.fromkeys(s["kind"] for s in drawn)
    return {k: sum(refused(s) for s in drawn if s["kind"] == k) / sum(s["kind"] == k for s in drawn) for k in kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[40, 120])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sets", type=int, default=200, help="clean and half-wrong sets per class")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rules = {
        "current (alpha 0.01)": lambda s: s["p_current"] < 0.01,
        **{
            f"agreement 0.01 + relabel, prior {a}, factor {k}": (
                lambda a, k: lambda s: s["p_agreement"] < 0.01 or s[f"log_bf {a}"] >= math.log(k)
            )(a, k)
            for a in PRIORS
            for k in FACTORS
        },
        **{
            f"oracle profiles: agreement 0.01 + relabel factor {k}": (
                lambda k: lambda s: s["p_agreement oracle"] < 0.01 or s["log_bf oracle"] >= math.log(k)
            )(k)
            for k in FACTORS
        },
        **{
            f"{n} unseen per class: agreement 0.01 + relabel factor {k}": (
                lambda n, k: lambda s: s[f"p_agreement {n}"] < 0.01 or s[f"log_bf {n}"] >= math.log(k)
            )(n, k)
            for n in RECORD_SIZES
            for k in FACTORS
        },
        **{f"softmax relabel, log ratio {t}": (lambda t: lambda s: s["soft"] >= t)(t) for t in (0, 5, 10, 20, 40)},
    }
    report = {"args": vars(args), "runs": []}
    for per_class in args.per_class:
        for seed in range(args.repeats):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as home:
                known, predictions, log_probs = train_version(Path(home), per_class, seed, args.arch, args.image_size)
            drawn = draw_sets(predictions, args.sets, random.Random(seed))
            score_sets(known, drawn, predictions, log_probs)
            run = {
                "per_class": per_class,
                "seed": seed,
                "holdout_per_class": dict(Counter(known.true)),
                "holdout_accuracy": known.accuracy(),
                "test_accuracy": sum(p == c for c, ps in predictions.items() for p in ps) / sum(map(len, predictions.values())),
                "sets": Counter(s["kind"] for s in drawn),
                "refused": {name: rates(drawn, rule) for name, rule in rules.items()},
                "seconds": time.perf_counter() - start,
            }
            report["runs"].append(run)
            print(f"per class {per_class}, seed {seed}: holdout {run['holdout_accuracy']:.2f}, test {run['test_accuracy']:.2f}")
            for name, r in run["refused"].items():
                print(f"  {name:56s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"label-check-{args.arch}-{args.image_size}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
