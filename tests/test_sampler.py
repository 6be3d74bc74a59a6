import pytest
import torch

from worker.sampler import ReplaySampler

DRAWS = 40_000


def old_fraction(n_old: int, n_new: int, lam: float) -> float:
    sampler = ReplaySampler(n_old, n_new, lam, torch.Generator().manual_seed(0))
    return (sampler.draw(DRAWS) < n_old).float().mean().item()


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.75, 1.0])
def test_old_data_is_drawn_with_probability_lambda(lam):
    # binomial standard deviation at 40k draws is at most 0.0025
    assert old_fraction(n_old=500, n_new=10, lam=lam) == pytest.approx(lam, abs=0.015)


def test_lambda_zero_never_draws_old_and_one_never_draws_new():
    assert old_fraction(100, 10, 0.0) == 0.0
    assert old_fraction(100, 10, 1.0) == 1.0


@pytest.mark.parametrize("lam", [0.0, 0.75, 1.0])
def test_without_old_data_every_draw_is_new(lam):
    sampler = ReplaySampler(0, 7, lam, torch.Generator().manual_seed(1))
    idx = sampler.draw(5000)
    assert idx.min() >= 0 and idx.max() < 7
    assert set(idx.tolist()) == set(range(7))


def test_without_new_data_every_draw_is_old():
    assert old_fraction(50, 0, 0.25) == 1.0


def test_draws_are_uniform_inside_each_pool():
    n_old, n_new = 4, 6
    idx = ReplaySampler(n_old, n_new, 0.5, torch.Generator().manual_seed(2)).draw(DRAWS)
    counts = torch.bincount(idx, minlength=n_old + n_new).float()
    old_share, new_share = counts[:n_old] / counts[:n_old].sum(), counts[n_old:] / counts[n_old:].sum()
    assert torch.allclose(old_share, torch.full((n_old,), 1 / n_old), atol=0.02)
    assert torch.allclose(new_share, torch.full((n_new,), 1 / n_new), atol=0.02)


def test_nothing_to_sample_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ReplaySampler(0, 0, 0.75, torch.Generator())
