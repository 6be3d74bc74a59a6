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
