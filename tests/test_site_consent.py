"""A site consents to each experiment before it reads anything (issue 31, parts 2 and 6).

* hostile model sources (paths, ``..``, ``~``, URLs), downloads, oversized runs and unaccepted
  methods / PEFT types are refused with a reply naming the option, the value and the site's
  limit -- and the site reads no record and writes no file;
* a ``data-dir`` that is a split's root is an error naming the site directories in it;
* the schema hash and the declared client index are checked before any record is read;
* a site's description and the names in its state paths never carry a path;
* ``fedmm site purge`` removes the cache and the client state, and keeps the privacy ledger
  and the audit log unless told loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import bound_method
from flwr.app import Context, Message, MessageType, RecordDict

from fedmm.config import ConfigError
from fedmm.federation import clientapp, consent, messages
from fedmm.federation.consent import NotAccepted, safe_name
from fedmm.federation.messages import RefusedMessage
from fedmm.federation.site import SiteSettings

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture()
def one_site(tiny_cfg, tmp_path):
    """``(cfg, site directory, split root, state dir)``: the first site of a tiny split; its
    settings name only ``data-dir`` and ``state-dir`` (the cache defaults to the state root)."""
    from fedmm.data import load_benchmark, sites
    from fedmm.data.site_split import write_sites

    root = tmp_path / "split"
    write_sites(load_benchmark(tiny_cfg), root)
    site = sites.list_sites(root)[0]
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "data.benchmark": "sites",
                                   "data.data_dir": str(site)})  # fmt: skip
    return cfg, site, root, tmp_path / "site-state"


def node(site: Path, state: Path, **settings) -> Context:
    config = {"data-dir": str(site), "state-dir": str(state), **settings}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def schema_sha(site: Path) -> str:
    from fedmm.data.schema import SCHEMA_FILE, read_schema

    return read_schema(site / SCHEMA_FILE).sha256()


def message(cfg, site: Path, kind=MessageType.TRAIN, arrays=None, index=0, sha=None,
            run_id="run1", **experiment) -> Message:  # fmt: skip
    """A server message over ``cfg`` with ``experiment`` options changed in the JSON it carries
    (as a hostile server would: no config check on the way)."""
    content = messages.server_message(arrays or {}, cfg, 1, index, sha or schema_sha(site), 0,
                                      run_id)  # fmt: skip
    config = dict(content[messages.CONFIG])
    config["experiment"] = json.dumps(json.loads(str(config["experiment"])) | experiment)
    content[messages.CONFIG] = type(content[messages.CONFIG])(config)
    return Message(content, 7, kind)


@pytest.fixture()
def reads(monkeypatch):
    """Every way a site reads its data or builds its runtime, recorded (and stopped)."""
    import fedmm.data.common
    import fedmm.data.sites

    calls: list[str] = []

    def stop(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return fail

    monkeypatch.setattr(fedmm.data.sites, "load_site", stop("load_site"))
    monkeypatch.setattr(fedmm.data.sites, "read_site_records", stop("read_site_records"))
    monkeypatch.setattr(fedmm.data.common, "read_images", stop("read_images"))
    monkeypatch.setattr(clientapp, "get_runtime", stop("get_runtime"))
    return calls


def files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*")]


HOSTILE_MODELS = ["../x", "/abs/models/vilt", "~/models", "org/../x", "..", "a/b/c",
                  "https://evil.example/model", "file:///etc/passwd", "C:\\models\\x",
                  "org/name with space"]  # fmt: skip


@pytest.mark.parametrize("hf_path", HOSTILE_MODELS)
def test_hostile_model_sources_are_refused_and_nothing_is_read_or_written(
    one_site, reads, tmp_path, hf_path
):
    cfg, site, _, state = one_site
    before = files(tmp_path / "xdg-cache", tmp_path / "xdg-state")
    msg = message(cfg, site, **{"model.hf_path": hf_path})
    with pytest.raises(NotAccepted, match="model.hf_path=.*model-dir") as refused:
        clientapp.handle(msg, node(site, state), train=True)
    assert repr(hf_path) in str(refused.value)
    assert reads == [] and not state.exists()
    assert files(tmp_path / "xdg-cache", tmp_path / "xdg-state") == before


REFUSALS = [  # (experiment options, site settings, what the refusal names)
    ({"model.hf_download": True}, {}, r"model.hf_download=True.*allow-download=false"),
    ({"model.image_size": 4096}, {}, r"model.image_size=4096.*max-image-size=1024"),
    ({"train.local_steps": 20000}, {},
     r"train.local_steps x train.accumulation=20000.*max-local-steps=10000"),
    ({"train.local_steps": 600, "train.accumulation": 20}, {},
     r"train.accumulation=12000.*max-local-steps=10000"),
    ({"fed.rounds": 10**6}, {}, r"fed.rounds=1000000.*max-rounds=1000"),
    ({"train.batch_size": 100000}, {}, r"train.batch_size=100000.*max-batch-size=512"),
    ({"train.eval_batch_size": 4096}, {"max-batch-size": 300},
     r"train.eval_batch_size=4096.*max-batch-size=300"),
    ({"eval.generate_batch_size": 100000}, {},
     r"eval.generate_batch_size=100000.*max-batch-size=512"),
    ({"model.max_text_len": 4096}, {}, r"model.max_text_len=4096.*max-text-len=512"),
    ({}, {"max-trainable-params": 100}, r"trainable values.*max-trainable-params=100"),
    ({"method": "feddat"}, {"accept-methods": "fedavg,fedprox"},
     r"method='feddat'.*accepts fedavg, fedprox"),
    ({"peft.type": "adapter"}, {"accept-peft": "lora"}, r"peft.type='adapter'.*accepts lora"),
    ({}, {"accept-models": "minilm-mobilenet"},
     r"model.backbone='tiny'.*accept-models \(minilm-mobilenet\)"),
    ({"model.hf_path": "someorg/some-model"}, {},
     r"model.hf_path='someorg/some-model'.*accept-models \(builtin\)"),
    ({"train.lr": -1.0}, {}, r"invalid at this site: train.lr must be a finite number in \(0"),
    # found by the hostile-server review: widths that build a model of gigabytes before the
    # trainable count could be checked, and a regex that backtracks for hours per module name
    ({"model.head_hidden": 3_000_000}, {}, r"model.head_hidden=3000000.*max-width=8192"),
    ({"peft.type": "lora", "peft.lora_r": 10**6}, {}, r"peft.lora_r=1000000.*max-width=8192"),
    ({"adapter.bottleneck": 10**6}, {}, r"adapter.bottleneck=1000000.*max-width=8192"),
    ({"peft.prompt_length": 10**6}, {}, r"peft.prompt_length=1000000.*max-width=8192"),
    ({"method": "tap", "tap.distill_steps": 10**9}, {},
     r"tap.distill_steps=1000000000.*max-local-steps=10000"),
    ({"peft.type": "lora", "peft.lora_targets": "(.|.)*Z"}, {},
     r"peft.lora_targets='\(\.\|\.\)\*Z'.*without groups"),
    ({"peft.type": "lora", "peft.lora_targets": "q.*.*.*.*.*Z"}, {}, r"at most 4 of"),
    ({"train.max_target_tokens": 10**6}, {}, r"train.max_target_tokens=1000000.*max-text-len"),
]  # fmt: skip


@pytest.fixture()
def global_np(one_site):
    """The global state a server sends to the site of ``one_site`` in round 1."""
    from fedmm.runtime import get_runtime

    cfg = one_site[0]
    return bound_method(cfg).init_global(get_runtime(cfg).model)


@pytest.mark.parametrize("experiment, settings, reason", REFUSALS)
def test_runs_beyond_the_sites_consent_are_refused_before_anything_is_read(
    one_site, global_np, reads, tmp_path, experiment, settings, reason
):
    cfg, site, _, state = one_site
    msg = message(cfg, site, arrays=global_np, **experiment)
    with pytest.raises(NotAccepted, match=reason):
        clientapp.handle(msg, node(site, state, **settings), train=True)
    assert reads == [] and files(state, tmp_path / "xdg-cache") == []


def test_a_refusal_leaves_the_site_naming_option_value_and_limit_and_is_audited(one_site, reads):
    """Through the ClientApp as Flower calls it: the reply names the option, the value and the
    limit; the only file the site writes is its audit log."""
    cfg, site, _, state = one_site
    msg = message(cfg, site, **{"fed.rounds": 5000})
    with pytest.raises(clientapp.SiteError) as raised:
        clientapp.make_client_app()(message=msg, context=node(site, state))
    assert str(raised.value) == ("NotAccepted: this site does not accept fed.rounds=5000: this "
                                 "site's limit is max-rounds=1000")  # fmt: skip
    assert reads == []
    assert [p.name for p in files(state) if p.is_file()] == ["audit.jsonl"]


def test_accepted_hub_ids_and_downloads_are_the_sites_choice(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"model.backbone": "vilt", "model.hf_path": "dandelin/vilt-b32"})
    with pytest.raises(NotAccepted, match="accept-models"):
        consent.check_model(cfg, SiteSettings())
    consent.check_model(cfg, SiteSettings(accept_models="builtin,dandelin/vilt-b32"))
    consent.check_model(cfg, SiteSettings(accept_models="*"))
    download = cfg.with_overrides({"model.hf_download": True})
    with pytest.raises(NotAccepted, match="allow-download"):
        consent.check_model(download, SiteSettings(accept_models="*"))
    consent.check_model(download, SiteSettings(accept_models="*", allow_download=True))
    # with the site's own weights (model-dir), whatever the run names is never read
    consent.check_model(cfg.with_overrides({"model.hf_path": "/srv/x"}),
                        SiteSettings(model_dir="/srv/site-weights"))  # fmt: skip
    assert SiteSettings.from_node_config({"allow-download": "false"}).allow_download is False


def test_a_hugging_face_vlm_familys_default_checkpoint_needs_the_family_named(tiny_cfg):
    """A family's hub default (up to LLaVA-1.5-7B from the site's cache) is not fedmm's own
    weights: builtin does not admit it; naming the family, or the site's model-dir, does."""
    cfg = tiny_cfg.with_overrides({"model.backbone": "llava", "data.task_kind": "generate"})
    with pytest.raises(NotAccepted, match="accept-models names the family"):
        consent.check_model(cfg, SiteSettings())
    consent.check_model(cfg, SiteSettings(accept_models="builtin,llava"))
    consent.check_model(cfg, SiteSettings(model_dir="/srv/site-llava"))


