"""`warmtune experiment`: the studies of Käding et al. (ACCV 2016 workshops) on Fashion-MNIST,
run through the service's own update engine.

Per repetition: a random split of the ten classes into five initial and five new ones. The
initial classes are learned first (version 1, from the base weights); then each new class
arrives, one after the other, in update sets of |U_t| = 10 images, each set one call of
apply_pending_updates(), the function the service's workers run. After every step the served
version is scored on official test images of the classes introduced so far. Every setting of
a repetition starts from a copy of the same initial version and sees the same update sets.

Studies: iterations per update, the old/new ratio λ, label noise, BatchNorm trained or frozen,
the promotion gate on a stream with poisoned sets at known positions, and its corroboration of
the sets refused on one label, on the same stream (both beyond the paper), the
head initialisation of new classes (beyond the paper), and the baselines: replay of everything
seen so far (near-uniform, one epoch per step) and λ = 0 (lower bound).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from app.datasets import LabelledImages
from app.errors import InvalidParameter
from app.model import model_from_state, select_device
from app.samples import Sample
from app.settings import Settings
from app.stores import Stores
from worker.jobs import apply_pending_updates
from worker.trainer import Accuracy, SampleTensors, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One way of running the update stream."""

    name: str
    # The method's settings default to the service's (Settings holds every default).
    iterations: str = Settings.model_fields["iterations"].default
    replay_lambda: float = Settings.model_fields["replay_lambda"].default
    noise: float = 0.0
    gate: bool = False
    # With the gate on. The gate studies in experiments/results.csv ran at 0.2, the service's default
    # until WARMTUNE_GATE_RELABEL_SHARE moved to 0.4 (the stream benchmark's poisoned sets); pinned so
    # that their rows stay the runs of these settings.
    nearest_share: float = 0.2
    poisoned: bool = False  # the stream with POISON's sets among the clean ones
    head_init: str = Settings.model_fields["head_init"].default
    batchnorm: str = Settings.model_fields["finetune_batchnorm"].default
    joint: bool = False
    # The service's whole loop: a rejected set reconsidered by itself after more images of its
    # classes are applied, and a training on the whole memory when the short fine-tune falls short.
    # Otherwise one short fine-tune and one decision per set, as in the paper.
    service_loop: bool = False
    corroborate: int = Settings.model_fields["gate_corroborate"].default  # in the service's loop

    @property
    def run_key(self) -> tuple:
        """Settings with the same key are the same run, computed once and reported in every study."""
        return (
            self.iterations,
            self.replay_lambda,
            self.noise,
            self.gate,
            self.nearest_share if self.gate else None,
            self.poisoned,
            self.head_init,
            self.batchnorm,
            self.joint,
            self.service_loop,
            self.corroborate if self.service_loop else None,
        )


DEFAULT = Setting("the service's defaults")
LOOP_BEFORE_CORROBORATION = Setting(
    "gate on, reconsidered and consolidating, no corroboration", gate=True, poisoned=True, service_loop=True, corroborate=0
)


