"""Generative vision-language models (issue 26) on the tiny Llama (``tiny-gen``): the same code
path as ``smollm2-mobilenet`` -- answer-only loss, greedy decoding, scores, the baselines'
federation and what they send, the LM cache, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_federation
from test_serverapp import InProcessGrid

from fedmm.config import ConfigError, FedmmConfig
from fedmm.generation import IGNORE, exact_match, normalize_text, token_f1, token_loss
from fedmm.methods.base import ClientContext
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture()
def gen_cfg(tiny_cfg) -> FedmmConfig:
    return tiny_cfg.with_overrides({
        "model.backbone": "tiny-gen", "data.task_kind": "generate", "peft.type": "lora",
        "model.max_text_len": 96, "data.train_per_client": 12, "data.test_per_client": 6,
        "train.local_steps": 2, "train.batch_size": 4, "eval.max_new_tokens": 12,
    })  # fmt: skip


def first_batch(cfg, n=4):
    runtime = get_runtime(cfg)
    split = runtime.client_split(0, "train")
    return runtime, split, split.batch(torch.arange(n), torch.device("cpu"))


# ---------------------------------------------------------------------- loss on answers only
def test_labels_are_the_answer_and_end_of_turn_only(gen_cfg):
    runtime, split, _ = first_batch(gen_cfg)
    chat = runtime.model.chat
    for i in range(len(split)):
        labelled = (split.labels[i] != IGNORE).nonzero().flatten()
        answer = chat.encode(split.references[i])
        assert split.labels[i, labelled].tolist() == [*answer, chat.eos_id]
        # each label is the next input token: position t predicts token t + 1
        assert split.input_ids[i, labelled + 1].tolist() == [*answer, chat.eos_id]
        assert int(labelled[0]) == int(split.prompt_lens[i]) - 1  # from the prompt's last token
    sub = split.subset(torch.tensor([2, 0]))
    assert sub.references == (split.references[2], split.references[0])
    assert sub.prompts(torch.arange(2)) == split.prompts(torch.tensor([2, 0]))


def test_loss_ignores_prompt_and_image_positions_and_reads_the_answer(gen_cfg):
    runtime, split, (feats, ids, mask, labels) = first_batch(gen_cfg)
    model = runtime.model
    model.peft.ensure_sets(["s"])
    with torch.no_grad(), model.active("s"):
        logits = model(feats, ids, mask)
    base = token_loss(logits, labels)
    # the model's outputs at prompt/image positions change: the loss must not
    prompt_pos = (labels == IGNORE) & (mask[:, : labels.shape[1]] == 1)
    noisy = logits.clone()
    noisy[prompt_pos] = torch.randn_like(noisy[prompt_pos]) * 10
    assert torch.equal(token_loss(noisy, labels), base)
    # one answer token's label changes: the loss must
    col = int((labels[0] != IGNORE).nonzero()[0, 0])
    changed = labels.clone()
    changed[0, col] = (changed[0, col] + 7) % logits.shape[-1]
    assert not torch.isclose(token_loss(logits, changed), base)


@pytest.mark.parametrize("peft_type", ["lora", "prompt"])
def test_training_loss_at_answer_positions_only_equals_the_full_logits_loss(gen_cfg, peft_type):
    """supervised_loss computes the output layer at the answer positions only: loss and
    gradients must equal token_loss over the full (B, L, V) logits."""
    from fedmm.methods.losses import supervised_loss

    cfg = dataclasses.replace(gen_cfg, peft=dataclasses.replace(gen_cfg.peft, type=peft_type))
    runtime, _, (feats, ids, mask, labels) = first_batch(cfg)
    model = runtime.model
    model.peft.ensure_sets(["s"])
    params = [p for p in model.parameters() if p.requires_grad]
    with model.active("s"):
        full = token_loss(model(feats, ids, mask), labels)
        g_full = torch.autograd.grad(full, params, allow_unused=True)
        kept = supervised_loss(model, feats, ids, mask, labels)
        g_kept = torch.autograd.grad(kept, params, allow_unused=True)
    assert torch.allclose(kept, full, atol=1e-6)
    assert any(g is not None for g in g_full)
    for a, b in zip(g_full, g_kept):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


def test_image_features_reach_the_answer_logits(gen_cfg):
    runtime, _, (feats, ids, mask, labels) = first_batch(gen_cfg)
    model = runtime.model
    model.peft.ensure_sets(["s"])
    with torch.no_grad(), model.active("s"):
        a = model(feats, ids, mask)
        b = model(torch.randn_like(feats), ids, mask)
    answer = labels != IGNORE
    assert not torch.allclose(a[answer], b[answer])


# ---------------------------------------------------------------------- decoding
class Scripted(torch.nn.Module):
    """An LM head that answers a fixed token sequence per row, step by step."""

    def __init__(self, scripts: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.scripts, self.vocab, self.step = scripts, vocab, 0

    def forward(self, hidden):
        out = torch.zeros(hidden.shape[0], hidden.shape[1], self.vocab)
        for i, script in enumerate(self.scripts):
            out[i, :, script[min(self.step, len(script) - 1)]] = 1.0
        self.step += 1
        return out


def test_generation_stops_at_eos_and_respects_max_new_tokens(gen_cfg):
    runtime, split, _ = first_batch(gen_cfg)
    model = runtime.model
    eos = model.chat.eos_id
    prompts = split.prompts(torch.arange(3))
    head = model.lm.lm_head
    try:
        model.lm.lm_head = Scripted([[10, 11, eos, 12], [20] * 50, [eos]], head.out_features)
        out = model.generate(split.feats[:3].float(), prompts, max_new_tokens=5)
    finally:
        model.lm.lm_head = head
    assert out == [[10, 11], [20] * 5, []]


def test_cached_left_padded_decoding_equals_full_recomputation(gen_cfg):
    """Greedy decoding through the KV cache with left padding gives, per row, exactly the tokens
    of recomputing the whole unpadded sequence at every step."""
    runtime, split, _ = first_batch(gen_cfg)
    model = runtime.model
    model.peft.ensure_sets(["s"])
    with torch.no_grad():
        for p in model.peft.parameters_of("s"):
            p.add_(torch.randn_like(p) * 0.3)  # LoRA B starts at 0: make it act
    idx = torch.tensor([0, 1, 2])
    prompts = split.prompts(idx)
    prompts[1] = prompts[1][:-3] + prompts[1][-2:]  # rows of different lengths: left padding
    assert len({len(p) for p in prompts}) > 1
    feats = split.feats[idx].float()
    with model.active("s"), torch.no_grad():
        cached = model.generate(feats, prompts, max_new_tokens=6)
        for i, prompt in enumerate(prompts):
            seq, full = list(prompt), []
            for _ in range(6):
                ids = torch.tensor([seq])
                token = int(model(feats[i : i + 1], ids, torch.ones_like(ids))[0, -1].argmax())
                if token == model.chat.eos_id:
                    break
                full.append(token)
                seq.append(token)
            assert cached[i] == full


# ---------------------------------------------------------------------- scores
def test_normalisation_exact_match_and_token_f1():
    assert normalize_text("The  T-shirt.") == "t shirt"
    assert exact_match("An ankle boot!", "ankle boot") == 1.0
    assert exact_match("boot", "ankle boot") == 0.0
    assert token_f1("ankle boot", "ankle boot") == 1.0
    assert token_f1("boot", "ankle boot") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("sandal", "ankle boot") == 0.0
    assert token_f1("", "") == 1.0


def test_scores_come_from_generated_text(gen_cfg, monkeypatch):
    runtime = get_runtime(gen_cfg)
    test = runtime.client_split(0, "test")
    ctx = ClientContext(gen_cfg, runtime.model, test, test, {}, 1, 0, 1, 1)
    answers = list(test.references)
    answers[0] = "The " + answers[0].upper() + "."  # normalised away: still a match
    answers[1] = "something else"
    monkeypatch.setattr("fedmm.generation.generate_split", lambda ctx, split: answers)
    scores = ctx.view("shared")
    n = len(test)
    assert scores["shared"] == pytest.approx((n - 1) / n)
    assert ctx.predictions["shared"][1]["generated"] == "something else"
    assert len(ctx.predictions["shared"]) == min(n, gen_cfg.eval.predictions)


# ---------------------------------------------------------------------- the baselines
BASELINES = ["local", "centralized", "fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm",
             "scaffold"]  # fmt: skip


class RecordingGrid(InProcessGrid):
    """Records every training reply's upload; each site keeps its state under ``<out>``, as a
    rehearsal's sites do (``engine.rehearsal_sites``)."""

    def __init__(self, n, out):
        super().__init__(n, sites={i: {"state-dir": f"{out}/client_state/site-{i}"}
                                   for i in range(n)})  # fmt: skip
        self.uploads: list[dict] = []

    def send_and_receive(self, messages, *, timeout=None):
        from fedmm.federation.messages import from_record

        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content() and "update" in reply.content.array_records:
                self.uploads.append(from_record(reply.content.array_records["update"]))
        return replies


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_runs_two_rounds_and_sends_only_peft_sets_and_projector(gen_cfg, method):
    cfg = gen_cfg.with_overrides({"method": method, "fed.clients": 2})
    model = get_runtime(cfg).model
    proj = {f"proj/{k}": tuple(v.shape) for k, v in model.visual_proj.state_dict().items()}
    if method == "centralized":
        from fedmm.methods.centralized import run_centralized
        from fedmm.results.predictions import predictions_section

        history = run_centralized(cfg)
        assert len(history) == 2 and all(h.clients for h in history)
        assert "| 0-original | shared |" in predictions_section(cfg.out_dir)
        return
    grid = RecordingGrid(2, cfg.out_dir)
    record = run_federation(grid, cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert all(0.0 <= v <= 1.0 for v in record["final"].values())
    summary = (Path(cfg.out_dir) / "summary.md").read_text()  # what the model said, per client
    assert "Generated answers" in summary and "| 1-inverted | " in summary
    if method == "local":
        assert not any(grid.uploads)  # nothing leaves a client
        return
    assert len(grid.uploads) == 4  # 2 clients x 2 rounds
    for upload in grid.uploads:
        # SCAFFOLD also sends its control variates' change, dc/<key>, over the same keys
        model_part = {k.removeprefix("dc/"): v for k, v in upload.items()}
        parts = {k.split("/", 1)[0] for k in model_part}
        assert parts == {"proj", "adapter.global_adapter"}, parts
        assert {k: v.shape for k, v in model_part.items() if k.startswith("proj/")} == proj
        lora = [k for k in model_part if k.startswith("adapter.")]
        assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
        assert (method == "scaffold") == any(k.startswith("dc/") for k in upload)


# ---------------------------------------------------------------------- learning
def test_a_learnable_generative_task_beats_the_most_common_answer(gen_cfg):
    """fmnist-function's ``object`` family (one class name per image, class-dependent bars):
    after a few FedAvg rounds the generated names match more often than always answering the
    most common test answer, and than the untrained model."""
    from collections import Counter

    cfg = gen_cfg.with_overrides({
        "data.benchmark": "fmnist-function", "fed.clients": 1, "fed.rounds": 3,
        "train.local_steps": 60, "train.batch_size": 16, "train.lr": 5e-3, "train.schedule": "constant",
        "data.train_per_client": 200, "data.test_per_client": 30,
    })  # fmt: skip
    test = get_runtime(cfg).client_split(0, "test")
    majority = Counter(test.references).most_common(1)[0][1] / len(test)
    record = run_federation(InProcessGrid(1), cfg)
    curve = [h["clients"]["0-object"]["shared"] for h in record["history"]]
    assert curve[0] < curve[-1] and curve[-1] > majority + 0.15, (curve, majority)


# ---------------------------------------------------------------------- bad input
def test_bitfit_is_refused_with_the_reason(gen_cfg):
    from fedmm.methods import get_method

    with pytest.raises(ConfigError, match="no biases|none"):
        get_method(gen_cfg.with_overrides({"peft.type": "bitfit"}))


def test_generative_task_needs_a_generative_backbone_and_vice_versa(gen_cfg):
    from fedmm.validate import validate_config

    with pytest.raises(ConfigError, match="needs a generative backbone"):
        validate_config(gen_cfg.with_overrides({"model.backbone": "tiny"}))
    with pytest.raises(ConfigError, match="data.task_kind=generate"):
        validate_config(gen_cfg.with_overrides({"data.task_kind": ""}))


def test_prompt_longer_than_the_limit_is_an_error_naming_it(gen_cfg):
    with pytest.raises(ConfigError, match=r"model.max_text_len=20"):
        get_runtime(gen_cfg.with_overrides({"model.max_text_len": 20})).client_split(0, "train")


def test_empty_target_is_an_error_and_long_targets_are_counted(gen_cfg):
    from fedmm.generation import encode_generative

    runtime = get_runtime(gen_cfg)
    raw = runtime.benchmark.clients[0].train
    feats = torch.zeros(len(raw), *runtime.model.visual_token_shape())
    kw = dict(template="{question}", max_text_len=96, name="c/train")
    empty = dataclasses.replace(raw, targets=["", *raw.targets[1:]])
    with pytest.raises(ConfigError, match="record 0: empty target"):
        encode_generative(runtime.model, empty, feats, max_target_tokens=16, **kw)
    enc = encode_generative(runtime.model, raw, feats, max_target_tokens=3, **kw)
    longer = sum(len(runtime.model.chat.encode(t)) > 3 for t in raw.targets)
    assert enc.truncated == longer > 0
    assert int((enc.labels != IGNORE).sum(1).max()) == 4  # 3 answer tokens + end of turn
    ctx = ClientContext(gen_cfg, runtime.model, enc, enc, {}, 1, 0, 1, 1)
    opt = ctx.optimizer([list(runtime.model.visual_proj.parameters())])
    next(ctx.steps(opt), None)
    assert ctx.stats["targets_truncated"] == longer


def test_missing_or_wrong_gguf_files_are_clear_errors(tmp_path):
    from gguf import GGUFWriter

    from fedmm.backbones.generative import check_gguf

    with pytest.raises(RuntimeError, match="does not exist"):
        check_gguf(tmp_path / "none.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(RuntimeError, match="not a GGUF file"):
        check_gguf(tmp_path / "text.gguf")
    writer = GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RuntimeError, match="'bert' is not a causal language model"):
        check_gguf(tmp_path / "bert.gguf")


# ---------------------------------------------------------------------- the LM cache
def test_cached_weights_equal_a_fresh_load_and_skip_the_loader(tmp_path):
    """The safetensors cache round trip, on a tiny random Llama (the SmolLM2 GGUF takes ~30 s
    to dequantize; the same function caches it, keyed by its sha256)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from fedmm.backbones.generative import load_cached_lm, tiny_llama

    calls = []

    def load():
        calls.append(1)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
        )
        return tiny_llama()[0], tok

    fresh, _ = load_cached_lm("k1", tmp_path, load)
    cached, _ = load_cached_lm("k1", tmp_path, load)
    assert len(calls) == 1 and (tmp_path / "llm" / "k1" / "model.safetensors").is_file()
    a, b = fresh.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(fresh(ids).logits, cached(ids).logits)
    load_cached_lm("k2", tmp_path, load)  # another key: another entry, loaded afresh
    assert len(calls) == 2


# ---------------------------------------------------------------------- site directories
def test_a_generative_benchmark_splits_into_sites_that_read_back_as_generation(gen_cfg, tmp_path):
    from fedmm.data import load_benchmark
    from fedmm.data.schema import read_schema
    from fedmm.data.site_split import write_sites
    from fedmm.data.sites import load_site

    bench = load_benchmark(gen_cfg)
    sites = write_sites(bench, tmp_path / "split")
    schema = read_schema(tmp_path / "split" / "schema.json")
    task = schema.tasks["fmnist-domain"]
    assert (task.kind, task.answers, task.prompt) == ("generate", [], bench.tasks[
        "fmnist-domain"].prompt)  # fmt: skip
    site = load_site(sites[1], gen_cfg)
    assert site.clients[0].test.targets == bench.clients[1].test.targets
    cfg = gen_cfg.with_overrides({"data.benchmark": "sites", "data.data_dir": str(sites[1]),
                                  "data.task_kind": ""})  # fmt: skip
    test = get_runtime(cfg).client_split(0, "test")
    assert test.kind == "generate" and test.references == tuple(bench.clients[1].test.targets)


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol table (its byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path, seed: int = 0) -> None:
    """A tiny Llama GGUF (hidden 32, 2 layers, fp32 tensors) with a byte-level BPE tokenizer and
    a ChatML template, written with the ``gguf`` package."""
    from gguf import GGUFWriter, TokenType

    d, layers, ff, heads, kv = 32, 2, 64, 4, 2
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_symbols(), "he", "ll"]
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    tensor("token_embd.weight", len(tokens), d)
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * d // heads, d)),
                            ("attn_v", (kv * d // heads, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):  # fmt: skip
            tensor(f"blk.{i}.{name}.weight", *shape)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_loads_once_and_its_cached_weights_equal_the_fresh_load(tmp_path):
    """The real path on a tiny GGUF: dequantized by transformers, cached as safetensors under
    the file's sha256; the cached model equals the fresh load, tensor for tensor, and the chat
    tokenizer comes back with it; another file gets another entry."""
    from fedmm.backbones.generative import file_sha256, load_gguf_lm

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    fresh, chat = load_gguf_lm(path, tmp_path / "cache")
    entry = tmp_path / "cache" / "llm" / file_sha256(path)
    assert (entry / "model.safetensors").is_file()
    cached, chat2 = load_gguf_lm(path, tmp_path / "cache")
    a, b = fresh.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 70, 71, 2]])
    assert torch.equal(fresh(ids).logits, cached(ids).logits)
    assert (
        chat.prompt("hi") == chat2.prompt("hi") and chat2.decode(chat2.encode("hello")) == "hello"
    )
    assert chat2.eos_id == 2  # <|im_end|>, the end of the assistant's turn
    write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    load_gguf_lm(tmp_path / "other.gguf", tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "llm").iterdir())) == 2


def test_generation_decodes_eval_generate_batch_size_rows_at_a_time(gen_cfg, monkeypatch):
    """The KV cache grows with the rows decoded together: ``generate_split`` never hands the
    model more than ``eval.generate_batch_size`` rows, and answers every row in order."""
    from fedmm.generation import generate_split

    cfg = gen_cfg.with_overrides({"eval.generate_batch_size": 3})
    rt = get_runtime(cfg)
    split = rt.client_split(0, "train")
    sizes, real = [], rt.model.generate

    def recording(feats, prompts, max_new_tokens):
        sizes.append(len(prompts))
        return real(feats, prompts, max_new_tokens)

    monkeypatch.setattr(rt.model, "generate", recording)
    ctx = ClientContext(cfg, rt.model, split, split, {}, 1, 0, 1, 1)
    answers = generate_split(ctx, split)
    n = len(split)
    assert len(answers) == n and sizes == [3] * (n // 3) + ([n % 3] if n % 3 else [])
