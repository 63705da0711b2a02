"""Runtime scorer over a bundle: tokenizers + onnxruntime + numpy (never torch or transformers).

encode() turns (prompt, response) pairs into the head's user-independent outputs; rewards() then scores any
user mixture in O(K d) numpy (a hierarchical bundle: the K=1 reward g plus each user's R weights times the item's
deviation features V e(x), models/deviation.py). encode() is two stages a server runs on different threads:
prepare() (identical texts looked up once, encoder outputs kept in an LRU cache keyed by (model version, content
hash, role), cache misses tokenized in bulk) and run() (the pending texts of any number of requests sorted by
length and cut into batches by a padded-token budget, so short texts are not padded to long ones). Execution
providers live in models/providers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models import bundle as B
from models.bundle import BundleError, BundleMeta
from models.cache import LRUCache
from models.config import EncoderSpec, pair_text
from models.deviation import Deviation
from models.head import ComparisonFeatures, HeadParams, prototype_rewards, reward_a, reward_b
from models.providers import ExecutionProvider, ProviderError, open_session

if TYPE_CHECKING:
    from models.precision import PrecisionChoice

__all__ = ["EncodedItems", "ProviderError", "Scorer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedItems:
    latent: np.ndarray  # (N, D) float64: f(e(x)) (PAL-B) or f(e(pair_text)) (PAL-A)
    prompt_prototypes: np.ndarray | None  # (N, K, D) for PAL-B, None for PAL-A
    truncated: np.ndarray  # (N,) bool: prompt and/or response was cut to max_length
    tokens: np.ndarray  # (N,) int: tokens the encoder saw for the item (prompt + response, or the pair text)
    deviation: np.ndarray | None = None  # (N, R) V e(x) + c_x of a hierarchical bundle, None for PAL

    def __len__(self) -> int:
        return len(self.latent)


_Key = tuple[str, bytes, str]  # (model version, text digest, role)


@dataclass(frozen=True)
class _Entry:
    """One cached encoder output: a response latent (D,), prompt prototypes (K, D) or a pair latent (D,); and for
    a hierarchical bundle's response or pair, its deviation features (R,)."""

    value: np.ndarray
    truncated: bool
    tokens: int
    deviation: np.ndarray | None = None


@dataclass(frozen=True)
class PendingText:
    """One distinct text a request still needs encoded, already tokenized (what a batcher queues and budgets)."""

    digest: bytes
    roles: frozenset[str]
    ids: list[int]
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Prepared:
    """A request after the cheap stage (`Scorer.prepare`): cache hits resolved, the misses tokenized."""

    n_items: int
    keys: list[_Key]
    found: dict[_Key, _Entry]
    pending: list[PendingText]
    # a hierarchical model with a per-statement table: each item's c_x, added to its V e(x) (models.deviation)
    item_offsets: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        """Real tokens still to encode: what the batcher's budget counts."""
        return sum(p.tokens for p in self.pending)


