"""Rewrite the reports of result directories from their ``results.json``, running nothing.

For each DIR: ``summary.md`` and ``curves.png`` from ``DIR/results.json``; where ``DIR/bench.json``
exists, also ``bench.json``, ``report.md`` and the bench plots for the grid it records (its
methods and variants, benchmarks, seeds).  Runs stored by an older fedmm are read as
``results.load`` upgrades them (views named by kind).  ``--merge SRC...`` first copies into
DIR's results.json every run of the SRC directories' results.json (a run of the same key is
replaced; an incomplete run is left out, with a message), with ``--variant NAME=SRC`` naming the
runs of one source as a variant (for runs made with ``fedmm run --set ...`` before the variant
existed); ``--methods``, ``--benchmarks`` and
``--seeds`` (and ``--peft`` where the runs mix PEFT types) then set the bench grid.

    .venv/bin/python scripts/render_results.py docs/results/bench docs/results/fmnist-domain
    .venv/bin/python scripts/render_results.py docs/results/ablations --merge runs/a runs/b \\
        --methods fedavg,feddat,feddat-fedhead --benchmarks fmnist-domain --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmm import bench, results
from fedmm.files import atomic_write


def merge(out: Path, sources: list[Path], variants: dict[str, str]) -> None:
    data = results.load(out)
    by_key = {results.run_key(r): r for r in data["runs"]}
    named = {Path(src).resolve(): name for name, src in variants.items()}
    for src in sources:
        if not (Path(src) / "results.json").is_file():
            raise SystemExit(f"--merge {src}: no results.json there")
        for run in results.load(src)["runs"]:
            rounds = run.get("config", {}).get("fed.rounds")
            if rounds is not None and not results.is_complete(run):
                print(
                    f"{src}: {results.label(run)} on {run['benchmark']} seed {run['seed']} has "
                    f"{len(run['history'])} of {rounds} rounds: not merged (still running?)"
                )
                continue
            name = named.get(Path(src).resolve())
            if name:
                run["variant"] = name
                run["config"]["variant"] = name
            by_key[results.run_key(run)] = run
    data["runs"] = list(by_key.values())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(data, indent=1).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--merge", nargs="*", default=[], type=Path)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--methods", default="")
    parser.add_argument("--benchmarks", default="")
    parser.add_argument("--seeds", default="")
    parser.add_argument(
        "--peft",
        default="",
        help="the grid's PEFT type (default: bench.json's, "
        "else the runs' own when they all share one)",
    )
    args = parser.parse_args()
    bad = [v for v in args.variant if "=" not in v]
    if bad:
        parser.error(f"--variant expects NAME=SRC, got {bad[0]!r}")
    variants = dict(v.split("=", 1) for v in args.variant)
    unknown = [src for src in variants.values() if Path(src) not in args.merge]
    if unknown:
        parser.error(f"--variant ...={unknown[0]}: not one of the --merge directories")
    for out in args.dirs:
        if args.merge:
            merge(out, args.merge, variants)
        data = results.load(out)
        results.write_summary(out, data)
        results.write_curves(out, data)
        grid_file = out / "bench.json"
        if args.methods or grid_file.is_file():
            grid = json.loads(grid_file.read_text())["grid"] if grid_file.is_file() else {}
            methods = args.methods.split(",") if args.methods else grid["methods"]
            benches = args.benchmarks.split(",") if args.benchmarks else grid["benchmarks"]
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else grid["seeds"]
            cells = [(b, m, s) for b in benches for s in seeds for m in methods]
            extra = {name: bench.Variant(v["method"], v["overrides"], v.get("isolates", ""))
                     for name, v in grid.get("variants", {}).items()}  # fmt: skip
            pefts = {r["peft"] for r in data["runs"]}
            peft = args.peft or grid.get("peft") or (pefts.pop() if len(pefts) == 1 else "")
            if not peft:
                parser.error(f"{out}: runs of PEFT types {sorted(pefts)}: say which with --peft")
            bench.write_outputs(out, cells, peft, extra)
        print(f"{out}: {len(data['runs'])} runs rendered")


if __name__ == "__main__":
    main()
