"""benchmarks/converged_grid.py: the leaders that get more seeds, its table (final accuracy, closed /
open, gap to centralized, time to accuracy) and the grid itself on the tiny backbone, resumed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedmm.data import load_benchmark
from fedmm.data.vqa_rad import find_vqa_rad
from fedmm.engine import run_method

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "converged_grid.py"
spec = importlib.util.spec_from_file_location("converged_grid", SCRIPT)
grid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid)


def _run(method: str, seed: int, final: dict, curve: tuple = (), benchmark: str = "b") -> dict:
    views = sorted({k.split(".")[0] for k in final})  # each view kind's curve: ``curve``
    history = [{"round": i + 1, "seconds": 10.0, "bytes_up": 0, "bytes_down": 0, "sampled": 1,
                "clients": {"c": dict.fromkeys(views, y)}}
               for i, y in enumerate(curve or (0.0,))]  # fmt: skip
    return {"method": method, "variant": "", "peft": "adapter", "benchmark": benchmark,
            "seed": seed, "views": views, "config": {},
            "final": final, "history": history}  # fmt: skip


def test_leaders_are_the_best_three_of_each_view_kind_by_seed_0_plus_centralized():
    runs = [
        _run("centralized", 0, {"shared": 0.90}),
        _run("local", 0, {"personal": 0.80}),
        _run("fedavg", 0, {"shared": 0.70, "shared+head": 0.60, "personal": 0.75}),
        _run("fedper", 0, {"shared+head": 0.65}),
        _run("feddat", 0, {"shared+head": 0.50, "personal": 0.85}),
        _run("fedpia", 0, {"shared": 0.72, "shared+head": 0.40, "personal": 0.70}),
        _run("ditto", 0, {"shared": 0.71, "personal": 0.60}),
        _run("ditto", 1, {"shared": 0.99, "personal": 0.99}),  # not seed 0: not counted
    ]
    methods = list(grid.METHODS)
    # k = 1: fedpia leads shared, fedper shared+head, feddat personal; centralized always
    assert grid.leaders(runs, methods, k=1) == ["centralized", "fedper", "feddat", "fedpia"]
    # k = 3: shared fedpia, ditto, fedavg; shared+head fedper, fedavg, feddat; personal feddat,
    # local, fedavg: every method here
    assert grid.leaders(runs, methods) == methods


def test_the_table_has_final_closed_open_gap_and_time_to_accuracy():
    runs = [
        _run("centralized", 0, {"shared": 0.80, "shared.closed": 0.9, "shared.open": 0.6},
             (0.5, 0.8)),
        _run("fedavg", 0, {"shared": 0.70, "shared.closed": 0.8, "shared.open": 0.5}, (0.7, 0.7)),
        _run("fedavg", 1, {"shared": 0.60, "shared.closed": 0.7, "shared.open": 0.4}, (0.4, 0.6)),
    ]  # fmt: skip
    text = "\n".join(grid.converged_table(runs, ["centralized", "fedavg"]))
    assert "`shared` (time to 65.0 %" in text  # the lowest final mean of the kind: fedavg's
    # centralized: one seed (n = 1), no gap to itself, reaches 65 % in round 2 (20 s)
    assert "| centralized | 1 | 80.0 (n = 1) | 90.0 (n = 1) | 60.0 (n = 1) | — | 2.0 | 20 |" in text
    # fedavg: two seeds, 15 points under centralized; seed 0 reaches 65 % in round 1, seed 1 never
    assert (
        "| fedavg | 2 | 65.0 ± 7.1 | 75.0 ± 7.1 | 45.0 ± 7.1 | -15.0 | 1.0 (1/2 seeds) | 10 |"
        in text
    )
    assert "± 0.0" not in text


@pytest.fixture()
def counted(monkeypatch):
    calls = []

    def counting(cfg):
        calls.append((cfg.method, cfg.seed, cfg.fed.rounds))
        return run_method(cfg)

    monkeypatch.setattr("fedmm.engine.run_method", counting)
    return calls


def test_the_grid_runs_seed_0_then_more_seeds_for_the_leaders_and_resumes(
    tiny_cfg, tmp_path, counted
):
    cfgs = {"fmnist-domain": tiny_cfg.with_overrides({"fed.rounds": 1})}
    methods = ["centralized", "local", "fedavg"]
    out = tmp_path / "grid"
    summary = grid.run_grid(cfgs, out, methods, more_seeds=(1,), start_rounds=1, max_rounds=1, k=1)
    s = summary["fmnist-domain"]
    assert s["rounds"] == 1 and s["dir"] == "fmnist-domain/rounds-1"
    data = json.loads((out / s["dir"] / "bench.json").read_text())
    seed0 = [r for r in data["runs"] if r["seed"] == 0]
    assert sorted(r["method"] for r in seed0) == sorted(methods)
    assert s["leaders"] == grid.leaders(seed0, methods, k=1)  # from the seed-0 results
    assert "centralized" in s["leaders"] and "fedavg" in s["leaders"]  # fedavg alone has shared
    assert sorted(r["method"] for r in data["runs"] if r["seed"] == 1) == sorted(s["leaders"])
    assert len(counted) == len(methods) + len(s["leaders"])
    table = (out / "converged.md").read_text()
    assert "### fmnist-domain (1 rounds)" in table and "Δ vs centralized" in table
    assert "| centralized | 2 |" in table  # seeds 0 and 1
    report = (out / s["dir"] / "report.md").read_text()  # the whole grid's, not the leaders' only
    assert all(f"| {m} |" in report for m in methods)

    text = "\n".join(grid.progress(cfgs, out, methods, more_seeds=(1,), k=1, max_rounds=1))
    cells = len(methods) + len(s["leaders"])
    assert f"budget 1 rounds, {cells} of {cells} cells complete;" in text  # the same cells
    assert "No cell missing." in text
    assert "`model.backbone=tiny`" in table and "`data.benchmark" not in table  # how it was made

    before = len(counted)
    again = grid.run_grid(cfgs, out, methods, more_seeds=(1,), start_rounds=1, max_rounds=1, k=1)
    assert len(counted) == before  # every cell complete: nothing reruns
    assert again["fmnist-domain"]["leaders"] == s["leaders"]


def test_the_grid_uses_vqa_rads_organ_clients_and_an_image_disjoint_dirichlet_split():
    cfgs = grid.grid_configs(["vqa-rad-organ", "vqa-rad-dirichlet"], {})
    assert cfgs["vqa-rad-organ"].fed.clients == 3
    dirichlet = cfgs["vqa-rad-dirichlet"]
    assert dirichlet.data.test_split == "image-disjoint" and dirichlet.fed.clients == 8


@pytest.mark.skipif(find_vqa_rad() is None, reason="VQA-RAD not available here")
def test_the_grids_vqa_rad_dirichlet_is_image_disjoint_and_every_client_is_scored():
    cfg = grid.grid_configs(["vqa-rad-dirichlet"], {"model.image_size": 16})["vqa-rad-dirichlet"]
    bench = load_benchmark(cfg)
    assert bench.notes["test_images_seen_in_train"] == 0
    assert len(bench.clients) == 8 and not bench.excluded
    assert all(len(c.train.texts) and len(c.test.texts) for c in bench.clients)


def test_progress_shows_complete_cells_the_missing_ones_and_the_plateau_and_runs_nothing(
    tiny_cfg, tmp_path
):
    from fedmm import bench
    from fedmm.results import save_run

    out, methods = tmp_path / "grid", ["centralized", "fedavg"]
    cfgs = {"fmnist-domain": tiny_cfg.with_overrides({"data.benchmark": "fmnist-domain"})}
    sub = out / "fmnist-domain" / "rounds-4"

    def stored(method, seed, curve, cfg=cfgs["fmnist-domain"]):
        run = _run(method, seed, {"shared": curve[-1]}, curve, "fmnist-domain")
        cell = bench.cell_config(cfg.with_overrides({"fed.rounds": 4}), method, seed, sub)
        run |= {"peft": cell.peft.type, "config": cell.to_flat()}
        save_run(sub, run)

    assert "## fmnist-domain: not started" in "\n".join(grid.progress(cfgs, out, methods))
    stored("centralized", 0, (0.5, 0.6, 0.7, 0.8))
    stored("fedavg", 0, (0.5, 0.6))  # cut off after 2 of 4 rounds
    text = "\n".join(grid.progress(cfgs, out, methods, more_seeds=(1,), k=1))
    assert "budget 4 rounds, 1 of 2 cells complete; plateau not yet decided" in text
    assert "| centralized | 1 | 80.0 (n = 1) |" in text
    assert "Missing: fedavg seed 0 (round 2 of 4 stored)." in text

    stored("fedavg", 0, (0.5, 0.6, 0.65, 0.65))
    text = "\n".join(grid.progress(cfgs, out, methods, more_seeds=(1,), k=1))
    # seed 0 complete: the plateau check (centralized still gains 10 points in its last round),
    # so the grid doubles the budget and runs no more seeds at this one
    assert "budget 4 rounds, 2 of 2 cells complete; still rising: centralized on" in text
    assert "; doubled to 8 rounds" in text and "No cell missing." in text
    text = "\n".join(grid.progress(cfgs, out, methods, more_seeds=(1,), k=1, max_rounds=4))
    # at the final budget, seed 1 of the leaders (centralized, fedavg) is counted as missing
    assert "budget 4 rounds, 2 of 4 cells complete; still rising: centralized on" in text
    assert "the final budget" in text and "Missing: centralized seed 1, fedavg seed 1." in text

    other = {"fmnist-domain": cfgs["fmnist-domain"].with_overrides({"train.lr": 0.5})}
    text = "\n".join(grid.progress(other, out, methods, more_seeds=(1,), k=1))
    assert "0 of 2 cells complete" in text and "fedavg seed 0 (stored with other options)" in text
    assert not (out / "converged.md").exists()  # nothing ran, nothing else written


def test_a_bf16_grid_is_refused_on_a_cpu_without_native_bf16_before_any_cell_runs(
    tmp_path, monkeypatch
):
    """bf16 cells emulated on an AVX2 CPU would take 25x as long (measured): a grid given
    ``train.precision=bf16`` there is refused, naming the fix, before anything is written;
    ``--progress`` still reads the stored cells (the bf16 record is rendered so)."""
    from fedmm import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: pytest.fail("a cell ran"))
    argv = ["--out", str(tmp_path / "g"), "--benchmark", "fmnist-domain"]
    with pytest.raises(SystemExit, match="fmnist-domain: .*emulated.*native bf16.*fp32"):
        grid.main([*argv, "--set", "train.precision=bf16"])
    assert not (tmp_path / "g").exists()
    (tmp_path / "g").mkdir()
    assert grid.main([*argv, "--set", "train.precision=bf16", "--progress"]) == 0


def test_the_grid_is_fp32_so_every_benchmark_runs_on_a_cpu_without_native_bf16(
    tmp_path, monkeypatch
):
    """Every benchmark of ``GRID`` is fp32 (issue 30: the grid must advance on either CPU): on a
    CPU without native bf16 all three run, and the progress report names each benchmark's own
    options beside the ones every cell shares (fp32 is the default: not named)."""
    from fedmm import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    cfgs = grid.grid_configs(list(grid.GRID), {"train.threads": 1})
    assert {c.train.precision for c in cfgs.values()} == {"fp32"}
    ran = []
    monkeypatch.setattr(grid, "run_grid", lambda cfgs, *a, **k: ran.append(list(cfgs)) or {})
    out = tmp_path / "g"
    assert grid.main(["--out", str(out)]) == 0
    assert ran == [list(grid.GRID)]
    out.mkdir()
    text = "\n".join(grid.progress(cfgs, out))
    assert "Options beyond the defaults, in every cell: `train.threads=1`." in text
    assert "train.precision" not in text
    organ = text.split("## vqa-rad-organ")[1].split("##")[0]
    assert "This benchmark's cells also: `fed.clients=3`." in organ
    dirichlet = text.split("## vqa-rad-dirichlet")[1]
    assert ("This benchmark's cells also: `data.test_split=image-disjoint`, `fed.clients=8`."
            in dirichlet)  # fmt: skip


def test_the_headline_table_ranks_each_view_kind_with_closed_open_and_the_gap():
    runs = [
        _run("centralized", 0, {"shared": 0.80, "shared.closed": 0.9, "shared.open": 0.6},
             (0.5, 0.8)),
        _run("fedavg", 0, {"shared": 0.60, "shared.closed": 0.7, "shared.open": 0.4,
                           "personal": 0.70, "personal.closed": 0.8, "personal.open": 0.5},
             (0.6, 0.7)),
        _run("local", 0, {"personal": 0.90, "personal.closed": 0.95, "personal.open": 0.8},
             (0.9, 0.9)),
    ]  # fmt: skip
    lines = grid.headline_table(runs, ["local", "centralized", "fedavg"])
    assert lines[0] == ("| view | method | seeds | all questions | closed | open | "
                        "Δ vs centralized (pt) | rounds to target (target %) |")  # fmt: skip
    # within a view kind, best first (local above fedavg though METHODS lists it after)
    assert lines[2:] == [
        "| `shared` | centralized | 1 | 80.0 (n = 1) | 90.0 (n = 1) | 60.0 (n = 1) | — | 2.0 (60.0) |",
        "| `shared` | fedavg | 1 | 60.0 (n = 1) | 70.0 (n = 1) | 40.0 (n = 1) | -20.0 | 1.0 (60.0) |",
        "| `personal` | local | 1 | 90.0 (n = 1) | 95.0 (n = 1) | 80.0 (n = 1) | +10.0 | 1.0 (70.0) |",
        "| `personal` | fedavg | 1 | 70.0 (n = 1) | 80.0 (n = 1) | 50.0 (n = 1) | -10.0 | 2.0 (70.0) |",
    ]  # fmt: skip
    plain = grid.headline_table([_run("centralized", 0, {"shared": 0.8}, (0.8,)),
                                 _run("fedavg", 0, {"shared": 0.8}, (0.8,))], ["fedavg", "centralized"])  # fmt: skip
    # no question groups (fmnist-domain): no closed / open columns; an equal mean is 0.0, never
    # -0.0; a tie keeps the order of `methods`
    assert (
        plain[0]
        == "| view | method | seeds | accuracy | Δ vs centralized (pt) | rounds to target (target %) |"
    )
    assert plain[2] == "| `shared` | fedavg | 1 | 80.0 (n = 1) | 0.0 | 1.0 (80.0) |"


def test_the_headline_shows_the_largest_budget_where_every_seed_0_cell_is_complete(
    tiny_cfg, tmp_path
):
    from fedmm import bench
    from fedmm.results import save_run

    out, methods = tmp_path / "grid", ["centralized", "fedavg"]
    cfgs = {"fmnist-domain": tiny_cfg.with_overrides({"data.benchmark": "fmnist-domain"})}

    def stored(rounds, method, curve, seed=0, cfg=cfgs["fmnist-domain"]):
        sub = out / "fmnist-domain" / f"rounds-{rounds}"
        run = _run(method, seed, {"shared": curve[-1]}, curve, "fmnist-domain")
        cell = bench.cell_config(cfg.with_overrides({"fed.rounds": rounds}), method, seed, sub)
        save_run(sub, run | {"peft": cell.peft.type, "config": cell.to_flat()})

    out.mkdir()
    text = "\n".join(grid.headline(cfgs, out, methods, more_seeds=(1,), k=1))
    assert ("**fmnist-domain**: no budget with every method's seed 0 complete yet (not "
            "started).") in text  # fmt: skip
    stored(2, "centralized", (0.5, 0.8))
    text = "\n".join(grid.headline(cfgs, out, methods, more_seeds=(1,), k=1))
    assert "complete yet (1 of 2 cells done at 2 rounds)." in text
    stored(2, "fedavg", (0.5, 0.7))
    stored(4, "centralized", (0.5, 0.8, 0.9, 0.9))  # fedavg not yet run at 4 rounds
    text = "\n".join(grid.headline(cfgs, out, methods, more_seeds=(1,), k=1))
    assert ("**fmnist-domain**, 2 rounds × 3 local steps, fp32, seed 0 (2 of 2 cells): not flat "
            "yet by the rule below, still rising: centralized (shared): +30.0 pt; fedavg (shared): "
            "+20.0 pt; the grid goes on to 4 rounds (1 of 2 cells done at 4 rounds).") in text  # fmt: skip
    assert "| `shared` | fedavg | 1 | 70.0 (n = 1) | -10.0 |" in text  # the 2-round cells
    assert "Plateau rule: < 0.5 pt gain over the last 20 % of rounds" in text
    stored(4, "fedavg", (0.5, 0.7, 0.8, 0.8))
    text = "\n".join(grid.headline(cfgs, out, methods, more_seeds=(1,), k=1, max_rounds=4))
    # the final budget, its seed 0 complete: that table, the leaders' seed 1 still to run
    assert "**fmnist-domain**, 4 rounds × 3 local steps, fp32, seed 0 (2 of 4 cells): " in text
    assert "; final budget; seed 1 of the leading methods to come." in text
    assert "| `shared` | fedavg | 1 | 80.0 (n = 1) | -10.0 |" in text
    # a leader's seed 1 added: the status says whose curves decided the budget
    stored(4, "fedavg", (0.5, 0.6, 0.6, 0.6), seed=1)
    text = "\n".join(grid.headline(cfgs, out, methods, more_seeds=(1,), k=1, max_rounds=4))
    assert "seeds 0, 1 (3 of 4 cells): flat by the rule below on seed 0's curves; final" in text


@pytest.mark.parametrize(
    "block, out, benchmarks, extra",
    [("converged-headline", "docs/results/converged", None, {}),
     # the bf16 seed-0 record of vqa-rad-dirichlet, begun on an AMX CPU (GRID's comment), until
     # its fp32 seed 0 is in (fmnist-domain's record is in its converged-progress.md only)
     ("converged-record", "docs/results/converged-bf16", "vqa-rad-dirichlet",
      {"train.precision": "bf16"})],
)  # fmt: skip
def test_the_readmes_converged_tables_are_the_snapshots(monkeypatch, block, out, benchmarks, extra):
    """README.md's converged tables are rendered from the grid's snapshot (and the bf16 record's),
    never typed: regenerate them with the command in the failure message."""
    from fedmm import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    root = SCRIPT.parents[1]
    readme = (root / "README.md").read_text()
    begin, end = f"<!-- {block}: begin -->\n", f"<!-- {block}: end -->"
    assert begin in readme and end in readme, f"README.md lost its {block} markers"
    shown = readme.split(begin, 1)[1].split(end, 1)[0]
    names = benchmarks.split(",") if benchmarks else list(grid.GRID)
    overrides = {"train.threads": 1, **extra}
    cfgs = grid.grid_configs(names, overrides)
    rendered = "\n".join(grid.headline(cfgs, root / out, max_rounds=40)) + "\n"
    which = f" --benchmark {benchmarks}" if benchmarks else ""
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    assert shown == rendered, (
        f"README.md's {block} tables differ from the snapshot: run `python benchmarks/"
        f"converged_grid.py --out {out}{which} --headline --max-rounds 40{sets}` and paste "
        f"{out}/converged-headline.md between the markers"
    )
