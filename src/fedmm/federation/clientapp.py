"""The fedmm ClientApp (Flower Message API): one SuperNode = one site = one client.

What a client reads, writes and how private it is are the **site's** settings
(``federation/site.py``: ``data-dir``, ``state-dir``, ``cache-dir``, ``device``, ``threads``, the
privacy floor), from the SuperNode's ``--node-config`` -- in a simulation fedmm generates them
per client (``make_client_app(sites=...)``).  The server's message carries the experiment only
(``config.experiment_keys``); the client refuses, with an error reply and nothing written or
changed, a message that carries anything else, a global state whose keys or shapes differ from
its model's, non-finite values, a schema other than its own or a client index other than the one
it declared (``RefusedMessage``).

Data: a site directory (``data.benchmark = "sites"``) holds only this site's records; with
``partition-id`` a node rehearses client K of a central benchmark.

Client state (FedDAT's A_c, personal heads, the local model, ...) persists across rounds in the
Flower ``Context`` (``context.state``) **and** on disk, atomically, in
``<state-dir>/<method>-<peft>-<benchmark>-seed<S>-<run id>/client.pt`` -- the whole identity of
the run, so another run never reads it.  A restarted node with an empty Context picks the disk
copy up (a ``.fedmm-*.tmp`` that a killed write left beside it is removed before the next save).
The copy being replaced is kept as ``client.pt.prev``: when a server resumes an
interrupted round r+1 that this client had already trained, the client goes back to its state of
round r.  The server says in every message which round of this client it last aggregated
(``last-trained``); a client that finds no state of that round is a loud error, never a silent
fresh start.

Order of checks (``Site``): the site's consent (``consent.py``: what it accepts, its caps, the
CLI's validator) from the message and the site's settings alone; then that ``data-dir`` is one
site's directory, the schema hash (``schema.json``) and the declared client index (``site.json``);
only then is the runtime built and data read.  A refusal reads and writes nothing.

Errors and audit: the functions registered on the ClientApp (``as_site``) append every message
received and every reply or error sent to the site's hash-chained audit log (``audit.py``), log a
failure in full in the site's own log under a short reference, and raise a ``SiteError`` holding
only what may leave (``short_error``): fedmm's refusals (``RefusedMessage`` and consent refusals,
``ConfigError``, ``PrivacyBudgetExceeded``), whose texts are built from the run's values, with
their message (paths stripped as a belt); any other error as ``ClassName: failed at the site
(details in the site's log, ref R)`` -- Flower sends that text to the server, which records it in
results.json.  ``handle`` / ``handle_query`` / ``dispatch`` raise the original exceptions (tests
call them directly) and write no audit entry.  ``as_site`` also configures logging in the
``flwr-clientapp`` process (``fedmm.logs``), so lines such as "restored client state of round R"
reach the site's log.

Secure aggregation (``fed.secure_aggregation``, ``secagg.py``): a training round is four
``train`` messages; setup, share-keys and unmask pass the site's consent checks (its settings and
the experiment; no data is read), the collect stage is the training message above, and its reply
is the masked input with the reply's time only (no loss, count or DP diagnostic).  A site refuses
stages out of order and, with ``require-secure-aggregation``, any run without it.

Differential privacy (``sitedp.py``): with the stricter of the run's request and the site's floor,
either the whole upload is clipped and noised here (``dp-mode = "update"``, ``dp.py``) or every
local step is DP-SGD (``"record"``, ``dpsgd.py``, Opacus).  ε is accounted in the site's one
ledger per training data set (``privacy.py``: over every run, locked, spent before training), and
a site refuses to train once its ``dp-max-epsilon`` would be exceeded.  With DP on, no exact loss,
pre-clip norm or ``stat.*`` score leaves, and evaluation scores are withheld unless the site says
``dp-evaluation = "exact"``; evaluations are counted against the site's limits.

Size (~560 lines): the site's half of every message (train, evaluate, query, the secure-aggregation
stages) in one place, so that each check a site applies before reading data is visible in one file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedmm import logs
from fedmm.config import ConfigError, FedmmConfig, run_name
from fedmm.data import sites as site_data
from fedmm.data.schema import SCHEMA_FILE, read_schema
from fedmm.federation import audit, consent, dp, early_stopping, messages, secagg, sitedp
from fedmm.federation.messages import RefusedMessage
from fedmm.federation.privacy import EvaluationLimit, PrivacyBudgetExceeded
from fedmm.federation.site import SiteSettings
from fedmm.files import atomic_torch_save, remove_stale_temps
from fedmm.methods import ClientContext, get_method
from fedmm.methods.aggregation import ClientInfo
from fedmm.methods.base import Method
from fedmm.methods.state import State, to_numpy, to_torch
from fedmm.runtime import SITES, Runtime, get_runtime
from fedmm.sections import steps_per_round

log = logging.getLogger(__name__)
STATE_KEY, STATE_META = "fedmm.client_state", "fedmm.client_state_meta"
CORE_STATS = {"steps", "lr_first", "lr_last", "loss_sum"}  # sent under their own names


def make_client_app(sites: dict[int, dict] | None = None) -> ClientApp:
    """The ClientApp; ``sites``: simulation only, partition id -> that site's settings (the
    ``--node-config`` keys a SuperNode's operator would set)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return as_site(handle, msg, context, train=True, sites=sites)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return as_site(handle, msg, context, train=False, sites=sites)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return as_site(handle_query, msg, context, sites=sites)

    return app