STUDIES: dict[str, list[Setting]] = {
    "iterations": [
        Setting("1 epoch", iterations="epochs:1"),
        Setting("1/2 epoch", iterations="epochs:0.5"),
        Setting("1/4 epoch", iterations="epochs:0.25"),
        Setting("1/10 epoch", iterations="epochs:0.1"),
        Setting("update-size iterations (9: |U_t| after the holdout)"),
    ],
    "lambda": [Setting(f"λ = {lam:g}", replay_lambda=lam) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)],
    "noise": [Setting(f"{noise:.0%} noise", noise=noise) for noise in (0.0, 0.1, 0.2, 0.3)],
    # Does the service's gate refuse poisoned sets (ground truth known) and let clean ones through?
    "gate": [
        Setting("gate on, one decision per set", gate=True, poisoned=True),
        Setting("gate off", poisoned=True),
        Setting("gate on, nearest-mean share 0.4", gate=True, nearest_share=0.4, poisoned=True),
        LOOP_BEFORE_CORROBORATION,
    ],
    # Does applying together the sets that stand refused on one label (WARMTUNE_GATE_CORROBORATE)
    # end the runs of refused sets of look-alike new classes, and at what cost in poisoned sets?
    "corroboration": [
        LOOP_BEFORE_CORROBORATION,
        Setting("gate on, the service's loop (reconsidered, consolidating, corroborated)", gate=True, poisoned=True, service_loop=True),
    ],
    "head": [Setting("new rows: mean of old"), Setting("new rows: random init", head_init="random")],
    "baselines": [
        Setting("joint training (upper bound)", iterations="epochs:1", joint=True),
        Setting("λ = 0.75, update-size iterations (default)"),
        Setting("λ = 0, naive fine-tuning (lower bound)", replay_lambda=0.0),
    ],
    # Does BatchNorm refitted to the fine-tune's batches (one class only at λ = 0) cost the old
    # classes, apart from what training the weights on those batches costs?
    "batchnorm": [Setting("λ = 0.75, BatchNorm trained (default)"), Setting("λ = 0.75, BatchNorm frozen", batchnorm="frozen")],
    "batchnorm-naive": [
        Setting("λ = 0, BatchNorm trained", replay_lambda=0.0),
        Setting("λ = 0, BatchNorm frozen", replay_lambda=0.0, batchnorm="frozen"),
    ],
    # The paper's network (--arch alexnet) has no BatchNorm: there this pair shows what λ = 0
    # costs through the weights alone. The same runs as two of the baselines, without joint training.
    "replay": [Setting("λ = 0.75 (default)"), Setting("λ = 0, naive fine-tuning", replay_lambda=0.0)],
}


# The poisoned sets of the gate study, spread evenly over the clean stream: each the share of its
# labels that are wrong, images of one known class labelled as another known class (the rest
# are images of the labelled class).
POISON = (1.0, 0.5, 1.0, 0.5, 1.0, 0.5)


@dataclass(frozen=True)
class Protocol:
    arch: str = "resnet18"
    image_size: int = 32
    repeats: int = 5
    initial_classes: int = 5
    new_classes: int = 5
    initial_per_class: int = 200
    initial_epochs: int = 60
    set_size: int = 10
    sets_per_class: int = 10
    eval_per_class: int = 100
    seed: int = 0
    device: str = "cpu"


QUICK = {"repeats": 1, "initial_per_class": 100, "initial_epochs": 30, "sets_per_class": 4, "eval_per_class": 50}


@dataclass
class Row:
    study: str
    setting: str
    repeat: int
    step: int
    new_class: str
    known_classes: int
    accuracy: float
    initial_accuracy: float  # on the initial classes only: the same classes at every step
    new_accuracy: float | None  # on the new classes introduced so far (none at step 0)
    version: int
    status: str
    iterations: int
    train_seconds: float
    wrong: float = 0.0  # the share of the set's labels that are wrong (label noise or poison)
    refused_by: str = ""  # the gate check that refused the set at its step (see worker/gate.py)
    final_status: str = ""  # the set's status after the last step (it differs from status once reconsidered)
    # A digest of the initial version's weights. Runs are paired only when they share it: the same
    # seed trains a slightly different initial version on another machine (step 0 scored 0.688 on
    # one and 0.692 on another, repetition 0), so a run read back from the CSV must match it.
    initial_model: str = ""


@dataclass(frozen=True)
class Stream:
    """What one repetition feeds every setting: the split, the update sets and the test images."""

    initial: list[str]
    new: list[str]
    initial_images: list[tuple[bytes, str]]
    update_sets: list[tuple[str, list[bytes]]]  # (class, images), in arrival order
    noise_pool: dict[str, list[bytes]]  # per class, images of the other classes to corrupt its sets with
    test: dict[str, SampleTensors]  # per class, the test images, decoded once
    poisoned_sets: dict[int, list[tuple[str, list[bytes], float]]]  # after clean step n: (label, images, wrong share)