@pytest.mark.parametrize("settings, match", [
    ({"accept-models": ""}, "accept-models is empty"),
    ({"accept-models": "../weights"}, "accept-models: '../weights'"),
    ({"accept-methods": "fedsomething"}, "accept-methods: unknown 'fedsomething'"),
    ({"accept-peft": "ia3"}, "accept-peft: unknown 'ia3'"),
    ({"max-rounds": 0}, "max-rounds must be >= 1"),
    ({"allow-download": "perhaps"}, "allow-download"),
])  # fmt: skip
def test_bad_consent_settings_stop_the_site_naming_the_setting(settings, match):
    with pytest.raises(ConfigError, match=match):
        SiteSettings.from_node_config(settings)


# ------------------------------------------------------------------ part 6: no silent fallbacks
def test_a_data_dir_holding_several_sites_is_an_error_naming_them(one_site, reads):
    cfg, site, root, state = one_site
    with pytest.raises(RuntimeError, match=r"holds site directories 00-\S+, 01-\S+, 02-\S+; "
                       r"point data-dir at one of them") as raised:  # fmt: skip
        clientapp.handle(message(cfg, site), node(root, state), train=True)
    assert str(root) in str(raised.value) and reads == []


def test_schema_and_index_are_checked_before_any_record_is_read(one_site, reads):
    cfg, site, _, state = one_site
    with pytest.raises(RefusedMessage, match="task schema"):
        clientapp.handle(message(cfg, site, sha="0" * 64), node(site, state), train=True)
    with pytest.raises(RefusedMessage, match="addressed client 2, but this site is client 0"):
        clientapp.handle(message(cfg, site, index=2), node(site, state), train=True)
    assert reads == [] and files(state) == []


