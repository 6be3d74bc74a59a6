"""Training and evaluation: read top to bottom, as the method reads.

An update step (fine_tune), warm-started from the current version:

    for each of N iterations:
        draw 64 samples: each from old data D_{t-1} with probability λ, else from the update U_t
        forward, cross-entropy loss, backward, SGD step (momentum 0.9, weight decay 0.0005; lr 0.001 from
        pretrained weights as in the paper, 0.01 in a lineage that started from random weights)

The first version (train_first_version), from the base weights:

    for each epoch, up to a budget:
        SGD over the shuffled samples
        score the holdout; keep the best weights; stop after `patience` epochs without a better score
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.images import image_to_pixels, to_model_input
from app.model import autocast, head_of
from app.samples import Sample
from app.settings import Settings
from worker.sampler import ReplaySampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters of one training run; their defaults live in Settings only."""

    iterations: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    replay_lambda: float
    log_every: int
    batchnorm: str  # "frozen": the short fine-tune keeps BatchNorm's running statistics

    @classmethod
    def from_settings(cls, settings: Settings, base_weights: str, iterations: int) -> TrainConfig:
        """The settings for a lineage that started from these base weights: a short fine-tune of
        this many iterations, or (0) a training on the whole memory, whose epochs decide."""
        return cls(
            iterations=iterations,
            batch_size=settings.batch_size,
            lr=settings.learning_rate(base_weights, short_fine_tune=iterations > 0),
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            replay_lambda=settings.replay_lambda,
            log_every=settings.log_every,
            batchnorm=settings.finetune_batchnorm,
        )


def iterations_for(policy: str, n_new: int, n_total: int, batch_size: int) -> int:
    """SGD iterations of one step: |U_t| (update-size), a fraction of an epoch of D_t, or a constant."""
    if policy == "update-size":
        return max(n_new, 1)
    if policy.startswith("epochs:"):
        return max(math.ceil(float(policy.removeprefix("epochs:")) * n_total / batch_size), 1)
    return int(policy)


class SampleTensors:
    """Labelled samples as model input; each image is decoded and preprocessed once, when first used."""

    def __init__(self, samples: Sequence[Sample], class_index: Mapping[str, int], image_size: int) -> None:
        self.samples = list(samples)
        self.labels = [s.label for s in self.samples]
        self.class_index = class_index
        self.image_size = image_size
        # -1 marks a label the model has no output for (yet): always counted wrong.
        self.targets = torch.tensor([class_index.get(s.label, -1) for s in self.samples], dtype=torch.long)
        self._pixels: dict[int, torch.Tensor] = {}

    @classmethod
    def join(cls, parts: Sequence[SampleTensors], class_index: Mapping[str, int] | None = None) -> SampleTensors:
        """Several parts as one (targets under class_index, else the first part's), keeping what they decoded."""
        first = parts[0]
        index = first.class_index if class_index is None else class_index
        joined = cls([s for p in parts for s in p.samples], index, first.image_size)
        offset = 0
        for part in parts:
            joined._pixels.update({offset + i: pixels for i, pixels in part._pixels.items()})
            offset += len(part)
        return joined

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> SampleTensors:
        """These samples only, keeping what was decoded of them."""
        part = SampleTensors([self.samples[i] for i in indices], self.class_index, self.image_size)
        part._pixels = {j: self._pixels[i] for j, i in enumerate(indices) if i in self._pixels}
        return part

    def reuse(self, decoded: Mapping[tuple[str, int], torch.Tensor]) -> SampleTensors:
        """Take the pixels of samples decoded before (by Sample.key) rather than decode them again."""
        for i, sample in enumerate(self.samples):
            if i not in self._pixels and (pixels := decoded.get(sample.key)) is not None:
                self._pixels[i] = pixels
        return self

    def decoded_by_key(self) -> dict[tuple[str, int], torch.Tensor]:
        """What was decoded so far, by Sample.key (what reuse takes)."""
        return {self.samples[i].key: pixels for i, pixels in self._pixels.items()}

    def decoded(self) -> SampleTensors:
        """Decode every sample now: for samples read many times, under class lists that change (join keeps them)."""
        for i in range(len(self)):
            self.pixels(i)
        return self

    def pixels(self, i: int) -> torch.Tensor:
        if i not in self._pixels:
            # Stored sets were checked on arrival; the limit guards the request path, not this one.
            self._pixels[i] = image_to_pixels(self.samples[i].read(), self.image_size, max_pixels=2**62, name=f"sample {i}")
        return self._pixels[i]

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = list(indices)
        return torch.stack([self.pixels(i) for i in indices]), self.targets[indices]


@dataclass
class TrainStats:
    iterations: int
    loss: float
    seconds: float
    epochs: int | None = None


