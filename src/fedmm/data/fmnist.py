"""The embedded default benchmarks: Fashion-MNIST turned into vision-language tasks, offline.

Images: the real Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist`` installs them
in /usr/share/datasets/fashion-mnist; any directory holding the four standard ``*.gz`` files works
through ``data.data_dir`` or ``$FEDMM_FASHION_MNIST``).

Texts: deterministic templated questions in five *question families*, each answered from the
label, over one shared answer vocabulary (10 item names, yes/no, 6 clothing groups):

* ``object``  "what item of clothing is shown?"                  -> item name
* ``verify``  "is this a picture of a sneaker?" (true half the time) -> yes / no
* ``group``   "which group of clothing does this item belong to?"   -> top / bottom / ...
* ``feet``    "is this item worn on the feet?"                      -> yes / no
* ``choice``  "is it a coat or a bag?" (one of the two is right)    -> item name

Two heterogeneity settings, after FedDAT's benchmarks:

* ``fmnist-domain`` (Domain): client k sees images in visual domain ``DOMAINS[k % 5]``
  (original, inverted, blurred, edge map, rotated 90°) and asks every question family.
* ``fmnist-function`` (Function): client k asks only family ``FAMILIES[k % 5]``, original images.

A caption variant for generative backbones (``fedmm.generation``; no caption data set needed):

* ``fmnist-caption``: the images of ``fmnist-domain`` (the same clients, domains and records),
  each with the instruction "Describe the image." and three reference captions **templated from
  its class** (``captions``: "a sneaker, a kind of footwear", "a sneaker: for everyday wear,
  worn on the feet", "a picture of a sneaker"); one generate task scored as captions (BLEU-4,
  ROUGE-L, CIDEr-D).  The references say nothing a class label does not, so its scores measure
  class recognition in caption form, not description of what else is in an image.

and a third, after FedDAT's Task benchmark and TAP's setting:

* ``fmnist-task`` (Task): six fixed clients that differ in task (VQA, classification,
  multi-label attributes, text classification) and in modality (image+text, image only, text
  only); see ``build_task``.

Every client holds ``data.train_per_client`` training images drawn from the Fashion-MNIST train
set and ``data.test_per_client`` test images from its test set, disjoint across clients; the split
is fixed by ``data.split_seed`` (not the run seed), so every method and seed sees the same data.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmm.config import FedmmConfig
from fedmm.data import Benchmark, ClientSpec, RawSplit, Task, register

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
ITEMS = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
GROUPS = ["top", "bottom", "top", "one-piece", "outerwear",
          "footwear", "top", "footwear", "accessory", "footwear"]  # fmt: skip
ON_FEET = {5, 7, 9}
ANSWERS = ITEMS + ["yes", "no"] + sorted(set(GROUPS))
FAMILIES = ("object", "verify", "group", "feet", "choice")
DOMAINS = ("original", "inverted", "blurred", "edges", "rotated")

TEMPLATES = {
    "object": ["what item of clothing is shown?", "what is this item?", "what is in the picture?"],
    "verify": ["is this a picture of a {a}?", "is the item a {a}?", "does the image show a {a}?"],
    "group": ["which group of clothing does this item belong to?", "what kind of garment is this?"],
    "feet": ["is this item worn on the feet?", "would you wear this on your feet?"],
    "choice": ["is it a {a} or a {b}?", "which is it, a {a} or a {b}?"],
}

INSTALL_HINT = (
    "Fashion-MNIST was not found. Install it with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist), or put the four files "
    f"{', '.join(FILES.values())} in a directory and pass `--set data.data_dir=DIR` "
    "(or set FEDMM_FASHION_MNIST=DIR)."
)


def find_fashion_mnist(data_dir: str = "") -> Path:
    """The first directory holding all four IDX files: data_dir, $FEDMM_FASHION_MNIST, defaults."""
    candidates = [data_dir] if data_dir else []
    candidates += [os.environ.get("FEDMM_FASHION_MNIST", ""), *DEFAULT_DIRS]
    for cand in filter(None, candidates):
        path = Path(cand)
        if all((path / f).is_file() for f in FILES.values()):
            return path
    looked = ", ".join(c for c in candidates if c)
    raise FileNotFoundError(f"{INSTALL_HINT} Looked in: {looked}.")


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic 0x0000 <dtype=0x08 uint8> <ndim>, big-endian dims."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: expected {int(np.prod(dims))} values for dims {dims}, got {body.size}"
        )
    return body.reshape(dims)


def load_fashion_mnist(data_dir: str = "") -> dict[str, np.ndarray]:
    root = find_fashion_mnist(data_dir)
    return {key: read_idx(root / name) for key, name in FILES.items()}


def apply_domain(images: np.ndarray, domain: str) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> the same images in another visual domain."""
    if domain == "original":
        return images
    if domain == "inverted":
        return 255 - images
    if domain == "blurred":
        return ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 1.5, 1.5)).astype(
            np.uint8
        )
    if domain == "edges":
        x = images.astype(np.float32)
        mag = np.hypot(ndimage.sobel(x, axis=1), ndimage.sobel(x, axis=2))
        scale = mag.reshape(len(mag), -1).max(axis=1).reshape(-1, 1, 1) + 1e-6
        return (255 * mag / scale).astype(np.uint8)
    if domain == "rotated":
        return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    raise ValueError(f"unknown domain {domain!r}; choices: {', '.join(DOMAINS)}")


