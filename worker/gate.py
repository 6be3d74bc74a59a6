"""The promotion gate: what the current version knows is kept, and labels that contradict it are refused.

Two checks, on what the models make of holdout samples (Answers: true and predicted labels):

1. Before training, per update set and label of a class the current version already knows: are
   the version's answers for its images far likelier for images of another known class, and do
   they agree with the label about as often as its recall of the label says? An annotator's slip
   (a set of shirts labelled "T-shirt/top") or a set with half its labels wrong fails one of
   the two; a clean set rarely does. What the version answers for each class is read from the
   old holdout and from its lineage's record of answers on accepted images before training on
   them (prequential: those images were unseen then), which holds many more images than the
   holdout. New classes are not checked: the current version has no output for them.
2. After training: does the candidate still tell the old classes apart on the old holdout? Its
   answer is read among the old classes only, so an old sample it now calls by a new class (the
   expected confusion when a new class resembles an old one) does not count as lost; an old class
   it now confuses with another old class does. A drop must pass both a margin and a paired
   (sign) test against the noise of a small holdout.

Holdout scopes in the metrics: "old" is the holdout of D_{t-1} (at most WARMTUNE_GATE_HOLDOUT_PER_CLASS
samples of each class: jobs.holdout_draw), "new" the holdout of U_t, "all" both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Answers:
    """True and predicted labels of labelled samples, in order: what one model made of them."""

    true: tuple[str, ...]
    predicted: tuple[str, ...]

    @classmethod
    def of(cls, logits: torch.Tensor, true: Sequence[str], classes: Sequence[str]) -> Answers:
        """Read logits as labels, among the first len(classes) outputs only."""
        if not len(true):
            return cls((), ())
        top = logits[:, : len(classes)].argmax(dim=1).tolist()
        return cls(tuple(true), tuple(classes[i] for i in top))

    def __len__(self) -> int:
        return len(self.true)

    @property
    def hits(self) -> list[bool]:
        return [t == p for t, p in zip(self.true, self.predicted, strict=True)]

    def accuracy(self) -> float | None:
        return sum(self.hits) / len(self) if len(self) else None

    def recall(self, label: str) -> tuple[int, int]:
        """Samples of this label predicted as it, and samples of this label."""
        hits = [h for t, h in zip(self.true, self.hits, strict=True) if t == label]
        return sum(hits), len(hits)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    check: str = ""  # which test refused: "relabel", "agreement", ...
    nearest: dict[str, dict[str, int]] | None = None  # the nearest-mean counts the verdict read, by label
    label: str = ""  # the label a label check refused


def beta_binomial_cdf(k: int, m: int, hits: int, n: int) -> float:
    """P(at most k successes of m) when the success rate was seen as hits of n before.

    The posterior predictive under a uniform prior: the rate is Beta(hits+1, n-hits+1), so a
    rate seen on a few samples is not trusted beyond what they show.
    """
    a, b = hits + 1, n - hits + 1

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    def log_comb(total: int, i: int) -> float:  # in logs: math.comb overflows a float past 1000 images
        return math.lgamma(total + 1) - math.lgamma(i + 1) - math.lgamma(total - i + 1)

    return sum(math.exp(log_comb(m, i) + log_beta(i + a, m - i + b) - log_beta(a, b)) for i in range(k + 1))


def log_predictive(answers: Counter[str], seen: Counter[str], categories: int, prior: float) -> float:
    """log P(a set's answers | the answers seen for images of one class), up to a factor that is
    the same for every class (the multinomial coefficient).

    The Dirichlet-multinomial posterior predictive: the class's answer rates are
    Dirichlet(seen + prior) over `categories` outputs, so a class seen on a few images predicts
    broadly and one seen on many predicts what it saw.
    """
    total = sum(seen.values()) + prior * categories
    log_p = math.lgamma(total) - math.lgamma(total + sum(answers.values()))
    for k, count in answers.items():
        log_p += math.lgamma(seen[k] + prior + count) - math.lgamma(seen[k] + prior)
    return log_p


def relabel_evidence(known: Answers, label: str, answers: Sequence[str], prior: float = 0.5, min_known: int = 0) -> tuple[str, float]:
    """The known class whose recorded answers explain a set labelled `label` best, and the log
    Bayes factor of that class against `label` (how much likelier the set's answers are if its
    images were of that class than if they were of `label`).

    If the version answers images of `label` as its record says, the expected factor of each
    other class is 1, so a factor >= k comes by chance with probability at most 1/k per class
    (Markov's inequality); how often it does in practice is measured by bench/label_check.py.
    Only classes with at least min_known answers compete with `label`: a class seen once
    predicts broadly and says little about any set.
    """
    profiles: dict[str, Counter[str]] = {}
    for t, p in zip(known.true, known.predicted, strict=True):
        profiles.setdefault(t, Counter())[p] += 1
    rivals = [c for c, seen in profiles.items() if c != label and sum(seen.values()) >= min_known]
    if label not in profiles or not rivals:
        return label, 0.0
    categories = len(set(known.true) | set(known.predicted) | set(answers))
    counts = Counter(answers)
    log_p = {c: log_predictive(counts, seen, categories, prior) for c, seen in profiles.items()}
    other = max(rivals, key=log_p.__getitem__)
    return other, log_p[other] - log_p[label]


# The relabel test needs this many images of a label in the set. One image answered as another
# class is by itself 10 to 100 times likelier for that class (the stream benchmark's mixed sets
# of known classes, 1 or 2 images per label, were refused that way 3 times in 57 sets); a slip
# that mislabels a few images is left to the agreement test and the check after training.
RELABEL_MIN_IMAGES = 5
# ... and this many known answers for the label and for any class it is compared with. A class
# learned from one set has a holdout image
# or two and no record yet (the version had no output for it then), so any sharply known class
# whose answers the set resembles "explains" it better; at 64 px AlexNet's second to fourth sets
# of Dress were all refused that way in the stream benchmark, and Dress was never learned.
RELABEL_MIN_KNOWN = 10


# The nearest-mean test reads only classes with at least this many stored images in the memory's
# draw: a class learned from one set of 10 (9 training images, one short fine-tune) has a mean the
# features do not yet set apart, and in the stream benchmark (ResNet-18, 32 px) the second and
# third clean sets of Pullover and Coat lay nearer other classes' means than their own.
NEAREST_MIN_REFERENCE = 20
# A set the nearest-mean test refused, when reconsidered by itself, must have at least this share
# of each judged label's images nearest its own mean (or at least as many there as nearest any
# other class). Without it a refused set gets up to WARMTUNE_RETRY_AUTO_MAX more draws of the
# stored images and more versions' features, and in both AlexNet poisoned stream runs a refused
# look-alike set (1 of 10 images nearest its label) passed on one of them.
NEAREST_RECONSIDERED_SHARE = 0.5


def class_means(features: torch.Tensor, labels: Sequence[str], least: int) -> dict[str, torch.Tensor]:
    """The mean of each class's (L2-normalised) features, normalised, for classes with at least `least` samples."""
    means = {}
    for label in dict.fromkeys(labels):
        rows = [i for i, other in enumerate(labels) if other == label]
        if len(rows) >= least:
            means[label] = torch.nn.functional.normalize(features[rows].mean(dim=0), dim=0)
    return means


def nearest_means(features: torch.Tensor, labels: Sequence[str], means: dict[str, torch.Tensor]) -> Answers:
    """For each sample labelled as a class with a mean, its label beside the class whose mean its
    features lie nearest (cosine)."""
    rows = [i for i, label in enumerate(labels) if label in means]
    if not rows:
        return Answers((), ())
    names = list(means)
    nearest = (features[rows] @ torch.stack([means[c] for c in names]).T).argmax(dim=1).tolist()
    return Answers(tuple(labels[i] for i in rows), tuple(names[i] for i in nearest))


def judged_by_nearest(labels: Sequence[str], classes: Collection[str]) -> bool:
    """Whether a set has a label the nearest-mean test judges: a known class with RELABEL_MIN_IMAGES
    or more images (most sets of a stream do not, and then no stored image needs a forward pass)."""
    return any(count >= RELABEL_MIN_IMAGES for label, count in Counter(labels).items() if label in classes)


def nearest_counts(nearest: Answers) -> dict[str, dict[str, int]]:
    """For each label with at least RELABEL_MIN_IMAGES images, how many lie nearest each class's mean."""
    counts: dict[str, dict[str, int]] = {}
    for label in dict.fromkeys(nearest.true):
        answers = Counter(p for t, p in zip(nearest.true, nearest.predicted, strict=True) if t == label)
        if sum(answers.values()) >= RELABEL_MIN_IMAGES:
            counts[label] = dict(answers.most_common())
    return counts


def check_nearest(nearest: Answers, share: float) -> Verdict:
    """Refuse a set whose images of a label lie nearer another class's stored images than their own.

    nearest: for each image of the set labelled as a class with a mean (see class_means), the
    class whose mean it lies nearest. A label with at least RELABEL_MIN_IMAGES images fails when
    at most `share` of them lie nearest its own mean and more lie nearest one other class's.
    The nearest mean reads where an image lies among the stored images of each class, not what
    the head answers, so a class the head has not caught up with yet (a new look-alike class, or
    one just weakened) is judged by its own images, and a look-alike pair the head answers alike
    (T-shirt/top and Shirt) can still be told apart. The verdict carries the counts it read.
    """
    counts = nearest_counts(nearest)
    for label, answers in counts.items():
        n, own = sum(answers.values()), answers.get(label, 0)
        rival, count = max(((c, k) for c, k in answers.items() if c != label), key=lambda ck: ck[1], default=(label, 0))
        if own <= share * n and count > own:
            return Verdict(
                False,
                f"labels contradict the current version: of {n} images labelled {label!r}, {own} lie nearest "
                f"the stored images of {label!r} and {count} nearest those of {rival!r} (in the current model's features; "
                f"refused at a share of {share:g} or less)",
                "nearest",
                counts,
                label,
            )
    return Verdict(True, "images lie nearest the stored images of their labels", nearest=counts)


def check_labels(known: Answers, incoming: Answers, alpha: float, factor: float) -> Verdict:
    """Refuse a set whose labels of known classes contradict the current version beyond chance.

    known: what the lineage answers for images of each known class: the current version's
    answers on the old holdout, and its ancestors' recorded answers on accepted images before
    training on them (older versions, so the record lags behind what the current one knows).
    incoming: the current version's answers on the set's images, with the set's labels as true labels.
    For each label of a known class, two tests of the images given that label:

    - relabel: another known class explains the answers at least `factor` times better than the
      label does (a Bayes factor; a known class labelled as another, the usual slip), for labels
      with at least RELABEL_MIN_IMAGES images in the set, among classes with at least
      RELABEL_MIN_KNOWN known answers;
    - agreement: the answers agree with the label less often than the version's recall of it
      explains, one-sided at alpha (beta-binomial: the record's size sets how far it is trusted;
      many wrong labels).

    Only classes that `known` has answers for are checked: new classes (the current version has
    no output for them) and known classes with no record pass. alpha and factor 0 switch a test off.
    """
    classes = set(known.true)
    checked = [(t, p) for t, p in zip(incoming.true, incoming.predicted, strict=True) if t in classes]
    if not checked or (alpha <= 0 and factor <= 0):
        return Verdict(True, "no labels of known classes to check")
    for label in dict.fromkeys(t for t, _ in checked):
        answers = [p for t, p in checked if t == label]
        seen = Counter(answers)
        judged = factor > 0 and len(answers) >= RELABEL_MIN_IMAGES and known.true.count(label) >= RELABEL_MIN_KNOWN
        other, log_factor = relabel_evidence(known, label, answers, min_known=RELABEL_MIN_KNOWN) if judged else (label, 0.0)
        if judged and log_factor >= math.log(factor):
            return Verdict(
                False,
                f"labels contradict the current version: it answers "
                f"{', '.join(f'{answer} {count}' for answer, count in seen.most_common())} for {len(answers)} images "
                f"labelled {label!r}: {math.exp(min(log_factor, 700)):.3g} times likelier for images of {other!r} than of {label!r} "
                f"(judged by its answers on {known.true.count(other)} and {known.true.count(label)} known images of "
                f"each; refused from {factor:g})",
                "relabel",
                label=label,
            )
        hits, n = known.recall(label)
        agree = seen[label]
        p_value = beta_binomial_cdf(agree, len(answers), hits, n)
        if alpha > 0 and p_value < alpha:
            return Verdict(
                False,
                f"labels contradict the current version: {agree} of {len(answers)} images labelled {label!r} agree "
                f"with it, while it recognises {label!r} on {hits} of {n} known images (p = {p_value:.1e} < {alpha})",
                "agreement",
                label=label,
            )
    agree = sum(t == p for t, p in checked)
    return Verdict(True, f"labels agree with the current version on {agree} of {len(checked)} known-class samples")


def net_losses(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """Samples the candidate got wrong that the current version got right, and the reverse."""
    lost = sum(b and not a for b, a in zip(before, after, strict=True))
    won = sum(a and not b for b, a in zip(before, after, strict=True))
    return lost, won


def worst_classes(before: Answers, after: Answers, count: int = 2) -> str:
    """The old classes whose holdout recall fell most, as 'Shirt 0.90 -> 0.40'."""
    drops = []
    for label in dict.fromkeys(before.true):
        (hb, n), (ha, _) = before.recall(label), after.recall(label)
        if ha < hb:
            drops.append(((hb - ha) / n, f"{label} {hb / n:.2f} -> {ha / n:.2f}"))
    return ", ".join(text for _, text in sorted(drops, reverse=True)[:count]) or "none in particular"


def sign_test_p(lost: int, won: int) -> float:
    """One-sided exact sign (McNemar) test: the chance of losing at least `lost` of the lost + won
    samples that changed, if the candidate were no worse (each change a fair coin)."""
    n = lost + won
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


def check_old_knowledge(before: Answers, after: Answers, max_drop: float, alpha: float) -> Verdict:
    """Refuse a candidate that tells the old classes apart worse than the current version.

    after is read among the old classes only. With alpha > 0 the drop must also stand out from
    the noise of a small holdout: an exact one-sided sign test on the samples lost and won must
    give p <= alpha. (Its normal approximation, used before, called 3 lost and 0 won
    significant at 0.05; exactly, p is 0.125.)
    """
    acc_before, acc_after = before.accuracy(), after.accuracy()
    if acc_before is None or acc_after is None:
        return Verdict(True, "no earlier holdout to compare with")
    drop = acc_before - acc_after
    summary = f"old classes told apart on the old holdout: {acc_before:.3f} -> {acc_after:.3f}"
    if drop <= max_drop:
        return Verdict(True, summary)
    lost, won = net_losses(before.hits, after.hits)
    p = sign_test_p(lost, won)
    if alpha > 0 and p > alpha:
        return Verdict(True, f"{summary}, within the holdout's noise ({lost} lost, {won} won of {len(after)}; p = {p:.3f})")
    return Verdict(
        False,
        f"the candidate would forget old classes: {summary} ({drop:.3f} > the allowed {max_drop:.3f}; "
        f"{lost} lost, {won} won of {len(after)}, p = {p:.3g}); fell most: {worst_classes(before, after)}",
        "old knowledge",
    )


def check_training(loss: float) -> Verdict:
    if not math.isfinite(loss):
        return Verdict(False, f"training diverged (loss {loss})", "training")
    return Verdict(True, "training converged")
