"""Operating a federation: crash-consistent writes, a run one can watch, short site errors.

* a write killed between its temporary file and ``os.replace`` leaves the old file, and its
  temporary file is removed when the next run starts; files and directories are fsynced; a round's
  checkpoint is written before results.json, so results.json never shows a round a resumed run
  would redo;
* the server logs one line per round; ``fedmm.logs.configure`` shows fedmm's lines in Flower's app
  processes without overriding a configured process; summary.md names the sites missing in the
  last round and marks a mean over fewer sites than the run has;
* what leaves a site after an error is its class and a short reason without local paths; the
  full error stays in the site's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from conftest import run_federation
from flwr.app import Context, Message, MessageType, RecordDict
from test_serverapp import InProcessGrid

from fedmm import logs, results
from fedmm.config import FedmmConfig
from fedmm.federation import checkpoint, clientapp, messages
from fedmm.federation.messages import RefusedMessage
from fedmm.files import TMP_PREFIX, atomic_torch_save, atomic_write, remove_stale_temps

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class Killed(BaseException):
    """The process dies: no ``except Exception`` runs (as with SIGKILL)."""


def temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{TMP_PREFIX}*.tmp"))


# ------------------------------------------------------------------ part 4: crash-consistent writes
def test_an_interrupted_write_keeps_the_old_file_and_the_next_start_removes_its_temp(
    tmp_path, monkeypatch, caplog
):
    target, state = tmp_path / "results.json", tmp_path / "client.pt"
    atomic_write(target, b"old")
    atomic_torch_save({"round": 1}, state)
    foreign = [tmp_path / "notes.tmp", tmp_path / ".other.tmp"]
    for path in foreign:
        path.write_bytes(b"not ours")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and temps(tmp_path) == []  # an error cleans up

    def die(src, dst):
        raise Killed

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(Killed):
        atomic_write(target, b"new")
    with pytest.raises(Killed):
        atomic_torch_save({"round": 2}, state)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert torch.load(state, weights_only=True) == {"round": 1}
    left = temps(tmp_path)
    assert len(left) == 2 and left[0].stat().st_size > 0

    with caplog.at_level(logging.INFO, logger="fedmm.files"):
        assert remove_stale_temps(tmp_path) == left
    assert temps(tmp_path) == [] and all(p.is_file() for p in foreign)  # only ours
    assert all(str(p) in caplog.text for p in left)


def test_writes_fsync_the_file_then_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "a.json", b"{}")
    atomic_torch_save({"x": 1}, tmp_path / "b.pt")
    assert synced == ["file", "dir", "file", "dir"]


def test_each_round_checkpoints_before_results_and_logs_one_line(tiny_cfg, monkeypatch, caplog):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2, "fed.eval_every": 2})
    out = Path(cfg.out_dir)
    for directory in (out, out / "checkpoints"):  # what a killed server left
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{TMP_PREFIX}killed.tmp").write_bytes(b"")
    order = []
    save_checkpoint, save_results = checkpoint.save, results.save_run

    def spy_checkpoint(cfg, rnd, *args):
        order.append(("checkpoint", rnd))
        return save_checkpoint(cfg, rnd, *args)

    def spy_results(out_dir, run):
        order.append(("results", len(run["history"])))
        save_results(out_dir, run)

    monkeypatch.setattr(checkpoint, "save", spy_checkpoint)
    monkeypatch.setattr(results, "save_run", spy_results)
    with caplog.at_level(logging.INFO, logger="fedmm.federation.serverapp"):
        run_federation(InProcessGrid(3, failing={101}), cfg)
    assert order == [("checkpoint", 1), ("results", 1), ("checkpoint", 2), ("results", 2)]
    assert temps(out) == [] and temps(out / "checkpoints") == []
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    head = r"round {}/2: 2/3 sites trained, 1 failed \(\+0 rejected\), [\d.]+s, "
    assert re.fullmatch(head.format(1) + "not evaluated", lines[0])
    views = r"shared \d+\.\d% shared\+head \d+\.\d% personal \d+\.\d% over 3/3 evaluated sites"
    assert re.fullmatch(head.format(2) + views, lines[1])


def test_a_server_killed_between_checkpoint_and_results_resumes_into_complete_results(
    tiny_cfg, monkeypatch
):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2})
    save_results = results.save_run

    def killed_in_round_2(out_dir, run):
        if len(run["history"]) == 2:
            raise Killed
        save_results(out_dir, run)

    monkeypatch.setattr(results, "save_run", killed_in_round_2)
    with pytest.raises(Killed):
        run_federation(InProcessGrid(3), cfg)
    monkeypatch.undo()
    on_disk = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    assert [h["round"] for h in on_disk["history"]] == [1]  # behind the checkpoint, never ahead
    assert checkpoint.load(cfg).round == 2
    resumed = run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))
    on_disk = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    assert [h["round"] for h in on_disk["history"]] == [1, 2]
    assert on_disk["final"] == resumed["final"]


def test_a_client_removes_stale_temps_in_its_state_dir_before_saving(tmp_path):
    path = tmp_path / "state" / "run" / "client.pt"
    path.parent.mkdir(parents=True)
    (path.parent / f"{TMP_PREFIX}abc.tmp").write_bytes(b"")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    clientapp.save_state(ctx, path, FedmmConfig(), 1, {"a": torch.ones(2)})
    assert temps(path.parent) == [] and torch.load(path, weights_only=True)["round"] == 1


# ------------------------------------------------------------------ part 5: seeing the run
@contextlib.contextmanager
def bare_root_logger():
    """A process nobody configured logging in (a flwr-clientapp); restored afterwards (inside
    the test's call: pytest adds and removes its own handlers around each phase)."""
    root, fedmm_logger = logging.getLogger(), logging.getLogger("fedmm")
    saved, saved_fedmm, level = root.handlers[:], fedmm_logger.handlers[:], fedmm_logger.level
    root.handlers.clear()
    try:
        yield fedmm_logger
    finally:
        root.handlers[:] = saved
        fedmm_logger.handlers[:] = saved_fedmm
        fedmm_logger.setLevel(level)


def test_configure_leaves_a_configured_process_alone(monkeypatch):
    assert logging.getLogger().handlers  # pytest's, as cli.main's in `fedmm run`
    monkeypatch.setenv(logs.ENV, "DEBUG")
    before = logging.getLogger("fedmm").handlers[:]
    assert logs.configure("serverapp") is False
    assert logging.getLogger("fedmm").handlers == before


def test_configure_shows_fedmm_lines_in_an_app_process_once(monkeypatch, capsys):
    monkeypatch.setenv(logs.ENV, "debug")
    with bare_root_logger() as fedmm_logger:
        assert logs.configure("clientapp") is True
        assert logs.configure("clientapp") is False  # idempotent
        assert len(fedmm_logger.handlers) == 1 and fedmm_logger.level == logging.DEBUG
        logging.getLogger("fedmm.federation.clientapp").debug("restored client state of round 3")
    err = capsys.readouterr().err
    assert re.search(r"DEBUG fedmm-clientapp\[\d+\] fedmm.federation.clientapp: restored client "
                     r"state of round 3", err)  # fmt: skip
    monkeypatch.setenv(logs.ENV, "nonsense")
    assert logs.level_from_env() == logging.INFO
    monkeypatch.delenv(logs.ENV)
    assert logs.level_from_env() == logging.INFO


def test_simulation_workers_log_at_the_level_of_the_process_that_runs_them(monkeypatch):
    monkeypatch.delenv(logs.ENV, raising=False)
    monkeypatch.setattr(logging.getLogger("fedmm"), "level", logging.WARNING)
    with logs.workers_log_like_me():
        assert os.environ[logs.ENV] == "WARNING"
    assert logs.ENV not in os.environ
    monkeypatch.setenv(logs.ENV, "DEBUG")  # the operator's choice wins
    with logs.workers_log_like_me():
        assert os.environ[logs.ENV] == "DEBUG"


def test_summary_names_the_sites_missing_in_the_last_round():
    def entry(rnd, failed=(), eval_failed=(), scored=("0-original", "1-inverted", "2-blurred")):
        return {
            "round": rnd, "seconds": 1.0, "server_seconds": 0.0, "bytes_up": 0, "bytes_down": 0,
            "bytes_eval": 0, "sampled": 3, "failures": len(failed), "failed": list(failed),
            "rejected": [], "eval_failed": list(eval_failed), "evaluated": 3,
            "clients": {c: {"global": 0.5} for c in scored},
            "train": {c: {"steps": 2.0} for c in scored},
            "eval": {},
        }  # fmt: skip

    run = {"method": "fedavg", "peft": "adapter", "benchmark": "b", "seed": 0,
           "views": ["global"], "trainable_params": 1, "history": [], "final": {},
           "clients": {"0-original": "", "1-inverted": "", "2-blurred": ""},
           "excluded_clients": {}}  # fmt: skip
    results.add_round(run, entry(1))
    assert results.missing_line(run) is None and results.sites_scored(run) == (3, 3)
    assert "missing in the last round:" not in results.summary_table({"runs": [run]})
    assert "| 50.0 |" in results.summary_table({"runs": [run]})
    results.add_round(run, entry(
        2, failed=[{"node": 102, "client": "2-blurred", "reason": "no reply within 90s"}],
        eval_failed=[{"node": 102, "client": "2-blurred", "reason": "error: SiteError: x"}],
        scored=("0-original", "1-inverted"),
    ))  # fmt: skip
    assert results.sites_scored(run) == (2, 3)
    table = results.summary_table({"runs": [run]})
    assert ("  missing in the last round: 2-blurred (no reply within 90s), 2-blurred "
            "(evaluation: error: SiteError: x)") in table  # fmt: skip
    assert "| 50.0 (2/3) |" in table and "(N/K): the mean is over the N of K sites" in table


# ------------------------------------------------------------------ part 6: short site errors
STRIPPED = [  # (text, what may leave)
    ("/srv/hosp/a/train.jsonl:6: bad JSON", "<path>:6: bad JSON"),
    ("No such file: '/srv/my site/images/x.png'", "No such file: <path>"),  # spaces, quoted
    ('cannot open "C:\\my docs\\x.png"', "cannot open <path>"),
    ("see ~/data/site-a", "see <path>"),
    ("path:/srv/x/y", "path:<path>"),
    ("from file:///srv/a/b.png", "from <path>"),
    ("images/0042/MRN123.png missing", "<path> missing"),  # relative, with a directory part
    ("record MRN123_scan.PNG", "record <path>"),  # a bare image name
    ("dicom at ./scans/a.dcm", "dicom at <path>"),
    ("model.hf_path='../x'", "model.hf_path=<path>"),
    ("C:\\sites\\a\\train.jsonl, 1/3", "<path>, 1/3"),
    ("1/3 of the sites, https://hf.co/m", "1/3 of the sites, https://hf.co/m"),  # no secrets
    ("this site does not accept fed.rounds=5000: this site's limit is max-rounds=1000",
     "this site does not accept fed.rounds=5000: this site's limit is max-rounds=1000"),
]  # fmt: skip


@pytest.mark.parametrize("text, stripped", STRIPPED)
def test_strip_paths_catches_every_form_of_path(text, stripped):
    assert clientapp.strip_paths(text) == stripped


def test_only_fedmms_own_refusals_leave_with_their_text():
    from fedmm.config import ConfigError
    from fedmm.federation.consent import NotAccepted
    from fedmm.federation.privacy import PrivacyBudgetExceeded

    exc = FileNotFoundError(2, "No such file or directory", "/srv/hosp/a/images/MRN1.png")
    assert clientapp.short_error(exc, "1a2b3c4d") == (
        "FileNotFoundError: failed at the site (details in the site's log, ref 1a2b3c4d)"
    )
    assert clientapp.short_error(ValueError("bad record images/MRN7.png")) == (
        "ValueError: failed at the site (details in the site's log)"
    )
    refused = RefusedMessage("the server addressed client 1, but this site is client 0")
    assert clientapp.short_error(refused) == f"RefusedMessage: {refused}"
    for passable in (ConfigError("x /srv/a/b"), NotAccepted("x /srv/a/b"),
                     PrivacyBudgetExceeded("x /srv/a/b")):  # fmt: skip
        assert clientapp.short_error(passable) == f"{type(passable).__name__}: x <path>"
    long = clientapp.short_error(RefusedMessage("x" * 1000))
    assert long.startswith("RefusedMessage: x") and len(long) <= len("RefusedMessage: ") + 200


@pytest.fixture()
def site_dirs(tiny_cfg, tmp_path):
    """Three site directories, the server's config over them, each site's settings."""
    from fedmm.data import load_benchmark
    from fedmm.data.site_split import write_sites
    from fedmm.engine import prepare, rehearsal_sites

    root = tmp_path / "sites"
    write_sites(load_benchmark(tiny_cfg), root)
    cfg = prepare(tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2,
                                           "data.benchmark": "sites",
                                           "data.data_dir": str(root)}))  # fmt: skip
    return cfg, rehearsal_sites(cfg)