def make_question(family: str, label: int, rng: np.random.Generator) -> tuple[str, str]:
    """A templated (question, answer) pair for an image of class ``label``."""
    template = TEMPLATES[family][rng.integers(len(TEMPLATES[family]))]
    if family == "object":
        return template, ITEMS[label]
    if family == "verify":
        truth = bool(rng.random() < 0.5)
        other = (label + 1 + rng.integers(len(ITEMS) - 1)) % len(ITEMS)
        asked = label if truth else int(other)
        return template.format(a=ITEMS[asked]), "yes" if truth else "no"
    if family == "group":
        return template, GROUPS[label]
    if family == "feet":
        return template, "yes" if label in ON_FEET else "no"
    if family == "choice":
        other = int((label + 1 + rng.integers(len(ITEMS) - 1)) % len(ITEMS))
        a, b = (label, other) if rng.random() < 0.5 else (other, label)
        return template.format(a=ITEMS[a], b=ITEMS[b]), ITEMS[label]
    raise ValueError(f"unknown question family {family!r}; choices: {', '.join(FAMILIES)}")


def _split(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, domain: str,
    families: tuple[str, ...], rng: np.random.Generator,
) -> RawSplit:  # fmt: skip
    texts, answers = [], []
    for y in labels[idx]:
        family = families[rng.integers(len(families))]
        question, answer = make_question(family, int(y), rng)
        texts.append(question)
        answers.append(ANSWERS.index(answer))
    return RawSplit(apply_domain(images[idx], domain), texts, np.asarray(answers, dtype=np.int64))


CAPTION_INSTRUCTION = "Describe the image."
CAPTION_TASK = "fmnist-caption"  # the benchmark's one task


def captions(label: int) -> list[str]:
    """The three reference captions of class ``label``, templated from its name, its group and
    its attributes (``ITEM_ATTRIBUTES``): they carry no more than the label."""
    item = ITEMS[label]
    a = "an" if item[0] in "aeiou" else "a"
    traits = ", ".join(DESCRIPTION_WORDS[t][0] for t in sorted(ITEM_ATTRIBUTES[label]))
    return [f"{a} {item}, a kind of {GROUPS[label]}", f"{a} {item}: {traits}",
            f"a picture of {a} {item}"]  # fmt: skip


def _caption_split(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, domain: str
) -> RawSplit:
    refs = [captions(int(y)) for y in labels[idx]]
    return RawSplit(apply_domain(images[idx], domain), [CAPTION_INSTRUCTION] * len(idx),
                    np.zeros(len(idx), dtype=np.int64), targets=[r[0] for r in refs],
                    references=refs)  # fmt: skip


