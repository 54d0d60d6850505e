"""Service settings: one pydantic-settings class, read from `VS_*` environment variables.

Nested groups use `__` (e.g. `VS_BATCH__MAX_SIZE=16`). Every field here is documented in
the README's configuration table; a test fails when the two drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Trendyol/e-commerce-product-image-encoder"


class BatchSettings(BaseModel):
    """Micro-batching of the inference worker."""

    max_size: int = Field(32, ge=1, le=1024, description="Most images in one forward pass.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest wait for a batch to fill after its first image."
    )
    queue_size: int = Field(
        256,
        ge=1,
        description=(
            "Images in flight (downloading, decoding, queued or in the model) before "
            "requests get 503."
        ),
    )
    preprocess_threads: int = Field(
        2, ge=1, le=64, description="Threads that decode, crop and resize images."
    )


class ImageSettings(BaseModel):
    """Limits applied to every image that enters the service."""

    max_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (pixels).")
    max_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1,
        description="Largest image file (bytes); a URL download is capped at this many bytes "
        "both on the wire and after undoing its Content-Encoding.",
    )
    max_request_pixels: int = Field(
        120_000_000,
        ge=1,
        description="Most pixels decoded for one request, over all its images (413 past it).",
    )
    decode_size: int = Field(
        512,
        ge=64,
        description="Images are reduced while decoding (JPEG DCT scaling, then whole-factor "
        "box reduction) to no less than this many pixels per side; the model sees 224.",
    )
    max_jpeg_scans: int = Field(
        32,
        ge=1,
        description="Most scans in a progressive JPEG; each scan costs a pass over the image.",
    )
    decode_threads: int = Field(
        2, ge=1, le=64, description="Threads that decode uploaded and downloaded images."
    )
    decode_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for one image to decode (503 if it never started)."
    )
    fetch_timeout_s: float = Field(10.0, gt=0, description="Total time allowed per URL download.")
    fetch_connect_timeout_s: float = Field(3.0, gt=0, description="TCP connect timeout per URL.")
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="Redirect hops followed.")
    fetch_content_codings: int = Field(
        1,
        ge=0,
        le=2,
        description="Content-Encoding layers (gzip, deflate) undone per download; more "
        "layers, or other codings, are refused (0: refuse any).",
    )
    fetch_dns_timeout_s: float = Field(
        2.0, gt=0, description="Longest wait for an image URL's host name to resolve."
    )
    fetch_dns_threads: int = Field(
        4, ge=1, le=64, description="Threads resolving image URL host names (their own pool)."
    )
    fetch_allowed_hosts: str = Field(
        "",
        description="Comma-separated hosts image URLs may use (`cdn.example.com`, "
        "`*.example.com`); empty: any public host.",
    )


class IndexSettings(BaseModel):
    """The sharded FAISS index (a cache of the catalogue's embeddings)."""

    shards: int = Field(4, ge=1, le=256, description="Number of FAISS shards.")
    train_threshold: int = Field(
        200_000, ge=1, description="Images above which IVF-PQ is trained (exact search below)."
    )
    retrain_growth: float = Field(
        2.0, gt=1.0, description="Retrain IVF-PQ when the catalogue has grown by this factor."
    )
    nlist: int = Field(0, ge=0, description="IVF lists; 0 = about 4 x sqrt(images).")
    pq_m: int = Field(64, ge=1, description="Bytes per PQ vector code.")
    fast_scan: bool = Field(
        False,
        description="4-bit fast-scan PQ codes of residuals (2 x pq_m sub-quantizers in pq_m "
        "bytes), scanned with SIMD lookups: at 128 bytes (pq_m 128) with 1,024 lists and "
        "one shard, the fastest batch-1 setting measured at 1M (docs/benchmarks.md).",
    )
    opq: bool = Field(False, description="Learn an OPQ rotation before PQ.")
    nprobe: int = Field(
        0,
        ge=0,
        description="IVF lists scanned per query; 0 = tuned to reach target_recall "
        "(1/64 of the lists, at least 16, until measured).",
    )
    refine: int = Field(
        0,
        ge=0,
        description="PQ candidates per result re-ranked exactly; 0 = tuned to reach "
        "target_recall (32 until measured).",
    )
    target_recall: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="recall@10 the tuned nprobe/refine must reach, measured against exact "
        "search on 512 catalogue vectors at every (re)build (its 95% lower confidence "
        "bound must reach it); 0 = no tuning.",
    )
    retune_growth: float = Field(
        1.25, gt=1.0, description="Measure and tune again when the index has grown by this factor."
    )
    catchup_interval_s: float = Field(
        1.0, gt=0, description="How often the change log is tailed (replicas converge)."
    )
    notify: bool = Field(
        True,
        description="On PostgreSQL, catch up as soon as any replica commits a change "
        "(LISTEN/NOTIFY); the periodic tail stays as the safety net.",
    )
    save_interval_s: float = Field(
        300.0, gt=0, description="Checkpoint the index files at most this often when changed."
    )


