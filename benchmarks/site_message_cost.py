"""What one message costs a deployed site before it trains: Flower 1.41 starts a fresh
``flwr-clientapp`` process per message, so each one imports fedmm, builds the model and reads and
encodes the site's data again.  This prints, side by side in one run, for one site directory:

* ``import``: importing the ClientApp (torch, transformers, Flower, fedmm);
* ``model+data``: the site's runtime (``Site``): the model and the site's records, first with an
  empty cache directory (cold), then again in a fresh process with the cache it left (warm);
* ``encode``: tokenising and the frozen visual features of both splits;
* the same site in a process that already holds it (what a simulation worker pays).

    .venv/bin/python benchmarks/site_message_cost.py [--sites DIR] [--site K] [--repeat 3]

Without ``--sites`` it splits the default benchmark (``fmnist-domain``, 3 clients) into a
temporary directory first.  Each figure is the median over ``--repeat`` fresh processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from flwr.app import Context, RecordDict
from fedmm.config import FedmmConfig
from fedmm.federation.clientapp import Site
t1 = time.perf_counter()
site_dir, cache, threads = sys.argv[1], sys.argv[2], sys.argv[3]
node = {"data-dir": site_dir, "cache-dir": cache, "state-dir": cache + "/state", "threads": int(threads)}
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
exp = FedmmConfig().with_overrides({"data.benchmark": "sites"})
site = Site(ctx, exp)
t2 = time.perf_counter()
site.split("train"), site.split("test")
t3 = time.perf_counter()
again = Site(ctx, exp); again.split("train"), again.split("test")
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "model+data": t2 - t1, "encode": t3 - t2,
                  "in-process": t4 - t3}))
"""


def child(site: Path, cache: Path, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(site), str(cache), str(threads)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", help="a directory of site directories (fedmm split)")
    parser.add_argument("--site", type=int, default=0, help="which site (default: 0)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="the site's threads setting")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedmm-site-cost-"))
    if args.sites:
        root = Path(args.sites)
    else:
        from fedmm.cli import main as fedmm

        root = tmp / "sites"
        if fedmm(["split", "--benchmark", "fmnist-domain", "--clients", "3", "--out", str(root)]):
            sys.exit("fedmm split failed")
    from fedmm.data.sites import list_sites

    site = list_sites(root)[args.site]
    rows = {"cold cache": [], "warm cache": []}
    for r in range(args.repeat):
        cache = tmp / f"cache-{r}"
        rows["cold cache"].append(child(site, cache, args.threads))
        rows["warm cache"].append(child(site, cache, args.threads))
    print(f"site {site} (median of {args.repeat} fresh processes, seconds)")
    print(f"| process | {' | '.join(rows['cold cache'][0])} | total |")
    print("|---" * (len(rows["cold cache"][0]) + 2) + "|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = med["import"] + med["model+data"] + med["encode"]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in med.values()) + f" | {total:.2f} |")


if __name__ == "__main__":
    main()
