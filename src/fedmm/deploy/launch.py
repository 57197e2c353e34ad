"""A real Flower deployment on one host: a SuperLink and N SuperNodes as separate OS processes.

This is what runs at N hospitals, folded onto loopback so it can be tried (and tested) on one
machine.  Each piece is a separate process started with Flower's own CLIs, exactly as on real
machines (docs/deployment.md, "Step by step across machines"):

    flower-superlink  --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
                      --enable-supernode-auth --port P
    flwr supernode register supernode-K.pub fedmm          (once per site, by the operator)
    flower-supernode  --superlink 127.0.0.1:P --root-certificates ca.crt
                      --auth-supernode-private-key supernode-K
                      --node-config 'data-dir="SITE_K" state-dir="..." ...'   (site settings,
                                   federation/site.py; partition-id=K only to rehearse a central
                                   benchmark)
    flwr run APP fedmm --run-config "..." --stream          (the same ServerApp/ClientApp as
                                                            fedmm's simulation)

TLS material and auth keys come from ``certs.py``.  ``flwr`` reads the connection "fedmm"
(address + CA) from ``$FLWR_HOME/config.toml``, which is written into the work directory, so
nothing touches ``~/.flwr``.  Every process runs in its own process group and ``stop`` ends the
groups (SIGTERM, then SIGKILL): Flower's SuperExec and app processes go with their parent.

Size (~590 lines): one ``Deployment`` (processes, certificates, node keys, readiness) and its fault
drill; the drill is the part that could move out.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmm import results
from fedmm.config import SITE_KEYS, FedmmConfig
from fedmm.deploy import certs
from fedmm.deploy.site import descendants, exit_reason
from fedmm.runkey import RunKey

log = logging.getLogger(__name__)
CONNECTION = "fedmm"  # the SuperLink connection's name in $FLWR_HOME/config.toml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} {exit_reason(proc.returncode)}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def default_app_dir() -> Path:
    """The fedmm project (pyproject.toml with [tool.flwr.app]) this package was loaded from."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            "cannot find fedmm's pyproject.toml beside the package; pass the project directory"
        )
    return root


