"""End to end: 2 rounds of Flower simulation (Ray backend) on the tiny backbone, via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from fedmm import results
from fedmm.cli import main


def test_two_round_flower_simulation_fedavg_and_feddat(tiny_cfg, capsys):
    out = tiny_cfg.out_dir
    args = [
        "run",
        "--method",
        "fedavg,feddat",
        "--rounds",
        "2",
        "--clients",
        "3",
        "--seed",
        "1",
        "--out",
        out,
    ]
    for key in (
        "model.backbone",
        "model.image_size",
        "data.data_dir",
        "data.train_per_client",
        "data.test_per_client",
        "train.local_steps",
        "train.batch_size",
        "cache_dir",
        "progress",
    ):
        args += ["--set", f"{key}={tiny_cfg.to_flat()[key]}"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| fedavg |" in printed and "| feddat |" in printed

    data = json.loads((Path(out) / "results.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"fedavg", "feddat"}
    for run in runs.values():
        assert run["benchmark"] == "fmnist-domain" and run["seed"] == 1
        assert [h["round"] for h in run["history"]] == [1, 2]
        for h in run["history"]:
            assert set(h["clients"]) == {"0-original", "1-inverted", "2-blurred"}
            assert (
                h["bytes_up"] > 0
                and h["bytes_down"] > 0
                and h["seconds"] > 0
                and h["failures"] == 0
            )
            assert all(s["steps"] == tiny_cfg.train.local_steps for s in h["train"].values())
            for views in h["clients"].values():
                assert set(views) == set(run["views"])
        assert set(results.scored_views(run)) == set(run["views"])
        assert set(run["final"]) - set(run["views"]) == set(run["view_aliases"])  # old names
        assert run["health"]["status"] == "ok" and run["health"]["trained"] == 6
        # what each site reported of its own data: sizes, nothing outside the schema
        assert set(run["loader_notes"]["sites"]) == set(run["clients"])
        assert all(n["unknown_train"] == n["unknown_test"] == 0
                   for n in run["loader_notes"]["sites"].values())  # fmt: skip
        assert run["excluded_clients"] == {}
    assert printed.count("-> ok") == 2  # one health line per run
    assert set(runs["feddat"]["views"]) == {"shared+head", "personal", "client"}
    # FedDAT uploads A_s + projection only; FedAvg also the head
    assert runs["feddat"]["history"][0]["bytes_up"] < runs["fedavg"]["history"][0]["bytes_up"]
    assert (Path(out) / "summary.md").read_text().count("| fed") == 2
    assert (Path(out) / "curves.png").stat().st_size > 1000
    # private client state was written per client, per method
    assert len(list((Path(out) / "client_state").glob("site-*/*/feddat-*/client.pt"))) == 3
