"""Tasks with text targets (task kind ``generate``): encoding, teacher-forced labels, decoding, scores.

A generative task has no label list: each record's target is text (its answer).  The model reads

    <chat prefix> [image tokens] <question in the task's prompt template><assistant header>

and is trained to continue with ``<answer> <eos>``.  The loss is the next-token cross-entropy on
the answer tokens and the end-of-turn token only: every prompt, image and padding position has
label -100 (``methods.base.task_loss``).

* ``train.max_target_tokens``: an answer longer than this (in tokens, end-of-turn excluded) is
  cut to its first ``max_target_tokens`` tokens for training, and the cut is counted: a warning
  per split and the train statistic ``targets_truncated`` of every round (results' train
  entries).  Scores always compare against the full reference text.
* A prompt longer than ``model.max_text_len`` tokens (chat template included, image tokens not),
  or a whole sequence longer than the language model's context, is an error naming the record
  and the limit; an empty answer is an error.

Evaluation (``generative_scores``): batched greedy decoding with the KV cache
(``GenerativeVLModel.generate``), at most ``eval.max_new_tokens`` new tokens, stopping at the
end-of-turn token.  How the text is scored is the task's ``score`` (schema field):

``vqa`` (the default; short answers).  After the normalisation of the VQA evaluation (Antol et
al., 2015; the official script's steps we apply: lower-case, punctuation removed, articles
a/an/the removed, whitespace collapsed), against the best-matching reference of a record:

* ``""`` (primary) exact match: normalised prediction == normalised reference;
* ``.f1``: token F1 of the normalised prediction and reference (SQuAD's, Rajpurkar et al., 2016);
* ``.<group>``: exact match per evaluation group (VQA-RAD: ``closed`` / ``open``);
* ``.unseen`` and ``.<group>_unseen``: exact match over the records whose reference answer occurs
  in no training record of the benchmark (``RawSplit.unseen``; VQA-RAD: ``.open_unseen``) -- a
  classifier over the training answers scores 0 there by construction.

``caption`` (descriptions; ``caption_scores``), corpus-level over the split, each text
lower-cased with punctuation removed (what coco-caption's PTB tokenizer does before scoring),
against all of a record's references:

* ``""`` (primary) and ``.cider``: CIDEr-D (Vedantam et al., 2015), ``pycocoevalcap``'s
  ``Cider`` (n = 1..4, sigma 6, x10 as in coco-caption; its IDF is over the scored split);
* ``.bleu``: corpus BLEU-4 (Papineni et al., 2002) by ``sacrebleu`` (13a tokenizer), / 100;
* ``.rougeL``: mean ROUGE-L F-measure (Lin, 2004) by ``rouge-score``, best reference per record.

The client keeps a sample of its predictions (``eval.predictions`` rows: question / reference /
generated) in ``ClientContext.predictions``; they are written under the site's own directory and,
in a rehearsal, into the run's summary.md (``write_predictions``) -- they never travel in a reply.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedmm.config import ConfigError
from fedmm.runtime import Encoded

if TYPE_CHECKING:
    from fedmm.data import Benchmark, RawSplit

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that takes no loss (torch's cross_entropy ignore_index)
DEFAULT_PROMPT = "{question} Answer in one or two words."
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = str.maketrans({c: " " for c in string.punctuation})
SCORES = ("vqa", "caption")  # a generative task's scoring (data.TASK_SCORES)


# ---------------------------------------------------------------------- scores
def normalize_text(text: str) -> str:
    """VQA-style normalisation: lower-case, punctuation -> space, articles dropped, whitespace
    collapsed (``"The T-shirt."`` -> ``"t shirt"``)."""
    text = str(text).lower().translate(PUNCT)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens' multiset overlap; 1.0 when both are empty."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_text(text: str) -> str:
    """A caption as scored: lower-case, punctuation -> space, whitespace collapsed (articles
    kept: they are part of a description, and coco-caption keeps them)."""
    return " ".join(str(text).lower().translate(PUNCT).split())


def caption_libraries():
    """``(sacrebleu, rouge_score.rouge_scorer, pycocoevalcap's Cider)``; ``ImportError`` saying
    what to install when one is missing (checked when a caption task is encoded, before any
    training)."""
    try:
        import sacrebleu
        from pycocoevalcap.cider.cider import Cider
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ImportError(
            f"caption scores need sacrebleu, rouge-score and pycocoevalcap ({exc.name} is "
            "missing): pip install sacrebleu==2.6.0 rouge-score==0.1.2 pycocoevalcap==1.2 "
            "(or pip install 'fedmm[caption]')"
        ) from exc
    return sacrebleu, rouge_scorer, Cider


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """``{"": CIDEr-D, ".cider": CIDEr-D, ".bleu": BLEU-4 / 100, ".rougeL": ROUGE-L F}`` of
    ``predictions`` (one per record) against ``references`` (a non-empty list per record), after
    ``caption_text``.  Computed by the libraries themselves: ``sacrebleu.corpus_bleu``,
    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score_multi`` (averaged over records) and
    ``pycocoevalcap.cider.cider.Cider`` (corpus mean).  CIDEr-D's document frequencies are taken
    over the scored records, so a split of one record scores 0 (log 1)."""
    sacrebleu, rouge_scorer, Cider = caption_libraries()  # noqa: N806  (a class)
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} records")
    hyps = [caption_text(p) for p in predictions]
    refs = [[caption_text(r) for r in rs] for rs in references]
    if not all(refs):
        raise ValueError("every record needs at least one reference caption")
    width = max(len(rs) for rs in refs)  # sacrebleu: one stream per reference, None = absent
    streams = [[rs[j] if j < len(rs) else None for rs in refs] for j in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams).score / 100
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = sum(rouge.score_multi(rs, h)["rougeL"].fmeasure for h, rs in zip(hyps, refs))
    cider, _ = Cider().compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)})
    cider = float(cider)
    return {"": cider, ".cider": cider, ".bleu": float(bleu), ".rougeL": rouge_l / len(hyps)}


# ---------------------------------------------------------------------- data
@dataclass
class GenerativeEncoded(Encoded):
    """An encoded generative split: ``input_ids`` (N, L) = prompt, image placeholders, answer
    and end-of-turn, right-padded; ``labels`` (N, L) next-token ids (-100 off the answer);
    ``prompt_lens`` (N,) the prompt's length (image tokens included); ``references`` (the
    training targets) and ``questions`` the texts; ``reference_sets`` every reference of each
    row (scored against); ``unseen`` whether a row's reference is in no training record (None:
    not known); ``score`` how the task is scored (``vqa`` / ``caption``); ``truncated`` how many
    targets were cut to ``max_target_tokens``."""

    prompt_lens: torch.Tensor | None = None
    references: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    truncated: int = 0
    reference_sets: tuple[tuple[str, ...], ...] = ()
    unseen: tuple[bool, ...] | None = None
    score: str = "vqa"

    def subset(self, idx: torch.Tensor) -> GenerativeEncoded:
        rows, base = idx.tolist(), super().subset(idx)
        return GenerativeEncoded(
            **{f.name: getattr(base, f.name) for f in fields(Encoded)},
            prompt_lens=self.prompt_lens[idx],
            references=tuple(self.references[i] for i in rows),
            questions=tuple(self.questions[i] for i in rows), truncated=self.truncated,
            reference_sets=tuple(self.reference_sets[i] for i in rows),
            unseen=None if self.unseen is None else tuple(self.unseen[i] for i in rows),
            score=self.score,
        )  # fmt: skip

    def prompts(self, idx: torch.Tensor) -> list[list[int]]:
        return [self.input_ids[i, : int(self.prompt_lens[i])].tolist() for i in idx.tolist()]


def encode_generative(
    model, raw: RawSplit, feats: torch.Tensor, *, template: str, max_text_len: int,
    max_target_tokens: int, name: str, task: str = "", present: torch.Tensor | None = None,
    score: str = "vqa",
) -> GenerativeEncoded:  # fmt: skip
    """Token ids and next-token labels of ``raw`` (``raw.targets``: the answers) for the
    generative ``model`` (its ``chat`` tokenizer, ``image_tokens``, ``image_offset``).

    Raises ``ConfigError`` naming ``name`` and the record for an empty target or a prompt
    longer than ``max_text_len``, and ``score`` outside ``SCORES``."""
    if raw.targets is None:
        raise ConfigError(f"{name}: a generative task needs text targets (RawSplit.targets)")
    if score not in SCORES:
        raise ConfigError(f"{name}: task score {score!r}; choices: {', '.join(SCORES)}")
    if score == "caption":
        caption_libraries()  # missing libraries: an error now, not after training
    chat, n_vis = model.chat, model.image_tokens
    # a model that builds its own prompts (Hugging Face VLMs: the family's processor expands the
    # image into its image tokens; a record without an image gets none) has ``prompt_ids``
    own_prompt = getattr(model, "prompt_ids", None)
    rows, prompt_lens, truncated = [], [], 0
    for i, (question, answer) in enumerate(zip(raw.texts, raw.targets)):
        text = template.format(question=question)
        if own_prompt is not None:
            has_image = raw.images is not None and (present is None or bool(present[i]))
            prompt, n_text = own_prompt(text, raw.images[i] if has_image else None)
        else:
            prefix, suffix = chat.prompt(text)
            prompt, n_text = [*prefix, *[chat.pad_id] * n_vis, *suffix], len(prefix) + len(suffix)
        if n_text > max_text_len:
            raise ConfigError(
                f"{name}, record {i}: the prompt has {n_text} tokens (chat "
                f"template included), more than model.max_text_len={max_text_len}; raise "
                f"model.max_text_len or shorten the question ({question[:60]!r})"
            )
        target = chat.encode(str(answer).strip())
        if not target:
            raise ConfigError(f"{name}, record {i}: empty target text (answer {answer!r}, "
                              f"question {question[:60]!r}); give every record a non-empty "
                              "answer")  # fmt: skip
        if len(target) > max_target_tokens:
            target, truncated = target[:max_target_tokens], truncated + 1
        rows.append((prompt, [*target, chat.eos_id]))
        prompt_lens.append(len(prompt))
    # one width for every split (the pooled centralised data concatenates them); batches are
    # trimmed to their longest row
    width = max_text_len + n_vis + max_target_tokens + 1
    if model.context and width > model.context:
        raise ConfigError(
            f"{name}: sequences of {width} tokens (prompt, {n_vis} image tokens, answer) exceed "
            f"the language model's context of {model.context} tokens; lower model.max_text_len "
            "or train.max_target_tokens"
        )
    ids = torch.full((len(rows), width), chat.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        seq = prompt + target
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        # position t predicts token t+1: the answer and eos, predicted from the prompt's end on
        labels[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(target)
    if truncated:
        log.warning("%s: %d of %d targets longer than train.max_target_tokens=%d were truncated "
                    "for training", name, truncated, len(rows), max_target_tokens)  # fmt: skip
    return GenerativeEncoded(
        feats, ids, mask, labels, tuple(raw.groups) if raw.groups is not None else None,
        present, task, "generate", prompt_lens=torch.tensor(prompt_lens, dtype=torch.long),
        references=tuple(str(t) for t in raw.targets), questions=tuple(raw.texts),
        truncated=truncated, score=score,
        reference_sets=tuple(
            tuple(str(r) for r in refs) for refs in (raw.references or [[t] for t in raw.targets])
        ),
        unseen=None if raw.unseen is None else tuple(bool(u) for u in raw.unseen),
    )  # fmt: skip


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100:
    ``logits`` ``(B, L, V)``, ``labels`` ``(B, L')`` with L' >= L (extra columns are padding)."""
    from torch.nn import functional as F

    labels = labels[:, : logits.shape[1]]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_split(ctx, split: GenerativeEncoded) -> list[str]:
    """Greedy answers of ``ctx.model`` to every row of ``split`` (text, special tokens dropped)."""
    model = ctx.model
    model.eval()
    bs = ctx.cfg.eval.generate_batch_size  # the KV cache grows with the rows decoded together
    out: list[str] = []
    for start in range(0, len(split), bs):
        idx = torch.arange(start, min(start + bs, len(split)))
        feats = split.feats[idx].to(torch.float32)
        with ctx.autocast():
            ids = model.generate(feats, split.prompts(idx), ctx.cfg.eval.max_new_tokens)
        out += [model.chat.decode(row) for row in ids]
    return out