class SiteError(RuntimeError):
    """What leaves a site when handling a message failed (``short_error``); the full error is in
    the site's own log."""


_SEP = r"[/\\]"
_PART = r"[^\s'\"`/\\,;:()\[\]{}<>|]+"
_IMAGE_EXT = r"\.(?:png|jpe?g|gif|bmp|tiff?|webp|dcm|dicom|nii(?:\.gz)?|npy|npz)"
_PATTERNS = [
    # quoted paths, spaces allowed: '/srv/my site/x.png', "C:\\a b\\c", '~/a b'
    re.compile(r"(?P<q>['\"])(?:[A-Za-z]:|~|\.{1,2})?[/\\][^'\"\n]*(?P=q)"),
    # file:// URLs (a local file, unlike https://)
    re.compile(r"file://[^\s'\"]*"),
    # home-relative and absolute paths, also after "path:" or "=" ("path:/srv/x")
    re.compile(rf"(?<![\w.~/\\])(?:~|[A-Za-z]:)?(?:{_SEP}{_PART})+{_SEP}?"),
    re.compile(rf"(?<![\w/\\])~(?:{_SEP}{_PART})*{_SEP}?"),
    # relative paths with a directory part: images/0042/MRN123.png, ./x, ../x
    re.compile(rf"(?<![\w.~/\\:])(?:\.{{1,2}}{_SEP})*{_PART}(?:{_SEP}{_PART})+{_SEP}?"),
    # bare image names: MRN123_scan.png
    re.compile(rf"(?<![\w/\\]){_PART}{_IMAGE_EXT}\b", re.IGNORECASE),
]
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
_RATIO = re.compile(r"\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)+")
MAX_REASON = 200
PATH = "<path>"


def strip_paths(text: str) -> str:
    """``text`` with every path replaced by ``<path>``: absolute (``/srv/a/train.jsonl:6``,
    ``C:\\x``), quoted with spaces (``'/srv/my site/x.png'``), home-relative (``~/x``), after a
    ``path:`` prefix, ``file://`` URLs, relative paths with a directory part
    (``images/0042/MRN123.png``, ``../x``) and bare image names (``MRN123.png``), which in a
    hospital may carry a patient's record number.  A line number after a path is kept
    (``<path>:6``); numbers like ``1/3`` and web URLs (``https://...``) are no site's secret."""
    urls: list[str] = []

    def keep_url(match: re.Match) -> str:
        if match.group(0).lower().startswith("file://"):
            return match.group(0)
        urls.append(match.group(0))
        return f"\0{len(urls) - 1}\0"

    text = _URL.sub(keep_url, text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(0) if _RATIO.fullmatch(m.group(0)) else PATH, text)
    return re.sub("\0(\\d+)\0", lambda m: urls[int(m.group(1))], text)