def engine_settings(home: Path, protocol: Protocol, repeat: int, setting: Setting) -> Settings:
    # Without the gate: a drop of 1.0 can never be exceeded, and the label tests are off (the paper has no gate).
    no_gate = (
        {"gate_relabel_share": setting.nearest_share}
        if setting.gate
        else {"gate_max_old_drop": 1.0, "gate_label_alpha": 0.0, "gate_relabel_factor": 0.0, "gate_relabel_share": 0.0}
    )
    # One short fine-tune and one decision per set, as in the paper, unless the setting runs the service's loop.
    paper_step = (
        {"gate_corroborate": setting.corroborate}
        if setting.service_loop
        else {"retry_auto_max": 0, "consolidate_growth": 0, "gate_corroborate": 0}
    )
    return Settings(
        home=home,
        arch=protocol.arch,
        image_size=protocol.image_size,
        device=protocol.device,
        seed=protocol.seed + repeat,
        iterations=setting.iterations,
        replay_lambda=setting.replay_lambda,
        head_init=setting.head_init,  # type: ignore[arg-type]
        finetune_batchnorm=setting.batchnorm,  # type: ignore[arg-type]
        bootstrap_max_epochs=protocol.initial_epochs,
        log_every=10**9,
        **no_gate,
        **paper_step,
    )


def make_stream(train: LabelledImages, test: LabelledImages, protocol: Protocol, repeat: int) -> Stream:
    rng = random.Random(protocol.seed * 1000 + repeat)
    classes = rng.sample(train.classes, protocol.initial_classes + protocol.new_classes)
    initial, new = classes[: protocol.initial_classes], classes[protocol.initial_classes :]
    initial_images = [(image, c) for c in initial for image in train.take(c, protocol.initial_per_class, rng)]
    per_class = protocol.set_size * protocol.sets_per_class
    update_sets = []
    for c in new:
        images = train.take(c, per_class, rng)
        update_sets += [(c, images[i : i + protocol.set_size]) for i in range(0, len(images), protocol.set_size)]
    noise_size = max(1, round(0.3 * protocol.set_size)) * protocol.sets_per_class
    noise_pool = {c: [train.take(rng.choice([o for o in classes if o != c]), 1, rng)[0] for _ in range(noise_size)] for c in new}
    test_images = {c: test.take(c, protocol.eval_per_class, rng) for c in classes}
    test_samples = {
        c: SampleTensors([Sample("test", i, c, data) for i, data in enumerate(images)], {}, protocol.image_size).decoded()
        for c, images in test_images.items()
    }
    poisoned = poisoned_sets(train, initial, update_sets, {i for i, _ in initial_images}, protocol, repeat)
    return Stream(initial, new, initial_images, update_sets, noise_pool, test_samples, poisoned)


def poisoned_sets(
    train: LabelledImages,
    initial: list[str],
    update_sets: list[tuple[str, list[bytes]]],
    used: set[bytes],
    protocol: Protocol,
    repeat: int,
) -> dict[int, list[tuple[str, list[bytes], float]]]:
    """POISON's sets at evenly spread positions: images of a known class labelled as another
    known class, both drawn at random. Their own generator, so the clean stream is the same as
    in every other study; images the stream already holds are not drawn."""
    rng = random.Random(f"poison-{protocol.seed}-{repeat}")
    used = used | {image for _, images in update_sets for image in images}
    out: dict[int, list[tuple[str, list[bytes], float]]] = defaultdict(list)
    for i, wrong in enumerate(POISON):
        after = max(1, round((i + 1) * len(update_sets) / (len(POISON) + 1)))
        known = list(dict.fromkeys(initial + [c for c, _ in update_sets[:after]]))
        true, label = rng.sample(known, 2)
        k = round(wrong * protocol.set_size)
        fresh = [[x for x in train.take(c, 3 * protocol.set_size, rng) if x not in used] for c in (true, label)]
        images = fresh[0][:k] + fresh[1][: protocol.set_size - k]
        if len(images) < protocol.set_size:
            raise InvalidParameter(f"too few images of {true!r} and {label!r} left for a poisoned set of {protocol.set_size}")
        used |= set(images)
        out[after].append((label, images, wrong))
    return dict(out)


