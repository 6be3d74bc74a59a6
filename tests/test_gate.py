from worker.gate import HoldoutScores, judge


def scores(old, new=0.5):
    return HoldoutScores(old=old, new=new, all=None, n_old=10, n_new=10)


def test_first_version_passes():
    assert judge(None, scores(None), loss=0.3, max_old_drop=0.05).passed


def test_a_small_drop_passes_and_a_large_one_is_rejected_with_the_numbers():
    assert judge(scores(0.90), scores(0.86), 0.3, 0.05).passed
    verdict = judge(scores(0.90), scores(0.80), 0.3, 0.05)
    assert not verdict.passed
    assert "0.900 to 0.800" in verdict.reason and "0.050" in verdict.reason


def test_a_diverged_candidate_is_rejected():
    verdict = judge(scores(0.9), scores(0.9), float("nan"), 0.05)
    assert not verdict.passed and "diverged" in verdict.reason


def test_no_old_holdout_means_nothing_to_compare():
    assert judge(scores(None), scores(None), 0.1, 0.05).passed


def paired(hits: list[bool]) -> HoldoutScores:
    return HoldoutScores(old=sum(hits) / len(hits), new=0.5, all=None, n_old=len(hits), n_new=10, old_hits=tuple(hits))


def test_a_drop_within_the_noise_of_a_small_holdout_passes():
    before = paired([True] * 30 + [False] * 3)
    after = paired([False, False, False] + [True] * 27 + [True, False, False])  # 3 lost, 1 won: 6 points
    verdict = judge(before, after, 0.3, 0.05, significance_z=1.645)
    assert verdict.passed and "3 lost, 1 won of 33" in verdict.reason
    assert not judge(before, after, 0.3, 0.05, significance_z=0).passed  # the margin alone rejects it


def test_a_consistent_loss_is_rejected_even_when_checked_for_noise():
    before = paired([True] * 11)
    after = paired([False] * 4 + [True] * 7)  # 4 lost, none won
    assert not judge(before, after, 0.3, 0.05, significance_z=1.645).passed
