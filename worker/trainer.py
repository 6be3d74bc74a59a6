"""The fine-tune of one update step, and evaluation: read top to bottom, as the method reads.

    for each of N iterations:
        draw 64 samples: each from old data D_{t-1} with probability λ, else from the update U_t
        forward, cross-entropy loss, backward, SGD step (lr 0.001, momentum 0.9, weight decay 0.0005)
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

from app.images import decode_image, pixel_transform, to_model_input, to_pixels
from app.samples import Sample
from app.settings import Settings
from worker.sampler import ReplaySampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    iterations: int
    batch_size: int = 64
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    replay_lambda: float = 0.75
    log_every: int = 50

    @classmethod
    def from_settings(cls, settings: Settings, iterations: int) -> TrainConfig:
        return cls(
            iterations=iterations,
            batch_size=settings.batch_size,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            replay_lambda=settings.replay_lambda,
            log_every=settings.log_every,
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
        # -1 marks a label the model has no output for (yet): always counted wrong.
        self.targets = torch.tensor([class_index.get(s.label, -1) for s in self.samples], dtype=torch.long)
        self.transform = pixel_transform(image_size)
        self._pixels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, i: int) -> torch.Tensor:
        if i not in self._pixels:
            image = decode_image(self.samples[i].data, max_pixels=2**62, name=f"sample {i}")
            self._pixels[i] = to_pixels(image, self.transform)
        return self._pixels[i]

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = list(indices)
        return torch.stack([self.pixels(i) for i in indices]), self.targets[indices]


@dataclass
class TrainStats:
    iterations: int
    loss: float
    seconds: float


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
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    sampler = ReplaySampler(len(old), len(new), cfg.replay_lambda, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses: list[torch.Tensor] = []
    for it in range(1, cfg.iterations + 1):
        pixels, targets = replay_batch(old, new, sampler.draw(cfg.batch_size))
        x, y = to_model_input(pixels, device), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if it % cfg.log_every == 0 or it == cfg.iterations:
            log.info("iteration %d/%d  loss %.4f  %.1fs", it, cfg.iterations, loss.item(), time.perf_counter() - start)
    final_loss = torch.stack(losses[-10:]).float().mean().item()
    return TrainStats(cfg.iterations, final_loss, time.perf_counter() - start)


@dataclass
class Accuracy:
    """Correct and total predictions per true label."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    hits: list[bool] = field(default_factory=list)  # per sample, in order

    def score(self, labels: Iterable[str] | None = None) -> float | None:
        """Accuracy over the given labels (all by default); None when there is no sample of them."""
        keys = self.total.keys() if labels is None else set(labels) & self.total.keys()
        total = sum(self.total[k] for k in keys)
        return sum(self.correct[k] for k in keys) / total if total else None

    @property
    def count(self) -> int:
        return sum(self.total.values())


@torch.no_grad()
def predict_labels(model: nn.Module, samples: SampleTensors, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Index of the top class for every sample."""
    model.to(device).eval()
    out = []
    for lo in range(0, len(samples), batch_size):
        pixels, _ = samples.batch(range(lo, min(lo + batch_size, len(samples))))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(to_model_input(pixels, device)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, samples: SampleTensors, device: torch.device) -> Accuracy:
    """Accuracy of the model on labelled samples, per label."""
    hits = (predict_labels(model, samples, device) == samples.targets).tolist()
    acc = Accuracy(hits=[bool(h) for h in hits])
    for label, hit in zip(samples.labels, hits, strict=True):
        acc.total[label] = acc.total.get(label, 0) + 1
        acc.correct[label] = acc.correct.get(label, 0) + int(hit)
    return acc