def test_a_site_without_a_description_sends_its_name_and_no_path(one_site, tmp_path):
    from fedmm.data import sites

    cfg, site, _, state = one_site
    info = json.loads((site / sites.SITE_FILE).read_text())
    info.pop("description", None)
    (site / sites.SITE_FILE).write_text(json.dumps(info))
    reply = clientapp.handle_query(message(cfg, site, MessageType.QUERY, index=-1),
                                   node(site, state))  # fmt: skip
    about = reply.content[messages.SITE]
    assert about["description"] == f"site {info['name']}"
    assert str(tmp_path) not in json.dumps({k: str(v) for k, v in about.items()})


def test_names_from_files_and_messages_become_safe_path_components(one_site, tmp_path):
    from fedmm.data import sites
    from fedmm.data.schema import SCHEMA_FILE

    assert safe_name("hospital-a_1.2") == "hospital-a_1.2"  # a safe name is kept as is
    for hostile in ("../../etc", ".hidden", "a/b", "", "x" * 200, "naïve name"):
        mapped = safe_name(hostile)
        assert consent.SAFE_NAME.fullmatch(mapped) and len(mapped) <= consent.MAX_NAME
        assert not mapped.startswith(".") and mapped != hostile
    assert safe_name("a/b") != safe_name("a-b")  # mapped names never collide with safe ones

    cfg, site, _, state = one_site
    info = json.loads((site / sites.SITE_FILE).read_text()) | {"name": "../../escaped"}
    (site / sites.SITE_FILE).write_text(json.dumps(info))
    schema = json.loads((site / SCHEMA_FILE).read_text()) | {"name": "../../evil"}
    (site / SCHEMA_FILE).write_text(json.dumps(schema))
    from fedmm.runtime import get_runtime

    global_np = bound_method(cfg).init_global(get_runtime(cfg).model)
    clientapp.handle(message(cfg, site, arrays=global_np), node(site, state), train=True)
    written = [p for p in tmp_path.rglob("client.pt")]
    assert len(written) == 1 and written[0].is_relative_to(state)
    assert written[0].parent.parent == state / safe_name("../../escaped")
    assert safe_name("../../evil") in written[0].parent.name
    with pytest.raises(RefusedMessage, match="malformed run id"):
        clientapp.handle(message(cfg, site, arrays=global_np, run_id="a" * 65),
                         node(site, state), train=True)  # fmt: skip


