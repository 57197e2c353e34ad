"""Task/modality heterogeneity and TAP: data, missing modalities, multi-label metrics, TAP's
ownership rules, aggregation, replacement on validation data, stage-2 distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bound_method

from fedmm.data import load_benchmark
from fedmm.methods import ClientContext, Reply
from fedmm.methods.losses import multilabel_scores, task_loss
from fedmm.methods.state import get_parts, part_module, to_torch
from fedmm.methods.tap import TAP, client_sets, owns
from fedmm.runtime import get_runtime


@pytest.fixture()
def task_cfg(tiny_cfg):
    return tiny_cfg.with_overrides({
        "data.benchmark": "fmnist-task", "fed.clients": 6, "method": "tap",
        "tap.teacher_steps": 2, "tap.distill_steps": 2,
    })  # fmt: skip


def ctx_for(cfg, index, rnd=1, state=None):
    rt = get_runtime(cfg)
    steps = cfg.train.local_steps
    return ClientContext(cfg, rt.model, rt.client_split(index, "train"),
                         rt.client_split(index, "test"), {} if state is None else state, rnd,
                         index, steps, steps * cfg.fed.rounds)  # fmt: skip


# ---------------------------------------------------------------------- data and model
def test_task_benchmark_clients_differ_in_task_and_modality(task_cfg):
    bench = load_benchmark(task_cfg)
    assert [c.task for c in bench.clients] == [
        "vqa", "vqa", "classify", "classify", "attributes", "describe",
    ]  # fmt: skip
    assert bench.head_sizes() == {"vqa": 18, "classify": 10, "attributes": 7, "describe": 6}
    text_only, image_only = bench.clients[5], bench.clients[2]
    assert text_only.modalities == ("text",) and text_only.train.images is None
    assert image_only.modalities == ("image",) and set(image_only.train.texts) == {""}
    attrs = bench.clients[4].train.labels
    assert attrs.dtype == np.float32 and attrs.shape[1] == 7 and set(np.unique(attrs)) <= {0, 1}


def test_the_task_benchmark_refuses_another_client_count(task_cfg):
    with pytest.raises(ValueError, match="6 fixed clients"):
        load_benchmark(task_cfg.with_overrides({"fed.clients": 5}))


def test_a_record_without_an_image_ignores_its_placeholder_features(task_cfg):
    rt = get_runtime(task_cfg)
    split = rt.client_split(5, "test")  # text only
    assert split.image_present is not None and not split.image_present.any()
    model = rt.model.eval()
    model.set_task("describe")
    feats, ids, mask, _ = split.batch(torch.arange(4), torch.device("cpu"))
    assert mask.shape[1] == ids.shape[1] + feats.shape[1] and mask[:, ids.shape[1] :].sum() == 0
    with torch.no_grad():
        a = model(feats, ids, mask)
        b = model(torch.randn_like(feats) * 100, ids, mask)  # whatever sits there is never read
    torch.testing.assert_close(a, b)


def test_multilabel_loss_and_scores():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    perfect = (targets * 2 - 1) * 5
    scores = multilabel_scores(perfect, targets)
    assert scores[""] == pytest.approx(1.0) and scores[".f1"] == pytest.approx(1.0)
    inverted = multilabel_scores(-perfect, targets)
    assert inverted[""] == pytest.approx(0.0) and inverted[".f1"] == pytest.approx(0.0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(perfect, targets)
    torch.testing.assert_close(task_loss(perfect, targets), expected)


@pytest.mark.parametrize("method", ["centralized", "local", "fedavg", "feddat"])
def test_every_method_scores_each_task_with_its_metric(task_cfg, method):
    from fedmm.engine import run_method

    run = run_method(task_cfg.with_overrides({"method": method, "fed.rounds": 1}))
    assert set(run["final_by_task"]) == {"vqa", "classify", "attributes", "describe"}
    view = run["views"][0]
    assert f"{view}.f1" in run["final_by_task"]["attributes"]  # multi-label: AUROC and F1
    assert f"{view}.f1" not in run["final_by_task"]["vqa"]


# ---------------------------------------------------------------------- TAP
def test_clients_receive_and_send_only_their_own_modules(task_cfg):
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    frozen = rt.model.frozen_state_keys()
    for index, spec in enumerate(rt.benchmark.clients):
        sent = tap.global_for_client(global_np, index)
        assert sent and all(owns(spec, k) for k in sent)
        assert len(sent) < len(global_np)  # nobody gets the union
        ctx = ctx_for(task_cfg, index)
        upload = tap.client_train(ctx, to_torch(sent)).upload
        assert set(upload) == set(sent), spec.client_id
        assert not {k.split("/", 1)[1] for k in upload} & frozen
        assert all(k.split("/", 1)[0] in ("proj", "head") or k.startswith("adapter.")
                   for k in upload)  # fmt: skip
    assert "proj/weight" not in tap.global_for_client(global_np, 5)  # text-only: no projection
    assert not any(k.startswith("head/vqa.") for k in tap.global_for_client(global_np, 2))


def test_a_client_receiving_a_foreign_module_refuses_it(task_cfg):
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    with pytest.raises(ValueError, match="does not own"):
        tap.client_train(ctx_for(task_cfg, 5), to_torch(global_np))


def test_the_global_weights_reach_the_client(task_cfg):
    """The reference's bug: aggregated fusion weights never loaded (strict=False, wrong prefix)."""
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    rng = np.random.default_rng(0)
    marked = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in global_np.items()}
    sent = tap.global_for_client(marked, 0)
    tap.prepare(rt.model)
    tap.load(ctx_for(task_cfg, 0), to_torch(sent))
    rt.model.set_task(tap.spec_of(0).task)
    held = get_parts(rt.model, tap.trainable_parts())
    for key, value in sent.items():
        np.testing.assert_array_equal(held[key].numpy(), value, err_msg=key)