@dataclass
class Deployment:
    """The running processes of one local deployment and where their files are."""

    workdir: Path
    port: int
    num_supernodes: int
    env: dict[str, str]
    node_configs: list[dict] = field(default_factory=list)  # site settings of SuperNode k
    superlink: subprocess.Popen | None = None
    supernodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    warm_worker: bool = True  # site.toml warm-worker: one ClientApp process per run, not per task

    # ------------------------------------------------------------------ start
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        logfile = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            start_new_session=True,  # own process group: stop() ends its children too
        )  # fmt: skip
        logfile.close()  # the child holds its own descriptor
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        p = self.paths
        self.superlink = self._spawn(
            "superlink",
            [self.bin("flower-superlink"), "--ssl-ca-certfile", str(p["ca_cert"]),
             "--ssl-certfile", str(p["server_cert"]), "--ssl-keyfile", str(p["server_key"]),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--database", str(self.database), "--host", "127.0.0.1", "--port", str(self.port)],
            self.env,
        )  # fmt: skip
        _wait_port(self.port, self.superlink, timeout)

    @property
    def database(self) -> Path:
        """The SuperLink's persistent state (registered keys, nodes, runs): a restarted SuperLink
        keeps every registration, so sites reconnect without registering again."""
        return self.workdir / "superlink.db"

    def nodes(self, timeout: float = 30.0) -> list[dict]:
        """The SuperLink's own view of its SuperNodes (``flwr supernode list`` through the
        deployment's connection, read with Flower's Control API client): per node its id,
        ``status``, ``last_contact`` (its last activation or heartbeat, epoch seconds) and
        ``public_key`` (PEM)."""
        out = subprocess.run(
            [sys.executable, "-c", "from fedmm.deploy.launch import _print_nodes; _print_nodes()"],
            env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the SuperLink's nodes:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def site_key(self, k: int) -> str:
        """Site ``k``'s public key as the SuperLink stores it (PEM, SubjectPublicKeyInfo)."""
        from cryptography.hazmat.primitives import serialization

        pub = serialization.load_ssh_public_key(self.paths["supernode_keys"][k][1].read_bytes())
        return pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def wait_back(self, sites: list[int], since: float, timeout: float = 300.0) -> dict[int, float]:
        """Until the SuperLink has heard from each of ``sites`` (an activation or a heartbeat)
        after ``since`` (epoch seconds), by its own node list; returns when each was heard from.

        "online" in ``flwr supernode list`` alone proves nothing here: the SuperLink lists a
        node as online until its last heartbeat + the heartbeat window, also a dead node's and,
        after a restart with its database, every node's.  A node's ``online_until`` minus that
        window is when it was last heard from (``flwr/server/superlink/linkstate/
        sql_linkstate.py``: ``activate_node`` and ``acknowledge_node_heartbeat`` set it to now
        + HEARTBEAT_PATIENCE x the node's heartbeat interval)."""
        keys = {self.site_key(k): k for k in sites}
        back: dict[int, float] = {}
        deadline, unanswered = time.monotonic() + timeout, ""
        while True:
            try:
                nodes, unanswered = self.nodes(), ""
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                nodes, unanswered = [], f"; last error: {exc}"  # e.g. a SuperLink still starting
            for node in nodes:
                k = keys.get(node["public_key"])
                if k is not None and k not in back and node["status"] == "online" \
                        and node["last_contact"] >= since:  # fmt: skip
                    back[k] = node["last_contact"]
            if len(back) == len(sites):
                return back
            for k in sites:
                if self.supernodes[k].poll() is not None:
                    raise RuntimeError(f"site {k}'s runner exited; see "
                                       f"{self.workdir / f'supernode-{k}.log'}")  # fmt: skip
            if time.monotonic() > deadline:
                missing = sorted(set(sites) - set(back))
                raise TimeoutError(
                    f"the SuperLink has not heard from site(s) {missing} within {timeout:.0f} s "
                    f"(flwr supernode list {CONNECTION}: {_brief(nodes)}{unanswered[-500:]}); "
                    f"see {self.workdir}/supernode-K.log"
                )
            time.sleep(1.0)

    def unfinished_runs(self, timeout: float = 60.0) -> list[dict]:
        """``flwr ls``'s runs that are not finished (pending, starting, running)."""
        out = self.flwr(["ls", CONNECTION, "--format", "json"], timeout)
        try:
            runs = json.loads(out.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr ls failed:\n{out.stdout}{out.stderr}") from None
        return [r for r in runs if not r["status"].startswith("finished")]

    def stop_dead_runs(self, emit=print, timeout: float = 60.0) -> list[str]:
        """``flwr stop`` every unfinished run: before a resume, the run whose ServerApp died.

        Flower keeps such a run "running" until its ServerApp's heartbeat window ends (its
        token expires, then ``finished:failed``, "No heartbeat received from the task":
        ``flwr/supercore/corestate/sql_corestate.py``), and its messages already out may still
        reach sites: a site running one of them would write the run's client state while the
        resumed run does.  Stopping it ends that (sites are refused its messages)."""
        stopped = []
        for run in self.unfinished_runs(timeout):
            rid = run["run-id"]
            emit(f"run {rid} is still '{run['status']}' by flwr ls though its ServerApp "
                 f"is gone; flwr stop {rid} {CONNECTION}")  # fmt: skip
            out = self.flwr(["stop", rid, CONNECTION], timeout)
            if out.returncode != 0:
                raise RuntimeError(f"flwr stop {rid} failed:\n{out.stdout}{out.stderr}")
            stopped.append(rid)
        return stopped

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and its children (SuperExec, the ServerApp): a crash."""
        _kill_group(self.superlink, signal.SIGKILL)

    def kill_serverapp(self) -> bool:
        """SIGKILL the running ``flwr-serverapp`` process(es) of this deployment; True if any."""
        killed = False
        for pid in descendants(self.superlink.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"flwr-serverapp") for part in cmdline):
                os.kill(pid, signal.SIGKILL)
                killed = True
        return killed

    def register(self, k: int, timeout: float = 60.0) -> None:
        """``flwr supernode register``: the SuperLink will accept SuperNode ``k``'s key."""
        pub = self.paths["supernode_keys"][k][1]
        out = self.flwr(["supernode", "register", str(pub), CONNECTION], timeout=timeout)
        if out.returncode != 0 and "already in use" not in out.stdout + out.stderr:
            # "already in use": registered before, kept in the SuperLink's database (a resume)
            raise RuntimeError(f"registering {pub} failed:\n{out.stdout}{out.stderr}")

    def start_supernode(self, k: int) -> None:
        """Site ``k`` as its operator runs it: ``fedmm site --config site.toml`` (the runner
        that starts ``flower-supernode`` and restarts it with backoff, ``deploy/site.py``)."""
        node_home = self.workdir / f"supernode-{k}"
        node_home.mkdir(exist_ok=True)
        config = node_home / "site.toml"
        config.write_text(
            f'superlink = "127.0.0.1:{self.port}"\n'
            f'root-certificates = {_toml(str(self.paths["ca_cert"]))}\n'
            f'auth-key = {_toml(str(self.paths["supernode_keys"][k][0]))}\n'
            f'flwr-home = {_toml(str(node_home / "flwr-home"))}\nport = {free_port()}\n'
            f"warm-worker = {'true' if self.warm_worker else 'false'}\n\n"
            "[settings]\n" + "".join(f"{key} = {_toml(v)}\n" for key, v in self.node_configs[k].items())
        )  # fmt: skip
        self.supernodes[k] = self._spawn(
            f"supernode-{k}", [sys.executable, "-m", "fedmm.cli", "site", "--config", str(config)],
            self.env,
        )  # fmt: skip

    # ------------------------------------------------------------------ use
    def bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def online_nodes(self, timeout: float = 30.0) -> int:
        out = self.flwr(["supernode", "list", CONNECTION, "--format", "json"], timeout)
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_online(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < n:
            for k, proc in self.supernodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"supernode-{k}'s runner {exit_reason(proc.returncode)}; see "
                        f"{self.workdir / f'supernode-{k}.log'}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} SuperNodes online after {timeout:.0f}s")
            time.sleep(1.0)

    def run(
        self, run_config: dict, app: Path | None = None, timeout: float = 600.0, wait: bool = True
    ) -> subprocess.Popen:
        """``flwr run APP fedmm --run-config ... --stream``; waits unless ``wait=False``.

        ``run_config`` values are fedmm options; strings are quoted as TOML wants them."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        proc = self._spawn(
            "flwr-run",
            [self.bin("flwr"), "run", str(app or default_app_dir()), CONNECTION,
             "--run-config", items, "--stream"],
            self.env | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
        )  # fmt: skip
        if wait:
            try:
                proc.wait(timeout=timeout)
            finally:
                _kill_group(proc)
        return proc

    def kill_supernode(self, k: int) -> None:
        """SIGKILL SuperNode ``k`` and its children: a site that crashes without saying so."""
        _kill_group(self.supernodes[k], signal.SIGKILL)

    def stop(self) -> None:
        for proc in [*self.supernodes.values(), self.superlink]:
            if proc is not None:
                _kill_group(proc)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _print_nodes() -> None:
    """Print the SuperLink's node list as JSON (one line): run in a process whose ``FLWR_HOME``
    holds the deployment's connection (``Deployment.nodes``).  The same call as ``flwr supernode
    list`` (``flwr/cli/supernode/ls.py``), keeping what its output leaves out: ``online_until``
    and the heartbeat interval, from which the last contact follows."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.constant import HEARTBEAT_PATIENCE
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
    try:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    finally:
        client.close()
    print(json.dumps([{
        "node_id": n.node_id, "status": n.status, "public_key": n.public_key.decode(),
        "last_contact": (n.online_until - HEARTBEAT_PATIENCE * n.heartbeat_interval
                         if n.HasField("online_until") else 0.0),
    } for n in nodes]))  # fmt: skip


def _brief(nodes: list[dict]) -> str:
    return ", ".join(f"node {n['node_id']} {n['status']}" for n in nodes) or "no answer"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"  # a TOML literal string: no escapes


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc.poll() is not None and sig != signal.SIGKILL:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


def start(
    workdir: str | Path, node_configs: list[dict], timeout: float = 120.0, warm_worker: bool = True
) -> Deployment:
    """Certificates + keys (made once under ``workdir/certs``), a TLS SuperLink with SuperNode
    authentication, every key registered, one SuperNode per entry of ``node_configs`` (its site
    settings, ``--node-config`` keys) online; ``warm_worker``: the sites' ``warm-worker``."""
    num_supernodes = len(node_configs)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cert_dir = workdir / "certs"
    if (cert_dir / "ca.crt").is_file() and all(
        (cert_dir / f"supernode-{k}").is_file() for k in range(num_supernodes)
    ):
        paths: dict = {
            "ca_cert": cert_dir / "ca.crt", "server_cert": cert_dir / "server.pem",
            "server_key": cert_dir / "server.key",
            "supernode_keys": [(cert_dir / f"supernode-{k}", cert_dir / f"supernode-{k}.pub")
                               for k in range(num_supernodes)],
        }  # fmt: skip
    else:
        paths = certs.generate(cert_dir, num_supernodes)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{paths["ca_cert"]}"\n'
    )
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the apps must import the fedmm this process runs (a checkout, not some installed copy)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    dep = Deployment(workdir, port, num_supernodes, env, list(node_configs), paths=paths,
                     warm_worker=warm_worker)  # fmt: skip
    try:
        dep.start_superlink(timeout)
        for k in range(num_supernodes):
            dep.register(k)
        for k in range(num_supernodes):
            dep.start_supernode(k)
        dep.wait_online(num_supernodes, timeout)
    except BaseException:
        dep.stop()
        raise
    return dep


def run_config_of(cfg) -> dict:
    """The experiment and server options of ``cfg`` that differ from the defaults, for
    ``flwr run --run-config``: never a site's path, device or threads (``config.SITE_KEYS``)."""
    default = FedmmConfig().to_flat()
    return {
        k: v for k, v in cfg.resolved().to_flat().items() if v != default[k] and k not in SITE_KEYS
    }


def _rounds_done(out_dir: Path, cfg) -> int:
    try:
        runs = results.load(out_dir)["runs"]
    except ValueError:  # being replaced right now
        return 0
    for run in runs:
        if RunKey.of_run(run) == RunKey.of_config(cfg):
            return len(run["history"])
    return 0


def site_nodes(cfg) -> list[dict]:
    """Each site's settings for a deployment of ``cfg`` on this host (``cfg`` prepared): its own
    data and state directory; a share of the cores when the run sets no thread count (the sites
    run at the same time here); ``partition-id`` only when rehearsing a central benchmark."""
    from fedmm.engine import rehearsal_sites

    node_configs = rehearsal_sites(cfg)
    if cfg.train.threads == 0:
        share = max(1, (os.cpu_count() or 1) // len(node_configs))
        for node in node_configs.values():
            node["threads"] = share
    for k, node in node_configs.items():
        if cfg.data.benchmark != "sites":
            node["partition-id"] = k  # rehearsing a central benchmark: client K of it
    return [node_configs[k] for k in sorted(node_configs)]


def _watch(proc: subprocess.Popen, timeout: float, on_tick=None) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f}s")
        if on_tick is not None:
            on_tick()
        time.sleep(0.2)
    _kill_group(proc)


def _finished_run(cfg, workdir: Path) -> dict:
    for run in results.load(cfg.out_dir)["runs"]:
        if RunKey.of_run(run) == RunKey.of_config(cfg):
            if not results.is_complete(run, cfg.fed.rounds):  # all rounds, or stopped early
                break
            return run
    raise RuntimeError(
        f"the deployed run did not complete; logs: {workdir / 'flwr-run.log'}, "
        f"{workdir / 'superlink.log'}, {workdir}/supernode-K.log"
    )


def deploy_and_run(
    cfg, workdir: str | Path, kill_node: int | None = None, kill_after_round: int = 1,
    timeout: float = 900.0, app: Path | None = None, warm_worker: bool = True,
) -> dict:  # fmt: skip
    """Start a deployment, one SuperNode per site, run ``cfg`` with ``flwr run``, stop.

    Sites: with ``data.benchmark = "sites"`` one per site directory under ``data.data_dir`` (its
    ``data-dir``), else ``fed.clients`` partitions of the central benchmark (``partition-id``);
    each with its own ``state-dir`` under ``<out>/client_state/``.  The ServerApp gets the run
    config without any site path: it reads ``data.schema`` only.  With ``resume=true`` the
    deployment in ``workdir`` (its certificates and SuperLink database) is started again and the
    run continues from its checkpoint.

    ``kill_node=K`` SIGKILLs SuperNode K as soon as round ``kill_after_round`` is in results.json
    (i.e. while the next round's messages are out): a site crashing mid-run.  ``warm_worker``:
    the sites' ``warm-worker`` setting (False: a ClientApp process per message).  Returns the run
    record from ``<out_dir>/results.json``.
    """
    from fedmm.engine import prepare

    cfg = prepare(cfg)
    workdir = Path(workdir)
    dep = start(workdir, site_nodes(cfg), warm_worker=warm_worker)
    if cfg.resume:  # the run that died is still "running" in the SuperLink's database
        try:
            dep.stop_dead_runs(emit=lambda m: log.warning("%s", m))
        except BaseException:
            dep.stop()
            raise
    killed = kill_node is None

    def fault() -> None:
        nonlocal killed
        if not killed and _rounds_done(Path(cfg.out_dir), cfg) >= kill_after_round:
            log.warning("killing supernode-%d after round %d", kill_node, kill_after_round)
            dep.kill_supernode(kill_node)
            killed = True

    try:
        _watch(dep.run(run_config_of(cfg), app=app, wait=False), timeout, fault)
    finally:
        dep.stop()
    return _finished_run(cfg, workdir)


def drill(cfg, workdir: str | Path, site: int = 1, timeout: float = 1800.0,
          emit=print) -> dict:  # fmt: skip
    """The fault drill of a deployment, as an operator lives it, timed:

    1. round 1 completes; while round 2 is out, site ``site`` is SIGKILLed (SuperNode and its
       runner) and restarted with ``fedmm site`` (refused until the SuperLink's heartbeat window
       passes, then online);
    2. the ServerApp process is SIGKILLed before round 2 completes (the run dies; its checkpoint
       is round 1's);
    3. the SuperLink is SIGKILLed and restarted with its database (no site registers again);
    4. a run still "running" by ``flwr ls`` is stopped (``flwr stop``); the run is resumed with
       its own options (``resume=true``) and finishes.

    "Back" is the SuperLink's own word, not a site's log: its node list shows the site online
    with an activation or heartbeat after the kill (``Deployment.wait_back``).  Returns ``{"run":
    the resumed run's record, "seconds": {...}}``: site back after its kill, every site back
    after the SuperLink's kill, resume to the end.  ``cfg.fed.rounds`` must be at least 2."""
    from fedmm.engine import prepare

    cfg = prepare(cfg)
    if cfg.fed.rounds < 2:
        raise ValueError("the drill needs fed.rounds >= 2")
    workdir = Path(workdir)
    nodes = site_nodes(cfg)
    dep = start(workdir, nodes)
    seconds: dict[str, float] = {}
    try:
        proc = dep.run(run_config_of(cfg), wait=False)
        deadline = time.monotonic() + timeout
        while _rounds_done(Path(cfg.out_dir), cfg) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"round 1 never completed; see {workdir / 'flwr-run.log'}")
            time.sleep(0.2)
        emit(f"drill: round 1 done; killing site {site} (SuperNode + runner) while round 2 is out")
        killed_at, t0 = time.time(), time.monotonic()
        dep.kill_supernode(site)
        dep.start_supernode(site)
        if not dep.kill_serverapp():
            raise RuntimeError("no flwr-serverapp process to kill: the run ended too soon")
        _kill_group(proc, signal.SIGKILL)
        emit("drill: killed the ServerApp mid-round 2; waiting for the SuperLink to hear from "
             f"site {site} again")  # fmt: skip
        dep.wait_back([site], killed_at)
        seconds["site_back_online"] = time.monotonic() - t0
        emit(f"drill: site {site} online again after {seconds['site_back_online']:.0f} s "
             "(by the SuperLink's node list); killing the SuperLink")  # fmt: skip
        killed_at, t0 = time.time(), time.monotonic()
        dep.kill_superlink()
        dep.start_superlink()
        back = dep.wait_back(list(range(len(nodes))), killed_at)  # the runners reconnect alone
        seconds["superlink_back"] = time.monotonic() - t0
        emit("drill: SuperLink back, every site heard from again ("
             + ", ".join(f"site {k} {back[k] - killed_at:.0f} s" for k in sorted(back))
             + f") after {seconds['superlink_back']:.0f} s; resuming the run")  # fmt: skip
        t0 = time.monotonic()
        dep.stop_dead_runs(
            lambda m: emit(f"drill: {m}")
        )  # the killed run, "running" until its heartbeat window ends
        _watch(dep.run(run_config_of(cfg.with_overrides({"resume": True})), wait=False),
               max(60.0, deadline - time.monotonic()))  # fmt: skip
        seconds["resume_to_end"] = time.monotonic() - t0
    finally:
        dep.stop()
    return {"run": _finished_run(cfg, workdir), "seconds": seconds}
