"""Learning happens: every registered method, run a few rounds on a task made to be learnable,
beats chance by a stated margin in every view it declares -- and sabotage makes that check fail.

The task (``bar_task``): ten classes, each drawn as the bright bar of ``conftest.fmnist_dir`` at
a class-dependent height on a noisy 28x28 image; three clients (the ``client`` column of the
``jsonl`` benchmark), each holding 40 training and 40 test images, every class equally often.
Every record asks the same question, so neither the text nor a constant answer can beat chance
(10 %): only the image can (``test_only_the_image_tells_the_class`` pins that).  The default
benchmark (``fmnist-domain``) is no use here: its 18 answers over five question families let an
image-blind model score far above 10 % (answering "no" to everything scores 28 % on the
``tiny_cfg`` split -- exactly what FedAvg and centralized reached there in 2 rounds of 3 steps), so
"beats 2x chance" would pass with a broken image path.

Measured final accuracies with ``SETTINGS`` (the lowest of a method's views; seed 0, the
seed the test runs, and in brackets the lowest over seeds 0, 1, 2): centralized 0.98 (0.98),
fedavg 0.98 (0.98), fedprox 0.97 (0.97), local 0.94 (0.86), fedpia 0.94 (0.94), tap 0.94
(0.92), ditto 0.92 (0.87), fedper 0.92 (0.89), feddat 0.91 (0.87), scaffold 0.84 (0.54),
fedavgm 0.77 (0.70), fedyogi 0.52 (0.34), fedadam 0.52 (0.34) -- the server-Adam family moves
slowest at its default server learning rate η = 0.01.  The check asks for ``CHANCE + MARGIN`` =
0.25 in every view: 2.5x chance, 5.5 standard deviations of a chance-level score on 120 test
images above chance (sd = sqrt(0.1 * 0.9 / 120) = 0.027), and 0.27 (0.09 over the three seeds)
below the lowest measured score.  Sabotaged, every view scored 0.09-0.11 (server keeps θ^t;
image zeroed) or 0.00 (gradient ascent).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_federation
from PIL import Image
from test_serverapp import InProcessGrid

from fedmm import results
from fedmm.config import FedmmConfig
from fedmm.engine import prepare, rehearsal_sites, run_method
from fedmm.methods import METHODS, ClientContext
from fedmm.methods.fedavg import FedAvg
from fedmm.runtime import Encoded, get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CLASSES, CLIENTS, TRAIN_PER_CLIENT, TEST_PER_CLIENT = 10, 3, 40, 40
CHANCE = 1 / CLASSES  # balanced test labels and one question: the best image-blind accuracy
MARGIN = 0.15  # every declared view must reach CHANCE + MARGIN (module docstring: why 0.15)
# One regime for every method: AdamW at 10x the default lr with batches of 16, 10 rounds of 4
# steps, evaluated once at the end (only the final accuracies are checked).  Many short rounds
# rather than few long ones because server momentum (FedAvgM, η = 1, β = 0.9: an effective step
# of 10x the averaged update) overshoots when each round's update is large: with 5 rounds of 8
# steps FedAvgM's shared view ended at 0.10-0.37 (seeds 0-2, a first version of this task).
SETTINGS = {
    "model.backbone": "tiny", "model.image_size": 32, "data.benchmark": "jsonl",
    "fed.clients": CLIENTS, "fed.rounds": 10, "fed.eval_every": 10, "train.local_steps": 4,
    "train.batch_size": 16, "train.lr": 1e-2, "seed": 0, "progress": False,
}  # fmt: skip
# Methods that need more than SETTINGS, with why (none today; TAP runs on the single-task
# benchmark too: all its clients share one task and one modality pair).
SPECIAL: dict[str, dict] = {}


def bar_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """``conftest.fmnist_dir``'s drawing: noise with a bright bar whose height is the class."""
    image = rng.integers(0, 60, size=(28, 28)).astype(np.uint8)
    image[2 * label : 2 * label + 6, 4:24] = 230
    return image


@pytest.fixture(scope="module")
def bar_task(tmp_path_factory) -> Path:
    """A ``jsonl`` benchmark directory: the bar images as PNGs, one question, a class per bar."""
    root = tmp_path_factory.mktemp("bar-task")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for split, per_client in (("train", TRAIN_PER_CLIENT), ("test", TEST_PER_CLIENT)):
        rows = []
        for i in range(CLIENTS * per_client):
            label, client = i % CLASSES, i // per_client
            name = f"img/{split}-{i}.png"
            Image.fromarray(bar_image(label, rng)).save(root / name)
            rows.append({"image": name, "text": "what is shown?", "answer": f"class {label}",
                         "client": client})  # fmt: skip
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def learning_cfg(bar_task: Path, tmp_path: Path, method: str) -> FedmmConfig:
    return FedmmConfig().with_overrides({
        **SETTINGS, "data.data_dir": str(bar_task), "out_dir": str(tmp_path / method),
        "method": method, **SPECIAL.get(method, {}),
    })  # fmt: skip