def generative_scores(ctx, split: GenerativeEncoded) -> dict[str, float]:
    """The scores of greedy generation on ``split`` by its task's ``score`` (module doc):
    ``vqa``: ``{"": exact match, ".f1": token F1, ".<group>": exact match per group, ".unseen",
    ".<group>_unseen"}``; ``caption``: ``{"": CIDEr-D, ".cider", ".bleu", ".rougeL"}``.  A sample
    of the predictions is left in ``ctx.last_predictions``."""
    generated = generate_split(ctx, split)
    refs = split.reference_sets or tuple((r,) for r in split.references)
    n = ctx.cfg.eval.predictions
    ctx.last_predictions = [
        {"question": q, "reference": r, "generated": g}
        for q, r, g in list(zip(split.questions, split.references, generated))[:n]
    ]
    if split.score == "caption":
        return caption_scores(generated, [list(r) for r in refs])
    em = [max(exact_match(g, r) for r in rs) for g, rs in zip(generated, refs)]
    f1 = [max(token_f1(g, r) for r in rs) for g, rs in zip(generated, refs)]
    scores = {"": sum(em) / len(em), ".f1": sum(f1) / len(f1)}

    def mean_over(rows: list[int]) -> float:
        return sum(em[i] for i in rows) / len(rows)

    groups = split.groups or ("",) * len(em)
    for group in sorted(set(split.groups or ())):
        scores[f".{group}"] = mean_over([i for i, g in enumerate(groups) if g == group])
    if split.unseen is not None:
        unseen = [i for i, u in enumerate(split.unseen) if u]
        if unseen:
            scores[".unseen"] = mean_over(unseen)
        for group in sorted({groups[i] for i in unseen} - {""}):
            scores[f".{group}_unseen"] = mean_over([i for i in unseen if groups[i] == group])
    return scores