# fedmm's own refusals: their texts are built from the run's values and the site's settings
PASSABLE = (RefusedMessage, ConfigError, PrivacyBudgetExceeded, EvaluationLimit)


def short_error(exc: BaseException, ref: str = "") -> str:
    """The reason a site sends when handling a message failed.

    A refusal of fedmm's own (``PASSABLE``: ``RefusedMessage`` and the consent refusals,
    ``ConfigError``, ``PrivacyBudgetExceeded``) leaves as ``"ClassName: message"``, paths
    stripped (``strip_paths``, a belt) and cut to ``MAX_REASON`` characters; any other error as
    ``"ClassName: failed at the site (details in the site's log, ref R)"`` -- its text may hold
    a site's paths or data, so it stays in the site's log under the same ``ref``."""
    name = type(exc).__name__
    if not isinstance(exc, PASSABLE):
        where = f", ref {ref}" if ref else ""
        return f"{name}: failed at the site (details in the site's log{where})"
    text = " ".join(strip_paths(str(exc)).split())
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 1] + "…"
    return f"{name}: {text}" if text else name


def as_site(handler, msg: Message, context: Context, **kwargs) -> Message:
    """``handler(msg, context, **kwargs)`` as the ClientApp runs it: logging configured; the
    message and what is sent back appended to the site's audit log (``audit.py``; a message that
    cannot be audited is not handled); any exception logged here in full under a short reference
    and re-raised as a ``SiteError`` with ``short_error`` (Flower sends an exception's text to
    the server, which records it in results.json)."""
    logs.configure("clientapp")
    kind = msg.metadata.message_type
    try:
        log_path = consent.site_root(site_settings(context, kwargs.get("sites"))) / audit.AUDIT_FILE
        received = audit.append(log_path, audit.received_entry(msg))
    except Exception as exc:  # where the log goes, or the log itself, is broken: handle nothing
        ref = secrets.token_hex(4)
        log.exception("%s message not handled: the audit log cannot be written (ref %s)", kind, ref)
        raise SiteError(short_error(exc, ref)) from None
    try:
        reply = handler(msg, context, **kwargs)
        sent = audit.sent_entry(received, reply)
    except Exception as exc:
        ref = secrets.token_hex(4)
        log.exception("%s message failed (ref %s)", kind, ref)
        reason = short_error(exc, ref)
        _audit_sent(log_path, audit.sent_entry(received, reason=reason, ref=ref), kind)
        raise SiteError(reason) from None
    _audit_sent(log_path, sent, kind)
    return reply


def _audit_sent(path: Path, entry: dict, kind: str) -> None:
    """Append what is about to leave; if that fails, nothing leaves but a fixed reason."""
    try:
        audit.append(path, entry)
    except Exception as exc:
        ref = secrets.token_hex(4)
        log.exception("%s reply withheld: the audit log cannot be written (ref %s)", kind, ref)
        raise SiteError(short_error(exc, ref)) from None


app = make_client_app()


def dispatch(msg: Message, context: Context, sites: dict[int, dict] | None = None) -> Message:
    """Handle ``msg`` by its type, as the ClientApp does (for in-process grids in tests)."""
    kind = msg.metadata.message_type
    if kind == MessageType.QUERY:
        return handle_query(msg, context, sites)
    return handle(msg, context, train=kind == MessageType.TRAIN, sites=sites)