def final_accuracies(cfg: FedmmConfig) -> dict[str, float]:
    """Run ``cfg`` as ``fedmm run`` would (federated methods through the round loop with every
    site in this process) and return the last round's mean accuracy of every declared view."""
    if METHODS[cfg.method].federated:
        cfg = prepare(cfg)
        run = run_federation(InProcessGrid(CLIENTS, sites=rehearsal_sites(cfg)), cfg)
    else:
        run = run_method(cfg)
    declared = results.declared_views(run)
    assert declared and set(declared) <= set(run["final"]), (
        f"{cfg.method}: views {declared} declared, {sorted(run['final'])} scored"
    )
    return {view: run["final"][view] for view in declared}


def assert_learned(method: str, accuracies: dict[str, float]) -> None:
    below = {v: round(a, 3) for v, a in accuracies.items() if a < CHANCE + MARGIN}
    assert not below, (
        f"{method} did not learn: {below} below chance {CHANCE:.2f} + margin {MARGIN:.2f} "
        f"(all views: { {v: round(a, 3) for v, a in accuracies.items()} })"
    )


def test_only_the_image_tells_the_class(bar_task, tmp_path):
    """Chance is 10 %: one question for every record, and every client's test labels are
    balanced, so answering from the text or always the same gets 1/10 of each client right."""
    bench = get_runtime(learning_cfg(bar_task, tmp_path, "fedavg")).benchmark
    assert len(bench.clients) == CLIENTS
    for client in bench.clients:
        assert len(set(client.test.texts) | set(client.train.texts)) == 1
        counts = np.bincount(client.test.labels, minlength=CLASSES)
        assert counts.max() / counts.sum() == pytest.approx(CHANCE)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_beyond_chance_in_every_view(bar_task, tmp_path, method):
    assert_learned(method, final_accuracies(learning_cfg(bar_task, tmp_path, method)))


@pytest.mark.parametrize("method", ["fedavg", "feddat"])
def test_bf16_and_the_fast_fp32_path_learn_beyond_chance(bar_task, tmp_path, method):
    """``train.precision=bf16`` (frozen backbone stored in bf16, fp32 PEFT master weights,
    autocast; runs on any CPU, natively where it has AMX / AVX512-BF16) and the fast fp32 path
    (``model.backbone_dropout=0``) learn the same task to the same bar."""
    for extra in ({"train.precision": "bf16"}, {"model.backbone_dropout": 0.0}):
        cfg = learning_cfg(bar_task, tmp_path, method).with_overrides(extra)
        model = get_runtime(cfg).model
        bf16 = extra.get("train.precision") == "bf16"
        assert model.text.encoder.layer[0].intermediate.dense.weight.dtype == (
            torch.bfloat16 if bf16 else torch.float32
        )
        assert_learned(f"{method} {extra}", final_accuracies(cfg))


# ---------------------------------------------------------------------- sabotage: the check fails
def test_check_fails_when_the_server_keeps_the_old_global_state(bar_task, tmp_path, monkeypatch):
    """A FedAvg server that ignores its clients (aggregation returns θ^t): the shared view stays
    at chance, and the learning check fails."""
    monkeypatch.setattr(FedAvg, "aggregate", lambda self, global_state, replies: global_state)
    accuracies = final_accuracies(learning_cfg(bar_task, tmp_path, "fedavg"))
    assert accuracies["shared"] <= CHANCE + 0.05, accuracies
    with pytest.raises(AssertionError, match="fedavg did not learn"):
        assert_learned("fedavg", accuracies)


def test_check_fails_when_the_gradient_sign_is_flipped(bar_task, tmp_path, monkeypatch):
    """Every local step goes up the loss instead of down: no view beats chance, and the
    learning check fails (centralized: one model, the cheapest run)."""
    original = ClientContext.step

    def ascending_step(self, optimizer, loss, adjust=None, **kwargs):
        def flip_then_adjust():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
            if adjust is not None:
                adjust()

        original(self, optimizer, loss, flip_then_adjust, **kwargs)

    monkeypatch.setattr(ClientContext, "step", ascending_step)
    accuracies = final_accuracies(learning_cfg(bar_task, tmp_path, "centralized"))
    assert all(a <= CHANCE + 0.05 for a in accuracies.values()), accuracies
    with pytest.raises(AssertionError, match="centralized did not learn"):
        assert_learned("centralized", accuracies)


def test_check_fails_when_the_model_never_sees_the_image(bar_task, tmp_path, monkeypatch):
    """A broken forward pass (every batch's image features zeroed): only the question is left,
    the same for every record, so no view beats chance and the learning check fails."""
    original = Encoded.batch

    def blind_batch(self, idx, device):
        feats, *rest = original(self, idx, device)
        return (torch.zeros_like(feats), *rest)

    monkeypatch.setattr(Encoded, "batch", blind_batch)
    accuracies = final_accuracies(learning_cfg(bar_task, tmp_path, "centralized"))
    assert all(a <= CHANCE + 0.05 for a in accuracies.values()), accuracies
    with pytest.raises(AssertionError, match="centralized did not learn"):
        assert_learned("centralized", accuracies)
