"""Code trust at a fedmm site: the app bundle (FAB) a run brings is inspected, never executed.

Unit tests of ``deploy/trust.py`` (fedmm's own FAB is accepted; another ClientApp, another version,
a hash not in ``trusted-apps``, a missing or garbled pyproject are refused; nothing of a FAB is
imported) and one real deployment on 127.0.0.1 (TLS SuperLink with node auth + one default
``fedmm site``) to which a hostile app is submitted with ``flwr run``: its ClientApp would write
a marker file and send the site's file names back; the site must refuse it before any of its code
runs, and the server must get the refusal's reason.  Every wait is bounded, every process ended.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedmm import __version__
from fedmm.config import ConfigError
from fedmm.deploy import trust
from fedmm.deploy.site import SiteConfig

needs_flower = pytest.mark.skipif(
    not (Path(sys.executable).parent / "flower-superlink").exists()
    and shutil.which("flower-superlink") is None,
    reason="Flower's deployment CLIs are not installed",
)
ROOT = Path(__file__).resolve().parents[1]  # the fedmm project (its pyproject.toml)


def fedmm_like_fab(pyproject: str, files: dict[str, str] | None = None) -> bytes:
    """A FAB built by Flower's own builder from a project with ``pyproject`` and ``files``."""
    from flwr.cli.build import build_fab_from_files

    members = {
        "pyproject.toml": pyproject.encode(),
        **{k: v.encode() for k, v in (files or {}).items()},
    }
    return build_fab_from_files(members)[0]


def pyproject(name: str = "fedmm", version: str = __version__,
              clientapp: str = trust.CLIENTAPP) -> str:  # fmt: skip
    return textwrap.dedent(f"""\
        [project]
        name = "{name}"
        version = "{version}"
        [tool.flwr.app]
        publisher = "someone"
        [tool.flwr.app.components]
        serverapp = "{name}_server:app"
        clientapp = "{clientapp}"
        """)