def test_aggregation_is_per_key_over_owners_and_keeps_unowned_keys(task_cfg):
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    a = {k: v + 1 for k, v in tap.global_for_client(global_np, 2).items()}  # classify, image
    b = {k: v + 3 for k, v in tap.global_for_client(global_np, 5).items()}  # describe, text
    new = tap.aggregate(global_np, [Reply(2, a, 10), Reply(5, b, 30)])
    shared = "adapter.mod_shared/0.down.weight"
    np.testing.assert_allclose(new[shared], global_np[shared] + (10 * 1 + 30 * 3) / 40, rtol=1e-6)
    only_image = "adapter.mod_image/0.down.weight"
    np.testing.assert_allclose(new[only_image], global_np[only_image] + 1, rtol=1e-6)
    for key in global_np:
        if key not in a and key not in b:  # e.g. the vqa head, mod_text's ... : nobody owns it
            np.testing.assert_array_equal(new[key], global_np[key], err_msg=key)
    assert any(k.startswith("head/vqa.") for k in global_np)


def test_replacement_is_judged_on_held_out_validation_data(task_cfg, monkeypatch):
    tap = bound_method(task_cfg)
    rt = get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    sent = to_torch(tap.global_for_client(global_np, 0))
    kept = {f"personal:{k}": v.clone() for k, v in sent.items()}  # a second round
    ctx = ctx_for(task_cfg, 0, state=kept)
    full = ctx.train
    scored, trained = [], []
    real_score, real_train = TAP._score, TAP._train
    monkeypatch.setattr(TAP, "_score", lambda self, c, s, split: scored.append(split)
                        or real_score(self, c, s, split))  # fmt: skip
    monkeypatch.setattr(TAP, "_train", lambda self, c, s, data, teacher=None, **kw: trained.append(
                        data) or real_train(self, c, s, data, teacher, **kw))  # fmt: skip
    tap.client_train(ctx, sent)
    assert len(scored) == 2 and scored[0] is scored[1]  # both models on the same split
    val, train = scored[0], trained[0]
    assert len(val) + len(train) == len(full) and len(val) == round(0.15 * len(full))

    def rows(split):  # a record's identity: its image features and its text
        return [tuple(f.flatten().tolist()) + tuple(i.tolist())
                for f, i in zip(split.feats, split.input_ids)]  # fmt: skip

    assert trained[0] is trained[1]  # both models train on the same, non-validation rows
    assert not set(rows(val)) & set(rows(train))
    assert sorted(rows(val) + rows(train)) == sorted(rows(full))
    assert "replaced" in ctx.stats and {"val_global", "val_personal"} <= set(ctx.stats)


