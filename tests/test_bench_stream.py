"""The stream benchmark's reading of the nearest-mean counts the service records."""

from bench.stream import corroborated_in, first_checks_by_share


def test_first_checks_are_judged_at_each_share_by_the_services_rule():
    set_log = [
        # clean: 3 of 10 nearest its label, first read at its second attempt (the first was refused by another test)
        {"kind": "new class", "nearest_means": [None, {"Coat": {"Shirt": 7, "Coat": 3}}]},
        # poisoned: 1 of 10 nearest its label, refused; its reconsideration (6 of 10) is not a first check
        {"kind": "poisoned", "nearest_means": [{"Coat": {"Pullover": 9, "Coat": 1}}, None, {"Coat": {"Coat": 6, "Pullover": 4}}]},
        # never read by the test
        {"kind": "known classes", "nearest_means": [None]},
    ]
    sweep = first_checks_by_share(set_log, shares=(0.05, 0.2, 0.3, 0.5))
    assert sweep["clean_checked"] == 1 and sweep["poisoned_checked"] == 1
    assert sweep["0.05"] == {"clean_refused": 0, "poisoned_refused": 0}
    assert sweep["0.2"] == {"clean_refused": 0, "poisoned_refused": 1}
    assert sweep["0.3"] == {"clean_refused": 1, "poisoned_refused": 1}
    assert sweep["0.5"] == {"clean_refused": 1, "poisoned_refused": 1}


def test_a_set_counts_as_corroborated_only_when_a_version_applied_it_as_such():
    refused = {"status": "rejected", "metrics": {"refused_by": "nearest", "refused_label": "Shirt"}}
    joined = {"status": "applied", "metrics": {"corroborated": {"Shirt": ["a", "b", "c"]}}}
    plain = {"status": "applied", "metrics": {"corroborated": {}}}
    turned_down = {"status": "rejected", "metrics": {"corroborated": {"Shirt": ["a", "b", "c"]}, "refused_by": "old knowledge"}}
    assert corroborated_in("a", [refused, joined])
    assert not corroborated_in("d", [refused, joined])
    assert not corroborated_in("a", [refused, plain])
    assert not corroborated_in("a", [refused, turned_down])
    assert not corroborated_in("a", [{"status": "applied", "metrics": {}}])  # a version from before corroboration