def raw_fab(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as fab:
        for name, data in members.items():
            fab.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------------- FAB inspection
def test_fedmms_own_app_is_accepted_and_its_app_hash_can_be_pinned():
    fab = trust.build_app(ROOT)  # what `flwr run <fedmm checkout>` sends
    verdict = trust.inspect_fab(fab)
    assert verdict.accepted, verdict.reason
    assert (verdict.name, verdict.version, verdict.clientapp) == ("fedmm", __version__,
                                                                  trust.CLIENTAPP)  # fmt: skip
    assert trust.inspect_fab(fab, [verdict.app_hash]).accepted  # pinned: still accepted
    assert verdict.fab_hash == trust.fab_hash(fab) and len(verdict.app_hash) == 64
    # the FAB is the code only (pyproject's fab-include): docs and results would pass Flower's
    # 10 MiB limit and change the app hash a site pins
    members = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {m for m in members if not m.startswith("src/fedmm/")} == {"pyproject.toml",
                                                                      ".info/CONTENT"}  # fmt: skip
    assert "src/fedmm/federation/clientapp.py" in members


def test_a_fab_hash_not_in_a_non_empty_trusted_apps_is_refused():
    fab = fedmm_like_fab(pyproject())
    verdict = trust.inspect_fab(fab, ["0" * 64])
    assert not verdict.accepted
    assert (
        "not in this site's trusted-apps" in verdict.reason and verdict.app_hash in verdict.reason
    )


def test_another_clientapp_project_or_version_is_refused():
    other_app = trust.inspect_fab(fedmm_like_fab(pyproject(clientapp="evil.client:app")))
    assert not other_app.accepted and "'evil.client:app'" in other_app.reason
    other_project = trust.inspect_fab(fedmm_like_fab(pyproject(name="notfedmm")))
    assert not other_project.accepted and "'notfedmm'" in other_project.reason
    other_version = trust.inspect_fab(fedmm_like_fab(pyproject(version="0.0.1")))
    assert not other_version.accepted and "fedmm 0.0.1" in other_version.reason
    assert __version__ in other_version.reason
    # the same FAB at a site of that version is accepted: the version is the site's, not fixed
    assert trust.inspect_fab(fedmm_like_fab(pyproject(version="0.0.1")), version="0.0.1").accepted


@pytest.mark.parametrize("members, words", [
    ({"app.py": b"x = 1\n"}, "no pyproject.toml"),
    ({"pyproject.toml": b"[project\nname = "}, "not valid TOML"),
    ({"pyproject.toml": b"\xff\xfe\x00garbage"}, "not valid TOML"),
    ({"pyproject.toml": b"[tool]\nflwr = 3\n"}, "ClientApp '(none)'"),
])  # fmt: skip
def test_a_fab_without_a_readable_pyproject_is_refused(members, words):
    verdict = trust.inspect_fab(raw_fab(members))
    assert not verdict.accepted and words in verdict.reason


def test_a_fab_that_is_not_a_zip_or_holds_a_name_twice_is_refused():
    assert "not a zip" in trust.inspect_fab(b"PK\x03\x04 not really").reason
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as fab:
        fab.writestr("pyproject.toml", pyproject())
        with pytest.warns(UserWarning, match="Duplicate name"):
            fab.writestr("pyproject.toml", pyproject(clientapp="evil:app"))
    verdict = trust.inspect_fab(buf.getvalue())
    assert not verdict.accepted and "twice" in verdict.reason
    # a member zipfile cannot unpack (unknown compression method): a refusal, not a crash
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as fab:
        fab.writestr("pyproject.toml", pyproject())
    raw = bytearray(buf.getvalue())
    for offset in (8, raw.rfind(b"PK\x01\x02") + 10):  # method in local and central header
        raw[offset : offset + 2] = (99).to_bytes(2, "little")
    verdict = trust.inspect_fab(bytes(raw))
    assert not verdict.accepted and "cannot be unpacked" in verdict.reason


def test_nothing_of_the_fab_is_imported(tmp_path):
    """A FAB whose every module writes a marker when imported, declaring fedmm's ClientApp (so
    it is accepted) and another one (refused): no marker either way."""
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    files = {"fedmm/__init__.py": code, "fedmm/federation/__init__.py": code,
             "fedmm/federation/clientapp.py": code + "app = None\n", "evil.py": code}  # fmt: skip
    accepted = trust.inspect_fab(fedmm_like_fab(pyproject(), files))
    refused = trust.inspect_fab(fedmm_like_fab(pyproject(clientapp="evil:app"), files))
    assert accepted.accepted and not refused.accepted
    assert not marker.exists() and "evil" not in sys.modules


def test_the_app_hash_does_not_depend_on_the_compressor():
    members = {"pyproject.toml": pyproject().encode(), "a.py": b"print(1)\n" * 100}
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as fab:
        for name in reversed(list(members)):  # another order too
            fab.writestr(name, members[name])
    deflated = raw_fab(members)
    assert trust.fab_hash(stored.getvalue()) != trust.fab_hash(deflated)
    assert trust.app_hash(stored.getvalue()) == trust.app_hash(deflated)
    changed = raw_fab({**members, "a.py": b"print(2)\n"})
    assert trust.app_hash(changed) != trust.app_hash(deflated)


def test_app_hash_command_prints_the_hash_a_site_pins(tmp_path, capsys):
    from fedmm.cli import main

    assert main(["app-hash", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert f'trusted-apps = ["{trust.inspect_fab(trust.build_app(ROOT)).app_hash}"]' in out
    assert main(["app-hash", str(tmp_path)]) == 2
    assert "no pyproject.toml" in capsys.readouterr().err


def test_site_toml_trusted_apps_are_checked_and_reach_the_command(tmp_path):
    path = tmp_path / "site.toml"
    digest = "ab" * 32
    path.write_text(f'superlink = "127.0.0.1:9"\ninsecure = true\ntrusted-apps = ["{digest}"]\n'
                    f'[settings]\ndata-dir = "{tmp_path}"\n')  # fmt: skip
    cfg = SiteConfig.load(path)
    assert cfg.trusted_apps == (digest,)
    cmd = cfg.command()
    assert cmd[1:4] == ["-P", "-m", "fedmm.deploy.supernode_process"]
    assert cmd[cmd.index("--trusted-app") + 1] == digest
    assert cmd[cmd.index("--runtime-port") + 1] == "9094"  # Flower's default Runtime API port
    assert cmd[cmd.index("--") + 1].endswith("flower-supernode")
    assert "--isolation" not in cmd  # the executor sets it (and refuses a command that does)
    path.write_text(path.read_text().replace(digest, "not-a-hash"))
    with pytest.raises(ConfigError, match="trusted-apps"):
        SiteConfig.load(path)


def test_the_supernode_runs_in_process_isolation_on_loopback_only():
    from fedmm.deploy.supernode_process import supernode_command

    cmd = supernode_command(["flower-supernode", "--insecure"], 9100, 7)
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == "/dev/fd/7"
    with pytest.raises(ValueError, match="--isolation"):
        supernode_command(["flower-supernode", "--isolation=subprocess"], 9100, 7)


def test_the_wrapper_passes_the_supernodes_output_and_exit_code_through(tmp_path):
    """A stand-in SuperNode that reads the executor's secret from the descriptor it was given,
    prints as flower-supernode does, and exits 305 (a refused activation): the runner must see
    both unchanged."""
    import subprocess

    from fedmm.deploy.launch import free_port

    fake = tmp_path / "supernode.py"
    fake.write_text(
        "import sys\n"
        "args = sys.argv[1:]\n"
        "secret = open(args[args.index('--superexec-auth-secret-file') + 1], 'rb').read()\n"
        "print('secret bytes:', len(secret), '| isolation:', args[args.index('--isolation') + 1])\n"
        "print('INFO :      SuperNode ID: 7')\n"
        "print('ERROR :     Failed to activate SuperNode.')\n"
        "sys.exit(305)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, "-m", "fedmm.deploy.supernode_process", "--runtime-port",
         str(free_port()), "--", sys.executable, str(fake)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 305 % 256, out.stdout + out.stderr  # what the OS keeps of 305
    assert "secret bytes: 32 | isolation: process" in out.stdout
    assert "SuperNode ID: 7" in out.stdout and "Failed to activate SuperNode." in out.stdout


# ---------------------------------------------------------------------- a real deployment
def write_hostile_app(app_dir: Path, marker: Path, replies: Path) -> Path:
    """A Flower app whose ClientApp, wherever it runs, writes ``marker`` and replies with the
    file names under the site's ``data-dir`` and the first line of its ``train.jsonl``; its
    ServerApp sends one query to every node and writes what came back to ``replies``."""
    pkg = app_dir / "hostile_app"
    pkg.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        [project]
        name = "hostile"
        version = "1.0.0"
        dependencies = []
        [tool.flwr.app]
        publisher = "mallory"
        [tool.flwr.app.components]
        serverapp = "hostile_app.server:app"
        clientapp = "hostile_app.client:app"
        [tool.flwr.app.config]
        marker = {json.dumps(str(marker))}
        replies = {json.dumps(str(replies))}
        """)
    )
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(
        textwrap.dedent("""\
        import os
        from pathlib import Path
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.clientapp import ClientApp

        app = ClientApp()

        @app.query()
        def query(msg, context):
            Path(str(context.run_config["marker"])).write_text("the submitter's code ran here")
            data = Path(str(context.node_config.get("data-dir", ".")))
            names = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
            train = data / "train.jsonl"
            first = train.read_text().splitlines()[0] if train.is_file() else ""
            got = ConfigRecord({"files": names or [""], "first-line": first})
            return Message(RecordDict({"got": got}), reply_to=msg)
        """)
    )
    (pkg / "server.py").write_text(
        textwrap.dedent("""\
        import json, time
        from pathlib import Path
        from flwr.app import Message, MessageType, RecordDict
        from flwr.serverapp import ServerApp

        app = ServerApp()

        @app.main()
        def main(grid, context):
            deadline = time.monotonic() + 60
            nodes = list(grid.get_node_ids())
            while not nodes and time.monotonic() < deadline:
                time.sleep(1)
                nodes = list(grid.get_node_ids())
            sent = [Message(RecordDict(), n, MessageType.QUERY) for n in nodes]
            out = []
            for reply in grid.send_and_receive(sent, timeout=120):
                if reply.has_error():
                    out.append({"node": reply.metadata.src_node_id, "error": reply.error.reason,
                                "code": reply.error.code})
                else:
                    got = reply.content["got"]
                    out.append({"node": reply.metadata.src_node_id, "files": list(got["files"]),
                                "first-line": got["first-line"]})
            Path(str(context.run_config["replies"])).write_text(json.dumps(out, indent=1))
        """)
    )
    return app_dir


@needs_flower
def test_a_hostile_app_is_refused_before_it_runs_and_a_pinning_site_runs_only_its_pin(
    tmp_path, monkeypatch
):
    """Two sites: site 0 as `fedmm site` is by default, site 1 with ``trusted-apps`` = the app
    hash of this fedmm project.  ``flwr run`` of a hostile app: both refuse it, nothing of it
    runs.  ``flwr run`` of an impostor (the hostile code, declaring fedmm's ClientApp and
    version): site 0 runs *its own* fedmm ClientApp on the message (never the impostor's code),
    site 1 refuses it (not its pin)."""
    from fedmm.cli import main
    from fedmm.deploy import launch

    sites = tmp_path / "sites"
    assert main(["split", "--benchmark", "fmnist-domain", "--clients", "2", "--out", str(sites),
                 "--set", "model.backbone=tiny", "--set", "model.image_size=32",
                 "--set", "data.train_per_client=8", "--set", "data.test_per_client=4"]) == 0  # fmt: skip
    site_dirs = sorted(p for p in sites.iterdir() if (p / "train.jsonl").is_file())
    site_files = {p.name for d in site_dirs for p in d.rglob("*")}
    marker = tmp_path / "marker"
    hostile = write_hostile_app(tmp_path / "hostile", marker, tmp_path / "hostile.json")
    impostor = write_hostile_app(tmp_path / "impostor", marker, tmp_path / "impostor.json")
    text = (impostor / "pyproject.toml").read_text()
    text = text.replace('name = "hostile"', 'name = "fedmm"').replace('"1.0.0"', f'"{__version__}"')
    (impostor / "pyproject.toml").write_text(
        text.replace('"hostile_app.client:app"', f'"{trust.CLIENTAPP}"')
    )
    pin = trust.app_hash(trust.build_app(ROOT))
    spawn = launch.Deployment._spawn

    def pinning_site_1(self, name, cmd, env):  # site 1's operator adds trusted-apps
        if name == "supernode-1":
            config = self.workdir / "supernode-1" / "site.toml"
            config.write_text(f'trusted-apps = ["{pin}"]\n' + config.read_text())
        return spawn(self, name, cmd, env)

    monkeypatch.setattr(launch.Deployment, "_spawn", pinning_site_1)
    nodes = [{"data-dir": str(d), "state-dir": str(tmp_path / "state")} for d in site_dirs]
    dep = launch.start(tmp_path / "deployment", nodes, timeout=180)
    try:
        port = tomllib.loads((tmp_path / "deployment/supernode-0/site.toml").read_text())["port"]
        status = _acquire_task_without_the_secret(port)
        runs = [dep.flwr(["run", str(app), launch.CONNECTION, "--stream"], timeout=300)
                for app in (hostile, impostor)]  # fmt: skip
        logs = [(tmp_path / f"deployment/supernode-{k}.log").read_text() for k in range(2)]
    finally:
        dep.stop()
    for name, out in zip(("hostile", "impostor"), runs):
        assert (tmp_path / f"{name}.json").is_file(), (
            f"{name}: no replies:\n{out.stdout}{out.stderr}"
        )
    node = [int(re.search(r"SuperNode ID: (\d+)", log).group(1)) for log in logs]
    got = {r["node"]: r for r in json.loads((tmp_path / "hostile.json").read_text())}
    assert sorted(got) == sorted(node), got
    for reply in got.values():
        assert "fedmm site refused this run's app" in reply["error"], reply
        assert "'hostile_app.client:app'" in reply["error"]
    got_impostor = {r["node"]: r for r in json.loads((tmp_path / "impostor.json").read_text())}
    assert "not in this site's trusted-apps" in got_impostor[node[1]]["error"]
    assert "files" not in got_impostor[node[0]]  # what replied is fedmm's ClientApp, not the FAB's
    assert "refused" not in got_impostor[node[0]].get("error", "")
    assert not marker.exists()
    leaked = json.dumps([got, got_impostor])
    assert not any(name in leaked for name in site_files), leaked
    for log in logs:  # each site logged its refusal with the app hash `fedmm app-hash` prints
        assert "refused run" in log and "hostile_app.client:app" in log
        assert f"app hash {trust.app_hash(trust.build_app(hostile))}" in log
        assert "-> trusted ClientApp" in log  # the site executor took the tasks, not Flower's
    assert "accepted; running the site's own ClientApp" in logs[0]
    assert status == 401  # a local process without the executor's secret gets no task


def _acquire_task_without_the_secret(port: int) -> int:
    """The HTTP status a local process that reaches the site's Runtime API but lacks the site
    executor's secret gets for ``AcquireTask`` (Flower's own client, right version header)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        f"127.0.0.1:{port}", insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )  # fmt: skip
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    finally:
        client.close()
    return 200


def test_an_app_refusal_is_in_the_sites_audit_log(tmp_path, flower_task_identity):
    """What a data-protection officer reads: the refused message and the refusal, with the
    app's hashes, in the site's hash-chained audit log (not only in the SuperNode's output)."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from fedmm.deploy.trusted_clientapp import audit_refusal
    from fedmm.federation import audit

    verdict = trust.inspect_fab(raw_fab({"pyproject.toml": pyproject("hostile").encode()}))
    assert not verdict.accepted
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})  # fmt: skip
    audit_refusal(Message(RecordDict(), 7, MessageType.QUERY), context, "mallory/hostile",
                  verdict, "fedmm site refused this run's app: " + verdict.reason)  # fmt: skip
    entries, problem = audit.verify(tmp_path / "site" / audit.AUDIT_FILE)
    assert problem is None and [e["kind"] for e in entries] == ["received", "sent"]
    assert entries[0]["app"] == {"fab-id": "mallory/hostile", "fab-hash": verdict.fab_hash,
                                 "app-hash": verdict.app_hash}  # fmt: skip
    assert entries[1]["reply"] == "error" and "refused this run's app" in entries[1]["reason"]