class Scorer:
    def __init__(
        self,
        meta: BundleMeta,
        head: HeadParams,
        users: dict[str, np.ndarray],
        session: ort.InferenceSession,
        provider: ExecutionProvider,
        tokenizer: Tokenizer,
        pad_id: int,
        max_batch_tokens: int | None,
        cache_size: int,
        pad_tolerance: int | None = -1,
        precision: str = "fp32",
        deviation: Deviation | None = None,
    ) -> None:
        self.meta = meta
        # A hierarchical bundle's basis, prior and seen users' weights (then `users` holds those weights).
        self.deviation = deviation
        self._deviation_output = None if deviation is None else meta.output_names.index(B.DEVIATION)
        self.precision = precision
        # How the precision was chosen (models/precision.py), when the loader chose it; /info reports it.
        self.precision_choice: PrecisionChoice | None = None
        self.backend = provider
        self.head = head
        self.provider: str = session.get_providers()[0]
        self.max_batch_tokens = max_batch_tokens or provider.batch_tokens
        # -1: the provider's default; None: rows of any length share a batch (budget only).
        self.pad_tolerance = provider.pad_tolerance if pad_tolerance == -1 else pad_tolerance
        self.width_multiple = provider.width_multiple
        self._users = users
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._tokenizer = tokenizer
        self._pad_id = pad_id
        self._cache: LRUCache[_Entry] = LRUCache(cache_size)
        self._stats_lock = threading.Lock()
        self._deduplicated = 0
        self._encoded = 0
        self._batches = 0

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        provider: str = "auto",
        precision: str = "fp32",
        intra_op_threads: int = 0,
        spinning: bool = False,
        max_batch_tokens: int | None = None,
        cache_size: int = 65536,
        pad_tolerance: int | None = -1,
    ) -> Scorer:
        """Load and validate a bundle; BundleError says what is wrong with it, ProviderError about the device.

        provider: a name in models.providers.REGISTRY (cuda, openvino, cpu), which starts or raises ProviderError,
        or `auto`: the first of them that runs `precision` here (models.providers.open_session)."""
        directory = Path(bundle_dir)
        if (max_batch_tokens is not None and max_batch_tokens < 1) or cache_size < 0:
            raise ValueError("need max_batch_tokens >= 1 and cache_size >= 0")
        if pad_tolerance is not None and pad_tolerance < -1:
            raise ValueError("pad_tolerance must be >= 0, None (no limit) or -1 (the provider's default)")
        meta = B.read_meta(directory)
        head = B.read_head(directory, meta)
        users = B.read_users(directory, meta)
        deviation = B.read_deviation(directory, meta, list(users))
        if deviation is not None:  # a hierarchical model's users are their deviation weights
            users = dict(zip(users, deviation.user_weights, strict=True))
        tokenizer, pad_id = _load_tokenizer(directory, meta)
        backend, session = open_session(directory, meta, provider, precision, intra_op_threads, spinning)
        scorer = cls(
            meta, head, users, session, backend, tokenizer, pad_id, max_batch_tokens, cache_size, pad_tolerance,
            precision, deviation,
        )
        scorer._probe()
        # Last: the structural checks above name what is wrong with a damaged file; this catches a well-formed
        # file or config changed after export, which must not serve under the old version.
        B.verify_contents(directory, meta)
        return scorer

    # ---------------------------------------------------------------- public API

    @property
    def weights_dim(self) -> int:
        """Numbers in a user's weights: K simplex weights, or a hierarchical model's R deviation weights."""
        return self.meta.weights_dim

    @property
    def prior(self) -> np.ndarray:
        """The weights of a user with no fit: the population prior on the simplex (PAL), or the deviation prior's
        mean (hier: zero, i.e. the global reward)."""
        if self.deviation is not None:
            return self.deviation.prior_mean.copy()
        return np.asarray(self.meta.prior_weights, dtype=np.float64)

    def seen_users(self) -> dict[str, np.ndarray]:
        """User id -> weights of the users the checkpoint was trained on (simplex (K,), or hier deviation (R,))."""
        return {u: w.copy() for u, w in self._users.items()}

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> EncodedItems:
        """Encoder + head outputs for each (prompt, response) pair. Blocking; safe to call from many threads.

        The two stages a server runs apart (service.batcher): `prepare` (cache, tokenizer) then `run` (encoder)."""
        return self.run([self.prepare(prompts, responses)])[0]

    def prepare(self, prompts: Sequence[str], responses: Sequence[str]) -> Prepared:
        """Resolve cache hits and tokenize the distinct misses (identical texts in the call are looked up once)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        requests = self._requests(prompts, responses)
        keys = [self._cache_key(_digest(text), role) for text, role in requests]
        found: dict[_Key, _Entry] = {}
        missing: dict[bytes, tuple[str, set[str]]] = {}  # digest -> (text, roles needed)
        for key, (text, role) in zip(keys, requests, strict=True):
            if key in found or (key[1] in missing and role in missing[key[1]][1]):
                continue
            entry = self._cache.get(key)
            if entry is not None:
                found[key] = entry
            else:
                missing.setdefault(key[1], (text, set()))[1].add(role)
        with self._stats_lock:
            self._deduplicated += len(requests) - len(found) - sum(len(r) for _, r in missing.values())
        encodings = self._tokenizer.encode_batch([text for text, _ in missing.values()]) if missing else []
        pending = [
            PendingText(digest, frozenset(roles), list(e.ids), len(e.overflowing) > 0)
            for (digest, (_, roles)), e in zip(missing.items(), encodings, strict=True)
        ]
        offsets = None if self.deviation is None else self.deviation.item_offsets(list(prompts), list(responses))
        return Prepared(len(prompts), keys, found, pending, offsets)

    def run(self, jobs: Sequence[Prepared]) -> list[EncodedItems]:
        """One encoder pass over every job's pending texts (a text several jobs need is encoded once), then each
        job's items. Jobs with nothing pending cost no encoder call."""
        merged: dict[bytes, PendingText] = {}
        for job in jobs:
            for p in job.pending:
                if (seen := merged.get(p.digest)) is not None:
                    p = PendingText(p.digest, seen.roles | p.roles, p.ids, p.truncated)
                merged[p.digest] = p
        computed: dict[_Key, _Entry] = {}
        if merged:
            texts = list(merged.values())
            outputs = self._encode_ids([t.ids for t in texts])
            for i, text in enumerate(texts):
                for role in text.roles:
                    # Copy the row so a cached entry does not keep its whole batch array alive.
                    value = np.array(outputs[1][i] if role == "prompt" else outputs[0][i])
                    dev = None
                    if self._deviation_output is not None and role != "prompt":
                        dev = np.array(outputs[self._deviation_output][i])
                    key = self._cache_key(text.digest, role)
                    computed[key] = entry = _Entry(value, text.truncated, text.tokens, dev)
                    self._cache.put(key, entry)
        return [self._assemble(job, computed) for job in jobs]

    def _assemble(self, job: Prepared, computed: dict[_Key, _Entry]) -> EncodedItems:
        entries = [job.found.get(k) or computed[k] for k in job.keys]
        n = job.n_items
        items = entries[n:] if self.meta.pal.form == "B" else entries  # the response (or pair) entries
        deviation = None
        if self.deviation is not None:
            deviation = _stack([e.deviation for e in items], (0, self.deviation.rank))
            if job.item_offsets is not None:
                deviation = deviation + job.item_offsets
        latent = _stack([e.value for e in items], (0, self.meta.pal.latent_dim))
        if self.meta.pal.form == "B":
            protos = _stack([e.value for e in entries[:n]], (0, self.meta.pal.k, self.meta.pal.latent_dim))
            pairs = list(zip(entries[:n], items, strict=True))
            truncated = np.array([a.truncated or b.truncated for a, b in pairs], dtype=bool).reshape(n)
            tokens = np.array([a.tokens + b.tokens for a, b in pairs], dtype=int)
            return EncodedItems(latent, protos, truncated, tokens, deviation)
        truncated = np.array([e.truncated for e in entries], dtype=bool).reshape(n)
        return EncodedItems(latent, None, truncated, np.array([e.tokens for e in entries], dtype=int), deviation)

    def rewards(self, enc: EncodedItems, weights: np.ndarray) -> np.ndarray:
        """Reward of item i for the user weights[i] (N, K), or a hierarchical model's deviation weights (N, R); a
        single row applies to every item."""
        w = np.asarray(weights, dtype=np.float64)
        n, k = len(enc), self.weights_dim
        if w.ndim == 1:
            w = np.broadcast_to(w, (n, k)) if w.shape == (k,) else w
        if w.shape != (n, k):
            raise ValueError(f"weights must have shape ({n}, {k}) or ({k},), got {np.shape(weights)}")
        if not np.isfinite(w).all():
            raise ValueError("weights hold NaN or inf")
        if self.deviation is not None:
            if enc.deviation is None:
                raise ValueError("a hierarchical model scores items with their deviation features")
            # g + w . V e(x): the global (K=1) reward plus the user's deviation; w = 0 (no comparisons) is g exactly.
            return self.global_rewards(enc) + (enc.deviation * w).sum(-1)
        return self._mixture_rewards(enc, w)

    def global_rewards(self, enc: EncodedItems) -> np.ndarray:
        """A hierarchical model's global reward g: its K=1 head's (the one prototype's) reward, (N,)."""
        return self._mixture_rewards(enc, np.ones((len(enc), self.meta.pal.k)))

    def _mixture_rewards(self, enc: EncodedItems, w: np.ndarray) -> np.ndarray:
        if self.meta.pal.form == "B":
            return reward_b(enc.latent, enc.prompt_prototypes, w, self.head.tau)
        # Many items share a user: compute each distinct ideal point once.
        rows, inverse = np.unique(w, axis=0, return_inverse=True)
        return reward_a(enc.latent, self.head.ideal_points(rows)[inverse.reshape(-1)])

    def prototype_rewards(self, enc: EncodedItems) -> np.ndarray:
        """Reward of each item under each pure prototype (one-hot weights): (N, K)."""
        return prototype_rewards(self.head, enc.latent, enc.prompt_prototypes)

    def features(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> ComparisonFeatures:
        """Encoded comparisons for models.head.fit_user (one encoder call; the shared prompt is encoded once)."""
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        n = len(prompts)
        enc = self.encode(list(prompts) * 2, list(chosen) + list(rejected))
        protos = None if enc.prompt_prototypes is None else enc.prompt_prototypes[:n]
        dev = None if enc.deviation is None else enc.deviation[:n] - enc.deviation[n:]
        return ComparisonFeatures(enc.latent[:n], enc.latent[n:], protos, dev)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the encoder sees per text (special tokens included, after truncation to max_length)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(_clean(texts))]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids the encoder sees per text (as training's HF tokenizer produces them)."""
        return [list(e.ids) for e in self._tokenizer.encode_batch(_clean(texts))]

    def cache_stats(self) -> dict[str, int]:
        with self._stats_lock:
            return {
                "hits": self._cache.hits,
                "misses": self._cache.misses,
                "size": len(self._cache),
                "capacity": self._cache.capacity,
                "deduplicated": self._deduplicated,
                "encoded": self._encoded,
                "batches": self._batches,
            }

    def clear_cache(self) -> None:
        self._cache.clear()

    def forget(self, prompts: Sequence[str], responses: Sequence[str]) -> int:
        """Drop the cached encodings encode() keeps for these (prompt, response) pairs (a deleted user's texts);
        returns how many entries were dropped."""
        requests = self._requests(prompts, responses)
        return sum(self._cache.pop(self._cache_key(_digest(text), role)) for text, role in requests)

    def warmup(self) -> None:
        """Run the graph at a few shapes (short, mid, full length) so the first request pays no allocation cost.
        Where widths are rounded (OpenVINO, which builds kernels per shape), also one row at every width a batch
        can have, so a single-item request never waits for a kernel build (16 shapes: 0.2-0.5 s, 1 thread)."""
        max_len = self.meta.encoder.max_length
        shapes = {(max(1, min(8, self.max_batch_tokens // n)), n) for n in (8, min(64, max_len), max_len)}
        if self.width_multiple > 1:
            widths = _padded_widths(np.arange(1, max_len + 1), self.width_multiple, max_len)
            shapes |= {(1, int(w)) for w in np.unique(widths)}
        for rows, width in sorted(shapes):
            self._run(np.full((rows, width), self._pad_id, dtype=np.int64), np.ones((rows, width), dtype=np.int64))

    # ---------------------------------------------------------------- internals

    def _requests(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[str, str]]:
        """The (text, role) pairs the graph encodes for these items: PAL-B all prompts then all responses, PAL-A
        one joined text per item."""
        prompts, responses = _clean(prompts), _clean(responses)
        if self.meta.pal.form == "B":
            return [(p, "prompt") for p in prompts] + [(r, "response") for r in responses]
        return [(pair_text(p, r), "pair") for p, r in zip(prompts, responses, strict=True)]

    def _cache_key(self, digest: bytes, role: str) -> tuple[str, bytes, str]:
        return (self.meta.version, digest, role)

    def _encode_ids(self, token_ids: list[list[int]]) -> list[np.ndarray]:
        outputs, n_batches = encode_token_ids(
            token_ids, self._run, self._pad_id, self.width_multiple, self.meta.encoder.max_length,
            self.max_batch_tokens, self.pad_tolerance,
        )
        with self._stats_lock:
            self._encoded += len(token_ids)
            self._batches += n_batches
        return outputs

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return run_graph(self._session, self._inputs, ids, mask, self.meta.output_names)

    def _probe(self) -> None:
        """One tiny batch through the graph: wrong output shapes or a broken graph fail at load, not per request."""
        cfg = self.meta.pal
        try:
            outputs = self._run(np.full((2, 4), self._pad_id, dtype=np.int64), np.ones((2, 4), dtype=np.int64))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"bundle graph failed on a probe batch: {e}") from e
        expected = [(2, cfg.latent_dim)] + ([(2, cfg.k, cfg.latent_dim)] if cfg.form == "B" else [])
        if self.deviation is not None:
            expected.append((2, self.deviation.rank))
        got = [o.shape for o in outputs]
        if got != expected:
            raise BundleError(f"bundle graph outputs shapes {got}, config implies {expected}")
        if not all(np.isfinite(o).all() for o in outputs):
            raise BundleError("bundle graph produced NaN or inf on a probe batch")
        # One row at full length: an encoder.max_length past the graph's position embeddings (8192 on MiniLM's
        # 512) fails here, at load, rather than on the first long request or at warmup.
        max_len = self.meta.encoder.max_length
        try:
            self._run(np.full((1, max_len), self._pad_id, dtype=np.int64), np.ones((1, max_len), dtype=np.int64))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(
                f"bundle graph cannot encode max_length={max_len} tokens (config.json encoder.max_length; the "
                f"encoder's position embeddings are probably shorter): {str(e).splitlines()[0][:300]}"
            ) from e


def run_graph(
    session: Any, input_names: list[str], ids: np.ndarray, mask: np.ndarray, outputs: list[str] | None = None
) -> list[np.ndarray]:
    """One call of an encoder graph (a bundle's, or the training embedder's) as float32 arrays; BERT-style graphs
    also take token_type_ids, all zeros (one segment)."""
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = np.zeros_like(ids)
    return [o.astype(np.float32, copy=False) for o in session.run(outputs, feed)]


def encode_token_ids(
    token_ids: list[list[int]],
    run: Callable[[np.ndarray, np.ndarray], list[np.ndarray]],
    pad_id: int,
    width_multiple: int,
    max_length: int,
    budget: int,
    pad_tolerance: int | None,
) -> tuple[list[np.ndarray], int]:
    """Sort by length, run batches cut by the padded-token budget (rows padded to the batch's longest, rounded up to
    the width multiple); (outputs in input order, number of batches). Shared by the scorer and training's ONNX
    embedder (models.embedder), so both batch and pad exactly alike."""
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(-lengths, kind="stable")
    widths = _padded_widths(lengths, width_multiple, max_length)
    results: list[list[np.ndarray]] = []
    positions: list[np.ndarray] = []
    for batch in _token_budget_batches(widths[order], budget, pad_tolerance):
        idx = order[batch]
        width = int(widths[idx].max())
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, j in enumerate(idx):
            ids[row, : lengths[j]] = token_ids[j]
            mask[row, : lengths[j]] = 1
        results.append(run(ids, mask))
        positions.append(idx)
    inverse = np.empty(len(token_ids), dtype=np.int64)
    inverse[np.concatenate(positions)] = np.arange(len(token_ids))
    return [np.concatenate([r[o] for r in results])[inverse] for o in range(len(results[0]))], len(results)


def _padded_widths(lengths: np.ndarray, multiple: int, cap: int) -> np.ndarray:
    """Each row's padded width: its length rounded up to `multiple`, never past `cap` (the encoder's max_length:
    positions beyond it need not exist) nor below the length itself."""
    return np.maximum(lengths, np.minimum(-(-lengths // multiple) * multiple, cap))


def _token_budget_batches(
    sorted_lengths: np.ndarray, budget: int, pad_tolerance: int | None = None
) -> list[np.ndarray]:
    """Cut length-sorted (descending) rows into batches with rows x longest row <= budget (>= 1 row each), and,
    with a pad tolerance, no row shorter than the batch's longest by more than it."""
    batches: list[np.ndarray] = []
    start = 0
    n = len(sorted_lengths)
    while start < n:
        width = int(sorted_lengths[start])
        stop = min(n, start + max(1, budget // max(width, 1)))
        if pad_tolerance is not None:
            # Lengths descend, so the rows within tolerance of the first are a prefix.
            stop = start + int(np.searchsorted(-sorted_lengths[start:stop], pad_tolerance - width, side="right"))
        batches.append(np.arange(start, stop))
        start = stop
    return batches


def _load_tokenizer(directory: Path, meta: BundleMeta) -> tuple[Tokenizer, int]:
    return load_tokenizer_dir(directory, meta.encoder)


def load_tokenizer_dir(directory: Path, spec: EncoderSpec) -> tuple[Tokenizer, int]:
    """The exported tokenizer (`directory`/tokenizer) with the encoder's truncation applied exactly as training's HF
    tokenizer does it, and its pad id."""
    path = directory / B.TOKENIZER_DIR / B.TOKENIZER_FILE
    if not path.is_file():
        raise BundleError(f"bundle {directory} has no {B.TOKENIZER_DIR}/{B.TOKENIZER_FILE}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise BundleError(f"{path} is not a readable tokenizer: {e}") from e
    tokenizer.no_padding()  # padding is per batch, to the batch's longest row
    tokenizer.enable_truncation(max_length=spec.max_length, direction=spec.truncation_side)
    pad_token = "[PAD]"
    config = directory / B.TOKENIZER_DIR / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("pad_token")
            if isinstance(value, dict):  # older transformers write an AddedToken object
                value = value.get("content")
            pad_token = value if isinstance(value, str) else pad_token
        except (OSError, ValueError):
            pass
    pad_id = tokenizer.token_to_id(pad_token)
    return tokenizer, 0 if pad_id is None else int(pad_id)


def _clean(texts: Sequence[str]) -> list[str]:
    """Type-check texts and replace lone surrogates (invalid unicode from JSON) so hashing and tokenizing work."""
    out: list[str] = []
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
        if not t.isascii():
            t = t.encode("utf-8", "replace").decode("utf-8")
        out.append(t)
    return out


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _stack(rows: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(rows).astype(np.float64) if rows else np.zeros(empty_shape)