def site_settings(context: Context, sites: dict[int, dict] | None = None) -> SiteSettings:
    """This node's site settings: its node config (+ the simulated site's, in a simulation)."""
    node = dict(context.node_config)
    if sites is not None:
        node = {**node, **sites[int(node["partition-id"])]}
    return SiteSettings.from_node_config(node)


class Site:
    """This node's view of itself for one message: settings, run config, data, identity.

    Built in the order that keeps a refusal free of reads and writes: consent (the experiment
    against the site's settings, ``consent.check_consent``), then -- for a site directory -- that
    ``data-dir`` is one site's directory, the schema hash and the declared client index from
    ``schema.json`` / ``site.json`` alone (``check``), and only then the runtime (model, data).
    ``meta`` / ``arrays``: the message's meta and global state (``messages.read_server_message``);
    ``check_index``: False for the query, which carries no client index."""

    def __init__(self, context: Context, experiment: FedmmConfig, sites=None,
                 meta: dict | None = None, arrays: dict | None = None,
                 check_index: bool = True) -> None:  # fmt: skip
        self.settings = site_settings(context, sites)
        if meta is not None and meta.get("run-id"):
            consent.check_run_id(meta["run-id"])
        consent.check_consent(experiment, self.settings, arrays)
        self.cfg = self.settings.apply(experiment)
        if self.cfg.data.benchmark != SITES and not self.settings.rehearsal:
            raise RuntimeError(
                f"the run rehearses the central benchmark {self.cfg.data.benchmark!r}, but this "
                "SuperNode has no partition-id; a site serves site-directory runs "
                "(data.benchmark=sites), or set partition-id=K to rehearse"
            )
        self.index = -1
        site_dir = self.cfg.data.benchmark == SITES  # else a rehearsed central benchmark
        if site_dir:
            if not self.settings.data_dir:
                raise RuntimeError(
                    "this site has no data-dir: set it in the SuperNode's --node-config "
                    '(data-dir="/path/to/site", a directory written by fedmm split)'
                )
            data_dir = Path(self.settings.data_dir)
            problem = consent.site_directory_problem(data_dir)
            if problem:
                raise (RuntimeError if data_dir.is_dir() else FileNotFoundError)(problem)
            if not self.settings.cache_dir:  # derived data stays in the site's own directory
                cache = consent.default_cache_dir(self.settings)
                self.cfg = self.cfg.with_overrides({"cache_dir": str(cache)})
            schema = read_schema(Path(self.settings.data_dir) / SCHEMA_FILE)
            if meta is not None:  # before any record is read
                self.index = self.check(meta, schema.sha256(), check_index)
        self.runtime: Runtime = get_runtime(self.cfg)
        if not site_dir and meta is not None:  # a central benchmark's schema needs its data
            self.index = self.check(meta, self.runtime.schema.sha256(), check_index)
        clients = self.runtime.benchmark.clients
        self.local = 0 if site_dir else self.settings.partition_id
        if not 0 <= self.local < len(clients):
            raise RuntimeError(
                f"partition-id {self.local} out of range: the benchmark has {len(clients)} clients"
            )
        self.spec = clients[self.local]
        self.info = ClientInfo(self.spec.client_id, self.spec.task, tuple(self.spec.modalities))

    def declared_index(self) -> int:
        """The client index this site declares (-1: none, the server assigns one)."""
        if self.cfg.data.benchmark != SITES:
            return self.settings.partition_id
        index = site_data.read_site_info(Path(self.settings.data_dir)).index
        return -1 if index is None else index

    def check(self, meta: dict, ours: str, check_index: bool = True) -> int:
        """The client index the server addressed, after checking it and the schema (``ours``:
        this site's schema hash)."""
        if meta["schema-sha256"] != ours:
            raise RefusedMessage(
                f"the run's task schema (sha256 {meta['schema-sha256'][:12]}) differs from this "
                f"site's ({ours[:12]}); every site and the server must hold the same schema.json"
            )
        if not check_index:
            return -1
        index, declared = meta["client-index"], self.declared_index()
        if index < 0 or (declared >= 0 and index != declared):
            raise RefusedMessage(f"the server addressed client {index}, but this site is "
                                 f"client {declared}")  # fmt: skip
        return index

    def state_file(self, run_id: str) -> Path:
        """``<state root>/<run name>-<run id>/client.pt``; every name in it a safe path
        component (``consent.safe_name``; the run id was checked on arrival)."""
        schema = consent.safe_name(self.runtime.schema.name)
        run = f"{run_name(self.cfg, schema)}-{consent.check_run_id(run_id)}"
        return self.settings.state_root(consent.safe_name(self.spec.client_id)) / run / "client.pt"

    def split(self, name: str):
        return self.runtime.client_split(self.local, name)