def arrivals(stream: Stream, setting: Setting) -> list[tuple[str, list[bytes], float]]:
    """The update sets a setting sees, in order: (label, images, share of wrong labels)."""
    out = []
    for step, (label, images) in enumerate(stream.update_sets, start=1):
        nth_set = sum(c == label for c, _ in stream.update_sets[: step - 1])
        out.append((label, *corrupt(images, setting.noise, stream.noise_pool[label], nth_set)))
        if setting.poisoned:
            out += stream.poisoned_sets.get(step, [])
    return out


def corrupt(images: list[bytes], noise: float, pool: list[bytes], nth_set: int) -> tuple[list[bytes], float]:
    """The paper's label noise: a share of the set replaced by images of other classes, labels kept;
    with the share of wrong labels it makes (rounded to whole images).

    The nth set of a class takes the pool's images from n*k on, so that no two sets share one
    (the pool holds 30 % of all sets of the class); before, the offset step*len(set) modulo the
    pool reused 3, 6 or 9 distinct images per class at 10, 20 and 30 %."""
    k = round(noise * len(images))
    return [pool[(nth_set * k + i) % len(pool)] for i in range(k)] + images[k:], k / len(images)


def test_accuracy(stores: Stores, classes: list[str], test: dict[str, SampleTensors], device: torch.device) -> Accuracy:
    """The current version on test images of the given classes (one it lacks counts wrong), per class."""
    meta = stores.snapshots.meta(stores.snapshots.current())
    model = model_from_state(meta.arch, stores.snapshots.weights(meta.version))
    return evaluate(model, SampleTensors.join([test[c] for c in classes], {c: i for i, c in enumerate(meta.classes)}), device)


def initial_version(stream: Stream, protocol: Protocol, repeat: int, home: Path) -> tuple[float, int, str]:
    """Learn the initial classes from the base weights: version 1, shared by every setting. Its
    test accuracy, the epochs it trained (until its holdout loss stopped falling, or the budget) and
    a digest of its weights."""
    settings = engine_settings(home, protocol, repeat, Setting("initial"))
    stores = Stores(settings)
    stores.samples.add([i for i, _ in stream.initial_images], [c for _, c in stream.initial_images])
    [result] = apply_pending_updates(settings)
    assert result.status == "applied", result
    accuracy = test_accuracy(stores, stream.initial, stream.test, select_device(protocol.device)).score() or 0.0
    return accuracy, result.metrics["epochs"], weights_digest(stores.snapshots.weights(stores.snapshots.current()))


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_setting(
    stream: Stream, protocol: Protocol, repeat: int, setting: Setting, home: Path, start_accuracy: float, bar: tqdm
) -> list[Row]:
    """Feed the repetition's update sets one at a time, each one call of apply_pending_updates; one
    row per arriving set (step 0: the initial version). In the service's loop a call may also apply
    sets rejected before: a row's iterations and seconds are all its call spent."""
    device = select_device(protocol.device)
    stores = Stores(engine_settings(home, protocol, repeat, setting))
    rows = [Row("", setting.name, repeat, 0, "", len(stream.initial), start_accuracy, start_accuracy, None, 1, "initial", 0, 0.0)]
    known = list(stream.initial)
    seen = {"old": len(stream.initial_images), "new": 0}
    update_ids = []
    for step, (label, images, wrong) in enumerate(arrivals(stream, setting), start=1):
        if label not in known:
            known.append(label)
        current = stores.snapshots.meta(stores.snapshots.current())
        update, _ = stores.samples.add(images, [label] * len(images), known_classes=current.classes)
        update_ids.append(update.update_id)
        settings = engine_settings(home, protocol, repeat, setting)
        if setting.joint:  # uniform over everything seen so far: old data in proportion to its size
            settings = settings.model_copy(update={"replay_lambda": seen["old"] / (seen["old"] + len(images))})
        results = apply_pending_updates(settings)
        result = [r for r in results if update.update_id in r.update_ids][-1]  # its last decision in this call
        seen["old"] += len(images) if result.status == "applied" else 0
        scores = test_accuracy(stores, known, stream.test, device)
        accuracy, initial_accuracy = scores.score() or 0.0, scores.score(stream.initial) or 0.0
        new_accuracy = scores.score([c for c in known if c not in stream.initial]) or 0.0
        rows.append(
            Row(
                "",
                setting.name,
                repeat,
                step,
                label,
                len(known),
                accuracy,
                initial_accuracy,
                new_accuracy,
                stores.snapshots.current(),
                result.status,
                sum(r.metrics.get("iterations", 0) for r in results),
                sum(r.metrics.get("train_seconds", 0.0) for r in results),
                wrong,
                result.metrics.get("refused_by", ""),
            )
        )
        bar.update(1)
    settled = stores.settled()
    return rows[:1] + [replace(row, final_status=settled[u][0]) for row, u in zip(rows[1:], update_ids, strict=True)]