def build(cfg: FedmmConfig, setting: str) -> Benchmark:
    raw = load_fashion_mnist(cfg.data.data_dir)
    k, n_train, n_test = cfg.fed.clients, cfg.data.train_per_client, cfg.data.test_per_client
    if k < 1 or n_train < 1 or n_test < 1:
        raise ValueError("fed.clients, data.train_per_client and data.test_per_client must be >= 1")
    if k * n_train > len(raw["train_labels"]) or k * n_test > len(raw["test_labels"]):
        raise ValueError(
            f"{k} clients x ({n_train} train, {n_test} test) exceeds Fashion-MNIST's "
            f"{len(raw['train_labels'])}/{len(raw['test_labels'])} images"
        )
    rng = np.random.default_rng(cfg.data.split_seed)
    train_perm = rng.permutation(len(raw["train_labels"]))
    test_perm = rng.permutation(len(raw["test_labels"]))
    clients = []
    for i in range(k):
        if setting in ("domain", "caption"):
            domain, families = DOMAINS[i % len(DOMAINS)], FAMILIES
            cid, desc = f"{i}-{domain}", f"{domain} images, all question families"
        else:
            domain, families = "original", (FAMILIES[i % len(FAMILIES)],)
            cid, desc = f"{i}-{families[0]}", f"original images, {families[0]} questions"
        train_idx = train_perm[i * n_train : (i + 1) * n_train]
        test_idx = test_perm[i * n_test : (i + 1) * n_test]
        if setting == "caption":  # fmnist-domain's images, captions templated from the class
            clients.append(ClientSpec(
                cid, f"{domain} images, captions templated from the class",
                _caption_split(raw["train_images"], raw["train_labels"], train_idx, domain),
                _caption_split(raw["test_images"], raw["test_labels"], test_idx, domain),
                task=CAPTION_TASK,
            ))  # fmt: skip
            continue
        train = _split(raw["train_images"], raw["train_labels"], train_idx, domain, families, rng)
        test = _split(raw["test_images"], raw["test_labels"], test_idx, domain, families, rng)
        clients.append(ClientSpec(cid, desc, train, test))
    if setting == "caption":
        task = Task("generate", [], "describe the item (references templated from its class)",
                    prompt="{question}", score="caption")  # fmt: skip
        return Benchmark(CAPTION_TASK, "Fashion-MNIST captions templated from the class, "
                         "Domain (visual domain per client)", [], clients,
                         {"references": "templated from the class (fmnist.captions)"},
                         {CAPTION_TASK: task})  # fmt: skip
    title = (
        "Domain (visual domain per client)"
        if setting == "domain"
        else "Function (question family per client)"
    )
    return Benchmark(f"fmnist-{setting}", f"Fashion-MNIST VQA, {title}", list(ANSWERS), clients)


# ---------------------------------------------------------------------- Task: tasks x modalities
ATTRIBUTES = ["upper-body", "lower-body", "on-feet", "sleeves", "layered", "carried", "casual"]
ITEM_ATTRIBUTES = {  # per Fashion-MNIST class, the attributes an annotator would tick
    0: {"upper-body", "sleeves", "casual"},  # t-shirt
    1: {"lower-body", "casual"},  # trouser
    2: {"upper-body", "sleeves", "layered"},  # pullover
    3: {"upper-body", "lower-body"},  # dress
    4: {"upper-body", "sleeves", "layered"},  # coat
    5: {"on-feet", "casual"},  # sandal
    6: {"upper-body", "sleeves"},  # shirt
    7: {"on-feet", "casual"},  # sneaker
    8: {"carried"},  # bag
    9: {"on-feet", "layered"},  # ankle boot
}
DESCRIPTION_WORDS = {  # text-only client: phrases that describe the item without naming it
    "upper-body": ["worn on the torso", "covers the chest"],
    "lower-body": ["covers the legs", "worn below the waist"],
    "on-feet": ["worn on the feet", "you walk in it"],
    "sleeves": ["has sleeves", "with arm openings"],
    "layered": ["worn over other clothes", "keeps you warm"],
    "carried": ["carried by hand or on a shoulder", "holds your things"],
    "casual": ["for everyday wear", "informal"],
}
TASK_CLIENTS = (  # (task, modalities, image domain): the fixed clients of fmnist-task
    ("vqa", ("image", "text"), "original"),
    ("vqa", ("image", "text"), "blurred"),
    ("classify", ("image",), "original"),
    ("classify", ("image",), "inverted"),
    ("attributes", ("image",), "original"),
    ("describe", ("text",), "original"),
)


def describe(label: int, rng: np.random.Generator) -> str:
    """A noisy description of an item of class ``label`` from its attributes (never its name)."""
    attrs = sorted(ITEM_ATTRIBUTES[label])
    keep = [a for a in attrs if rng.random() < 0.8] or [attrs[rng.integers(len(attrs))]]
    phrases = [DESCRIPTION_WORDS[a][rng.integers(2)] for a in keep]
    rng.shuffle(phrases)
    return "a garment: " + ", ".join(phrases)


