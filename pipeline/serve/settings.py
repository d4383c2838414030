"""`ServeSettings`: everything the application is parametrised by (``args`` in serve_config.yaml).

No Ray, torch or transformers here: the CLI, the app builder and both deployments validate the same
settings, and ``meda serve --help`` must answer at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meda_engine.config import CompressionConfig

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.fetch import MediaPolicy
    from pipeline.openai_api import Limits

MiB = 2**20


@dataclass(frozen=True)
class APIKeys:
    """The accepted API keys, resolved once where the application is built and handed to the ingress
    replicas as an explicit constructor argument (never read from a replica's environment).

    ``required`` records that auth was configured at build time: a replica that then receives no
    key refuses to start rather than serve without auth (fail closed).
    """

    keys: tuple[str, ...] = ()
    required: bool = False

    def __post_init__(self) -> None:
        if self.required and not self.keys:
            raise ValueError("API-key auth is required but no key was given")

    def __repr__(self) -> str:  # never print the keys themselves
        return f"APIKeys({len(self.keys)} key(s), required={self.required})"

    __str__ = __repr__


class ServeSettings(BaseModel):
    """Everything the application is parametrised by (``args`` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    # the model
    model: str  # hub id, local checkpoint directory or s3:// prefix (a relative path is resolved by app_builder)
    served_model_name: str | None = None  # the name clients pass as `model`; default: `model`
    device: str = "auto"
    dtype: str = "auto"
    max_pixels_per_frame: int | None = None
    torch_threads: int | None = None  # torch intra-op threads per model replica (None: torch's default)

    # server-default compression; requests override any field through `kv_compression`
    method: str = "meda"
    budget: float = 0.2  # a fraction in (0, 1]
    budget_tokens: int | None = None  # an absolute mean count of prompt tokens kept per layer (overrides budget)
    compression: dict[str, Any] = Field(default_factory=dict)  # any other CompressionConfig field

    # request limits
    max_body_bytes: int = Field(32 * MiB, ge=1)
    max_prompt_tokens: int = Field(32768, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens: int = Field(2048, ge=1)
    default_temperature: float = Field(0.0, ge=0)
    max_images: int = Field(8, ge=0)
    max_videos: int = Field(1, ge=0)
    default_video_frames: int = Field(16, ge=1)
    default_video_fps: float | None = Field(None, gt=0)
    max_video_frames: int = Field(64, ge=1)
    max_decode_pixels: int | None = Field(None, ge=1)  # downscale decoded frames to this; None: media's defaults
    decode_timeout_s: float = Field(60.0, gt=0)
    media_threads: int = Field(8, ge=1)  # concurrent fetches per ingress replica
    # pixel budgets (meda_engine.media.PixelBudget): what decoding may hold, counted before decoding
    max_request_pixels: int = Field(64_000_000, ge=1)  # one request's media together (refused above: 413)
    max_pixels_in_flight: int = Field(128_000_000, ge=1)  # all decodes of one ingress replica together
    decode_concurrency: int = Field(2, ge=1)  # decodes running at once per ingress replica

    # media URL policy (pipeline.fetch)
    allowed_schemes: list[str] = Field(default_factory=lambda: ["data", "s3", "https"])
    allow_http: bool = False
    allowed_buckets: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    allow_private_networks: bool = False
    max_media_bytes: int = Field(256 * MiB, ge=1)
    fetch_timeout_s: float = Field(30.0, gt=0)  # one deadline over connect + the whole body
    storage: dict[str, Any] = Field(default_factory=dict)  # filesystem_for kwargs: endpoint_url, region, anon...

    # auth: keys given here, plus a comma-separated list in the environment variable `api_key_env`
    # *of the process that builds the app* (meda serve, or Serve's build task for serve deploy)
    api_keys: list[str] = Field(default_factory=list)
    api_key_env: str | None = "MEDA_API_KEY"
    require_api_key: bool = False  # refuse to build the app when no key resolves

    # deployments
    num_gpus: float = Field(0.0, ge=0)  # per model replica
    num_cpus: float = Field(1.0, ge=0)  # per model replica
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)  # per model replica; default max_num_seqs / 2
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)  # Ray's own default is 600 s
    # the replica's engine loop (meda_engine.scheduler): rows decoding together, and the KV memory cap
    max_num_seqs: int = Field(8, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)  # prompt tokens prefilled together in one step
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    kv_cache_memory_fraction: float | None = Field(None, gt=0, le=1)  # of the device's memory
    ingress_num_cpus: float = Field(1.0, ge=0)
    ingress_min_replicas: int = Field(1, ge=1)
    ingress_max_replicas: int = Field(2, ge=1)
    ingress_max_ongoing_requests: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        try:  # fail at build time, not on the first request
            self.default_compression()
        except ValueError as e:  # ConfigError: say which settings it is about
            raise ValueError(f"invalid default compression (method/budget/budget_tokens/compression): {e}") from None
        if self.max_replicas < self.min_replicas or self.ingress_max_replicas < self.ingress_min_replicas:
            raise ValueError("need min_replicas <= max_replicas and ingress_min_replicas <= ingress_max_replicas")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_fraction is not None:
            raise ValueError("give kv_cache_memory_bytes or kv_cache_memory_fraction, not both")
        if self.max_request_pixels > self.max_pixels_in_flight:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels}) must not exceed "
                             f"max_pixels_in_flight ({self.max_pixels_in_flight})")
        return self

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def autoscaling_target(self) -> float:
        """Requests in flight per model replica the autoscaler aims at: by default half a batch, so a
        replica scales out while its batch is still filling rather than only once it overflows."""
        return self.target_ongoing_requests or max(1.0, self.max_num_seqs / 2)

    def default_compression(self) -> CompressionConfig:
        return CompressionConfig.from_dict({**self.compression, "method": self.method, "budget": self.budget,
                                            "budget_tokens": self.budget_tokens})

    def limits(self) -> Limits:
        from pipeline.openai_api import Limits

        return Limits(default_max_tokens=self.default_max_tokens, max_tokens=self.max_tokens,
                      default_temperature=self.default_temperature, max_images=self.max_images,
                      max_videos=self.max_videos, default_video_frames=self.default_video_frames,
                      default_video_fps=self.default_video_fps, max_video_frames=self.max_video_frames)

    def media_policy(self) -> MediaPolicy:
        from pipeline.fetch import MediaPolicy

        schemes = [s.lower() for s in self.allowed_schemes] + (["http"] if self.allow_http else [])
        return MediaPolicy(allowed_schemes=tuple(dict.fromkeys(schemes)), allowed_buckets=tuple(self.allowed_buckets),
                           allowed_hosts=tuple(self.allowed_hosts), allow_private_networks=self.allow_private_networks,
                           max_bytes=self.max_media_bytes, timeout_s=self.fetch_timeout_s,
                           storage_options=dict(self.storage))

    def resolve_api_keys(self, environ: dict[str, str] | None = None) -> APIKeys:
        """The keys from ``api_keys`` and ``$api_key_env`` of *this* process (the one building the app).

        Raises ValueError when ``require_api_key`` is set and none resolves."""
        env = os.environ if environ is None else environ
        from_env = env.get(self.api_key_env, "") if self.api_key_env else ""
        keys = tuple(k.strip() for k in (*self.api_keys, *from_env.split(",")) if k.strip())
        if self.require_api_key and not keys:
            where = f"${self.api_key_env}" if self.api_key_env else "api_keys"
            raise ValueError(f"require_api_key is set but no API key was found ({where} is empty where the app is "
                             "built); refusing to start an endpoint without auth")
        return APIKeys(keys, required=bool(keys))
