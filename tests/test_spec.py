"""The ground floor (fedmm.spec): options declared once with their scope, everything else derived
from the declarations, and what needs no model -- the options, the CLI's help and listing, reading
and rendering results -- loads no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from fedmm import config
from fedmm.config import FedmmConfig, declared_fields
from fedmm.spec import METHOD_SPECS, SCOPES


def test_every_option_is_declared_with_a_scope_and_the_derived_sets_follow():
    declared = declared_fields()
    assert set(declared) == set(FedmmConfig().to_flat())
    assert all(f.metadata.get("scope") in SCOPES for f in declared.values())
    # the allowlists and resume's sets as they were kept by hand before (config.py, checkpoint.py)
    assert config.SITE_KEYS == {"data.data_dir", "cache_dir", "device", "train.threads"}
    assert config.SERVER_KEYS == {
        "out_dir", "progress", "track", "resume", "variant", "data.schema", "fed.round_timeout",
        "fed.min_clients", "fed.eval_every", "fed.eval_fraction", "validate.max_examples",
        "validate.max_upload_mb", "fed.early_stopping_min_delta",
    }  # fmt: skip
    assert config.MAY_DIFFER == {"resume", "progress", "track", "out_dir", "cache_dir", "device",
                                 "data.data_dir", "data.schema", "eval.predictions"}  # fmt: skip
    assert config.OPERATIONAL == {"fed.round_timeout", "fed.min_clients", "fed.eval_every",
                                  "fed.eval_fraction"}  # fmt: skip
    assert config.experiment_keys() == set(declared) - config.SITE_KEYS - config.SERVER_KEYS
    assert config.FLAG_KEYS == {"benchmark": "data.benchmark", "peft": "peft.type",
                                "rounds": "fed.rounds", "clients": "fed.clients", "seed": "seed",
                                "out": "out_dir", "track": "track"}  # fmt: skip


def test_a_new_option_is_placed_by_its_declaration(monkeypatch):
    """Declaring a site option is all it takes to keep it out of server messages and out of a
    bench cell's identity -- no second list to update."""
    from fedmm import spec

    @dataclasses.dataclass
    class Probe:
        where: str = spec.option("", scope=spec.SITE, affects_results=False, help="a path")

    monkeypatch.setitem(spec.METHOD_SPECS, "probe", spec.MethodSpec(Probe))
    assert "probe.where" in config.keys_where(scope=spec.SITE)
    assert "probe.where" in config.keys_where(affects_results=False)
    assert "probe.where" not in config.experiment_keys()


def test_the_method_registry_is_the_declared_one():
    from fedmm.methods import METHODS

    assert list(METHODS) == list(METHOD_SPECS)
    for name, cls in METHODS.items():
        spec = METHOD_SPECS[name]
        assert cls.spec is spec and cls.views == spec.views
        assert cls.view_aliases == spec.view_aliases
        assert FedmmConfig().methods.get(name, None).__class__ is (spec.options or type(None))


def test_options_help_listing_and_results_load_no_torch(tmp_path):
    """In a fresh process: ``import fedmm.config`` with a default ``FedmmConfig()``, ``fedmm
    --help``, ``fedmm list``, and writing, reading and rendering a results.json (the tables;
    curves.png needs matplotlib, which needs numpy but not torch) import no torch."""
    where = str(tmp_path)
    code = f"""
import contextlib, io, sys
import fedmm.config
cfg = fedmm.config.FedmmConfig()
assert cfg.feddat.temperature == 3.0
from fedmm.cli import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    assert main(["list"]) == 0
assert "feddat.temperature = 3.0" in listing.getvalue() and "scaffold" in listing.getvalue()
from fedmm import results
def stored(method, views, scores):
    run = results.new_run(cfg.with_overrides({{"method": method}}), "b", {{"c0": "client 0"}},
                          None, views, 10)
    results.add_round(run, results.RoundRecord(1, seconds=1.0, sampled=1,
                      clients={{"c0": scores}}, train={{"c0": {{"steps": 1.0}}}}))
    results.save_run({where!r}, run)
stored("feddat", ("shared+head", "personal", "client"),
       {{"shared+head": 0.5, "personal": 0.75, "client": 0.25}})
stored("fedavg", ("shared",), {{"shared": 0.4}})  # as if older: fedavg declares three views
table = results.summary_table(results.write_reports({where!r}))  # + summary.md, curves.png
assert "| feddat | 0 | 1 | — | 50.0 | 75.0 | 25.0 |" in table, table
assert "| fedavg | 0 | 1 | 40.0 | n/m | n/m | — |" in table, table
print("torch loaded:", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("torch loaded: False"), out.stdout[-300:]
    assert (tmp_path / "curves.png").stat().st_size > 0