# ---------------------------------------------------------------------- benchmarks as generation
def as_generative(benchmark: Benchmark, template: str = DEFAULT_PROMPT) -> Benchmark:
    """A classification benchmark answered in text, the prompt the record's question in
    ``template``.  The split, images and questions are unchanged, so the two runs of a benchmark
    are comparable record for record.

    * A single-label benchmark becomes one generative task named after the benchmark: each
      record's target text is its own answer (``RawSplit.targets`` where the builder kept them --
      VQA-RAD and jsonl do, so a test answer outside the training answers keeps its text instead
      of ``<unk>`` -- else the label's name).  A record is ``unseen`` when its normalised answer
      is in no client's training targets.
    * A multi-task benchmark (``fmnist-task``, ``fmnist-task-caption``) keeps its tasks and their
      names, each now generative: a single-label task's target is the label's name, a
      multi-label task's the names of its positive labels in the task's label order, joined by
      ``", "`` (``"none"`` when no label is positive); the prompt is the task's own
      (``Task.prompt``) or ``template``.  A task that is already generative (a caption task)
      stays as it is.  (No ``unseen`` marks: every answer is a label name.)
    """
    from fedmm.data import Benchmark, ClientSpec, Task

    if benchmark.tasks:
        return _tasks_as_generative(benchmark, template)

    def targets(raw) -> list[str]:
        if raw.targets is not None:
            return list(raw.targets)
        return [benchmark.answers[int(y)] for y in raw.labels]

    seen = {normalize_text(t) for c in benchmark.clients for t in targets(c.train)}

    def split(raw):
        texts = targets(raw)
        return replace(raw, targets=texts, unseen=[normalize_text(t) not in seen for t in texts])

    clients = [
        ClientSpec(c.client_id, c.description, split(c.train), split(c.test), benchmark.name,
                   c.modalities)
        for c in benchmark.clients
    ]  # fmt: skip
    task = Task("generate", [], f"{benchmark.name} answered in text", prompt=template)
    notes = dict(benchmark.notes, task_kind=f"generate (prompt {template!r})")
    notes["test_unseen"] = sum(sum(c.test.unseen) for c in clients)
    return Benchmark(benchmark.name, benchmark.description, [], clients, notes,
                     {benchmark.name: task}, dict(benchmark.excluded))  # fmt: skip