def run_experiment(train: LabelledImages, test: LabelledImages, protocol: Protocol, studies: list[str], out: Path) -> list[Row]:
    """Run every setting of the studies for every repetition, write CSV, plots and table to out."""
    for logger in ("worker", "app", "matplotlib"):  # the progress bar and the per-run lines say enough
        logging.getLogger(logger).setLevel(logging.ERROR)
    runs: dict[tuple, Setting] = {}
    for study in studies:
        for setting in STUDIES[study]:
            runs.setdefault(setting.run_key, setting)
    steps = protocol.new_classes * protocol.sets_per_class
    poisoned_steps = len(POISON) * sum(s.poisoned for s in runs.values())
    earlier, minutes = earlier_results(out, protocol)
    done = runs_done(earlier)
    started, spent_before = time.time(), minutes.get(",".join(studies), 0.0)
    by_key: dict[tuple, list[Row]] = defaultdict(list)
    with (
        tempfile.TemporaryDirectory(prefix="warmtune-experiment-") as scratch,
        tqdm(total=protocol.repeats * (len(runs) * steps + poisoned_steps), unit="step") as bar,
    ):
        for repeat in range(protocol.repeats):
            # Trained even when every setting is in the CSV: a run is read back only from this initial version.
            stream = make_stream(train, test, protocol, repeat)
            initial_home = Path(scratch) / f"initial-{repeat}"
            start_accuracy, epochs, digest = initial_version(stream, protocol, repeat, initial_home)
            bar.write(
                f"repeat {repeat}: initial {', '.join(stream.initial)} -> test accuracy {start_accuracy:.3f} after {epochs} "
                f"epochs (budget {protocol.initial_epochs}); new {', '.join(stream.new)}"
            )
            for key, setting in runs.items():
                earlier_run = matching_run(done.get((key, repeat), []), digest, start_accuracy)
                if earlier_run:
                    rows = earlier_run
                    bar.update(len(rows) - 1)
                else:
                    home = Path(scratch) / "run"
                    shutil.copytree(initial_home, home)
                    rows = [
                        replace(r, initial_model=digest) for r in run_setting(stream, protocol, repeat, setting, home, start_accuracy, bar)
                    ]
                    shutil.rmtree(home)
                by_key[key] += rows
                bar.write(f"  {setting.name:45} final {rows[-1].accuracy:.3f}{' (run before, in the CSV)' if earlier_run else ''}")
            # Written after every repetition, so a long run that is cut short still leaves results.
            minutes |= {",".join(studies): round(spent_before + (time.time() - started) / 60, 1)}
            rows = write_results(by_key, studies, protocol, out, earlier, minutes)
    return rows