def test_purge_removes_cache_and_state_and_keeps_ledger_and_audit(
    one_site, global_np, tmp_path, capsys
):
    from fedmm import cli

    cfg, site, _, state = one_site
    settings = {"data-dir": str(site), "state-dir": str(state), "dp-clip-norm": 10.0,
                "dp-noise-multiplier": 0.5}  # fmt: skip
    ctx = Context(run_id=1, node_id=7, node_config=settings, state=RecordDict(), run_config={})
    clientapp.make_client_app()(message=message(cfg, site, arrays=global_np), context=ctx)
    root = consent.site_root(SiteSettings.from_node_config(settings))
    names = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert {"audit.jsonl", "client.pt"} <= set(names)
    assert len(list((root / "privacy").glob("*.json"))) == 1  # the one ledger of this data
    assert list((root / "cache" / "features").glob("*.pt"))  # the default cache: the site's own
    assert not (tmp_path / "xdg-cache").exists()

    toml = tmp_path / "site.toml"
    toml.write_text('superlink = "127.0.0.1:9"\ninsecure = true\n[settings]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))  # fmt: skip
    assert cli.main(["site", "purge", "--config", str(toml), "--what", "cache"]) == 0
    assert not (root / "cache" / "features").exists() and list(root.rglob("client.pt"))
    assert cli.main(["site", "purge", "--config", str(toml), "--what", "state"]) == 0
    left = sorted({p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()})
    assert left == ["audit.jsonl", "privacy"]
    assert "privacy ledger and audit log kept" in capsys.readouterr().out
    assert cli.main(["site", "purge", "--config", str(toml),
                     "--also-delete-privacy-ledger-and-audit-log"]) == 0  # fmt: skip
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_purging_the_cache_of_a_rehearsed_partition_is_an_error_not_a_silent_nothing(tmp_path):
    """A rehearsed partition without cache-dir uses the shared default cache: a purge of one
    partition must neither empty it nor report an empty directory as purged."""
    from fedmm.federation import retention

    settings = SiteSettings.from_node_config({"data-dir": str(tmp_path / "fmnist"),
                                              "state-dir": str(tmp_path), "partition-id": 1})  # fmt: skip
    with pytest.raises(ValueError, match="shared feature cache"):
        retention.purge(settings, "cache")
    own = SiteSettings.from_node_config({"data-dir": str(tmp_path / "fmnist"), "partition-id": 1,
                                         "state-dir": str(tmp_path), "cache-dir": str(tmp_path / "c")})  # fmt: skip
    (tmp_path / "c" / "features").mkdir(parents=True)
    assert retention.purge(own, "cache") == [tmp_path / "c" / "features"]
