"""The promotion gate: a candidate is published only if it keeps what the current version knew.

Holdout scopes: "old" is the holdout of the data the current version was trained on (D_{t-1}),
"new" the holdout of the update sets being applied (U_t), "all" both together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from worker.trainer import SampleTensors, evaluate


@dataclass(frozen=True)
class HoldoutScores:
    old: float | None
    new: float | None
    all: float | None
    n_old: int
    n_new: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def holdout_scores(model: nn.Module, old: SampleTensors, new: SampleTensors, device: torch.device) -> HoldoutScores:
    acc_old, acc_new = evaluate(model, old, device), evaluate(model, new, device)
    correct = sum(acc_old.correct.values()) + sum(acc_new.correct.values())
    total = acc_old.count + acc_new.count
    return HoldoutScores(acc_old.score(), acc_new.score(), correct / total if total else None, len(old), len(new))


def judge(before: HoldoutScores | None, after: HoldoutScores, loss: float, max_old_drop: float) -> Verdict:
    """Pass unless training diverged or accuracy on the old holdout fell by more than max_old_drop."""
    if not math.isfinite(loss):
        return Verdict(False, f"training diverged (loss {loss})")
    if before is None or before.old is None or after.old is None:
        return Verdict(True, "no earlier holdout to compare with")
    drop = before.old - after.old
    if drop > max_old_drop:
        return Verdict(
            False,
            f"holdout accuracy on old data would fall from {before.old:.3f} to {after.old:.3f} "
            f"({drop:.3f} > the allowed {max_old_drop:.3f})",
        )
    return Verdict(True, f"holdout accuracy on old data {before.old:.3f} -> {after.old:.3f}")
