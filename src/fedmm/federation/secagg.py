"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020) on fedmm's Message-API round loop.

With ``fed.secure_aggregation = "secagg+"`` the server learns the sum of the sampled sites'
uploads, never one site's (docs/secure-aggregation.md).  Flower's own ``SecAggPlusWorkflow`` and
``secaggplus_mod`` need its legacy strategy stack; this module follows their four stages on
fedmm's ``Federation`` and ``clientapp.handle``, with Flower's primitives
(``flwr.common.secure_aggregation``: ECDH key agreement + HKDF and Fernet encryption, Shamir
t-of-n shares over PyCryptodome, stochastic quantization) and the ChaCha20 stream cipher of the
``cryptography`` package as the mask generator (why not Flower's ``pseudo_rand_gen``: see
``expand``).  No primitive is implemented here.

One round, n sampled sites, each with k neighbours (``fed.secagg_neighbours``; 0 = all n - 1:
Bonawitz et al.'s SecAgg), Shamir threshold t (``fed.secagg_threshold``)::

    stage           server -> site i                          site i -> server
    setup           n, share count k+1, t, c, bits            pk1_i, pk2_i (two fresh ECDH keys)
    share-keys      (pk1_j, pk2_j) of i's neighbours           Enc(KA(sk2_i, pk2_j), (i, j,
                                                                b_i share, sk1_i share)) per j
    collect         the global state + the ciphertexts         y_i = w_i·Q(Δ_i) ⊕ w_i
                    addressed to i; i trains here                   + PRG(b_i) ± Σ_j PRG(KA(sk1_i, pk1_j))
    unmask          survivors U and dropped D among i's        shares of b_j (j ∈ U), of sk1_j
                    neighbours                                  (j ∈ D)

    server: Σ_{i∈U} y_i − Σ_{i∈U} PRG(b_i) ∓ Σ_{d∈D, i∈U} PRG(KA(sk1_d, pk1_i))  (mod 2^m)
            = Σ_{i∈U} w_i·Q(Δ_i) ⊕ Σ_{i∈U} w_i

Pairwise masks cancel in the sum (site i adds ``+PRG(s_ij)`` when i > j, ``−`` when i < j); a
site that drops after sharing its keys is unmasked from its neighbours' shares of sk1; a round
completes only when every needed secret has t shares and at least t sites survive, else
``SecAggFailed`` says why and the round loop keeps the global state.