def label_text(task, labels) -> list[str]:
    """The answer texts of a classification ``task``'s ``labels``: a single-label task's label
    names; a multi-label task's positive label names joined by ``", "`` (``"none"``: none)."""
    if task.kind == "multilabel":
        return [", ".join(a for a, on in zip(task.answers, row) if on > 0.5) or "none"
                for row in labels]  # fmt: skip
    return [task.answers[int(y)] for y in labels]


def _tasks_as_generative(benchmark: Benchmark, template: str) -> Benchmark:
    from fedmm.data import Task

    tasks = {
        name: task if task.kind == "generate" else Task(
            "generate", [], f"{task.description} (answered in text)", task.prompt or template)
        for name, task in benchmark.tasks.items()
    }  # fmt: skip

    def split(raw, task):
        if task.kind == "generate":
            return raw
        return replace(raw, targets=label_text(task, raw.labels))

    clients = [
        replace(c, train=split(c.train, benchmark.tasks[c.task]),
                test=split(c.test, benchmark.tasks[c.task]))
        for c in benchmark.clients
    ]  # fmt: skip
    prompts = {name: t.prompt for name, t in tasks.items()}
    notes = dict(benchmark.notes, task_kind=f"generate (prompts {prompts})")
    return replace(benchmark, clients=clients, notes=notes, tasks=tasks)


# ---------------------------------------------------------------------- predictions
def save_predictions(path: Path, client_id: str, rnd: int, predictions: dict[str, list]) -> None:
    """Append one evaluation's prediction sample (per view) to the JSON-lines file ``path``."""
    if not predictions:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for view, rows in predictions.items():
            for row in rows:
                fh.write(json.dumps({"client": client_id, "round": rnd, "view": view, **row})
                         + "\n")  # fmt: skip
