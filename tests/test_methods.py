"""Method invariants: FedDAT's dual adapters, equal step budgets and schedules, server averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bound_method

from fedmm.methods import METHODS, ClientContext, Reply
from fedmm.methods.aggregation import weighted_average
from fedmm.methods.centralized import run_centralized
from fedmm.methods.context import lr_at
from fedmm.methods.feddat import CLIENT, FROZEN, GLOBAL
from fedmm.methods.losses import distill_kl, task_loss
from fedmm.methods.state import from_namespace, get_parts, to_torch
from fedmm.runtime import get_runtime


def client_ctx(cfg, state, rnd, index=0):
    rt = get_runtime(cfg)
    steps = cfg.train.local_steps
    return ClientContext(cfg, rt.model, rt.client_split(index, "train"), rt.client_split(index, "test"),
                         state, rnd, index, steps, steps * cfg.fed.rounds)  # fmt: skip


def simulate_client(cfg, rounds):
    """Rounds of one client with the server's aggregation in between (one client: identity)."""
    method = bound_method(cfg)
    rt = get_runtime(cfg)
    global_np = method.init_global(rt.model)
    state, snapshots, stats = {}, [], []
    for rnd in range(1, rounds + 1):
        ctx = client_ctx(cfg, state, rnd)
        update = method.client_train(ctx, to_torch(global_np))
        global_np = method.aggregate(
            global_np, [Reply(0, {k: v.numpy() for k, v in update.upload.items()}, 10)]
        )
        state = update.keep
        snapshots.append({k: v.clone() for k, v in state.items()})
        stats.append(dict(ctx.stats))
    return method, snapshots, stats, global_np


PEFT_TYPES = ["adapter", "lora", "prompt", "bitfit"]


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_feddat_client_adapter_changes_in_every_round(tiny_cfg, peft_type):
    cfg = tiny_cfg.with_overrides({"method": "feddat", "fed.rounds": 4, "peft.type": peft_type})
    model = get_runtime(cfg).model
    bound_method(cfg).prepare(model)
    previous = get_parts(model, [f"adapter.{CLIENT}"])
    _, snaps, _, _ = simulate_client(cfg, 4)
    for rnd, snap in enumerate(snaps, 1):
        current = {k: v for k, v in snap.items() if k.startswith(f"adapter.{CLIENT}/")}
        assert current.keys() == previous.keys()
        changed = [k for k in current if not torch.equal(current[k], previous[k])]
        assert changed, f"A_c did not change in round {rnd}"
        if peft_type != "lora":  # LoRA's A gets no gradient while B is still zero
            assert len(changed) == len(current), (
                f"round {rnd}: unchanged {set(current) - set(changed)}"
            )
        previous = current


def test_feddat_keeps_client_adapter_and_head_private(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "feddat"})
    method, snaps, _, global_np = simulate_client(cfg, 1)
    assert all(k.split("/")[0] in (f"adapter.{GLOBAL}", "proj") for k in global_np)
    assert set(k.split("/")[0] for k in snaps[0]) == {f"adapter.{CLIENT}", "head"}
    shared = bound_method(cfg.with_overrides({"feddat.federate_head": True}))
    assert "head" in shared.upload_parts() and "head" not in shared.personal_parts()