Encoding (what is masked, per site k): Δ_k = upload_k − θ^t for the keys of the global state
(from 0 for a method's extra uploads: SCAFFOLD's Δc), clipped to [−c, c] and stochastically
quantized by Flower's ``quantize`` to integers in [0, Q], Q = 2^``fed.secagg_quantization_bits``;
each value multiplied by the weight w_k (n_k under ``fed.weighting = samples``, 1 under
``uniform``; 1 for a method's ``secagg_summed`` keys); w_k itself appended as one more masked
value, so the server learns Σ w_k, not n_k.  All arithmetic mod M = 2^``fed.secagg_modulus_bits``;
the sum never wraps while Σ_k w_k · Q < M (``check_capacity``, before the round).

Quantization error (stated, and measured in tests/test_secagg.py): for values inside [−c, c],
stochastic rounding moves each value by less than one step 2c/Q, and is unbiased; the weighted
mean of such values is off by less than 2c/Q per coordinate (a convex combination of errors each
below 2c/Q), the sum of S values by less than S·2c/Q; plus float32 rounding of the result.
A value outside [−c, c] is clipped first (not bounded by this; the site logs how many).

Size (~670 lines): both halves of one protocol (the sites' stages and the server's), as each method
keeps both halves of its protocol in one module.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedmm.config import ConfigError, FedmmConfig
from fedmm.federation.messages import RefusedMessage
from fedmm.files import atomic_write
from fedmm.spec import SECURE_AGGREGATIONS  # fed.secure_aggregation's choices

log = logging.getLogger(__name__)

SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect-masked-input", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
SECAGG = "secagg"  # the ConfigRecord of a stage message and of its reply
MASKED = "masked"  # the ArrayRecord of a site's masked input
WEIGHT_KEY = "secagg/weight"  # the masked w_k appended to the upload
STATE_KEY = "fedmm.secagg"  # the site's protocol state (secrets) in its Flower Context
NONCE = bytes(16)  # ChaCha20's counter+nonce: every key is fresh per round and used once


class SecAggFailed(RuntimeError):
    """A round whose secure aggregation cannot complete (too few survivors or shares)."""


# ---------------------------------------------------------------------- options
def check_options(cfg: FedmmConfig) -> None:
    """The fed.secagg_* options together (``ConfigError`` naming them): an even neighbour count
    (a ring, Flower's SecAgg+ graph), a threshold that a round can reach, no lossy
    ``fed.compression`` on top of the quantization."""
    f = cfg.fed
    if f.secagg_neighbours % 2:
        raise ConfigError(
            f"fed.secagg_neighbours={f.secagg_neighbours} must be even (k/2 neighbours on each "
            "side of a ring of the sampled sites) or 0 (every sampled site)"
        )
    if f.secagg_threshold == 1:
        raise ConfigError("fed.secagg_threshold=1 would let any one site's share reveal a secret; "
                          "use >= 2 or 0 (a strict majority)")  # fmt: skip
    if f.secagg_quantization_bits >= f.secagg_modulus_bits:
        raise ConfigError(
            f"fed.secagg_quantization_bits={f.secagg_quantization_bits} must be below "
            f"fed.secagg_modulus_bits={f.secagg_modulus_bits} (sums are taken mod 2^bits)"
        )
    if f.compression != "none":
        raise ConfigError(
            f"fed.compression={f.compression} with fed.secure_aggregation: masked integers "
            "cannot be compressed; the quantization is set by fed.secagg_quantization_bits"
        )
    k = f.clients
    sampled = max(1, min(k, math.ceil(f.fraction * k)))
    if sampled < 2:
        raise ConfigError(
            f"fed.secure_aggregation needs at least 2 sampled sites per round (fed.clients={k}, "
            f"fed.fraction={f.fraction:g} samples {sampled}): the sum of one is the site's upload"
        )
    params = Params.for_round(cfg, sampled)
    if params.threshold > params.share_num:
        raise ConfigError(
            f"fed.secagg_threshold={f.secagg_threshold} exceeds the {params.share_num} shares "
            f"of each secret (a site and its neighbours, {sampled} sampled sites); lower it"
        )


@dataclass(frozen=True)
class Params:
    """One round's protocol parameters: ``sampled`` sites, ``share_num`` shares of each secret
    (a site and its neighbours), Shamir ``threshold``, clipping range ``clip``, quantization and
    modulus bits."""

    sampled: int
    share_num: int
    threshold: int
    clip: float
    quant_bits: int
    modulus_bits: int

    @classmethod
    def for_round(cls, cfg: FedmmConfig, sampled: int) -> Params:
        f = cfg.fed
        k = f.secagg_neighbours
        share_num = sampled if k == 0 or k + 1 >= sampled else k + 1
        threshold = f.secagg_threshold or max(2, share_num // 2 + 1)
        return cls(sampled, share_num, threshold, f.secagg_clip, f.secagg_quantization_bits,
                   f.secagg_modulus_bits)  # fmt: skip

    @property
    def levels(self) -> int:
        """Q: Δ ∈ [−c, c] maps to the integers 0..Q."""
        return 1 << self.quant_bits

    @property
    def step(self) -> float:
        """One quantization step, 2c/Q: the stated error bound per value and per mean."""
        return 2 * self.clip / self.levels

    def to_record(self) -> dict:
        return {"sampled": self.sampled, "share-num": self.share_num,
                "threshold": self.threshold, "clip": float(self.clip),
                "quantization-bits": self.quant_bits, "modulus-bits": self.modulus_bits}  # fmt: skip

    @classmethod
    def from_offer(cls, cfg: FedmmConfig, record: ConfigRecord) -> Params:
        """A site's check of the server's setup: the parameters its own run config gives for
        the offered number of sampled sites, exactly (``RefusedMessage`` otherwise: a server
        cannot lower the threshold below what its claimed count gives, nor change the
        quantization; share-keys must then list exactly that many sites)."""
        try:
            sampled = int(record["sampled"])
        except (KeyError, TypeError, ValueError):
            raise RefusedMessage("secure aggregation setup without the sampled count") from None
        if not 2 <= sampled <= cfg.fed.clients:
            raise RefusedMessage(f"secure aggregation setup: {sampled} sampled sites, not in "
                                 f"[2, fed.clients={cfg.fed.clients}]")  # fmt: skip
        ours = cls.for_round(cfg, sampled)
        offered = {k: record.get(k) for k in ours.to_record()}
        if offered != ours.to_record():
            raise RefusedMessage(f"secure aggregation setup {offered} differs from the run's "
                                 f"fed.secagg options: {ours.to_record()}")  # fmt: skip
        return ours


def neighbours(sampled: Sequence[int], share_num: int, seed: int) -> dict[int, set[int]]:
    """SecAgg+'s graph as Flower builds it: the sampled nodes on a ring in a shuffled order,
    each with the ``share_num // 2`` nodes on either side (itself included); ``share_num`` =
    all: the complete graph.  ``seed``: the ring's order (the server's round RNG)."""
    order = list(sampled)
    np.random.default_rng(seed).shuffle(order)
    n, half = len(order), share_num // 2
    if share_num >= n:
        return {node: set(order) for node in order}
    return {node: {order[(i + d) % n] for d in range(-half, half + 1)}
            for i, node in enumerate(order)}  # fmt: skip


def check_capacity(total_weight: int, params: Params) -> None:
    """The masked sum of ``total_weight`` = Σ_k w_k quantized values (each ≤ Q) and of the
    weights must stay below the modulus, else it wraps (``ConfigError`` naming the options)."""
    if (total_weight * params.levels) >> params.modulus_bits:
        raise ConfigError(
            f"secure aggregation: the sum of up to {total_weight} weighted values of up to "
            f"2^{params.quant_bits} would wrap mod 2^{params.modulus_bits}; raise "
            "fed.secagg_modulus_bits or lower fed.secagg_quantization_bits (or use "
            "fed.weighting=uniform)"
        )


# ---------------------------------------------------------------------- masks and encoding
def raw_key(fernet_key: bytes) -> bytes:
    """The 32 raw bytes of a key from ``generate_shared_key`` (urlsafe base64, Fernet's form)."""
    return base64.urlsafe_b64decode(fernet_key)


def expand(seed: bytes, shapes: Sequence[tuple[int, ...]], modulus_bits: int) -> list[np.ndarray]:
    """Masks uniform in [0, 2^modulus_bits): the ChaCha20 keystream of the 32-byte ``seed``
    (``cryptography``), read as little-endian uint64 words and reduced mod 2^bits (exact: a power
    of two).  Flower's ``pseudo_rand_gen`` is not used: it folds the seed to 32 bits for NumPy's
    ``RandomState``, so a server could search all 2^32 masks of a site's seed."""
    if len(seed) != 32:
        raise ValueError(f"a mask seed is 32 bytes, got {len(seed)}")
    sizes = [math.prod(s) for s in shapes]
    stream = Cipher(algorithms.ChaCha20(seed, NONCE), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * sum(sizes))), dtype="<u8").copy()
    if modulus_bits < 64:
        words &= np.uint64((1 << modulus_bits) - 1)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(words[start : start + size].reshape(shape))
        start += size
    return out


