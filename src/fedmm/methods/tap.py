"""TAP -- Two-stage Adaptive Personalisation (Lee et al., 2025, arXiv 2509.26524).

Setting: clients differ in **task** and **modality** (``fmnist-task``: VQA, classification,
multi-label attributes, text classification; image+text, image-only, text-only clients;
``fmnist-task-caption`` adds a caption-generation client, on a generative backbone).

Modality-task-pair architecture on fedmm's single-stream model.  PEFT sets keyed by modality and
by task, one head per task::

    mod_shared, mod_image, mod_text          (modality modules, plus a shared one)
    task_shared, task_<t> for every task t   (task modules, plus a shared one)
    head/<t>.*                               (one head per task), proj (the visual projection)

Client k (modalities M_k, task t_k) uses only S_k = {mod_shared} ∪ {mod_m : m ∈ M_k} ∪
{task_shared, task_<t_k>}, active together at every insertion point (``tap.combine``):

    sum:     h + Σ_{s ∈ S_k} A_s(h)          average: h + (1/|S_k|) Σ_{s ∈ S_k} A_s(h)

Its keys K_k: the sets S_k, head ``t_k``, and ``proj`` when it has images ("mismatched
architectures": nobody trains or receives what it does not use).

Server (holds the union θ of every client's modules):

* sends client k only θ[K_k] (``global_for_client``);
* per key, the sample-weighted average over the replying clients that own it; a key no replying
  client owns keeps its value:  θ^{t+1}[j] = Σ_{k∈O_j} n_k θ_k[j] / Σ_{k∈O_j} n_k.

Client, stage 1 (every round):

1. load θ[K_k] as the *global copy* and train it ``train.local_steps`` steps on the task loss;
2. **replacement** (from the client's second round on; in its first, the personalised model
   starts as the trained global copy): score the trained global copy and the personalised model on a held-out
   validation split (``tap.val_frac`` of the client's training data, fixed by ``data.split_seed``,
   never trained on); if  score_global > score_personal · (1 + ``tap.margin``), every module of
   the task (the sets S_k, head t_k, proj) of the personalised model is replaced by the global
   copy's (counted in results.json: ``train[client].replaced``, per round; never with
   ``tap.replacement = false``);
3. train the personalised model ``train.local_steps`` steps on the task loss (like Ditto, TAP
   trains two models per round: ``personal_steps``);
4. upload the global copy's K_k tensors.  The personalised model never leaves the client.

Stage 2 (after the last round, in the final evaluation): the final global sub-model, finetuned
locally for ``tap.teacher_steps`` steps, is the teacher; the personalised model is distilled for
``tap.distill_steps`` steps (learning rate ``tap.distill_lr``, cosine over those steps) on

    L = task_loss(z_p, y) + λ·T²·KL(teacher ‖ student)        (``tap.lam``, ``tap.temperature``;
                                                              Bernoulli KL per label for
                                                              multi-label tasks)

on logits.  Views (kinds as ``fedmm.spec.VIEW_KINDS``): ``shared`` (θ[K_k], with the head its
task's clients share), ``personal`` (the personalised model: stage 1 alone -- TAP without stage 2)
and, in the last round, ``distilled`` (stage 1 + stage 2).  No ``shared+head``: the client's own
head is the personalised model's, trained on its modules.  A client that has not trained yet has
no personalised model: it scores ``shared`` only, and stage 2 skips it.

Text generation (a generative backbone, ``docs/generative.md``): every task of the federation
is answered in text -- a classification task by its label's name, a multi-label task by its
positive labels' names (``data.task_kind=generate``, ``generation.as_generative``), a
text-generation task (captions, ``fmnist-task-caption``; VQA as generation) by its target text --
so a pair is still (client modalities, task) with the modules above, less the heads: the frozen
LM's output layer answers every task, and a task is told apart by its ``task_<t>`` set and its
prompt.  The client keys K_k are its PEFT sets and ``proj`` (image clients) only.  What changes:

* replacement (step 2) scores both models on the validation rows with the task's primary
  generative score of their greedy answers (``ClientContext.score``,
  ``generation.generative_scores``: exact match; CIDEr-D for a caption task) instead of accuracy;
* stage 2 distils token logits: at every answer position (label ≠ -100: the answer tokens and
  the end-of-turn token, both models reading the reference prefix by teacher forcing) the KL of
  the next-token distributions over the vocabulary at temperature T, averaged over the answer
  positions (``distillation``); prompt, image and padding positions take no part (their
  logits are not even computed, ``batch_loss``):

      L = CE_answer(z_p, y) + λ·T²·mean_{(b,t): y_bt ≠ -100} KL(p_T(z_teacher,bt) ‖ p_T(z_p,bt)),
      p_T(z) = softmax(z / T) over the vocabulary

* every view (``shared``, ``personal``, ``distilled``) is scored by decoding autoregressively
  (greedy, with the KV cache, ``eval.max_new_tokens``), as every generative run is.  The TAP
  reference (``evaluation/eval_utils.py``) instead scores a text-generation task by the argmax
  of one forward pass at every output position (non-autoregressive: no predicted token is fed
  back), with METEOR and BERTScore; it also compares training losses for replacement and
  distils every position's distribution, padding included (``utils/training.py``:
  ``kl_div(..., "batchmean")`` over the whole sequence).

Ablations (``fedmm bench`` variants): ``tap.replacement = false`` skips step 2's replacement (the
personalised model is never replaced; both validation scores are still recorded); TAP without
stage 2 is the ``personal`` view of any TAP run.

Reference defects avoided: the global weights of every module reach the client (``load_parts``
is strict about names: no prefix mismatch can be silently skipped; tested); only PEFT,
projection and head tensors are exchanged, never the frozen backbone; replacement compares the
two models on the same held-out validation data, not training losses of different batches;
distillation is on logits; one frozen backbone per process.

In a simulation all clients of a process share one model object, so its PEFT bank holds the
union of sets; a client's computation and messages involve only its own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.nn import functional as F

from fedmm.backbones import VLModel
from fedmm.config import ConfigError
from fedmm.data import MODALITIES
from fedmm.generation import IGNORE
from fedmm.methods.aggregation import ClientInfo, Reply
from fedmm.methods.base import ClientUpdate, Method, register
from fedmm.methods.context import ClientContext
from fedmm.methods.losses import distill_kl, task_loss  # fmt: skip
from fedmm.methods.state import (
    Arrays,
    State,
    from_namespace,
    get_parts,
    load_parts,
    namespaced,
    to_numpy,
)
from fedmm.peft import PEFT_TYPES
from fedmm.runtime import Encoded, held_out
from fedmm.spec import PERSONAL, SHARED


def slug(task: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", task) or "main"


def client_sets(spec: ClientInfo) -> list[str]:
    """S_k: the PEFT sets client ``spec`` builds and trains."""
    return [
        "mod_shared", *(f"mod_{m}" for m in spec.modalities), "task_shared",
        f"task_{slug(spec.task)}",
    ]  # fmt: skip


def owns(spec: ClientInfo, key: str) -> bool:
    """Whether state key ``key`` ("<part>/<param>") belongs to client ``spec``'s modules."""
    part = key.split("/", 1)[0]
    if part == "proj":
        return "image" in spec.modalities
    if part == "head":
        return not spec.task or key.startswith(f"head/{spec.task}.")
    return part.removeprefix("adapter.") in client_sets(spec)


