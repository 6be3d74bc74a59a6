"""The λ-replay sampler of Käding et al.: old data with total probability λ, new data with 1-λ."""

from __future__ import annotations

import torch


class ReplaySampler:
    """Draws sample indices over old ++ new: a draw comes from the n_old old samples with
    probability λ and from the n_new new ones with 1-λ, uniformly inside each pool.

    λ = 0 ignores old data; λ = 1 postpones new data. A pool that is empty is never drawn from.
    """

    def __init__(self, n_old: int, n_new: int, replay_lambda: float, generator: torch.Generator) -> None:
        if n_old + n_new == 0:
            raise ValueError("nothing to sample from: both old and new data are empty")
        if not 0 <= replay_lambda <= 1:
            raise ValueError(f"λ must lie in [0, 1], got {replay_lambda}")
        self.n_old = n_old
        self.n_new = n_new
        self.p_old = 0.0 if n_old == 0 else 1.0 if n_new == 0 else replay_lambda
        self.generator = generator

    def draw(self, k: int) -> torch.Tensor:
        """k indices into the concatenation old ++ new (old first)."""
        from_old = torch.rand(k, generator=self.generator) < self.p_old
        old_idx = torch.randint(max(self.n_old, 1), (k,), generator=self.generator)
        new_idx = self.n_old + torch.randint(max(self.n_new, 1), (k,), generator=self.generator)
        return torch.where(from_old, old_idx, new_idx)
