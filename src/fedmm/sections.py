"""The core option sections of ``FedmmConfig`` (``model``, ``adapter``, ``peft``, ``train``, ``fed``,
``data``, ``validate``, ``dp``): every option declared once with ``fedmm.spec.option`` -- default,
interval or choices, help, scope and whether it affects results.  Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmm.spec import (
    BACKBONE_NAMES,
    CLIENTS_BY,
    COMPRESSIONS,
    DIRICHLET_BY,
    PEFT_TYPE_NAMES,
    PRECISIONS,
    SCHEDULES,
    SECURE_AGGREGATIONS,
    SERVER,
    SITE,
    TEST_SPLITS,
    WEIGHTINGS,
    option,
)  # fmt: skip


@dataclass
class ModelConfig:
    """The backbone and the trainable parts around it."""

    backbone: str = option("minilm-mobilenet", choices=BACKBONE_NAMES, help="see fedmm.backbones")
    image_size: int = option(
        96, "[8, inf)", help="images are resized to this square size before the vision tower"
    )
    grid: int = option(
        3,
        "[1, inf)",
        help="visual tokens: the vision grid is average-pooled to at most grid x grid",
    )
    max_text_len: int = option(24, "[3, inf)", help="text tokens, [CLS] and [SEP] included")
    head_hidden: int = option(256, "[1, inf)", help="hidden width of the task head MLP")
    dropout: float = option(0.1, "[0, 1)", help="dropout in the head")
    backbone_dropout: float = option(
        -1.0,
        "[-1, 1)",
        help="dropout inside the frozen backbone's transformer while training (hidden and "
        "attention): -1 = the backbone's own rates (MiniLM: 0.1), 0 = off (faster; accuracy "
        "effect not yet measured); docs/performance.md",
    )
    # Hugging Face families (vilt | clip | siglip | blip, see docs/backbones.md): where to load from
    hf_path: str = option(
        "", help='hub name, local dir or "tiny-random"; "" = the family\'s default'
    )
    hf_download: bool = option(
        False, help="may fetch hf_path from the hub (else local files/cache only)"
    )
    gradient_checkpointing: bool = option(
        False, help="recompute backbone activations in backward (less memory)"
    )


@dataclass
class AdapterConfig:
    """Bottleneck adapter ``A(h) = W_up ReLU(W_down h + b_down) + b_up`` after every FFN."""

    reduction_factor: int = option(
        8, "[1, inf)", help="bottleneck r = d // reduction_factor (ignored when bottleneck > 0)"
    )
    bottleneck: int = option(0, "[0, inf)", help='explicit r; 0 means "use reduction_factor"')
    init_std: float = option(0.02, "[0, inf)", help="W_down ~ N(0, init_std)")
    zero_init_up: bool = option(
        True, help="W_up = 0 so the adapter is the identity at init (open choice)"
    )


@dataclass
class PeftConfig:
    """Which PEFT type the methods train (every method uses the same type and size)."""

    type: str = option("adapter", choices=PEFT_TYPE_NAMES, help="PEFT type", flag="peft")
    lora_r: int = option(
        0,
        "[0, inf)",
        help="LoRA rank; 0 = the rank whose size matches one adapter set (equal budget)",
    )
    lora_alpha: float = option(16.0, "(0, inf)", help="LoRA scaling alpha / r")
    lora_targets: str = option(
        "query,value", help="linear layers of the text transformer, by last name"
    )
    prompt_length: int = option(
        20, "[1, inf)", help="prompt tokens prepended to the joint sequence"
    )


@dataclass
class TrainConfig:
    """Local optimisation, identical for every method (same steps, same schedule)."""

    lr: float = option(1e-3, "(0, inf)", help="peak learning rate")
    weight_decay: float = option(0.0, "[0, inf)", help="AdamW weight decay")
    batch_size: int = option(32, "[1, inf)", help="training batch size")
    local_steps: int = option(
        15,
        "[1, inf)",
        help="optimiser steps per client per round, for every method (replaced by "
        "train.local_epochs when that is > 0)",
    )
    local_epochs: float = option(
        0.0,
        "[0, inf)",
        help="the round's budget in passes over each client's training data: client k takes "
        "ceil(E x n_k / (batch_size x accumulation)) steps per round, every method alike; 0 = "
        "train.local_steps (the two are exclusive: set one); fedmm run on jsonl/site data: 1",
    )
    schedule: str = option("cosine", choices=SCHEDULES, help="over the whole run (never restarted)")
    warmup_frac: float = option(
        0.05, "[0, 1)", help="fraction of all steps spent in linear warm-up"
    )
    grad_clip: float = option(1.0, "[0, inf)", help="max global grad norm; 0 disables clipping")
    eval_batch_size: int = option(256, "[1, inf)", help="evaluation batch size")
    # the thread count changes float sums (the same results need the same count): it affects them
    threads: int = option(
        0,
        "[0, inf)",
        scope=SITE,
        help="torch intra-op threads in each client process; 0 = all cores",
    )
    # fp32 | bf16 | auto (bf16 where the device has native bf16 -- CUDA, or a CPU with AMX /
    # AVX512-BF16 -- else fp32; each site resolves it, results record it per client).  bf16: the
    # frozen backbone's matmul weights stored once in bf16, autocast, the trainable PEFT sets,
    # projection and head kept in fp32 (docs/performance.md).  Default fp32 until the parity
    # runs (fp32 vs bf16, 3 seeds, two benchmarks) are done on an idle machine.
    precision: str = option(
        "fp32",
        choices=PRECISIONS,
        help="fp32 | bf16 (frozen backbone stored in bf16, autocast, fp32 trainable sets) | auto "
        "(bf16 where the CPU has amx_bf16/avx512_bf16 or the GPU bf16); default fp32 until "
        "parity runs are done (docs/performance.md)",
    )
    accumulation: int = option(
        1, "[1, inf)", help="micro-batches per optimiser step: effective batch = batch_size x this"
    )
    max_target_tokens: int = option(
        16, "[1, inf)", help="generative tasks: answers longer than this (tokens) are cut for "
        "training, counted (train stat targets_truncated) and reported (docs/generative.md)",
    )  # fmt: skip


def steps_per_round(train: TrainConfig, n_train: int) -> int:
    """Optimiser steps one client takes per round: ``train.local_steps``, or with
    ``train.local_epochs = E > 0``, ``ceil(E · n_train / (batch_size · accumulation))`` -- E
    passes over the client's ``n_train`` training records (at least 1 step; 0 for a client with
    no records, which trains nothing).

    The equal-budget rule: the budget is per client, not per method.  Client k takes the same
    ``s_k`` steps in every method (each of Ditto's two updates, FedDAT's joint step, SCAFFOLD's
    K = s_k in its control-variate update), so methods compare at equal compute; clients of
    different sizes take different step counts, so each sees E epochs of its own data per round
    (a small client is not overfit by a large one's budget, a large one not starved); FedAvg's
    sample weighting is unchanged.  The centralised baseline takes Σ_k s_k steps per round on
    the pooled data, what the federation's clients take together.  Each client's learning-rate
    schedule spans its own ``s_k · fed.rounds`` steps."""
    if train.local_epochs <= 0:
        return train.local_steps
    if n_train <= 0:
        return 0
    return max(1, math.ceil(train.local_epochs * n_train / (train.batch_size * train.accumulation)))


@dataclass
class FedConfig:
    """The federation: rounds, clients, sampling, server weighting."""

    rounds: int = option(
        5,
        "[1, inf)",
        help="federated rounds (your own data, jsonl or --sites, with no budget stated: 20, with train.local_epochs=1)",
        flag="rounds",
    )
    clients: int = option(5, "[1, inf)", help="number of clients", flag="clients")
    fraction: float = option(
        1.0, "(0, 1]", help="fraction of clients sampled for training each round"
    )
    min_clients: int = option(
        1,
        "[1, inf)",
        scope=SERVER,
        operational=True,
        help="fewest replies a training round needs to aggregate",
    )
    weighting: str = option("samples", choices=WEIGHTINGS, help="server average weights")
    round_timeout: float = option(
        0.0,
        "[0, inf)",
        scope=SERVER,
        operational=True,
        help="seconds to wait for replies; 0 = wait for all",
    )
    eval_every: int = option(
        1,
        "[1, inf)",
        scope=SERVER,
        operational=True,
        help="evaluate every N rounds and always after the last",
    )
    eval_fraction: float = option(
        1.0,
        "(0, 1]",
        scope=SERVER,
        operational=True,
        help="fraction of clients evaluated (seeded sample; last round: all)",
    )
    # early stopping (federation/early_stopping.py): on the validation split (data.val_frac)
    # run scope: a site scores its validation split only when asked (patience > 0), on one view
    early_stopping_patience: int = option(
        0,
        "[0, inf)",
        help="stop after this many evaluations without a new best mean validation score "
        "(needs data.val_frac > 0); 0 = off: every round of fed.rounds runs",
    )
    early_stopping_min_delta: float = option(
        0.0,
        "[0, inf)",
        scope=SERVER,
        help="a new best must beat the previous one by more than this (points of the score, 0-100)",
    )
    early_stopping_view: str = option(
        "",
        help='the view whose mean validation score decides; "" = the method\'s first view '
        "(fedmm list shows each method's views)",
    )
    compression: str = option("none", choices=COMPRESSIONS, help="encoding of the uploaded update")
    # secure aggregation (federation/secagg.py, docs/secure-aggregation.md): off | secagg+ (Bell
    # et al. 2020): the server learns only the sum of the sampled sites' uploads
    secure_aggregation: str = option(
        "off", choices=SECURE_AGGREGATIONS, help="the server learns only the sum of the uploads"
    )
    secagg_threshold: int = option(
        0, "[0, inf)", help="t of the t-of-n Shamir shares; 0 = a strict majority of n"
    )
    secagg_neighbours: int = option(
        0, "[0, inf)", help="k other sites each site masks with (even); 0 = every sampled site"
    )
    secagg_clip: float = option(
        1.0, "(0, inf)", help="clipping range c: each uploaded Δ value is clipped to [-c, c]"
    )
    secagg_quantization_bits: int = option(
        24, "[1, 30]", help="Δ ∈ [-c, c] quantized to integers in [0, 2^bits]"
    )
    secagg_modulus_bits: int = option(
        64, "[2, 64]", help="masked sums are taken mod 2^bits (sent as uint32 if ≤ 32)"
    )


@dataclass
class DataConfig:
    """Which benchmark and how much of it each client holds."""

    benchmark: str = option("fmnist-domain", help="benchmark name", flag="benchmark")
    data_dir: str = option(
        "",
        scope=SITE,
        affects_results=False,
        help="where the benchmark's files are; \"\" = the benchmark's default search",
    )
    train_per_client: int = option(400, "[1, inf)", help="training records per client")
    test_per_client: int = option(150, "[1, inf)", help="test records per client")
    val_frac: float = option(
        0.0,
        "[0, 0.9]",
        help="share of each client's training records held out as its validation split for "
        "early stopping (never trained on; seeded by data.split_seed and the client's id); 0 = "
        "none",
    )
    split_seed: int = option(
        0, "[0, inf)", help="the data split is fixed by this seed, independent of the run seed"
    )
    test_split: str = option(
        "standard",
        choices=TEST_SPLITS,
        help="VQA-RAD: standard (official testset) | image-disjoint",
    )
    alpha: float = option(
        0.5,
        "(0, inf)",
        help="Dirichlet concentration of the label-skew partitions (smaller = more skew)",
    )
    dirichlet_by: str = option(
        "answer", choices=DIRICHLET_BY, help="vqa-rad-dirichlet: the skewed label per image"
    )
    clients_by: str = option(
        "column", choices=CLIENTS_BY, help="jsonl: column (the records' `client`) | iid | dirichlet"
    )
    skip_missing_images: bool = option(
        False, help="jsonl: drop records with a missing or unreadable image"
    )
    normalize_answers: bool = option(
        True, help="jsonl: strip, collapse spaces, lower-case every answer"
    )
    allow_empty_clients: bool = option(
        False, help="keep clients with 0 train or 0 test rows, out of every mean"
    )
    # its content is the benchmark's: where the server's copy is does not change a result
    schema: str = option(
        "",
        scope=SERVER,
        affects_results=False,
        help="the server's copy of the "
        'task schema (schema.json); "" = derived from the benchmark by the '
        "process that starts a rehearsal",
    )
    task_kind: str = option(
        "", choices=("", "generate"), help='"" = the benchmark\'s own task kinds; "generate" = a '
        "classification benchmark (one task or several) answered in text by a generative "
        "backbone (docs/generative.md)",
    )  # fmt: skip


@dataclass
class EvalConfig:
    """Evaluation of generative tasks (fedmm.generation): greedy decoding and what is shown."""

    max_new_tokens: int = option(
        16,
        "[1, 512]",
        help="generated tokens per answer at most (decoding stops at end-of-turn); the prompt "
        "plus these must fit the model's context",
    )
    generate_batch_size: int = option(
        32,
        "[1, inf)",
        help="rows decoded together by greedy generation (train.eval_batch_size sizes the "
        "classifiers' evaluation batches): the KV cache grows with them -- 163 rows of VQA-RAD "
        "on SmolLM2 took 7 GB more than 32 rows",
    )
    predictions: int = option(
        5, "[0, inf)", affects_results=False,  # experiment scope: the sites must receive it
        help="predictions per client and view kept at the site for summary.md (0 = none)",
    )  # fmt: skip


@dataclass
class ValidateConfig:
    """Server-side checks of every training reply before aggregation (federation/validation.py).

    Shapes, dtypes, keys and finiteness are always checked against the method's declared upload;
    these are the bounds that have no exact expected value."""

    max_examples: int = option(
        1_000_000,
        "[1, inf)",
        scope=SERVER,
        help="largest num-examples one client may claim (weights the average)",
    )
    max_upload_mb: float = option(
        0.0,
        "[0, inf)",
        scope=SERVER,
        help="bound on one upload's tensor bytes; 0 = the declared upload's size",
    )


@dataclass
class DPConfig:
    """Client-side differential privacy of the upload (federation/dp.py): clip, then add noise."""

    clip_norm: float = option(
        0.0, "[0, inf)", help="C: the update Δ = θ_k − θ^t is scaled to ‖Δ‖₂ ≤ C; 0 = DP off"
    )
    noise_multiplier: float = option(
        0.0, "[0, inf)", help="σ: adds N(0, (σC)²) to every uploaded coordinate"
    )