def test_feddat_frozen_copy_equals_received_global_and_is_not_trained(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "feddat"})
    method = bound_method(cfg)
    rt = get_runtime(cfg)
    received = to_torch(method.init_global(rt.model))
    received = {k: v + 0.01 * torch.randn_like(v) for k, v in received.items()}  # a non-trivial A_s
    ctx = client_ctx(cfg, {}, 1)
    upload = method.client_train(ctx, received).upload
    frozen = get_parts(rt.model, [f"adapter.{FROZEN}"])
    for k, v in frozen.items():
        assert torch.equal(v, received[k.replace(FROZEN, GLOBAL)])
    assert not all(torch.equal(upload[k], received[k]) for k in upload)  # A_s itself trained
    assert not any(p.requires_grad for p in rt.model.peft.parameters_of(FROZEN))


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_feddat_gradients_split_exactly_between_the_two_losses(tiny_cfg, peft_type):
    """One backward of L_s + L_DAT gives A_s exactly ∇L_s and A_c exactly ∇L_DAT."""
    cfg = tiny_cfg.with_overrides(
        {"method": "feddat", "adapter.zero_init_up": False, "peft.type": peft_type}
    )
    method = bound_method(cfg)
    rt = get_runtime(cfg)
    model, dc = rt.model, cfg.feddat
    ctx = client_ctx(cfg, {}, 1)
    method.prepare(model)
    method.load(ctx, to_torch(method.init_global(model)))
    model.eval()  # no dropout: the same forward twice gives the same logits
    feats, ids, mask, labels = ctx.train.batch(torch.arange(8), ctx.device)

    def losses():
        with model.active(CLIENT, FROZEN, combine=dc.dat_combine):
            z_dat = model(feats, ids, mask)
        with model.active(GLOBAL):
            z_s = model(feats, ids, mask)
        l_s = dc.alpha * task_loss(z_s, labels) + (1 - dc.alpha) * distill_kl(
            z_s, z_dat.detach(), dc.temperature
        )
        l_dat = dc.beta * task_loss(z_dat, labels) + (1 - dc.beta) * distill_kl(
            z_dat, z_s.detach(), dc.temperature
        )
        return l_s, l_dat

    a_s, a_c = model.peft.parameters_of(GLOBAL), model.peft.parameters_of(CLIENT)
    for p in a_s + a_c:
        p.requires_grad_(True)
    l_s, l_dat = losses()
    fused = torch.autograd.grad(l_s + l_dat, a_s + a_c)
    l_s, _ = losses()
    only_s = torch.autograd.grad(l_s, a_s, allow_unused=True)
    _, l_dat = losses()
    only_dat = torch.autograd.grad(l_dat, a_c, allow_unused=True)
    for g, ref in zip(fused, list(only_s) + list(only_dat)):
        assert ref is not None and torch.allclose(g, ref, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in fused[len(a_s) :])


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
@pytest.mark.parametrize("method", [m for m, cls in METHODS.items() if cls.federated])
def test_every_method_takes_the_same_steps_on_the_same_schedule(tiny_cfg, method, peft_type):
    if method == "fedpia" and peft_type in ("prompt", "bitfit"):
        pytest.skip("FedPIA refuses PEFT types without hidden units (tested in test_fedpia)")
    cfg = tiny_cfg.with_overrides(
        {"method": method, "fed.rounds": 3, "train.warmup_frac": 0.2, "peft.type": peft_type,
         "tap.combine": "average"}  # prompts combine by average only
    )  # fmt: skip
    _, _, stats, _ = simulate_client(cfg, 3)
    total = cfg.train.local_steps * 3
    for rnd, s in enumerate(stats, 1):
        first = (rnd - 1) * cfg.train.local_steps
        assert s["steps"] == cfg.train.local_steps
        assert s["lr_first"] == pytest.approx(lr_at(first, total, cfg.train))
        assert s["lr_last"] == pytest.approx(
            lr_at(first + cfg.train.local_steps - 1, total, cfg.train)
        )


def test_centralized_takes_one_rounds_worth_of_all_clients_steps(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "centralized"})
    history = run_centralized(cfg)
    k, s = cfg.fed.clients, cfg.train.local_steps
    assert [h.train["pooled"]["steps"] for h in history] == [k * s] * cfg.fed.rounds
    assert history[0].train["pooled"]["lr-first"] == pytest.approx(
        lr_at(0, k * s * cfg.fed.rounds, cfg.train)
    )
    assert set(history[-1].clients) == {c.client_id for c in get_runtime(cfg).benchmark.clients}


def test_schedule_never_restarts():
    from fedmm.sections import TrainConfig

    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, schedule="cosine")
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warm-up
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, TrainConfig(schedule="nope"))


def test_weighted_average_by_samples_and_uniform():
    a = Reply(0, {"w": np.array([0.0, 0.0], dtype=np.float32)}, 1)
    b = Reply(1, {"w": np.array([4.0, 8.0], dtype=np.float32)}, 3)
    assert np.allclose(weighted_average([a, b], "samples")["w"], [3.0, 6.0])
    assert np.allclose(weighted_average([a, b], "uniform")["w"], [2.0, 4.0])
    with pytest.raises(ValueError):
        weighted_average([], "samples")


def test_registry_lists_the_foundation_methods():
    assert {"local", "centralized", "fedavg", "fedprox", "fedper", "feddat"} <= set(METHODS)


def test_fedprox_with_zero_mu_is_fedavg_and_mu_pulls_towards_the_global_model(tiny_cfg):
    def one_round(name, mu):
        cfg = tiny_cfg.with_overrides({"method": name, "fedprox.mu": mu, "model.dropout": 0.0})
        method = bound_method(cfg)
        start = to_torch(method.init_global(get_runtime(cfg).model))
        torch.manual_seed(0)
        upload = method.client_train(client_ctx(cfg, {}, 1), start).upload
        return sum(float(((upload[k] - start[k]) ** 2).sum()) for k in upload) ** 0.5, upload

    drift_avg, up_avg = one_round("fedavg", 0.0)
    drift_0, up_0 = one_round("fedprox", 0.0)
    drift_big, _ = one_round("fedprox", 1000.0)
    assert all(torch.allclose(up_avg[k], up_0[k]) for k in up_avg)
    assert drift_big < 0.5 * drift_avg


def test_fedper_keeps_its_head_and_shares_only_the_body(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedper"})
    method, snaps, _, global_np = simulate_client(cfg, 2)
    assert {k.split("/")[0] for k in global_np} == {"adapter.global_adapter", "proj"}
    assert {k.split("/")[0] for k in snaps[0]} == {"head"}
    assert not all(torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])  # trained on, kept