def scalar_of(private_key: bytes) -> bytes:
    """The private scalar of a PEM EC key, 48 bytes big-endian (SECP384R1, Flower's curve):
    what is Shamir-shared (the 306-byte PEM would cost 20 Shamir chunks instead of 4)."""
    key = bytes_to_private_key(private_key)
    return key.private_numbers().private_value.to_bytes(48, "big")


def key_of_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The private key of a scalar from ``scalar_of`` (cryptography's ``derive_private_key``)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())


def wire_dtype(modulus_bits: int) -> np.dtype:
    """uint32 where the modulus fits (half the bytes), else uint64."""
    return np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)


def encode(
    upload: dict[str, np.ndarray], global_state: dict[str, np.ndarray], keys: Sequence[str],
    summed: Callable[[str], bool], weight: int, params: Params,
) -> tuple[list[np.ndarray], int]:  # fmt: skip
    """``([w·Q(Δ_key) for key in keys] + [w], values clipped)`` as uint64: Δ from the global
    state (from 0 for keys it lacks), Flower's stochastic ``quantize``; weight 1 for ``summed``
    keys.  Shapes as the upload's; the last array has shape (1,)."""
    out, clipped = [], 0
    for key in keys:
        delta = np.asarray(upload[key], dtype=np.float64)
        if key in global_state:
            delta = delta - np.asarray(global_state[key], dtype=np.float64)
        clipped += int(np.count_nonzero(np.abs(delta) > params.clip))
        q = quantize([delta], params.clip, params.levels)[0].astype(np.uint64)
        out.append(q * np.uint64(1 if summed(key) else weight))
    out.append(np.array([weight], dtype=np.uint64))
    return out, clipped