class DuplicatesSettings(BaseModel):
    """Duplicate pairs for catalogue unification."""

    floor: float = Field(
        0.80, ge=-1.0, le=1.0, description="Lowest cosine stored as a duplicate pair."
    )
    neighbours: int = Field(
        20, ge=1, le=1000, description="Nearest images checked per image for pairs."
    )
    on_replay: bool = Field(
        True,
        description="Recompute the pairs of products other replicas wrote as their changes "
        "arrive here; off on all replicas but one makes that one the duplicates worker.",
    )
    replay_limit: int = Field(
        1_000,
        ge=0,
        description="Most images one catch-up refreshes pairs for; beyond it (a bulk load) "
        "pairs are left to `vsearch duplicates scan`.",
    )

    same_probability: float = Field(
        0.9, gt=0.0, le=1.0, description="Calibrated P(same) from which a pair is tier `same`."
    )
    exact_score: float = Field(
        0.995, ge=-1.0, le=1.0, description="Score from which a pair is tier `exact`."
    )
    calibration_min_labels: int = Field(
        50, ge=4, description="Decisions (at least 5 of each kind) before probabilities exist."
    )
    calibration_isotonic_labels: int = Field(
        1000, ge=10, description="Decisions from which isotonic regression replaces Platt."
    )
    calibration_refit_every: int = Field(
        20, ge=1, description="New decisions after which the calibration is fitted again."
    )


class SearchSettings(BaseModel):
    """Search-time quality features (app/catalogue/rerank.py; measured in docs/benchmarks.md)."""

    flip: bool = Field(
        False,
        description="Embed each query also mirrored and average the two (a second image in "
        "the forward pass); per request: `flip`.",
    )
    expansion: int = Field(
        0,
        ge=0,
        le=50,
        description="Alpha query expansion over this many nearest images, then search again "
        "(0: off); per request: `expand`.",
    )
    expansion_alpha: float = Field(
        3.0, ge=0.0, le=20.0, description="Exponent on the neighbours' scores in the expansion."
    )
    product_images: int = Field(
        10,
        ge=1,
        le=100,
        description="Score each product by its best image and the mean of its best this many "
        "images (1: best image only).",
    )
    product_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of that mean in a product's score (0: best image only).",
    )
    product_candidates: int = Field(
        20, ge=1, le=1000, description="Products re-scored from all their images per search."
    )


