"""Service settings: one `Settings(BaseSettings)` read from `XCROSS_*` environment variables (and `REDIS_URL`).

Every knob is declared here with its default and meaning; docs/service.md lists them all (a test checks that).
`load_settings()` validates at start and turns pydantic's errors into one `SettingsError` whose lines name the
environment variable, the value given and what to do, e.g.
`XCROSS_BATCH_PROMPTS='0': Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "XCROSS_"
REPO_ROOT = Path(__file__).resolve().parents[1]
ONNX_CACHE = Path("~/.cache/xcross-serve/onnx").expanduser()
RECALL_CACHE = Path("~/.cache/xcross-serve/recall").expanduser()
BACKEND_PRECISION = {"torch": "fp32", "torch-bf16": "bf16", "onnx": "fp32", "onnx-int8": "int8"}


class SettingsError(ValueError):
    """The environment holds an invalid setting; the message names each variable and the fix."""


class Settings(BaseSettings):
    """All service settings. Env names: `XCROSS_<FIELD>` upper-cased, except `REDIS_URL`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True,
                                      validate_default=True)

    # --- models and data --------------------------------------------------------------------------------
    artifacts: Path = Field(REPO_ROOT / "artifacts", description="checkpoint root: lora/<Domain>/, xcross/<Domain>/, "
                                                                       "weaverec/<Domain>/, gca/<Domain>/")
    data_dir: Path | None = Field(None, description="amazon-xcross data root for the catalogs "
                                                    "(default: ../shared/data/amazon-xcross beside the repository)")
    backbone: str = Field("minilm", description="backbone name for model.backbone.load_backbone")
    model: Literal["auto", "xcross", "weaverec", "gca", "lora"] = Field(
        "auto", description="checkpoint kind serving a request without a `model` field, where the domain has it "
                            "(auto, or a domain without it: the first of xcross, weaverec, gca, lora it has); "
                            "every checkpoint found is served and selectable per request")
    allow_empty: bool = Field(False, description="start even when no checkpoint is found (/readyz stays 503)")
    # --- recall stage (POST /recommend without candidates; docs/recall.md "Two-stage") ------------------------
    recall_n: int = Field(200, ge=0, le=1000, description="candidates the recall stage hands the model when a "
                                                          "request gives none (0 = off: candidates required)")
    recall_index: Literal["exact", "hnsw"] = Field(
        "exact", description="text recall search: exact = one matrix product over the catalog; hnsw = usearch's "
                             "approximate HNSW graph (pip install usearch), for catalogs too large for exact search")
    recall_mode: Literal["auto", "text", "id", "blend"] = Field(
        "auto", description="recall stage of a domain with an item-id checkpoint (XCROSS_ARTIFACTS/recall/"
                            "amazon-<Domain>/): id = the id model alone, blend = reciprocal rank fusion of text and "
                            "id recall, text = text only; auto = blend. Domains without one use text recall")
    recall_cache: Path | None = Field(RECALL_CACHE, description="where the catalogs' title embeddings are cached "
                                                                "(one .npy per catalog and backbone, keyed by "
                                                                "a hash of its titles)")
    # --- compute ----------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is present, else cpu")
    backend: Literal["auto", "torch", "torch-bf16", "onnx", "onnx-int8"] = Field(
        "auto", description="torch (fp32), torch-bf16 (bf16 autocast, bf16 weights), onnx (ONNX Runtime fp32; CUDA "
                            "provider on GPU), onnx-int8 (dynamic int8, CPU); auto = torch-bf16 on CUDA and on "
                            "CPUs with avx512_bf16 or amx_bf16, else torch; under auto an explicit "
                            "XCROSS_PRECISION picks torch (fp32) or torch-bf16 (bf16)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA and on CPUs with avx512_bf16 or amx_bf16, else fp32 (kept "
                            "for compatibility: the torch precision when XCROSS_BACKEND=auto)")
    onnx_cache: Path = Field(ONNX_CACHE, description="where the onnx backends export the models at start "
                                                     "(one directory per checkpoint content hash)")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    tune_malloc: bool = Field(True, description="keep large tensors on the glibc heap instead of fresh mmap pages "
                                                "(faster forwards at 60+ prompts; memory is kept by the process)")
    max_len: int = Field(256, ge=8, le=4096, description="prompt length cap in tokens (oldest history dropped)")
    warmup: bool = Field(True, description="run one forward per domain before /readyz turns 200")
    # --- batching ---------------------------------------------------------------------------------------
    batch_prompts: int = Field(30, ge=1, le=4096, description="prompts per forward: a request's prompts are "
                                                              "scored in forwards of at most this many, and "
                                                              "concurrent requests of one domain fill a forward "
                                                              "together up to it")
    max_batch_tokens: int = Field(30 * 256, ge=8, description="padded tokens per forward (prompts x longest "
                                                               "prompt); must hold one prompt of max_len")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long an idle batcher waits for more "
                                                                 "prompts of the same domain before a forward "
                                                                 "that is not full")
    queue_prompts: int = Field(3000, ge=1, description="prompts waiting for a forward, all domains; a request "
                                                       "that does not fit is refused with 429 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline in the batcher; past it 504")
    # --- request limits (DESIGN 7) ----------------------------------------------------------------------
    max_history: int = Field(50, ge=1, le=1000, description="history items per request")
    max_candidates: int = Field(1000, ge=1, description="candidates per request")
    max_title_chars: int = Field(512, ge=1, description="characters per raw title")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size; larger bodies get 413")
    # --- tokenization cache -----------------------------------------------------------------------------
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "redis_url"),
                                  description="Redis for the shared token cache; unset = in-process LRU only")
    cache_lru_size: int = Field(100_000, ge=0, description="titles kept in the in-process LRU")
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="expiry of the Redis token keys")
    cache_timeout_s: float = Field(0.05, gt=0, description="Redis connect/read timeout")
    cache_retry_s: float = Field(5.0, ge=0, description="after a Redis failure, skip Redis for this long")
    # --- process ----------------------------------------------------------------------------------------
    graceful_timeout_s: float = Field(30.0, gt=0, description="on SIGTERM, the process exits within this many "
                                                              "seconds, drain included: past the drain, requests "
                                                              "still in flight are cancelled (docs/reliability.md)")
    drain_s: float = Field(5.0, ge=0, description="on SIGTERM, /readyz answers 503 `draining` at once and the "
                                                  "service keeps answering for this long, with `Connection: "
                                                  "close`, so a load balancer takes it out before it stops "
                                                  "accepting (0 = stop accepting at once)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    # --- administration (issue 19; docs/onboarding.md) ---------------------------------------------------
    admin_token: SecretStr | None = Field(None, description="enables POST /admin/reload (rebuild the served models "
                                                            "and catalogs from XCROSS_ARTIFACTS, swap them in "
                                                            "atomically), with `Authorization: Bearer <token>`; "
                                                            "unset = the endpoint is off (404). SIGHUP reloads "
                                                            "either way")
    reload_grace_s: float = Field(5.0, ge=0, description="after a reload, the previous models keep serving the "
                                                         "requests that started on them for this long before "
                                                         "they are closed")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backend != "auto" and self.precision != "auto" and BACKEND_PRECISION[self.backend] != self.precision:
            raise ValueError(
                f"XCROSS_PRECISION={self.precision} contradicts XCROSS_BACKEND={self.backend} (which runs in "
                f"{BACKEND_PRECISION[self.backend]}); unset XCROSS_PRECISION or pick the backend alone")
        if self.max_batch_tokens < self.max_len:
            raise ValueError(
                f"XCROSS_MAX_BATCH_TOKENS={self.max_batch_tokens} is below XCROSS_MAX_LEN={self.max_len}: "
                "one full-length prompt would never fit a forward; raise XCROSS_MAX_BATCH_TOKENS")
        if self.drain_s >= self.graceful_timeout_s:
            raise ValueError(
                f"XCROSS_DRAIN_S={self.drain_s:g} is not below XCROSS_GRACEFUL_TIMEOUT_S={self.graceful_timeout_s:g}: "
                "the graceful timeout counts from SIGTERM and includes the drain; raise XCROSS_GRACEFUL_TIMEOUT_S")
        if self.queue_prompts < self.max_candidates:
            raise ValueError(
                f"XCROSS_QUEUE_PROMPTS={self.queue_prompts} is below XCROSS_MAX_CANDIDATES={self.max_candidates}: "
                "a request with the most candidates could never be queued; raise XCROSS_QUEUE_PROMPTS")
        return self


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return "REDIS_URL" if field.lower() == "redis_url" else ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (overrides win); raise `SettingsError` naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = str(err["loc"][0])
                lines.append(f"{env_name(field)}={err.get('input')!r}: {msg}")
            else:
                lines.append(msg)
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the table of docs/service.md."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            default = {REPO_ROOT / "artifacts": "<repo>/artifacts", ONNX_CACHE: "~/.cache/xcross-serve/onnx",
                       RECALL_CACHE: "~/.cache/xcross-serve/recall"}.get(
                default, str(default))
        rows.append((env_name(name), "unset" if default is None else str(default), field.description or ""))
    return rows
