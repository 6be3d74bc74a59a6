"""The promotion gate: a candidate is published only if it keeps what the current version knew.

Holdout scopes: "old" is the holdout of the data the current version was trained on (D_{t-1}),
"new" the holdout of the update sets being applied (U_t), "all" both together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    old_hits: tuple[bool, ...] = field(default=(), repr=False)  # per old holdout sample, for the paired test

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if k != "old_hits"}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def holdout_scores(model: nn.Module, old: SampleTensors, new: SampleTensors, device: torch.device) -> HoldoutScores:
    acc_old, acc_new = evaluate(model, old, device), evaluate(model, new, device)
    correct = sum(acc_old.correct.values()) + sum(acc_new.correct.values())
    total = acc_old.count + acc_new.count
    return HoldoutScores(
        acc_old.score(), acc_new.score(), correct / total if total else None, len(old), len(new), tuple(acc_old.hits)
    )


def net_losses(before: tuple[bool, ...], after: tuple[bool, ...]) -> tuple[int, int]:
    """Old holdout samples the candidate got wrong that the current version got right, and the reverse."""
    lost = sum(b and not a for b, a in zip(before, after, strict=True))
    won = sum(a and not b for b, a in zip(before, after, strict=True))
    return lost, won


def judge(
    before: HoldoutScores | None, after: HoldoutScores, loss: float, max_old_drop: float, significance_z: float = 0.0
) -> Verdict:
    """Pass unless training diverged or accuracy on the old holdout fell by more than max_old_drop.

    With significance_z > 0 the drop must also stand out from the noise of a small holdout: on
    the same samples, the net number lost (lost - won) must exceed z * sqrt(lost + won), a
    one-sided sign (McNemar) test. Without it, two unlucky samples out of thirty read as a
    seven-point drop and a good update is thrown away.
    """
    if not math.isfinite(loss):
        return Verdict(False, f"training diverged (loss {loss})")
    if before is None or before.old is None or after.old is None:
        return Verdict(True, "no earlier holdout to compare with")
    drop = before.old - after.old
    if drop > max_old_drop and significance_z > 0 and len(before.old_hits) == len(after.old_hits):
        lost, won = net_losses(before.old_hits, after.old_hits)
        if lost - won <= significance_z * math.sqrt(lost + won):
            return Verdict(
                True,
                f"holdout accuracy on old data {before.old:.3f} -> {after.old:.3f}: within the holdout's noise "
                f"({lost} lost, {won} won of {after.n_old} samples)",
            )
    if drop > max_old_drop:
        return Verdict(
            False,
            f"holdout accuracy on old data would fall from {before.old:.3f} to {after.old:.3f} "
            f"({drop:.3f} > the allowed {max_old_drop:.3f})",
        )
    return Verdict(True, f"holdout accuracy on old data {before.old:.3f} -> {after.old:.3f}")