def owned(state: dict, spec: ClientInfo) -> dict:
    return {k: v for k, v in state.items() if owns(spec, k)}


@contextlib.contextmanager
def loaded(model: VLModel, state: State) -> Iterator[None]:
    """Temporarily hold ``state`` in the model (the previous values come back on exit)."""
    parts = sorted({k.split("/", 1)[0] for k in state})
    saved = {k: v for k, v in get_parts(model, parts).items() if k in state}
    load_parts(model, state, partial=True)
    try:
        yield
    finally:
        load_parts(model, saved, partial=True)


@register("tap")
class TAP(Method):
    per_client_messages = True  # each client is sent (and returns) only its own modules
    dp_sgd_refusal = ("it trains two stages and scores a validation split it reports (two "
                      "models, data-dependent selection)")  # fmt: skip
    # its averages are sums over each module's owners, but the sites upload different module
    # sets: masked vectors of one layout (zeros + per-module weights) are not built yet
    early_stopping_refusal = (
        "its stage 2 (post-training distillation) runs at the last round of fed.rounds, which "
        "a run that stops early never reaches"
    )
    secagg_refusal = (
        "its sites upload different module sets (their task's and modalities'), "
        "and fedmm's secure aggregation sums vectors of one layout only"
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.tap
        if c.combine not in PEFT_TYPES[cfg.peft.type].combines:
            raise ConfigError(
                f"tap.combine={c.combine!r} is not defined for peft.type {cfg.peft.type!r}; "
                "use tap.combine=average"
            )

    # ------------------------------------------------------------------ modules
    def bind(self, tasks: Sequence[str], clients: Mapping[int, ClientInfo]) -> None:
        """The schema's tasks and who is who (server: every client, from the sites' replies to
        the query; client: itself): TAP's modules depend on each client's task and modalities."""
        self._tasks = sorted(tasks)
        self._clients = dict(clients)

    def spec_of(self, client_index: int) -> ClientInfo:
        if client_index not in getattr(self, "_clients", {}):
            raise RuntimeError(
                f"TAP does not know client {client_index}'s task and modalities "
                "(Method.bind was not called with it)"
            )
        return self._clients[client_index]

    def all_sets(self) -> list[str]:
        """Every module of the federation: each modality's and each task's of the schema."""
        if not hasattr(self, "_tasks"):
            raise RuntimeError("TAP needs the schema's tasks (Method.bind) before its modules")
        info = [ClientInfo("", t, MODALITIES) for t in self._tasks]
        return sorted({s for spec in info for s in client_sets(spec)})

    def prepare(self, model: VLModel) -> None:
        model.peft.ensure_sets(self.all_sets())
        model.reset_trainable(self.cfg.seed)

    def trainable_parts(self) -> tuple[str, ...]:
        return ("proj", "head", *(f"adapter.{s}" for s in self.all_sets()))

    def upload_parts(self) -> tuple[str, ...]:
        return self.trainable_parts()  # each client uploads only its own keys of these

    def count_trainable(self, model: VLModel) -> int:
        """The server's union model (every client's modules, every head)."""
        model.peft.ensure_sets(self.all_sets())
        return sum(v.numel() for v in get_parts(model, self.trainable_parts()).values())

    # ------------------------------------------------------------------ server
    def init_global(self, model: VLModel) -> Arrays:
        self.prepare(model)
        return to_numpy(get_parts(model, self.trainable_parts()))

    def global_for_client(self, global_state: Arrays, client_index: int) -> Arrays:
        return owned(global_state, self.spec_of(client_index))

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        weights = {r.client_index: 1.0 if self.cfg.fed.weighting == "uniform" else r.num_examples
                   for r in replies}  # fmt: skip
        new_state = {}
        for key, value in global_state.items():
            owners = [r for r in replies if key in r.arrays]
            total = sum(weights[r.client_index] for r in owners)
            if not owners or total <= 0:
                new_state[key] = value  # nobody trained it this round
                continue
            new_state[key] = sum(
                (weights[r.client_index] / total) * r.arrays[key].astype(np.float64) for r in owners
            ).astype(np.float32)
        return new_state

    # ------------------------------------------------------------------ client
    def load(self, ctx: ClientContext, received: State) -> None:
        """θ[K_k] into the union model (only the client's own modules may arrive)."""
        spec = self.spec_of(ctx.client_index)
        unexpected = [k for k in received if not owns(spec, k)]
        if unexpected:  # the server must never send another client's modules
            raise ValueError(f"client {spec.client_id} received modules it does not own: "
                             f"{unexpected[:3]}")  # fmt: skip
        load_parts(ctx.model, received, partial=True)

    def _split(self, ctx: ClientContext) -> tuple[Encoded, Encoded]:
        """(training part, held-out validation part) of the client's training data."""
        seed = self.cfg.data.split_seed * 7919 + ctx.client_index
        kept, val = held_out(len(ctx.train), self.cfg.tap.val_frac, seed)
        return ctx.train.subset(kept), ctx.train.subset(val)

    def _params(self, ctx: ClientContext, spec: ClientInfo) -> list[list[torch.nn.Parameter]]:
        model = ctx.model
        groups = [model.peft.parameters_of(s) for s in client_sets(spec)]
        groups.append(list(model.task_head().parameters()))
        if "image" in spec.modalities:
            groups.append(list(model.visual_proj.parameters()))
        return groups

    def _train(
        self, ctx: ClientContext, spec: ClientInfo, data: Encoded, teacher: State | None = None,
        **steps,
    ) -> None:  # fmt: skip
        """``ctx.steps(**steps)`` AdamW steps of the client's modules on ``data`` with the task
        loss (+ distillation from ``teacher``'s logits when given)."""
        model, c = ctx.model, self.cfg.tap
        opt = ctx.optimizer(self._params(ctx, spec))
        with model.active(*client_sets(spec), combine=c.combine):
            for feats, ids, mask, labels in ctx.steps(opt, data=data, **steps):
                loss = self.batch_loss(model, feats, ids, mask, labels, data.kind, teacher)
                ctx.step(opt, loss)

    def batch_loss(
        self, model: VLModel, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
        labels: torch.Tensor, kind: str, teacher: State | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One batch's loss: the task loss, + λ·``distillation`` from ``teacher``'s logits (stage
        2; the teacher's weights are swapped in for its forward pass, without gradient).

        A generative task (``kind`` ``generate``, ``labels`` ``(B, L')`` next-token ids, -100
        off the answer) computes both models' logits at the answer positions only (the model's
        ``keep``, as ``losses.supervised_loss``): the answer tokens' cross-entropy, and the
        distillation over those positions -- the prompt's, image's and padding's logits are never
        computed, so they cannot enter the loss."""
        answer = None
        if kind == "generate":
            labels = labels[:, : ids.shape[1]]
            answer = labels != IGNORE

        def forward() -> torch.Tensor:
            return model(feats, ids, mask) if answer is None else model(feats, ids, mask,
                                                                        keep=answer)  # fmt: skip

        if teacher is not None:  # before the student's forward: swapping the weights in place
            with loaded(model, teacher), torch.no_grad():  # would break autograd
                target = forward()
        logits = forward()
        if answer is None:
            loss = task_loss(logits, labels)
        else:
            loss = F.cross_entropy(logits.float(), labels[answer])
        if teacher is not None:
            loss = loss + self.cfg.tap.lam * self.distillation(logits, target, kind)
        return loss

    def distillation(
        self, student: torch.Tensor, teacher: torch.Tensor, kind: str,
        answer: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Stage 2's T²·KL(teacher ‖ student) (``tap.temperature``), without λ.

        Class logits ``(B, K)``: per row over the classes, batch mean (multi-label: per label,
        Bernoulli).  A generative task: next-token logits over the vocabulary, one row per answer
        position ``(N, V)`` (what ``batch_loss`` computes), or every position's ``(B, L, V)``
        with ``answer`` (bool ``(B, L)``: label ≠ -100) selecting the answer positions; the KL
        is averaged over the answer positions, and no other position takes part.  Both models
        read the reference answer's prefix (teacher forcing)."""
        t = self.cfg.tap.temperature
        if kind != "generate":
            return distill_kl(student, teacher, t, kind == "multilabel")
        if student.ndim == 3:
            if answer is None:
                raise ValueError("per-position logits (B, L, V) need the answer positions")
            student, teacher = student[answer], teacher[answer]
        return distill_kl(student.float(), teacher.float(), t)

    def _score(self, ctx: ClientContext, spec: ClientInfo, split: Encoded) -> float:
        """The task's primary score of the current model on ``split``: accuracy (multi-label:
        mean AUROC) or, for a generative task, its greedy answers' primary generative score
        (exact match; CIDEr-D for a caption task)."""
        with ctx.model.active(*client_sets(spec), combine=self.cfg.tap.combine):
            score = ctx.score(split)[""]
        ctx.last_predictions = []  # validation answers are no test sample (ctx.view's)
        return score

    def _snapshot(self, ctx: ClientContext, spec: ClientInfo) -> State:
        parts = ["head", *(f"adapter.{s}" for s in client_sets(spec))]
        parts += ["proj"] if "image" in spec.modalities else []
        return owned(get_parts(ctx.model, parts), spec)  # head: this task's only

    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        spec = self.spec_of(ctx.client_index)
        personal = from_namespace(ctx.kept, "personal")
        train, val = self._split(ctx)
        # 1. the global copy
        self._train(ctx, spec, train)
        global_copy = self._snapshot(ctx, spec)
        # 2. replacement, judged on held-out validation data (a client's first round has no
        #    personalised model yet: it starts as the trained global copy, no decision counted)
        if personal and len(val):  # no validation rows (a 1-row client): no decision
            score_global = self._score(ctx, spec, val)
            load_parts(ctx.model, personal, partial=True)
            score_personal = self._score(ctx, spec, val)
            replace_it = self.cfg.tap.replacement and (
                score_global > score_personal * (1 + self.cfg.tap.margin)
            )
            if replace_it:
                load_parts(ctx.model, global_copy, partial=True)
            ctx.stats.update(
                replaced=float(replace_it), val_global=score_global, val_personal=score_personal
            )
        # 3. the personalised model, on a second step budget
        self._train(ctx, spec, train, stat="personal_steps")
        # 4. upload the global copy (its own keys only); keep the personalised model
        return ClientUpdate(global_copy, keep=namespaced(self._snapshot(ctx, spec), "personal"))

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        spec = self.spec_of(ctx.client_index)
        personal = from_namespace(ctx.kept, "personal")
        with ctx.model.active(*client_sets(spec), combine=self.cfg.tap.combine):
            ctx.view(SHARED)
            if not personal:  # not trained yet: no personalised model, nothing to distil into
                return ctx.views
            load_parts(ctx.model, personal, partial=True)
            ctx.view(PERSONAL)
        if ctx.round == self.cfg.fed.rounds:
            self._stage2(ctx, spec, received, personal)
        return ctx.views

    def _stage2(self, ctx: ClientContext, spec: ClientInfo, received: State, personal: State):
        """Distil the locally finetuned final global model into the personalised model."""
        c = self.cfg.tap
        train, _ = self._split(ctx)
        schedule = replace(self.cfg.train, lr=c.distill_lr, warmup_frac=0)

        def budget(n: int, stat: str) -> dict:  # its own cosine over n steps, round 1's batches
            return {"n": n, "stat": stat, "schedule": schedule, "first_step": 0, "total": n,
                    "seed_round": 1}  # fmt: skip

        load_parts(ctx.model, received, partial=True)
        if c.teacher_steps:
            self._train(ctx, spec, train, **budget(c.teacher_steps, "teacher_steps"))
        teacher = self._snapshot(ctx, spec)
        load_parts(ctx.model, personal, partial=True)
        if c.distill_steps:
            self._train(ctx, spec, train, teacher=teacher,
                        **budget(c.distill_steps, "distill_steps"))  # fmt: skip
        with ctx.model.active(*client_sets(spec), combine=c.combine):
            ctx.view("distilled")