def build_task(cfg: FedmmConfig) -> Benchmark:
    """``fmnist-task``: six clients that differ in task *and* modality (TAP's setting).

    =====  ===========  ===============  ========  ===============================================
    id     task         kind             inputs    what
    =====  ===========  ===============  ========  ===============================================
    0, 1   vqa          single (18)      image+text VQA as fmnist-domain (original / blurred)
    2, 3   classify     single (10)      image     the item class (original / inverted images)
    4      attributes   multilabel (7)   image     ``ATTRIBUTES`` of the class (``ITEM_ATTRIBUTES``)
    5      describe     single (6)       text      the clothing group from a noisy description
    =====  ===========  ===============  ========  ===============================================

    Images, sizes and the split follow ``fmnist-domain`` (``data.train_per_client`` /
    ``data.test_per_client`` each, disjoint across clients, fixed by ``data.split_seed``).
    The text-only client gets no images at all (``RawSplit.images = None``); image-only clients
    get empty texts.  The multi-label targets are a fixed function of the class, so AUROC can
    reach 1; the metric is mean AUROC (primary) and macro-F1.
    """
    if cfg.fed.clients != len(TASK_CLIENTS):
        raise ValueError(f"fmnist-task has {len(TASK_CLIENTS)} fixed clients: set "
                         f"fed.clients={len(TASK_CLIENTS)}, got {cfg.fed.clients}")  # fmt: skip
    raw = load_fashion_mnist(cfg.data.data_dir)
    k, n_train, n_test = len(TASK_CLIENTS), cfg.data.train_per_client, cfg.data.test_per_client
    if n_train < 1 or n_test < 1:
        raise ValueError("data.train_per_client and data.test_per_client must be >= 1")
    if k * n_train > len(raw["train_labels"]) or k * n_test > len(raw["test_labels"]):
        raise ValueError(f"{k} clients x ({n_train} train, {n_test} test) exceeds Fashion-MNIST")
    rng = np.random.default_rng(cfg.data.split_seed)
    train_perm = rng.permutation(len(raw["train_labels"]))
    test_perm = rng.permutation(len(raw["test_labels"]))
    groups = sorted(set(GROUPS))
    tasks = {
        "vqa": Task("single", list(ANSWERS), "templated questions, image + text"),
        "classify": Task("single", list(ITEMS), "item class from the image alone"),
        "attributes": Task("multilabel", list(ATTRIBUTES), "garment attributes, image alone"),
        "describe": Task("single", groups, "clothing group from a description, text alone"),
    }

    def split(task: str, modalities, domain: str, images, labels, idx) -> RawSplit:
        ys = labels[idx]
        if task == "vqa":
            return _split(images, labels, idx, domain, FAMILIES, rng)
        pics = apply_domain(images[idx], domain) if "image" in modalities else None
        if task == "attributes":
            targets = np.array(
                [[a in ITEM_ATTRIBUTES[int(y)] for a in ATTRIBUTES] for y in ys], dtype=np.float32
            )
            return RawSplit(pics, [""] * len(ys), targets)
        if task == "classify":
            return RawSplit(pics, [""] * len(ys), ys.astype(np.int64))
        texts = [describe(int(y), rng) for y in ys]
        return RawSplit(None, texts, np.array([groups.index(GROUPS[int(y)]) for y in ys]))

    clients = []
    for i, (task, modalities, domain) in enumerate(TASK_CLIENTS):
        train_idx = train_perm[i * n_train : (i + 1) * n_train]
        test_idx = test_perm[i * n_test : (i + 1) * n_test]
        clients.append(ClientSpec(
            f"{i}-{task}", f"{task}: {tasks[task].description} ({domain} images)"
            if "image" in modalities else f"{task}: {tasks[task].description}",
            split(task, modalities, domain, raw["train_images"], raw["train_labels"], train_idx),
            split(task, modalities, domain, raw["test_images"], raw["test_labels"], test_idx),
            task=task, modalities=modalities,
        ))  # fmt: skip
    return Benchmark(
        "fmnist-task", "Fashion-MNIST, Task: clients differ in task and modality", [], clients,
        tasks=tasks,
    )  # fmt: skip


@register("fmnist-task", clients=len(TASK_CLIENTS))
def fmnist_task(cfg: FedmmConfig) -> Benchmark:
    return build_task(cfg)


@register("fmnist-domain")
def fmnist_domain(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "domain")


@register("fmnist-caption")
def fmnist_caption(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "caption")


@register("fmnist-function")
def fmnist_function(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "function")