class RateLimitSettings(BaseModel):
    """Token-bucket limits per valid API key, else per client address (IPv6: per /64)."""

    per_minute: float = Field(
        0.0,
        ge=0,
        description="Sustained requests per minute per valid key (else per client address); "
        "0 turns limits off.",
    )
    burst: int = Field(60, ge=1, description="Requests a key may send at once.")
    auth_failures_per_minute: float = Field(
        6.0,
        ge=0,
        description="Sustained failed authentications (wrong or missing key) per client "
        "address per minute; past the burst every keyed request from it is 429. 0: no limit.",
    )
    auth_failures_burst: int = Field(
        20, ge=1, description="Failed authentications a client address may make at once."
    )
    max_clients: int = Field(
        100_000,
        ge=1,
        description="Most clients each limiter remembers; the least recently seen are "
        "forgotten first.",
    )


class AttributeSettings(BaseModel):
    """Bounds on a product's free-form `attributes` (checked on every write)."""

    max_bytes: int = Field(
        16 * 1024, ge=2, description="Largest `attributes` object, as compact JSON (bytes)."
    )
    max_depth: int = Field(
        4, ge=1, le=64, description="Deepest nesting of objects and arrays in `attributes`."
    )
    max_keys: int = Field(
        64, ge=1, description="Most keys in `attributes`, counted over all nested objects."
    )


class ImportSettings(BaseModel):
    """Bulk imports over HTTP (`POST /imports`): run in the background, one job at a time."""

    batch_size: int = Field(
        32, ge=1, le=10_000, description="Records per committed step (the resume point)."
    )
    concurrency: int = Field(
        4,
        ge=1,
        le=256,
        description="Products of an import in flight at once (fetching, embedding, storing); "
        "small, so imports leave the model to searches too.",
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest uploaded import file (bytes)."
    )


