"""Gateway settings: environment variables `ORCHESTRATOR_GATEWAY_*` (the Kafka connection and
topics come from the service's own `ORCHESTRATOR_*` settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCHESTRATOR_GATEWAY_", extra="forbid", validate_default=True
    )

    host: str = Field("127.0.0.1", description="address the HTTP server binds")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0: any free port)")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, le=64 * 1024 * 1024, description="largest request body (413 above)"
    )
    sync_wait_s: float = Field(
        60.0, gt=0, le=600, description="how long POST /v1/images/generations waits (then 504)"
    )
    max_prefer_wait_s: float = Field(
        60.0, ge=0, le=600, description="upper bound of `Prefer: wait=N` on POST /v1/jobs"
    )
    idempotency_ttl_s: float = Field(
        86_400.0, gt=0, le=30 * 86_400, description="how long an Idempotency-Key is honoured"
    )
    keys_file: Path | None = Field(
        None,
        description="JSON file of API keys stored as sha256 hashes with their routes and limits "
        "(a Kubernetes secret mounted as a file); unset: no key is accepted",
    )
    rate_per_s: float = Field(5.0, gt=0, le=10_000, description="default per-key request rate")
    burst: int = Field(20, ge=1, le=100_000, description="default per-key token-bucket size")
    max_concurrent: int = Field(
        8, ge=1, le=10_000, description="default per-key requests in flight at once"
    )
    size_multiple: int = Field(
        8,
        ge=1,
        le=1024,
        description="width and height of `size` must be multiples of this: the deployed "
        "model's unit (its repository's `size_multiple` parameter: 64 for SD 1.5-shaped UNets, "
        "8 for the tiny preset); 8, the VAE's factor, is what every SD-family model needs. "
        "The service still checks the model's own unit",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key signing webhook calls (unset: webhooks refused)"
    )
    webhook_attempts: int = Field(4, ge=1, le=20, description="tries of one webhook call")
    webhook_backoff_s: float = Field(0.5, gt=0, le=60, description="first retry delay (doubles)")
    image_base_url: str = Field(
        "",
        description="absolute URL prefix of this gateway for `url` answers (unset: relative "
        "URLs /v1/images/...)",
    )
    registry_topic: str = Field(
        "diffusion.gateway.jobs", description="compacted topic of the jobs the gateway took"
    )
    reply_topic: str = Field(
        "",
        description="topic the service answers gateway jobs on (empty: its response_topic; "
        "else one its reply-topic rule allows)",
    )
    lookback_s: float = Field(
        7 * 86_400.0, gt=0, description="how far back the topics are read at start"
    )
    catchup_wait_s: float = Field(
        2.0, ge=0, le=60, description="how long a GET of an unknown job waits for the tail"
    )
    kafka_timeout_ms: int = Field(
        5000, ge=500, le=120_000, description="publish acknowledgement timeout (503 after)"
    )
    fetch_wait_ms: int = Field(
        20,
        ge=1,
        le=5000,
        description="the tail's fetch wait: how long the broker may hold an empty fetch (Apache "
        "Kafka answers as soon as a record comes, so this is the idle poll interval; a broker "
        "that holds every fetch that long, as Tansu does, adds up to it to each answer)",
    )
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="HTTP parser (auto: httptools if installed, else h11)"
    )
    loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="event loop of `orchestrator gateway` (auto: uvloop if installed; "
        "`orchestrator dev` runs it on its own loop)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="processes of `orchestrator gateway`, each a full gateway (own Kafka "
        "tail, limits and idempotency turns, like a replica) on the same port (SO_REUSEPORT: "
        "the kernel spreads the connections); about one per core. `orchestrator dev` runs one",
    )
    dev_key: SecretStr | None = Field(
        None, description="an extra API key allowed every route (orchestrator dev only)"
    )
