import json, sys
from collections import Counter, defaultdict

logs = [json.loads(l) for l in open(sys.argv[1])]
kinds = {}
for f in sys.argv[2:]:
    d = json.load(open(f))
    for run in d["runs"].values():
        for s in run["set_log"]:
            kinds[s["update_id"]] = (s["kind"], s["labels"])


def label_stats(labels, answers, known):
    for L in dict.fromkeys(labels):
        if L not in known:
            continue
        a = [p for t, p in zip(labels, answers) if t == L]
        if len(a) < 5:
            continue
        c = Counter(a)
        rv = max((v for k, v in c.items() if k != L), default=0)
        yield L, len(a), c[L], rv


def r1(thr):
    return lambda st: any(rv > l and rv >= thr * n for L, n, l, rv in st)


def r2(share):
    return lambda st: any(l <= share * n and rv > l for L, n, l, rv in st)


rules = {f"r1@{t}": r1(t) for t in (0.4, 0.5, 0.6)} | {f"r2@{s}": r2(s) for s in (0.2, 0.3, 0.4, 0.5)}
res = defaultdict(Counter)
for e in logs:
    kind = kinds.get(e["update_id"], ("?",))[0]
    cls = "poisoned" if kind == "poisoned" else "clean"
    res[cls]["n"] += 1
    res[cls]["head"] += not e["passed"]
    for m in ("knn1", "knn5", "knn10", "ncm"):
        st = list(label_stats(e["labels"], e[m], e["known"]))
        for name, rule in rules.items():
            ref = rule(st)
            res[cls][f"{m} {name}"] += ref
            res[cls][f"{m} {name} OR head"] += ref or not e["passed"]
            res[cls][f"{m} {name} AND head"] += ref and not e["passed"]
keys = list(res["clean"])
print(f"{'rule':34} clean_refused/{res['clean']['n']}  poisoned_refused/{res['poisoned']['n']}")
for k in keys:
    if k == "n":
        continue
    print(f"{k:34} {res['clean'][k]:5d} {res['poisoned'][k]:5d}")
print()
for e in logs:
    kind, note = kinds.get(e["update_id"], ("?", "?"))
    if kind == "poisoned":
        continue
    st = list(label_stats(e["labels"], e["ncm"], e["known"]))
    if r2(0.3)(st):
        print(kind, note[:40], [s for s in st if s[2] <= 0.3 * s[1]], "head", "pass" if e["passed"] else "REFUSE")