def handle_query(msg: Message, context: Context, sites=None) -> Message:
    """Who this site is: the server asks once before round 1 (names, tasks, modalities, sizes;
    never a record, never a path)."""
    arrays, experiment, meta = messages.read_server_message(msg.content)
    site = Site(context, experiment, sites, meta, arrays, check_index=False)
    notes = site.runtime.benchmark.notes.get("unknown_answers", {})
    metrics = {
        "client-index": site.declared_index(), "num-train": len(site.spec.train),
        "num-test": len(site.spec.test), "unknown-train": int(notes.get("train", 0)),
        "unknown-test": int(notes.get("test", 0)),
    }  # fmt: skip
    about = ConfigRecord({
        "name": site.spec.client_id, "task": site.spec.task,
        "modalities": ",".join(site.spec.modalities), "description": site.spec.description,
        "schema-sha256": site.runtime.schema.sha256(),
    })  # fmt: skip
    reply = messages.client_reply(None, metrics)
    reply[messages.SITE] = about
    return Message(reply, reply_to=msg)


def check_global(method: Method, site: Site, arrays: dict, index: int) -> None:
    """The global state must have exactly the keys and shapes this client's model expects."""
    expected = method.init_global(site.runtime.model)
    if method.per_client_messages:
        expected = method.global_for_client(expected, index)
    extra, missing = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
    if extra or missing:
        raise RefusedMessage(
            f"the global state does not match this client's model: unexpected keys {extra[:3]}, "
            f"missing keys {missing[:3]}"
        )
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise RefusedMessage(f"global {key}: shape {tuple(value.shape)}, this client's model "
                                 f"has {tuple(expected[key].shape)}")  # fmt: skip


def secagg_stage(msg: Message, experiment: FedmmConfig, train: bool) -> str | None:
    """The secure-aggregation stage a message asks for (None: a plain message).  A run with
    ``fed.secure_aggregation`` gets no plain training reply from this site, and a run without
    it no stage (``RefusedMessage``): the server cannot switch it off by leaving the record out."""
    stage = None
    if secagg.SECAGG in msg.content:
        stage = str(msg.content[secagg.SECAGG].get("stage", ""))
    secure = experiment.fed.secure_aggregation != "off"
    if stage is not None and not (train and secure):
        raise RefusedMessage(f"a secure aggregation stage ({stage!r}) in a "
                             f"{'training' if train else 'evaluation'} message of a run with "
                             f"fed.secure_aggregation={experiment.fed.secure_aggregation}")  # fmt: skip
    if stage is None and train and secure:
        raise RefusedMessage("a plain training message in a run with fed.secure_aggregation="
                             f"{experiment.fed.secure_aggregation}: this site uploads only "
                             "masked inputs in it")  # fmt: skip
    return stage


def handle_secagg_keys(msg: Message, context: Context, experiment: FedmmConfig, meta: dict,
                       sites=None) -> Message:  # fmt: skip
    """Setup, share-keys and unmask (``secagg.client_stage``): the site's consent to the run
    first (its settings and the experiment only: these stages read no data and build no model)."""
    settings = site_settings(context, sites)
    consent.check_run_id(meta["run-id"])
    consent.check_consent(experiment, settings, None)
    claims = consent.site_root(settings) / "secagg"  # each stage answered once (secagg.claim)
    return Message(secagg.client_stage(msg, context, meta, experiment, claims), reply_to=msg)


