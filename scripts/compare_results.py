"""Compare two results.json files run by run (before/after a refactor): every recorded value
except timings, the run id and the config.  Prints IDENTICAL or the differences per method.

    python scripts/compare_results.py BEFORE/results.json AFTER/results.json

Used for issue 16's refactor: every method on fmnist-domain, seed 0, 2 rounds, before and after.
"""

import json
import math
import sys

TIMING = {
    "seconds",
    "server_seconds",
    "load-seconds",
    "run_id",
    "created",
    "fedmm_version",
    "version",
}


def walk(a, b, path, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in TIMING:
                continue
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
                continue
            walk(a[k], b[k], f"{path}/{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", diffs)
    else:
        if a != b and not (
            isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        ):
            diffs.append(f"{path}: {a!r} vs {b!r}")


before, after = (json.load(open(p)) for p in sys.argv[1:3])
runs_b = {r["method"]: r for r in before["runs"]}
runs_a = {r["method"]: r for r in after["runs"]}
for m in runs_b:
    if m not in runs_a:
        print(f"{m}: missing after")
        continue
    diffs = []
    rb, ra = dict(runs_b[m]), dict(runs_a[m])
    for r in (rb, ra):
        r.pop("config", None)
        r.pop("health", None)
        for h in r.get("history", []):
            for t in h.get("eval", {}).values():
                t.pop("seconds", None)
    walk(rb, ra, m, diffs)
    scores = {v: round(100 * x, 2) for v, x in runs_a[m]["final"].items() if "." not in v}
    print(f"{m}: {'IDENTICAL' if not diffs else f'{len(diffs)} differences'}  final {scores}")
    for d in diffs[:8]:
        print("   ", d)