def runs_done(earlier: list[Row]) -> dict[tuple[tuple, int], list[list[Row]]]:
    """The runs already in the CSV, by run key and repetition: a setting another study ran (the
    defaults, λ = 0, ...) is read back, not run again, if it started from the same initial version
    (see matching_run). One key may hold several runs, written on different machines."""
    settings = {(study, s.name): s for study, listed in STUDIES.items() for s in listed}
    runs: dict[tuple[str, str, int], list[Row]] = defaultdict(list)
    for row in earlier:
        if (row.study, row.setting) in settings:
            runs[row.study, row.setting, row.repeat].append(row)
    done: dict[tuple[tuple, int], list[list[Row]]] = defaultdict(list)
    for (study, setting, repeat), rows in runs.items():
        done[settings[study, setting].run_key, repeat].append(sorted(rows, key=lambda r: r.step))
    return done


def matching_run(runs: list[list[Row]], digest: str, start_accuracy: float) -> list[Row] | None:
    """The run that started from this initial version: the same weights digest, or, for rows
    written before the digest was kept, the same test accuracy at step 0 (a weaker check: two
    versions that differ may score alike)."""
    for rows in runs:
        if rows[0].initial_model == digest or (not rows[0].initial_model and math.isclose(rows[0].accuracy, start_accuracy)):
            return rows
    return None


def write_results(
    by_key: dict[tuple, list[Row]], studies: list[str], protocol: Protocol, out: Path, earlier: list[Row], minutes: dict[str, float]
) -> list[Row]:
    """Write this run's studies beside the earlier ones in out (see earlier_results): CSV, table and plots of all."""
    rows = [
        replace(row, study=study, setting=setting.name)
        for study in studies
        for setting in STUDIES[study]
        for row in by_key[setting.run_key]
    ]
    rows = [r for r in earlier if r.study not in studies] + rows
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "protocol.json").write_text(json.dumps({"protocol": protocol_key(protocol), "minutes": minutes}, indent=1) + "\n")
    in_csv = [s for s in STUDIES if any(r.study == s for r in rows)]
    for study in in_csv:
        plot_study(rows, study, protocol, out / f"{study}.png")
    (out / "results.md").write_text(results_table(rows, in_csv, protocol, minutes))
    return rows


def protocol_key(protocol: Protocol) -> dict:
    """What studies must share to be reported together: everything but the repetitions (each study has its own)."""
    return {k: v for k, v in asdict(protocol).items() if k != "repeats"}


def earlier_results(out: Path, protocol: Protocol) -> tuple[list[Row], dict[str, float]]:
    """The rows and run times already in out, so that studies can be run one at a time into one CSV.

    Rows of the studies being run again are replaced when this run writes; out must hold results of
    the same protocol (or none).
    """
    if not (out / "results.csv").exists():
        return [], {}
    saved = json.loads((out / "protocol.json").read_text()) if (out / "protocol.json").exists() else {}
    if saved.get("protocol") != protocol_key(protocol):
        raise InvalidParameter(
            f"{out} holds results of another protocol ({saved.get('protocol', 'not recorded')}); "
            f"this run's is {protocol_key(protocol)}: choose another --out"
        )
    with open(out / "results.csv", newline="") as f:
        return [row_from_csv(record) for record in csv.DictReader(f)], saved.get("minutes", {})