def handle(msg: Message, context: Context, train: bool, sites=None) -> Message:
    t0 = time.perf_counter()
    global_arrays, experiment, meta = messages.read_server_message(msg.content)
    stage = secagg_stage(msg, experiment, train)
    if stage is not None and stage != secagg.COLLECT:
        return handle_secagg_keys(msg, context, experiment, meta, sites)
    site = Site(context, experiment, sites, meta, global_arrays)  # consent, schema, index first
    cfg, rnd, index = site.cfg, meta["round"], site.index
    method = get_method(cfg)
    method.bind(site.runtime.schema.task_names(), {index: site.info})
    check_global(method, site, global_arrays, index)
    params = None
    if stage == secagg.COLLECT:  # the relayed shares checked before any record is read
        params = secagg.client_collect(msg, context, meta, cfg,
                                       consent.site_root(site.settings) / "secagg")  # fmt: skip
    consent.check_trainable(method.count_trainable(site.runtime.model), "the built model",
                            site.settings)  # fmt: skip
    dp_cfg = site.settings.effective_dp(cfg.dp)  # the stricter of the run's and the site's
    dp_on = sitedp.is_on(dp_cfg)
    if train:  # refuse what this site's DP cannot serve before any record is read
        sitedp.check_mode(site.settings, dp_cfg, method, cfg)
    site.split("train"), site.split("test")  # encoded now, so load-seconds counts the data too
    val = None
    if cfg.fed.early_stopping_patience > 0:  # its validation split (held out of "train"): big
        val = site.split("val")  # enough that its score is no probe of a few records
        consent.check_val_rows(cfg, len(val), site.settings)
    load_seconds = time.perf_counter() - t0  # model + this site's data: ~0 once a process has them
    state_file = site.state_file(meta["run-id"])
    state = restore_state(context, state_file, cfg, rnd, meta["last-trained"], train=train)
    # train.local_epochs: this site's own step count, from its own rows (sections.steps_per_round)
    steps = steps_per_round(cfg.train, len(site.split("train")))
    if train:
        consent.check_steps(cfg, steps, site.settings)
    ctx = ClientContext(
        cfg, site.runtime.model, site.split("train"), site.split("test"), state, rnd, index,
        steps, steps * cfg.fed.rounds, val=None if train else val,
        val_view=early_stopping.stopping_view(cfg) if val is not None else "",
    )  # fmt: skip
    global_state = to_torch(global_arrays)
    if not train:  # counted against the site's evaluation limits before it runs
        # a site with a privacy budget guards its scores even when a run turns DP off
        guarded = dp_on or site.settings.dp_max_epsilon > 0
        sitedp.gate_evaluation(site, guarded, meta, global_arrays)
        views = method.client_evaluate(ctx, global_state)
        if ctx.predictions:  # generative: a sample of what it said, kept at the site only
            from fedmm.generation import save_predictions
            from fedmm.results.predictions import PREDICTIONS_FILE

            save_predictions(state_file.parent / PREDICTIONS_FILE, site.spec.client_id, rnd,
                             ctx.predictions)  # fmt: skip
        metrics = sitedp.evaluation_metrics(views, site.settings, guarded, ctx.val_views)
        metrics.update({"client-index": index, "num-examples": len(ctx.test),
                        "seconds": time.perf_counter() - t0,
                        "load-seconds": load_seconds})  # fmt: skip
        return Message(messages.client_reply(None, metrics), reply_to=msg)

    # before any training: spend the round's ε in the site's one ledger (locked; recorded before
    # the reply leaves: a crash over-counts)
    release, epsilon = None, 0.0
    if dp_on:
        release = sitedp.release(site.settings, dp_cfg, cfg, len(ctx.train))
        epsilon = sitedp.spend(site, release, meta, cfg)
        ctx.dp_sgd = sitedp.dp_sgd_for(release, cfg, len(ctx.train))
    try:
        update = method.client_train(ctx, global_state)
    finally:
        if ctx.dp_sgd is not None:  # the model is shared: no Opacus hook outlives the round
            ctx.dp_sgd.close()
    undeclared = sorted(set(update.upload) - set(method.upload_spec(site.runtime.model)))
    if undeclared:  # a method bug: never send what the method did not declare
        raise RuntimeError(f"method {cfg.method!r} returned an upload outside its declared "
                           f"upload_spec: {undeclared[:3]}")  # fmt: skip
    if release is not None and release.mode == "record":  # DP-SGD already noised every step
        arrays, dp_stats = to_numpy(update.upload), {}
    else:  # update level: clip the whole update to C, add N(0, (σC)²) (dp.py)
        arrays, dp_stats = dp.privatize(to_numpy(update.upload), global_arrays, dp_cfg)
    save_state(context, state_file, cfg, rnd, update.keep)
    n_steps = ctx.stats.get("steps", 0)
    metrics = {f"stat.{k}": v for k, v in ctx.stats.items() if k not in CORE_STATS}
    metrics |= {
        "client-index": index, "num-examples": len(ctx.train), "steps": n_steps,
        "lr-first": ctx.stats.get("lr_first", 0.0), "lr-last": ctx.stats.get("lr_last", 0.0),
        "loss": ctx.stats.get("loss_sum", 0.0) / max(1, n_steps),
        "seconds": time.perf_counter() - t0, "load-seconds": load_seconds, **dp_stats,
    }  # fmt: skip
    private = f", {release.mode}-level DP, ε = {epsilon:.3g}" if release else ""
    log.info("client %s, round %d: %d steps, loss %.4f, %.1f s (%.1f s loading)%s",
             site.spec.client_id, rnd, n_steps, metrics["loss"], metrics["seconds"],
             load_seconds, private)  # fmt: skip
    if params is not None:  # secure aggregation: the masked input, nothing per site but time
        keys = sorted(method.upload_spec(site.runtime.model))
        missing = sorted(set(keys) - set(arrays))
        if missing:  # a method bug: the masked vector has one layout for every site
            raise RuntimeError(f"method {cfg.method!r} returned an upload without declared keys "
                               f"{missing[:3]}; secure aggregation sums whole uploads")  # fmt: skip
        weight = len(ctx.train) if cfg.fed.weighting == "samples" else 1
        masked, clipped = secagg.client_mask(
            context, int(context.node_id), arrays, global_arrays, keys,
            method.secagg_summed, weight, params,
        )  # fmt: skip
        if clipped:  # the site's own log: the server never learns it
            log.warning("client %s, round %d: %d update values outside fed.secagg_clip=%g were "
                        "clipped before secure aggregation", site.spec.client_id, rnd, clipped,
                        params.clip)  # fmt: skip
        reply = messages.client_reply(None, {
            "client-index": index, "seconds": time.perf_counter() - t0,
            "load-seconds": load_seconds})  # fmt: skip
        reply[secagg.MASKED] = masked
        return Message(reply, reply_to=msg)
    # with DP: no exact pre-clip norm, loss or stat.* score leaves (they are not noised)
    metrics = sitedp.train_metrics(metrics, release, epsilon, site.settings.dp_delta)
    return Message(messages.client_reply(arrays, metrics, cfg.fed.compression), reply_to=msg)