def decode(
    total: Sequence[np.ndarray], global_state: dict[str, np.ndarray], keys: Sequence[str],
    shapes: Sequence[tuple[int, ...]], summed: Callable[[str], bool], survivors: int,
    params: Params,
) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
    """The unmasked sums -> ``({key: weighted mean of the uploads, or their sum for summed
    keys}, Σ w_k)``: the inverse of ``encode`` summed over ``survivors`` sites (Flower's
    ``dequantize`` map, q ↦ q·2c/Q − c, applied to the mean of q)."""
    weight = int(total[-1][0])
    if weight <= 0:
        raise SecAggFailed(f"the unmasked total weight is {weight}: the sum is corrupt")
    scale = 2 * params.clip / params.levels
    out = {}
    for key, shape, value in zip(keys, shapes, total, strict=False):
        divisor = survivors if summed(key) else weight
        mean = value.astype(np.float64).reshape(shape) / divisor * scale - params.clip
        if key in global_state:
            mean = mean + np.asarray(global_state[key], dtype=np.float64)
        out[key] = (mean * survivors if summed(key) else mean).astype(np.float32)
    return out, weight


def add_mod(a: np.ndarray, b: np.ndarray, bits: int, sign: int = 1) -> np.ndarray:
    """``a ± b mod 2^bits`` on uint64 (wrap-around mod 2^64 is consistent with any 2^bits)."""
    with np.errstate(over="ignore"):
        out = a + b if sign > 0 else a - b
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


# ---------------------------------------------------------------------- the site's half
def _state(context) -> dict:
    record = context.state.get(STATE_KEY)
    return dict(record) if record is not None else {}


def _save(context, state: dict) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def claim(claims: Path | None, node: int, meta: dict, stage: str) -> None:
    """Claim ``stage`` of this run and round for site ``node`` once, on disk, under an exclusive
    ``flock`` (``<claims>/<node>.json``): two messages of one stage handled at the same time (a
    busy warm worker gives the second its own process, each with a copy of the Flower Context)
    must not both be answered -- two unmask replies with different survivor lists would hand the
    server both shares of one peer, two masked inputs under the same masks the difference of two
    updates.  ``setup`` always claims (a resumed round restarts there, with fresh keys); any other
    stage only right after the stage before it.  ``claims=None``: no on-disk claim (the
    protocol's unit tests, one process).  Raises ``RefusedMessage``."""
    if claims is None:
        return
    from fedmm.federation.privacy import locked

    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{int(node)}.json"
    with locked(path):
        last = json.loads(path.read_text()) if path.is_file() else {}
        if stage != SETUP:
            before = STAGES[STAGES.index(stage) - 1]
            if last != {"run": meta["run-id"], "round": meta["round"], "stage": before}:
                raise RefusedMessage(
                    f"secure aggregation stage {stage!r} of round {meta['round']}: this site "
                    f"already answered it or has not answered {before!r} (last: "
                    f"{last.get('stage', 'none')!r} of round {last.get('round', '-')})"
                )
        claim_record = {"run": meta["run-id"], "round": meta["round"], "stage": stage}
        atomic_write(path, json.dumps(claim_record).encode())