def row_from_csv(record: dict[str, str]) -> Row:
    kinds = {f.name: f.type for f in fields(Row)}  # annotations as text: from __future__ import annotations
    convert: dict[str, Callable[[str], object]] = {
        "int": int,
        "float": float,
        "str": str,
        "float | None": lambda v: float(v) if v else None,
    }
    return Row(**{name: convert[kinds[name]](value) for name, value in record.items()})


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def curves(rows: list[Row], study: str) -> dict[str, dict[int, list[float]]]:
    """Per setting of a study: accuracy per step, one value per repetition."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.study == study:
            out[r.setting][r.step].append(r.accuracy)
    return out


# Two-sided 95 % quantiles of Student's t by degrees of freedom (past 30, 30's: slightly wide).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T_975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval_95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval over repetitions (0 with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T_975[min(len(values) - 1, len(T_975)) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def plot_study(rows: list[Row], study: str, protocol: Protocol, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for setting, per_step in curves(rows, study).items():
        steps = sorted(per_step)
        mean, half = zip(*(interval_95(per_step[s]) for s in steps), strict=True)
        ax.plot(steps, mean, label=setting)
        ax.fill_between(
            steps, [m - h for m, h in zip(mean, half, strict=True)], [m + h for m, h in zip(mean, half, strict=True)], alpha=0.2
        )
    run = [
        r for r in rows if r.study == study and r.setting == settings_in(rows, study)[0].name and r.repeat == repetitions(rows, study)[0]
    ]
    for before, row in itertools.pairwise(run):
        if before.step > 0 and row.known_classes > before.known_classes:  # a new class arrives
            ax.axvline(row.step - 0.5, color="grey", lw=0.5, ls=":")
        if poisoned_stream(study) and row.wrong > 0:
            ax.axvline(row.step, color="red", lw=0.5, alpha=0.5)
    poisoned = "; red: poisoned sets" if poisoned_stream(study) else ""
    ax.set_xlabel(f"update step (|U_t| = {protocol.set_size}; dotted: a new class arrives{poisoned})")
    ax.set_ylabel("test accuracy on the classes known so far")
    repeats = len(repetitions(rows, study))
    ax.set_title(f"{study}: {protocol.arch} at {protocol.image_size}px, mean and 95 % interval over {repeats} repetition(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_std(values: list[float]) -> str:
    """Mean ± sample standard deviation over repetitions (no ± with one repetition)."""
    if len(values) < 2:
        return f"{statistics.fmean(values):.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_difference(values: list[float], reference: list[float]) -> str:
    """Mean difference from the reference setting, paired by repetition (same seed, same sets), with its 95 % t-interval."""
    mean, half = interval_95([v - r for v, r in zip(values, reference, strict=True)])
    if round(half, 3):  # a spread too small to print is none
        return f"{mean:+.3f} ({mean - half:+.3f} to {mean + half:+.3f})"
    return f"{mean:+.3f}" + (" (the same in every repetition)" if len(values) > 1 else "")


def reference_setting(study: str) -> Setting:
    """What a study's settings are compared with: the service's defaults where the study runs them, else its first setting."""
    return next((s for s in STUDIES[study] if s.run_key == DEFAULT.run_key), STUDIES[study][0])


def largest_served_drop(run: list[Row]) -> float:
    """Largest fall of test accuracy on the initial classes (a fixed class set) from one step to
    the next, over all steps: a rejected step serves the same version, so it counts as no drop
    rather than being skipped; before, steps were compared on the classes known so far and only
    where the version changed, which left out exactly the rejected steps."""
    drops = [a.initial_accuracy - b.initial_accuracy for a, b in itertools.pairwise(run)]
    return max(drops, default=0.0)


# What the table reports of each run (one per repetition), by column.
MEASURES: dict[str, Callable[[list[Row]], float]] = {
    "final accuracy": lambda run: run[-1].accuracy,
    "mean accuracy": lambda run: statistics.fmean(r.accuracy for r in run[1:]),
    "initial classes at the end": lambda run: run[-1].initial_accuracy,
    "new classes at the end": lambda run: run[-1].new_accuracy or 0.0,
    "iterations per step": lambda run: statistics.fmean(r.iterations for r in run[1:]),
}
GATE_MEASURES: dict[str, Callable[[list[Row]], float]] = {
    "largest drop between served versions": largest_served_drop,
    "clean sets rejected at the end": lambda run: rejected(run, 0.0),
    **{f"{w:.0%}-wrong sets rejected at the end (of {POISON.count(w)})": lambda run, w=w: rejected(run, w) for w in sorted(set(POISON))},
}


def rejected(run: list[Row], wrong: float) -> int:
    """How many of the run's sets with this share of wrong labels ended rejected (rows written
    before final_status was kept had one decision per set: their status)."""
    return sum((r.final_status or r.status) == "rejected" and r.wrong == wrong for r in run)


def poisoned_stream(study: str) -> bool:
    """Whether the study's stream holds POISON's sets (the gate studies): their measures and marks."""
    return any(s.poisoned for s in STUDIES[study])


def repetitions(rows: list[Row], study: str) -> list[int]:
    return sorted({r.repeat for r in rows if r.study == study})


def settings_in(rows: list[Row], study: str) -> list[Setting]:
    """The study's settings that have rows (a setting added to a study since is not run yet)."""
    names = {r.setting for r in rows if r.study == study}
    return [s for s in STUDIES[study] if s.name in names]