def replay_batch(old: SampleTensors, new: SampleTensors, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble a batch from indices over old ++ new."""
    n_old = len(old)
    pixels = [old.pixels(i) if i < n_old else new.pixels(i - n_old) for i in indices.tolist()]
    return torch.stack(pixels), torch.cat([old.targets, new.targets])[indices]


def fine_tune(
    model: nn.Module,
    old: SampleTensors,
    new: SampleTensors,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
) -> TrainStats:
    """Run cfg.iterations SGD steps over the λ-replay sampler; the model is trained in place."""
    start = time.perf_counter()
    optimizer = prepare_training(model, cfg, device)
    if cfg.batchnorm == "frozen":
        freeze_batchnorm_statistics(model)
    sampler = ReplaySampler(len(old), len(new), cfg.replay_lambda, generator)
    losses: list[torch.Tensor] = []
    for it in range(1, cfg.iterations + 1):
        losses.append(sgd_step(model, optimizer, *replay_batch(old, new, sampler.draw(cfg.batch_size)), device))
        if it % cfg.log_every == 0 or it == cfg.iterations:
            log.info("iteration %d/%d  loss %.4f  %.1fs", it, cfg.iterations, losses[-1].item(), time.perf_counter() - start)
    final_loss = torch.stack(losses[-10:]).float().mean().item()
    return TrainStats(cfg.iterations, final_loss, time.perf_counter() - start)


def prepare_training(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Normalise with the running statistics the model has and stop updating them.

    A fine-tune batch is mostly the replayed old data but, with λ < 1, its new class is
    over-represented, and with λ = 0 it is one class only: batch statistics of such batches
    drift from what the model will see when it serves every class.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Forward, cross-entropy loss, backward, step; returns the loss."""
    x, y = to_model_input(pixels, device), targets.to(device, non_blocking=True)
    with autocast(device):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def full_batches(order: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The order, wrapped around so that the last batch is full too.

    A last batch of a few samples would refit BatchNorm's running statistics to those few.
    """
    short = -len(order) % batch_size
    return torch.cat([order, order[:short]]) if len(order) > batch_size else order


def train_first_version(
    model: nn.Module,
    train: SampleTensors,
    holdout: SampleTensors,
    cfg: TrainConfig,
    max_epochs: int,
    patience: int,
    device: torch.device,
    generator: torch.Generator,
) -> TrainStats:
    """Epochs over the shuffled samples until the holdout stops improving; the model ends with the best epoch's weights.

    Better means a lower holdout loss. Accuracy on a small holdout moves in steps and by luck (a
    random AlexNet scores 0.67 on 24 samples one epoch and 0.33 the next, before it learns
    anything), while the loss falls steadily through such a plateau. Without a holdout every
    epoch of the budget runs.
    """
    start = time.perf_counter()
    best: float | None = None
    best_state: dict[str, torch.Tensor] = {}
    since_best = iterations = 0
    losses: list[torch.Tensor] = []
    optimizer = prepare_training(model, cfg, device)
    for epoch in range(1, max_epochs + 1):
        model.train()  # evaluate() left it in eval mode
        order = full_batches(torch.randperm(len(train), generator=generator), cfg.batch_size)
        for lo in range(0, len(order), cfg.batch_size):
            losses.append(sgd_step(model, optimizer, *train.batch(order[lo : lo + cfg.batch_size].tolist()), device))
            iterations += 1
        if not len(holdout):
            continue
        scores = evaluate(model, holdout, device)
        log.info("epoch %d  train loss %.4f  holdout accuracy %.3f loss %.4f", epoch, losses[-1].item(), scores.score() or 0.0, scores.loss)
        if best is None or scores.loss < best:
            best, since_best = scores.loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif (since_best := since_best + 1) >= patience:
            break
    if best_state:
        model.load_state_dict(best_state)
    final_loss = torch.stack(losses[-10:]).float().mean().item() if losses else float("nan")
    return TrainStats(iterations, final_loss, time.perf_counter() - start, epochs=epoch)


@dataclass
class Accuracy:
    """Correct and total predictions per true label, and the mean loss."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    hits: list[bool] = field(default_factory=list)  # per sample, in order
    loss: float = float("nan")  # mean cross-entropy over samples of classes the model has

    def score(self, labels: Iterable[str] | None = None) -> float | None:
        """Accuracy over the given labels (all by default); None when there is no sample of them."""
        keys = self.total.keys() if labels is None else set(labels) & self.total.keys()
        total = sum(self.total[k] for k in keys)
        return sum(self.correct[k] for k in keys) / total if total else None

    @property
    def count(self) -> int:
        return sum(self.total.values())


@torch.no_grad()
def predict_logits(model: nn.Module, samples: SampleTensors, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """The model's (N, classes) float32 logits for every sample, on the CPU."""
    # Channels-last on the CPU too, where oneDNN's convolutions answer in it 1.8x as fast for
    # ResNet-18 at 32 px and 1.25x for AlexNet at 64 px, and an SGD step on the model left so
    # costs about the same (bench/memory_format.py): the gate's evaluations are what grows with
    # the history (bench/history.py --at).
    model.to(device, memory_format=torch.channels_last).eval()
    out = []
    for lo in range(0, len(samples), batch_size):
        pixels, _ = samples.batch(range(lo, min(lo + batch_size, len(samples))))
        with autocast(device):
            out.append(model(to_model_input(pixels, device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, head_of(model).out_features)


def predict_features(model: nn.Module, samples: SampleTensors, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for every sample, and what its head reads (the penultimate layer's
    output), L2-normalised: where each sample lies among the others in the model's eyes."""
    head = head_of(model)
    read: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: read.append(inputs[0].float().cpu()))
    try:
        logits = predict_logits(model, samples, device)
    finally:
        hook.remove()
    features = torch.cat(read) if read else torch.empty(0, head.in_features)
    return logits, F.normalize(features, dim=1)


def evaluate(model: nn.Module, samples: SampleTensors, device: torch.device) -> Accuracy:
    """Accuracy of the model on labelled samples, per label, and its mean loss."""
    return accuracy_of(predict_logits(model, samples, device), samples)


def accuracy_of(logits: torch.Tensor, samples: SampleTensors) -> Accuracy:
    hits = (logits.argmax(dim=1) == samples.targets).tolist() if len(samples) else []
    known = (samples.targets >= 0) & (samples.targets < logits.shape[1])
    loss = F.cross_entropy(logits[known], samples.targets[known]).item() if known.any() else float("nan")
    acc = Accuracy(hits=[bool(h) for h in hits], loss=loss)
    for label, hit in zip(samples.labels, hits, strict=True):
        acc.total[label] = acc.total.get(label, 0) + 1
        acc.correct[label] = acc.correct.get(label, 0) + int(hit)
    return acc