def test_fedadam_server_step_follows_the_adam_update(tiny_cfg):
    cfg = tiny_cfg.with_overrides(
        {"method": "fedadam", "fedadam.server_lr": 0.1, "fedadam.tau": 1e-3}
    )
    method = bound_method(cfg)
    theta = {"w": np.array([1.0, -1.0], dtype=np.float32)}
    reply = Reply(0, {"w": np.array([1.5, -1.0], dtype=np.float32)}, 5)
    new = method.aggregate(theta, [reply])
    m, v = 0.1 * np.array([0.5, 0.0]), 0.01 * np.array([0.25, 0.0])
    assert np.allclose(new["w"], theta["w"] + 0.1 * m / (np.sqrt(v) + 1e-3), atol=1e-6)
    again = method.aggregate(
        new, [Reply(0, {"w": new["w"]}, 5)]
    )  # zero update: momentum carries on
    assert again["w"][0] > new["w"][0]


def test_ditto_personal_model_is_private_and_pulled_to_the_global_one(tiny_cfg):
    def personal_distance(lam):
        cfg = tiny_cfg.with_overrides({"method": "ditto", "ditto.lam": lam})
        method, snaps, stats, global_np = simulate_client(cfg, 1)
        assert stats[0]["steps"] == stats[0]["personal_steps"] == cfg.train.local_steps
        assert {k.split("/")[0] for k in global_np} == {"adapter.global_adapter", "proj", "head"}
        personal = from_namespace(snaps[0], "personal")
        assert len(personal) == len(snaps[0])  # everything it keeps is the personal model
        assert {k.split("/")[0] for k in personal} == {"adapter.personal_adapter", "proj", "head"}
        start = to_torch(method.init_global(get_runtime(cfg).model))
        pers = {k.replace("personal_adapter", "global_adapter"): v for k, v in personal.items()}
        return sum(float(((pers[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    assert personal_distance(1000.0) < 0.5 * personal_distance(0.0)


def test_a_set_starts_the_same_whatever_other_sets_the_model_holds(tiny_cfg):
    model = get_runtime(tiny_cfg).model
    model.peft.ensure_sets(["global_adapter"])
    model.reset_trainable(0)
    alone = model.peft.state_dict_of("global_adapter")
    model.peft.ensure_sets(["client_adapter", "frozen_global", "zzz"])  # sorted before and after
    model.reset_trainable(0)
    for key, value in model.peft.state_dict_of("global_adapter").items():
        assert torch.equal(value, alone[key]), key


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_a_warning(tiny_cfg, monkeypatch):
    """An explicit ``train.precision=bf16`` on a CPU without amx_bf16 / avx512_bf16 is emulated
    (measured 25x slower than fp32 on an AVX2 EPYC): building the model warns and names the fix;
    ``auto`` and ``fp32`` never warn, nor does bf16 where it is native."""
    from fedmm import precision
    from fedmm.runtime import Runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.emulated_bf16("bf16", cpu)
    assert not precision.emulated_bf16("auto", cpu) and not precision.emulated_bf16("fp32", cpu)
    with pytest.warns(UserWarning, match=r"emulated.*train\.precision=auto or fp32"):
        rt = Runtime(tiny_cfg.with_overrides({"train.precision": "bf16"}))
    assert rt.bf16  # it runs as asked
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert not precision.emulated_bf16("bf16", cpu)


def test_auto_precision_is_bf16_only_where_the_device_has_native_bf16(tiny_cfg, monkeypatch):
    """``train.precision=auto``: bf16 on a CPU whose /proc/cpuinfo flags have amx_bf16 or
    avx512_bf16, fp32 on one without (emulated bf16 is slower there), recorded in the round's
    train stats (``bf16``); the flag reader is mocked, so this holds on any machine."""
    from fedmm import precision
    from fedmm.methods.precision import resolve_precision

    cpu = torch.device("cpu")
    for flags in ({"avx512f", "fma"}, {"avx512f", "amx_bf16", "amx_tile"}, {"avx512_bf16"}):
        monkeypatch.setattr(precision, "cpu_flags", lambda f=flags: frozenset(f))
        native = bool(flags & {"amx_bf16", "avx512_bf16"})
        assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
        cfg = tiny_cfg.with_overrides({"method": "fedavg", "train.precision": "auto"})
        ctx = client_ctx(cfg, {}, 1)
        bound_method(cfg).client_train(ctx, to_torch(bound_method(cfg).init_global(ctx.model)))
        assert ctx.stats["bf16"] == float(native)
        # a bf16 run's frozen backbone is stored in bf16, its trainable sets stay fp32
        weight = ctx.model.text.encoder.layer[0].intermediate.dense.weight
        assert weight.dtype == (torch.bfloat16 if native else torch.float32)
        assert all(p.dtype == torch.float32 for p in ctx.model.peft.parameters_of("global_adapter"))
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)  # no /proc/cpuinfo: torch's probes
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        assert resolve_precision("auto", cpu) == ("bf16" if amx else "fp32")
    with pytest.raises(Exception, match="train.precision"):
        resolve_precision("fp16", cpu)