class Settings(BaseSettings):
    """All configuration of the service and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="VS_",
        env_nested_delimiter="__",
        extra="ignore",
        protected_namespaces=(),
    )

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses unsafe settings."
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="Model directory (config.json + model.safetensors) or a hub id.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Inference precision; auto = fp16 on CUDA, bf16 on CPUs where it agrees "
        "with fp32 and is faster.",
    )
    data_dir: Path = Field(
        Path("~/.local/share/vsearch"),
        description=(
            "SQLite file, index files, cached models. One place per user, whatever the "
            "working directory, so every command sees the same catalogue."
        ),
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file under the data directory."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    image: ImageSettings = Field(default_factory=ImageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    duplicates: DuplicatesSettings = Field(default_factory=DuplicatesSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    api_keys: str = Field(
        "", description="Comma-separated API keys allowed to write (empty: writes are open)."
    )
    api_keys_file: Path | None = Field(
        None, description="File with one write API key per line (added to VS_API_KEYS)."
    )
    api_keys_read: str = Field(
        "", description="Comma-separated keys for reads; when set, reads need a key too."
    )
    api_key_scopes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="JSON object: API key -> the product sets it is confined to "
        '(`{"key-1": ["shop-a"]}`). Each key must also be in VS_API_KEYS or VS_API_KEYS_READ, '
        "and both must be set. Keys not named here see every set.",
    )
    api_key_scopes_file: Path | None = Field(
        None, description="JSON file with more key scopes, as VS_API_KEY_SCOPES."
    )
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    trusted_proxies: str = Field(
        "",
        description="Comma-separated proxy addresses or networks whose `X-Forwarded-For` "
        "and `X-Forwarded-Proto` are believed (`vsearch serve`); empty: none, the "
        "connection's address is the client's.",
    )
    attributes: AttributeSettings = Field(default_factory=AttributeSettings)
    imports: ImportSettings = Field(default_factory=ImportSettings)
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed by CORS (empty: CORS off)."
    )
    docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json.")
    max_products_per_request: int = Field(
        64, ge=1, le=10_000, description="Most products in one POST /products."
    )
    max_request_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest request body, counted while streaming."
    )
    migrate_on_start: bool = Field(
        True, description="Run database migrations at start (else refuse a schema behind)."
    )
    allow_private_urls: bool = Field(
        False, description="Allow image URLs on private/loopback addresses (tests, trusted nets)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json lines, plain text, or auto (text on a terminal, else json)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model at start (about a minute; ~40% faster on CPU).",
    )
    runtime: Literal["torch", "openvino"] = Field(
        "torch",
        description="What runs the forward pass: PyTorch, or OpenVINO's CPU runtime (CPU "
        "only; needs the `openvino` extra; the model is converted at start, seconds for "
        "ConvNeXt-Base; VS_COMPILE is then not used; VS_PRECISION=auto is settled on "
        "OpenVINO's own timings).",
    )
    warmup: bool = Field(True, description="Run the model once at start (and check precision).")

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _refuse_unsafe_in_production(self) -> Settings:
        if self.environment != "production":
            return self
        if self.allow_private_urls:
            raise ValueError("VS_ALLOW_PRIVATE_URLS must not be enabled in production")
        if not self.api_keys.strip() and self.api_keys_file is None:
            raise ValueError(
                "production needs VS_API_KEYS (or VS_API_KEYS_FILE): writes would be open to "
                "anyone who can reach the service"
            )
        return self

    def write_keys(self) -> list[str]:
        """The configured write API keys (from VS_API_KEYS and VS_API_KEYS_FILE)."""
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [k.strip() for k in lines if k.strip() and not k.startswith("#")]
        return keys

    def read_keys(self) -> list[str]:
        """Keys that may read (read keys plus write keys); empty when reads are open."""
        keys = [k.strip() for k in self.api_keys_read.split(",") if k.strip()]
        return keys + self.write_keys() if keys else []

    def key_scopes(self) -> dict[str, frozenset[str]]:
        """API key -> the product sets it is confined to (VS_API_KEY_SCOPES and
        VS_API_KEY_SCOPES_FILE). ValueError when a scope could be side-stepped: a scoped
        key that is no key of the service, or reads or writes open to anyone without a
        key (a scoped client would then just leave its key out)."""
        given: dict[str, list[str]] = dict(self.api_key_scopes)
        if self.api_key_scopes_file is not None:
            loaded = json.loads(self.api_key_scopes_file.read_text())
            if not isinstance(loaded, dict):
                raise ValueError("VS_API_KEY_SCOPES_FILE must hold a JSON object")
            given.update(loaded)
        if not given:
            return {}
        write, read = self.write_keys(), self.read_keys()
        if not write or not read:
            raise ValueError(
                "VS_API_KEY_SCOPES needs VS_API_KEYS (or VS_API_KEYS_FILE) and "
                "VS_API_KEYS_READ: with reads or writes open, a scoped client could leave its "
                "key out and reach every product"
            )
        scopes: dict[str, frozenset[str]] = {}
        for n, (key, sets) in enumerate(given.items(), start=1):
            # The key itself is never repeated in an error: it would end up in logs.
            if key.strip() != key or key not in read:
                raise ValueError(
                    f"VS_API_KEY_SCOPES: scoped key #{n} is not in VS_API_KEYS, "
                    "VS_API_KEYS_FILE or VS_API_KEYS_READ"
                )
            if (
                not isinstance(sets, list)
                or not sets
                or not all(isinstance(s, str) and s for s in sets)
            ):
                raise ValueError(
                    f"VS_API_KEY_SCOPES: scoped key #{n} needs a non-empty list of set ids"
                )
            scopes[key] = frozenset(sets)
        return scopes

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under `data_dir` (computed each
        time: a cached value would survive `model_copy(update=...)` and point elsewhere)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'vsearch.db').resolve()}"


def settings_rows() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested ones flattened."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            shown = "(unset)" if default is None else str(default)
            if isinstance(default, bool):
                shown = str(default).lower()
            rows.append((f"{prefix}{name.upper()}", shown, info.description or ""))

    walk(Settings, "VS_")
    return rows


def settings_markdown() -> str:
    """The README's configuration table, generated from `Settings`."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for env, default, description in settings_rows():
        lines.append(f"| `{env}` | `{default}` | {description} |")
    return "\n".join(lines)