def test_a_site_error_leaves_short_and_is_logged_in_full(site_dirs, tmp_path, caplog):
    """Through the handlers registered on the ClientApp, as Flower calls them."""
    from fedmm.data.schema import read_schema

    cfg, settings = site_dirs
    missing = tmp_path / "hospital" / "site-a"
    sha = read_schema(Path(cfg.data.schema)).sha256()
    msg = Message(messages.server_message({}, cfg, 0, schema_sha=sha), 100, MessageType.QUERY)
    node = {**settings[0], "data-dir": str(missing)}
    ctx = Context(run_id=1, node_id=100, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(Exception) as direct:
        clientapp.handle_query(msg, ctx)  # called directly: the original exception
    assert not isinstance(direct.value, clientapp.SiteError) and str(missing) in str(direct.value)
    with caplog.at_level(logging.ERROR, logger="fedmm.federation.clientapp"):
        with pytest.raises(clientapp.SiteError) as raised:
            clientapp.make_client_app()(message=msg, context=ctx)
    assert str(missing) not in str(raised.value) and raised.value.__cause__ is None
    reason = re.fullmatch(rf"{type(direct.value).__name__}: failed at the site \(details in the "
                          r"site's log, ref ([0-9a-f]{8})\)", str(raised.value))  # fmt: skip
    assert reason, str(raised.value)
    (logged,) = [r for r in caplog.records if r.exc_info]
    assert str(missing) in str(logged.exc_info[1])  # the site's own log has the detail
    assert reason.group(1) in logged.getMessage()  # ... under the reference that left


def test_results_never_hold_a_sites_paths(site_dirs, tmp_path):
    """A site whose data directory disappears after round 1: its failure is recorded with a
    short reason, without the site's path."""
    cfg, settings = site_dirs
    gone = Path(settings[0]["data-dir"])

    def lose_site_0(entry):
        if entry["round"] == 1:
            gone.rename(tmp_path / "moved")

    record = run_federation(InProcessGrid(3, sites=settings, errors_as_replies=True), cfg,
                            lose_site_0)  # fmt: skip
    r2 = record["history"][1]
    (failed,) = r2["failed"]
    assert failed["client"] == "0-original" and len(r2["train"]) == 2
    assert re.match(r"error: \w+: ", failed["reason"])
    text = (Path(cfg.out_dir) / "results.json").read_text()
    assert str(gone) not in text and str(tmp_path / "moved") not in text
    summary = (Path(cfg.out_dir) / "summary.md").read_text()
    assert "missing in the last round: 0-original (error: FileNotFoundError: " in summary