def client_stage(
    msg: Message, context, meta: dict, cfg: FedmmConfig, claims: Path | None = None
) -> RecordDict:
    """Setup, share-keys or unmask on this site (collect: ``client_collect`` +
    ``client_mask``), checking the stage order of this round (``RefusedMessage`` otherwise:
    a site never answers a stage twice with the same keys, nor out of order; ``claim``).
    The site's identity is the SuperNode's (``context.node_id``), never the message's."""
    record = msg.content[SECAGG]
    stage = str(record.get("stage", ""))
    me = int(context.node_id)
    state = _state(context)
    if stage in STAGES:
        if stage != SETUP:
            _expect(state, stage, meta)
        claim(claims, me, meta, stage)
    if stage == SETUP:
        Params.from_offer(cfg, record)
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        state = {
            "run": meta["run-id"], "round": meta["round"], "stage": SETUP,
            "sampled": int(record["sampled"]),
            "threshold": int(record["threshold"]), "share-num": int(record["share-num"]),
            "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
            "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2),
        }  # fmt: skip
        _save(context, state)
        return RecordDict({SECAGG: ConfigRecord({"pk1": state["pk1"], "pk2": state["pk2"]})})
    if stage == SHARE_KEYS:
        keys = {int(k): v for k, v in record.items() if k != "stage"}
        if keys.get(me) != [state["pk1"], state["pk2"]]:
            raise RefusedMessage("secure aggregation share-keys: this site's own public keys "
                                 "are missing or altered in the server's list")  # fmt: skip
        if len(keys) != state["share-num"]:  # exactly the setup's count: the threshold t was
            # set for it, and more keys would spread t-of-n shares over sites the setup did not
            # count (and cost a key agreement each)
            raise RefusedMessage(f"secure aggregation share-keys: {len(keys)} sites with keys, "
                                 f"not the {state['share-num']} of the setup")  # fmt: skip
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise RefusedMessage("secure aggregation share-keys: two sites show the same key")
        seed = os.urandom(32)  # b_i, the self mask's seed
        b_shares = create_shares(seed, state["threshold"], len(keys))
        sk_shares = create_shares(scalar_of(state["sk1"]), state["threshold"], len(keys))
        dsts, ctxts, mine, ss2 = [], [], {}, []
        sk2 = bytes_to_private_key(state["sk2"])
        for idx, (node, (_, pk2)) in enumerate(sorted(keys.items())):
            if node == me:
                mine = {"b": b_shares[idx], "sk": sk_shares[idx]}
                ss2.append(b"")
                continue
            shared = generate_shared_key(sk2, bytes_to_public_key(pk2))
            ss2.append(shared)  # kept (as Flower's ss2_dict) to decrypt this neighbour's shares
            plain = share_keys_plaintext_concat(me, node, b_shares[idx], sk_shares[idx])
            dsts.append(node)
            ctxts.append(encrypt(shared, plain))
        state |= {
            "stage": SHARE_KEYS, "seed": seed, "nodes": sorted(keys),
            "pk1s": [keys[n][0] for n in sorted(keys)], "ss2s": ss2,
            "share-nodes": [me], "b-shares": [mine["b"]], "sk-shares": [mine["sk"]],
        }  # fmt: skip
        _save(context, state)
        return RecordDict({SECAGG: ConfigRecord({"dsts": dsts, "ctxts": ctxts})})
    if stage == UNMASK:
        active = [int(x) for x in record.get("active", [])]
        dead = [int(x) for x in record.get("dead", [])]
        held = list(state["share-nodes"])
        if set(active) & set(dead) or len(set(active)) != len(active):
            raise RefusedMessage("secure aggregation unmask: a site is listed both as a "
                                 "survivor and as dropped (its input would be revealed)")  # fmt: skip
        if me not in active or set(active + dead) - set(held):
            raise RefusedMessage("secure aggregation unmask: the lists name sites this site "
                                 "holds no share of, or leave this site out")  # fmt: skip
        if len(active) < state["threshold"]:
            raise RefusedMessage(f"secure aggregation unmask: {len(active)} survivors, fewer "
                                 f"than the threshold {state['threshold']}")  # fmt: skip
        shares = [state["b-shares"][held.index(n)] for n in active]
        shares += [state["sk-shares"][held.index(n)] for n in dead]
        _save(context, {"run": state["run"], "round": state["round"], "stage": UNMASK})
        return RecordDict({SECAGG: ConfigRecord({"nids": active + dead, "shares": shares})})
    raise RefusedMessage(f"unknown secure aggregation stage {stage!r}; stages: {STAGES}")


def _expect(state: dict, stage: str, meta: dict) -> None:
    """The stage before ``stage`` must be this run's and round's last answered one."""
    if stage not in STAGES:
        raise RefusedMessage(f"unknown secure aggregation stage {stage!r}; stages: {STAGES}")
    before = STAGES[STAGES.index(stage) - 1]
    if (not state or state.get("stage") != before or state.get("run") != meta["run-id"]
            or state.get("round") != meta["round"]):  # fmt: skip
        raise RefusedMessage(
            f"secure aggregation stage {stage!r} of round {meta['round']} out of order: this "
            f"site's last answered stage is {state.get('stage', 'none')!r} of round "
            f"{state.get('round', '-')} (a round restarts at {SETUP!r})"
        )


