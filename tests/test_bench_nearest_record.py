"""The class-relative nearest-mean rule, replayed on recorded counts."""

from bench.nearest_record import first_checks, refused


def test_a_look_alike_class_is_judged_against_its_own_record_and_a_relabel_still_fails():
    set_log = [
        # two clean Shirt sets applied, 3 of 10 nearest Shirt each: Shirt's record is 6 of 20
        {"kind": "new", "attempts": ["applied: "], "nearest_means": [{"Shirt": {"T-shirt/top": 7, "Shirt": 3}}]},
        {"kind": "new", "attempts": ["rejected: x", "applied: "], "nearest_means": [None, {"Shirt": {"T-shirt/top": 7, "Shirt": 3}}]},
        # a clean Shirt set at 2 of 10: low for the share, not for Shirt
        {"kind": "new", "attempts": ["rejected: x"], "nearest_means": [{"Shirt": {"T-shirt/top": 8, "Shirt": 2}}]},
        # Trouser images labelled Bag, while Bag's applied sets lay 10 of 10 nearest Bag
        {"kind": "known", "attempts": ["applied: "], "nearest_means": [{"Bag": {"Bag": 10}}]},
        {"kind": "poisoned", "attempts": ["rejected: x"], "nearest_means": [{"Bag": {"Trouser": 9, "Bag": 1}}]},
        # never read by the test
        {"kind": "known", "attempts": ["applied: "], "nearest_means": [None]},
    ]
    checks = first_checks(set_log)
    assert [c.poisoned for c in checks] == [False, False, False, False, True]
    shirt, bag = checks[2].labels["Shirt"], checks[4].labels["Bag"]
    assert (shirt.own, shirt.images, shirt.record_own, shirt.record_images) == (2, 10, 6, 20)
    assert (bag.record_own, bag.record_images) == (10, 10)
    assert refused(checks[2], share=0.2, alpha=None, least=10)
    assert not refused(checks[2], share=0.2, alpha=0.05, least=10)
    assert refused(checks[4], share=0.2, alpha=0.05, least=10)
    # with too short a record the fixed share alone decides
    assert refused(checks[2], share=0.2, alpha=0.05, least=21)