# ---------------------------------------------------------------------- persistent state
def prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def pinned_options(cfg: FedmmConfig) -> str:
    """The options a run may not change once this site has kept state in it, as canonical JSON:
    every experiment option that affects results, except ``fed.rounds`` and the operational ones
    (a resumed run may extend its rounds or change timeouts).  Without the pin a server could
    switch, say, ``feddat.federate_head`` on mid-run with ``train.lr`` near 0 and receive the
    client's kept personal head as the "federated" one (hostile-server review, 2026-12-06)."""
    from fedmm.config import MAY_DIFFER, OPERATIONAL, experiment_of

    free = MAY_DIFFER | OPERATIONAL | {"fed.rounds"}
    pinned = {k: v for k, v in experiment_of(cfg).items() if k not in free}
    return json.dumps(pinned, sort_keys=True, default=str)


def check_pinned(kept: str | None, cfg: FedmmConfig) -> None:
    """``RefusedMessage`` naming the options that differ from those the run's kept state was
    trained under (``kept``, ``pinned_options`` of then); None: state from before the pin."""
    if kept is None or kept == (now := pinned_options(cfg)):
        return
    old, new = json.loads(kept), json.loads(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    raise RefusedMessage(
        f"this run's options changed since this site kept state in it ({', '.join(changed[:6])}"
        f"{', ...' if len(changed) > 6 else ''}): a run keeps its experiment; start a new run"
    )


def restore_state(
    context: Context, path: Path, cfg: FedmmConfig, rnd: int, last_trained: int = 0,
    train: bool = True,
) -> State:  # fmt: skip
    """The client's private state: from the Context, else (after a restart) from disk.

    Training in round ``rnd`` starts from the state of a round < rnd; evaluating in round ``rnd``
    reads the state that round's training left (≤ rnd).  A newer copy -- written by a round the
    server never completed, before it was restarted -- is passed over for the one before it.
    ``last_trained`` (from the server): the last round of this client the server aggregated; a
    state older than that, or none at all, is an error -- the site lost what the run depends on.
    A state kept under other options (``check_pinned``) is a ``RefusedMessage``.
    """
    newest = rnd - 1 if train else rnd
    meta = context.state.get(STATE_META)
    if (
        meta is not None and str(meta["path"]) == str(path) and STATE_KEY in context.state
        and last_trained <= int(meta.get("round", 0)) <= newest
    ):  # fmt: skip
        check_pinned(meta.get("pinned"), cfg)
        return to_torch(messages.from_record(context.state[STATE_KEY]))
    found = 0
    for candidate in (path, prev_path(path)):
        if candidate.is_file():
            saved = torch.load(candidate, weights_only=True)
            found = max(found, int(saved.get("round", 0)))
            if 0 < saved.get("round", 0) <= newest and saved["round"] >= last_trained:
                check_pinned(saved.get("pinned"), cfg)
                log.info("restored client state of round %d from %s", saved["round"], candidate)
                return dict(saved["state"])
    if last_trained > 0:
        raise RuntimeError(
            f"client state of round {last_trained} (the last round the server aggregated from this "
            f"client) is missing: {path} holds {'nothing' if not found else f'round {found}'}. "
            "The site's state-dir was lost or changed; restore it, or start a new run"
        )
    return {}


def save_state(context: Context, path: Path, cfg: FedmmConfig, rnd: int, state: State) -> None:
    """Keep ``state`` in the Context and on disk (atomically; the previous round's copy kept)."""
    context.state[STATE_KEY] = messages.to_record(to_numpy(state))
    pinned = pinned_options(cfg)
    context.state[STATE_META] = ConfigRecord({"path": str(path), "round": rnd, "pinned": pinned})
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # a write of a killed client process
    if path.is_file():
        try:
            if torch.load(path, weights_only=True).get("round", 0) < rnd:
                os.replace(path, prev_path(path))
        except Exception as exc:  # a torn or foreign file is not worth keeping
            log.warning("unreadable state file %s replaced: %s", path, exc)
    atomic_torch_save(
        {"round": rnd, "pinned": pinned, "state": {k: v.cpu() for k, v in state.items()}}, path
    )


__all__ = ["Site", "SiteError", "app", "as_site", "dispatch", "handle", "handle_query",
           "make_client_app", "restore_state", "save_state", "short_error", "site_settings",
           "strip_paths"]  # fmt: skip