def test_replacement_copies_the_global_copy_when_it_wins(task_cfg, monkeypatch):
    tap = bound_method(task_cfg)
    rt = get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    sent = to_torch(tap.global_for_client(global_np, 2))
    # personal model much worse on validation: a state of large random weights
    bad = {f"personal:{k}": torch.randn_like(v) * 10 for k, v in sent.items()}
    scores = iter([0.9, 0.1])  # global copy, then personal
    monkeypatch.setattr(TAP, "_score", lambda *a: next(scores))
    ctx = ctx_for(task_cfg, 2, rnd=2, state=dict(bad))
    update = tap.client_train(ctx, sent)
    assert ctx.stats["replaced"] == 1.0
    for key, value in update.upload.items():  # the personal model restarted from the global copy
        personal = update.keep[f"personal:{key}"]
        assert (personal - value).norm() < (personal - bad[f"personal:{key}"]).norm(), key
    scores = iter([0.5, 0.5])  # a tie is no win (relative margin)
    ctx = ctx_for(task_cfg, 2, rnd=2, state=dict(bad))
    tap.client_train(ctx, sent)
    assert ctx.stats["replaced"] == 0.0
    # the ablation without replacement: the same win is scored and recorded, never acted on
    scores = iter([0.9, 0.1])
    ablated = task_cfg.with_overrides({"tap.replacement": False})
    ctx = ctx_for(ablated, 2, rnd=2, state=dict(bad))
    bound_method(ablated).client_train(ctx, sent)
    assert ctx.stats["replaced"] == 0.0
    assert (ctx.stats["val_global"], ctx.stats["val_personal"]) == (0.9, 0.1)


def test_a_first_round_starts_the_personal_model_from_the_trained_global_copy(task_cfg):
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    sent = to_torch(tap.global_for_client(tap.init_global(rt.model), 1))
    ctx = ctx_for(task_cfg, 1)
    update = tap.client_train(ctx, sent)
    assert "replaced" not in ctx.stats  # no personalised model existed: nothing to decide
    assert any(not torch.equal(update.keep[f"personal:{k}"], v) for k, v in update.upload.items())


def test_stage_two_runs_after_the_last_round_only(task_cfg):
    tap, rt = bound_method(task_cfg), get_runtime(task_cfg)
    global_np = tap.init_global(rt.model)
    sent = to_torch(tap.global_for_client(global_np, 4))
    state = tap.client_train(ctx_for(task_cfg, 4, 1, {}), sent).keep
    views = tap.client_evaluate(ctx_for(task_cfg, 4, 1, state), sent)
    assert set(views) == {"shared", "shared.f1", "personal", "personal.f1"}
    last = task_cfg.fed.rounds
    before = {k: v.clone() for k, v in state.items()}
    views = tap.client_evaluate(ctx_for(task_cfg, 4, last, state), sent)
    assert {"distilled", "distilled.f1"} <= set(views)
    assert all(torch.equal(before[k], state[k]) for k in state)  # evaluation keeps its state


def test_module_sets_follow_the_client_modalities_and_task(task_cfg):
    bench = load_benchmark(task_cfg)
    assert client_sets(bench.clients[0]) == [
        "mod_shared", "mod_image", "mod_text", "task_shared", "task_vqa",
    ]  # fmt: skip
    assert client_sets(bench.clients[5]) == ["mod_shared", "mod_text", "task_shared",
                                             "task_describe"]  # fmt: skip
    model = get_runtime(task_cfg).model
    bound_method(task_cfg).prepare(model)
    assert part_module(model, "adapter.task_attributes") is not None