def results_table(rows: list[Row], studies: list[str], protocol: Protocol, minutes: dict[str, float]) -> str:
    lines = [
        "# Results",
        "",
        f"{protocol.arch} at {protocol.image_size} px, seed {protocol.seed}; "
        f"{protocol.initial_classes} initial classes ({protocol.initial_per_class} images each, "
        f"up to {protocol.initial_epochs} epochs), then {protocol.new_classes} new classes in "
        f"{protocol.sets_per_class} update sets of {protocol.set_size}; accuracy on {protocol.eval_per_class} test "
        f"images per known class. Minutes of computing, summed over the runs of each command: "
        f"{', '.join(f'{k} {v:g}' for k, v in minutes.items())}.",
        "",
        "Final and at the end: after the last step. Mean: over all update steps, the initial model excluded. Each as mean ± "
        "sample SD over repetitions. Below it, for each setting but the study's reference: the difference from the "
        "reference, paired by repetition (same update sets, and the same initial version: the same digest of its weights, or "
        "for rows written before the digest was kept, the same accuracy at step 0), mean and 95 % t-interval. Largest drop: of "
        "accuracy on the initial classes from one step to the next, over all steps. The gate study's stream holds "
        f"{len(POISON)} poisoned sets among the clean ones (images of a known class labelled as another known class, all "
        "or half of them), at the same positions in every setting, and so does the corroboration study's; a rejected set is "
        "reconsidered only in the service's loop settings (elsewhere one decision per set).",
    ]
    for study in studies:
        reference = reference_setting(study)
        measures = MEASURES | (GATE_MEASURES if poisoned_stream(study) else {})
        repeats = repetitions(rows, study)
        lines += ["", f"## {study}", "", f"{len(repeats)} repetition(s). Reference: {reference.name}.", ""]
        lines += ["| setting | " + " | ".join(measures) + " |", "|" + " --- |" * (len(measures) + 1)]
        present = settings_in(rows, study)
        by_setting = {
            s.name: [[r for r in rows if r.study == study and r.setting == s.name and r.repeat == k] for k in repeats] for s in present
        }
        for setting in present:
            values = {name: [measure(run) for run in by_setting[setting.name]] for name, measure in measures.items()}
            lines.append(f"| {setting.name} | " + " | ".join(mean_std(v) for v in values.values()) + " |")
            if setting.name != reference.name and reference.name in by_setting:
                ref = {name: [measure(run) for run in by_setting[reference.name]] for name, measure in measures.items()}
                diffs = [paired_difference(values[name], ref[name]) for name in measures]
                lines.append("| paired difference | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"