def client_collect(
    msg: Message, context, meta: dict, cfg: FedmmConfig, claims: Path | None = None
) -> Params:
    """Before training: the ciphertexts relayed to this site, decrypted and checked; the share
    of each sender kept (``RefusedMessage`` for too few, foreign or misaddressed ones)."""
    record = msg.content[SECAGG]
    state = _state(context)
    _expect(state, COLLECT, meta)
    me = int(context.node_id)
    claim(claims, me, meta, COLLECT)
    srcs = [int(x) for x in record.get("srcs", [])]
    ctxts = list(record.get("ctxts", []))
    if len(srcs) != len(ctxts) or len(set(srcs)) != len(srcs):
        raise RefusedMessage("secure aggregation collect: malformed ciphertext list")
    if len(srcs) + 1 < state["threshold"]:
        raise RefusedMessage(f"secure aggregation collect: shares from {len(srcs)} other sites, "
                             f"fewer than the threshold {state['threshold']} - 1")  # fmt: skip
    nodes, ss2 = list(state["nodes"]), list(state["ss2s"])
    held, b_sh, sk_sh = (
        list(state["share-nodes"]),
        list(state["b-shares"]),
        list(state["sk-shares"]),
    )
    for src, ctxt in zip(srcs, ctxts, strict=True):
        if src not in nodes or src == me:
            raise RefusedMessage(f"secure aggregation collect: a share from node {src}, not a "
                                 "neighbour of this site")  # fmt: skip
        try:
            plain = decrypt(ss2[nodes.index(src)], ctxt)
        except Exception:  # a ciphertext not made with the shared key: refuse, reveal nothing
            raise RefusedMessage(f"secure aggregation collect: the share from node {src} does "
                                 "not decrypt") from None  # fmt: skip
        a, b, b_share, sk_share = share_keys_plaintext_separate(plain)
        if (a, b) != (src, me):
            raise RefusedMessage("secure aggregation collect: a share addressed to another pair")
        held.append(src)
        b_sh.append(b_share)
        sk_sh.append(sk_share)
    state |= {"stage": COLLECT, "share-nodes": held, "b-shares": b_sh, "sk-shares": sk_sh}
    _save(context, state)
    return Params.for_round(cfg, int(state["sampled"]))


def client_mask(
    context, me: int, upload: dict[str, np.ndarray], global_state: dict[str, np.ndarray],
    keys: Sequence[str], summed: Callable[[str], bool], weight: int, params: Params,
) -> tuple[ArrayRecord, int]:  # fmt: skip
    """y = encode(upload) + PRG(b) ± Σ_j PRG(KA(sk1, pk1_j)) mod 2^m over the neighbours j
    whose shares this site holds (``client_collect``); returns (masked record, clipped count).
    The self-mask seed b is forgotten once used."""
    state = _state(context)
    vector, clipped = encode(upload, global_state, keys, summed, weight, params)
    shapes = [v.shape for v in vector]
    bits = params.modulus_bits
    vector = [add_mod(v, m, bits) for v, m in zip(vector, expand(state["seed"], shapes, bits))]
    sk1 = bytes_to_private_key(state["sk1"])
    nodes, pk1s = list(state["nodes"]), list(state["pk1s"])
    for node in state["share-nodes"]:
        if node == me:
            continue
        seed = raw_key(generate_shared_key(sk1, bytes_to_public_key(pk1s[nodes.index(node)])))
        sign = 1 if me > node else -1
        vector = [add_mod(v, m, bits, sign) for v, m in zip(vector, expand(seed, shapes, bits))]
    state["seed"] = b""  # b_i is never needed again here (the server rebuilds it from shares)
    _save(context, state)
    dtype = wire_dtype(bits)
    names = [*keys, WEIGHT_KEY]
    record = ArrayRecord({k: Array(np.ascontiguousarray(v.astype(dtype)))
                          for k, v in zip(names, vector, strict=True)})  # fmt: skip
    return record, clipped


# ---------------------------------------------------------------------- the server's half
def check_masked(record: ArrayRecord, keys: Sequence[str], shapes: Sequence[tuple[int, ...]],
                 modulus_bits: int) -> None:  # fmt: skip
    """A masked input must hold exactly the declared upload keys and ``WEIGHT_KEY``, in their
    shapes, as the wire dtype, every value below the modulus (``ValueError`` otherwise)."""
    expected = dict(zip([*keys, WEIGHT_KEY], [*shapes, (1,)], strict=True))
    if set(record.keys()) != set(expected):
        extra, missing = (
            sorted(set(record.keys()) - set(expected)),
            sorted(set(expected) - set(record.keys())),
        )
        raise ValueError(f"masked input keys differ: unexpected {extra[:3]}, missing {missing[:3]}")
    dtype = wire_dtype(modulus_bits)
    for key, shape in expected.items():
        value = record[key].numpy()
        if value.dtype != dtype or tuple(value.shape) != tuple(shape):
            raise ValueError(f"masked input {key}: {value.dtype}{tuple(value.shape)}, expected "
                             f"{dtype}{tuple(shape)}")  # fmt: skip
        if modulus_bits < 64 and value.size and int(value.max()) >> modulus_bits:
            raise ValueError(f"masked input {key} holds values >= 2^{modulus_bits}")


@dataclass
class Outcome:
    """What one round's secure aggregation gives the round loop."""

    sums: dict[str, np.ndarray]  # key -> weighted mean (summed keys: sum) of the survivors'
    weight: int  # Σ w_k over the survivors
    survivors: list[int]  # nodes whose masked input was summed
    metrics: dict[int, dict]  # node -> the collect reply's metrics (seconds only)
    info: dict  # per-stage counts and bytes, for results.json


class SecureRound:
    """The server's half of one round: ``run`` sends the four stages through ``send`` (the
    grid's send_and_receive) and returns an ``Outcome`` or raises ``SecAggFailed``.

    ``message(node, stage, arrays?)``: the round loop's message to a node (its experiment,
    round, run id; with ``arrays`` the training message of the collect stage);
    ``on_reply(node, stage, reply)``: called for every reply (errors included) so the loop
    records failures; it returns False for a reply it rejects."""

    def __init__(self, params: Params, keys: Sequence[str], shapes: Sequence[tuple[int, ...]],
                 summed: Callable[[str], bool], seed: int, minimum: int = 1) -> None:  # fmt: skip
        """``minimum``: fewest masked inputs a round aggregates besides the threshold
        (``fed.min_clients``)."""
        self.params, self.keys, self.shapes, self.summed = params, list(keys), list(shapes), summed
        self.seed, self.minimum = seed, minimum
        self.info: dict = {"bytes_down": 0, "bytes_up": 0, "bytes_masked": 0, "wait_seconds": 0.0}

    def _exchange(self, send, message, on_reply, stage, contents: dict[int, dict], arrays=None):
        out = []
        for node, cfg in contents.items():
            msg = message(node, MessageType.TRAIN, arrays)
            msg.content[SECAGG] = ConfigRecord({"stage": stage, **cfg})
            out.append(msg)
        self.info["bytes_down"] += sum(_record_bytes(m.content[SECAGG]) for m in out)
        t0 = time.perf_counter()
        replies = send(out)
        self.info["wait_seconds"] += time.perf_counter() - t0  # the sites' work and the wire
        got = {}
        for node, reply in on_reply(stage, out, replies):
            got[node] = reply
            if SECAGG in reply.content:
                self.info["bytes_up"] += _record_bytes(reply.content[SECAGG])
            if MASKED in reply.content:
                self.info["bytes_masked"] += _record_bytes(reply.content[MASKED])
        self.info[stage] = len(got)
        return got

    def run(self, sampled: list[int], send, message, on_reply, global_state) -> Outcome:
        p = self.params
        graph = neighbours(sampled, p.share_num, self.seed)
        # 1. setup: fresh key pairs
        got = self._exchange(send, message, on_reply, SETUP,
                             {n: p.to_record() for n in sampled})  # fmt: skip
        pks = {}
        for node, reply in got.items():
            rec = reply.content[SECAGG]
            pks[node] = [bytes(rec["pk1"]), bytes(rec["pk2"])]
        self._enough(pks, graph, SETUP)
        # 2. share keys: each site's neighbours' public keys; encrypted shares come back
        got = self._exchange(send, message, on_reply, SHARE_KEYS, {
            n: {str(j): pks[j] for j in graph[n] if j in pks} for n in pks})  # fmt: skip
        relay: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in got}
        for src, reply in got.items():
            rec = reply.content[SECAGG]
            for dst, ctxt in zip(rec["dsts"], rec["ctxts"], strict=True):
                if int(dst) in relay and int(dst) in graph[src]:
                    relay[int(dst)][0].append(src)
                    relay[int(dst)][1].append(bytes(ctxt))
        shared = set(got)  # U1: their masks may be in their neighbours' inputs
        self._enough(shared, graph, SHARE_KEYS)
        # 3. collect: the training message and the relayed shares; masked inputs come back
        got = self._exchange(send, message, on_reply, COLLECT, {
            n: {"srcs": relay[n][0], "ctxts": relay[n][1]} for n in sorted(shared)},
            arrays=global_state)  # fmt: skip
        survivors = sorted(got)
        dead = sorted(shared - set(got))
        if len(survivors) < max(p.threshold, self.minimum):
            raise SecAggFailed(f"{len(survivors)} masked inputs arrived, fewer than the threshold "
                               f"t={p.threshold} (fed.secagg_threshold) or fed.min_clients="
                               f"{self.minimum}")  # fmt: skip
        metrics = {n: dict(got[n].content["metrics"]) if "metrics" in got[n].content else {}
                   for n in survivors}  # fmt: skip
        total = None
        for node in survivors:
            rec = got[node].content[MASKED]
            vec = [rec[k].numpy().astype(np.uint64) for k in [*self.keys, WEIGHT_KEY]]
            total = vec if total is None else [add_mod(a, b, p.modulus_bits)
                                               for a, b in zip(total, vec)]  # fmt: skip
        # 4. unmask: survivors' self-mask seeds, dropped sites' mask keys, from the shares
        alive = set(survivors)
        got = self._exchange(send, message, on_reply, UNMASK, {
            n: {"active": sorted(graph[n] & alive), "dead": sorted(graph[n] & set(dead))}
            for n in survivors})  # fmt: skip
        shares: dict[int, list[bytes]] = {n: [] for n in survivors + dead}
        for reply in got.values():
            rec = reply.content[SECAGG]
            for owner, share in zip(rec["nids"], rec["shares"], strict=True):
                if int(owner) in shares:
                    shares[int(owner)].append(bytes(share))
        short = sorted(n for n, s in shares.items() if len(s) < p.threshold)
        if short:
            raise SecAggFailed(f"too few shares to unmask ({len(got)} of {len(survivors)} "
                               f"survivors answered the unmask stage; nodes {short[:5]} have fewer "
                               f"than fed.secagg_threshold={p.threshold})")  # fmt: skip
        shapes = [v.shape for v in total]
        for node in survivors:  # remove b_i's self mask
            try:
                seed = combine_shares(shares[node])
            except ValueError:
                raise SecAggFailed(
                    f"the shares of node {node}'s mask seed do not combine"
                ) from None
            total = [add_mod(t, m, p.modulus_bits, -1)
                     for t, m in zip(total, expand(seed, shapes, p.modulus_bits))]  # fmt: skip
        for d in dead:  # a dropped site's pairwise masks stay in its neighbours' inputs
            try:
                sk1 = key_of_scalar(combine_shares(shares[d]))
            except ValueError:
                raise SecAggFailed(
                    f"the shares of dropped node {d}'s mask key do not combine"
                ) from None
            for i in survivors:
                if d not in relay[i][0]:  # i never masked with d (d's shares never reached it)
                    continue
                seed = raw_key(generate_shared_key(sk1, bytes_to_public_key(pks[i][0])))
                sign = -1 if i > d else 1  # i added +m when i > d
                total = [add_mod(t, m, p.modulus_bits, sign)
                         for t, m in zip(total, expand(seed, shapes, p.modulus_bits))]  # fmt: skip
        sums, weight = decode(total, global_state, self.keys, self.shapes, self.summed,
                              len(survivors), p)  # fmt: skip
        self.info |= {"survivors": len(survivors), "dropped": len(dead)}
        return Outcome(sums, weight, survivors, metrics, self.info)

    def _enough(self, nodes, graph: dict[int, set[int]], stage: str) -> None:
        """Every site still in the round needs ≥ t neighbours (itself included) still in it."""
        alive = set(nodes)
        if len(alive) < self.params.threshold:
            raise SecAggFailed(f"after the {stage} stage {len(alive)} sites remain, fewer than the "
                               f"threshold fed.secagg_threshold={self.params.threshold}")  # fmt: skip
        for node in alive:
            if len(graph[node] & alive) < self.params.threshold:
                raise SecAggFailed(f"after the {stage} stage node {node} has "
                                   f"{len(graph[node] & alive)} neighbours left, fewer than the "
                                   f"threshold {self.params.threshold}")  # fmt: skip


def _record_bytes(record) -> int:
    """Payload bytes of a record: arrays' bytes; a config record's values (bytes and text by
    length, numbers as 8 bytes; Flower's ``count_bytes`` fails on an empty list)."""
    if isinstance(record, ArrayRecord):
        return int(record.count_bytes())

    def size(v) -> int:
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return len(v) if isinstance(v, bytes | str) else 8

    return sum(len(k) + size(v) for k, v in record.items())


__all__ = ["COLLECT", "MASKED", "SECAGG", "SECURE_AGGREGATIONS", "SETUP", "SHARE_KEYS", "STAGES",
           "UNMASK", "Outcome", "Params", "SecAggFailed", "SecureRound", "check_capacity",
           "check_options", "client_collect", "client_mask", "client_stage", "decode", "encode",
           "expand", "neighbours"]  # fmt: skip
