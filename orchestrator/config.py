"""Configuration: environment variables `ORCHESTRATOR_*` and an optional env file.

Every field is documented and bounded; the whole set is validated at start, so a bad value
stops the service with a message naming the field instead of failing later.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.core.envelope import EnvelopeLimits, ReplyTopicRule
from orchestrator.core.routing import parse_endpoints
from orchestrator.core.validation import Limits
from orchestrator.executor import RetryPolicy

if TYPE_CHECKING:
    from orchestrator.adapters.kafka import KafkaSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCHESTRATOR_",
        env_file=None,
        extra="forbid",
        validate_default=True,
    )

    # --- Triton -----------------------------------------------------------------------------
    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton gRPC endpoints: comma-separated host:port; each host name is "
        "resolved again every triton_resolve_interval_s and every address it yields is an "
        "endpoint (a Kubernetes headless Service gives one per Triton pod)",
    )
    triton_resolve_interval_s: float = Field(
        10.0, gt=0, le=3600, description="how often Triton host names are resolved again"
    )
    triton_ssl: bool = Field(False, description="use TLS for the Triton gRPC channel")
    triton_timeout_s: float = Field(60.0, gt=0, le=3600, description="deadline of one Triton call")
    triton_shared_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="UNet conditioning through Triton system shared memory, registered once per "
        "endpoint and rewritten only when a batch's jobs change (the orchestrator beside Triton, "
        "sharing /dev/shm): auto = per endpoint, plain gRPC where registration is refused (a "
        "remote Triton); on = required; off = plain gRPC",
    )
    triton_conditioning_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="over plain gRPC (no shared memory), send each job's UNet conditioning once "
        "per endpoint to the repository's `unet_cached` model, which keeps it (LRU, bounded) and "
        "calls the UNet through BLS; a miss is answered by resending: auto = where the endpoint "
        "serves unet_cached; on = required; off = conditioning in every step's call",
    )

    # --- Kafka ------------------------------------------------------------------------------
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_id: str = "diffusion-orchestrator"
    group_id: str = Field("diffusion-orchestrator", description="consumer group of the service")
    request_topic: str = "diffusion.requests"
    response_topic: str = "diffusion.responses"
    dlq_topic: str = "diffusion.requests.dlq"
    progress_topic: str = Field(
        "diffusion.progress",
        description="where progress events (queued, started, step, finished, failed, "
        "cancelled) go, keyed by request id; advisory: dropped rather than waited for",
    )
    control_topic: str = Field(
        "diffusion.control",
        description="where commands about requests (cancel) are read from; every instance "
        "reads every partition",
    )
    role: Literal["all", "encode", "denoise", "decode"] = Field(
        "all",
        description="which stages this process runs: all (the whole job), or one stage role "
        "(encode -> encoded_topic -> denoise -> denoised_topic -> decode), each consuming its "
        "own topic as group `<group_id>-<role>`",
    )
    encoded_topic: str = Field(
        "diffusion.stage.encoded",
        description="hand-offs of the encode role to the denoise role (EncodedRequest)",
    )
    denoised_topic: str = Field(
        "diffusion.stage.denoised",
        description="hand-offs of the denoise role to the decode role (DenoisedLatents)",
    )
    reply_topics: str = Field(
        "",
        description="comma-separated topics, besides response_topic, a request may name as its "
        "reply topic (the request and dead-letter topics are never allowed)",
    )
    reply_topic_prefixes: str = Field(
        "diffusion.replies.",
        description="comma-separated prefixes: a reply topic under one of them is allowed "
        "(e.g. diffusion.replies.<client>); empty: none",
    )
    session_timeout_ms: int = Field(
        10_000, ge=500, le=600_000, description="consumer group session timeout"
    )
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=60_000)
    rebalance_timeout_ms: int = Field(
        10_000, ge=500, le=600_000, description="how long a rebalance waits for members"
    )
    fetch_max_wait_ms: int = Field(
        50,
        ge=0,
        le=10_000,
        description="longest a fetch waits on the broker for new records (latency vs idle "
        "fetch traffic; brokers that do not answer early hold every fetch this long)",
    )
    max_record_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024, description="largest record produced"
    )

    # --- Avro -------------------------------------------------------------------------------
    schema_dir: Path | None = Field(None, description="local schema directory (default: avro/)")
    schema_registry_url: str | None = Field(None, description="Confluent schema registry URL")
    schema_registry_username: str | None = Field(
        None, min_length=1, max_length=256, description="schema registry basic-auth user name"
    )
    schema_registry_password: SecretStr | None = Field(
        None, min_length=1, max_length=4096, description="schema registry basic-auth password"
    )
    schema_registry_ca_file: FilePath | None = Field(
        None, description="CA bundle (PEM) that signs the registry's certificate (https)"
    )
    schema_registry_cert_file: FilePath | None = Field(
        None, description="client certificate (PEM) for mutual TLS with the registry"
    )
    schema_registry_key_file: FilePath | None = Field(
        None, description="private key (PEM) of schema_registry_cert_file, if not inside it"
    )
    schema_registry_timeout_s: float = Field(
        5.0, gt=0, le=300, description="deadline of one schema registry request"
    )
    schema_registry_negative_ttl_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="how long an id the registry does not know is remembered as unknown "
        "(records with it are dead-lettered without asking again); 0: not remembered",
    )

    # --- Results ----------------------------------------------------------------------------
    inline_image_max_bytes: int = Field(
        1024 * 1024, ge=0, description="PNGs up to this size travel inline, larger go to output_dir"
    )
    output_dir: Path = Field(Path("out/images"), description="shared volume for large images")
    output_uri_base: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$",
        description="URI prefix under which consumers reach output_dir (e.g. an HTTP server "
        "or bucket serving it): stored images are answered as BASE/<aa>/<sha256>/<i>.png; "
        "unset: file:// URIs of output_dir (consumers mount the same volume)",
    )

    # --- Work -------------------------------------------------------------------------------
    max_in_flight: int = Field(
        256,
        ge=1,
        le=4096,
        description="read-ahead: records fetched and held at once (waiting for a slot or "
        "running), also bounded by max_buffered_bytes; priority acts among these",
    )
    max_active_jobs: int = Field(
        32,
        ge=1,
        le=4096,
        description="jobs started and running at once; the others wait for a slot, highest "
        "priority (then earliest deadline, then arrival) first (docs/operations.md)",
    )
    admission_aging_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="seconds of waiting that promote a job by one priority class, so low "
        "priority is never starved",
    )
    admission_preempt: bool = Field(
        True,
        description="a waiting high-priority job, with no slot free, makes one running job of a "
        "lower class yield its slot at its next denoising step boundary; it resumes from the "
        "same step when it gets a slot again (docs/operations.md)",
    )
    admission_max_preemptions: int = Field(
        2,
        ge=0,
        le=100,
        description="times one job may be made to yield its slot, so lower priority still "
        "completes (0: never preempted)",
    )
    batching: Literal["step", "naive"] = Field("step", description="UNet step batching mode")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest wait to fill a batch")
    batch_cohorts: int = Field(
        2,
        ge=1,
        le=8,
        description="step mode: groups of jobs that flush apart, so one steps while another's "
        "call runs in Triton (1: all jobs in lockstep; 2 measured better, docs/benchmarks.md)",
    )
    prompt_cache_entries: int = Field(
        1024,
        ge=0,
        le=1_000_000,
        description="prompts whose text embeddings are kept (least recently used go first); "
        "0 disables the prompt-embedding cache",
    )
    prompt_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        le=64 * 1024**3,
        description="bytes the prompt-embedding cache may hold (tensors, prompt and 512 bytes per "
        "entry); 0 disables it",
    )
    prompt_cache_check_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="how often the text encoder's identity (its Triton configs and ready "
        "versions) is read again; a change drops the cache",
    )

    # --- Request limits ---------------------------------------------------------------------
    max_steps: int = Field(150, ge=1, le=1000)
    max_width: int = Field(1024, ge=8, le=8192)
    max_height: int = Field(1024, ge=8, le=8192)
    max_num_images: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(4096, ge=1)
    max_init_image_bytes: int = Field(8 * 1024 * 1024, ge=1)

    max_buffered_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="bound on request bytes held in flight"
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="larger request records are dead-lettered"
    )
    max_request_id_chars: int = Field(128, ge=8, le=1024, description="longest request_id")
    max_metadata_entries: int = Field(32, ge=0, le=1024, description="entries in metadata")
    max_metadata_key_chars: int = Field(128, ge=1, le=65536)
    max_metadata_value_chars: int = Field(1024, ge=0, le=1_048_576)
    max_deadline_ahead_s: float = Field(
        7 * 24 * 3600.0, gt=0, le=366 * 24 * 3600.0, description="how far ahead deadline_ms may lie"
    )
    answer_cache_size: int = Field(
        10_000, ge=0, le=1_000_000, description="recent answers kept to answer repeated ids"
    )

    # --- Reliability ------------------------------------------------------------------------
    retry_attempts_per_call: int = Field(6, ge=1, le=100)
    retry_initial_backoff_s: float = Field(0.1, gt=0, le=60)
    retry_max_backoff_s: float = Field(5.0, gt=0, le=300)
    retry_max_per_job: int = Field(30, ge=0, le=10_000)
    breaker_failure_threshold: int = Field(
        3, ge=1, le=1000, description="consecutive transient failures that open the circuit"
    )
    breaker_probe_interval_s: float = Field(1.0, gt=0, le=60)
    record_retry_initial_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="first wait before a record whose answer and dead letter both failed to "
        "publish (broker unavailable) is tried again; doubles up to record_retry_max_s",
    )
    record_retry_max_s: float = Field(30.0, gt=0, le=600)
    stuck_record_after_s: float = Field(
        120.0,
        gt=0,
        le=86_400,
        description="a record retried for longer than this fails /readyz and counts in "
        "orchestrator_stuck_records",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="time in-flight work gets to finish on SIGTERM"
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="liveness fails when the consume loop stalls this long"
    )

    # --- Operations -------------------------------------------------------------------------
    http_port: int = Field(
        9400, ge=0, le=65535, description="metrics and health endpoints (0: a free port)"
    )
    http_host: str = Field("0.0.0.0", description="address of the metrics/health endpoint")
    tracing: bool = Field(True, description="OpenTelemetry spans (export via OTEL_* variables)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # --- Progress ---------------------------------------------------------------------------
    progress_events: bool = Field(
        True, description="publish progress events to progress_topic (advisory, never waited for)"
    )
    progress_step_events_per_s: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="at most this many step events per job per second (the first and the last "
        "step are always sent)",
    )
    preview_interval_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="at most one preview per job per this many seconds (requests with preview)",
    )
    preview_max_side: int = Field(
        64, ge=8, le=512, description="longest side of a preview in pixels (never upscaled)"
    )
    preview_max_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=512 * 1024,
        description="bytes of one encoded preview; quality and size are lowered to fit, else "
        "the preview is left out",
    )
    progress_queue_size: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="progress events waiting to be produced; a full queue drops new events",
    )
    progress_send_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="how long one progress event may wait for the broker (metadata, ack) "
        "before it is dropped",
    )
    progress_flush_timeout_s: float = Field(
        2.0, ge=0, le=60, description="at stop, time given to queued progress events"
    )

    # --- Cancellation -----------------------------------------------------------------------
    cancel_remember_s: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="how long a cancel is remembered (a request arriving later is answered "
        "cancelled at once); also how far back the control topic is read at start",
    )
    cancel_remember_max: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="at most this many cancels remembered (the oldest forgotten first)",
    )

    @field_validator("triton_url")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        parse_endpoints(value)  # raises ValueError naming the bad item
        return value

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            attempts_per_call=self.retry_attempts_per_call,
            initial_backoff_s=self.retry_initial_backoff_s,
            max_backoff_s=self.retry_max_backoff_s,
            max_retries_per_job=self.retry_max_per_job,
        )

    def kafka(self, suffix: str = "") -> KafkaSettings:
        """The Kafka connection (bootstrap, security, SASL, TLS); `suffix` marks a client's
        id and group (e.g. "-loadtest")."""
        from orchestrator.adapters.kafka import KafkaSettings

        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_username=self.sasl_username,
            sasl_password=self.sasl_password,
            ssl_cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
            ssl_certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
            ssl_keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            client_id=self.client_id + suffix,
            group_id=self.group_id + suffix,
        )

    def envelope_limits(self) -> EnvelopeLimits:
        return EnvelopeLimits(
            max_request_id_chars=self.max_request_id_chars,
            max_metadata_entries=self.max_metadata_entries,
            max_metadata_key_chars=self.max_metadata_key_chars,
            max_metadata_value_chars=self.max_metadata_value_chars,
            max_deadline_ahead_s=self.max_deadline_ahead_s,
        )

    def service_topics(self) -> list[str]:
        """Every topic the service reads or writes (the ones `orchestrator dev` creates)."""
        return list(
            dict.fromkeys(
                [
                    self.request_topic,
                    self.response_topic,
                    self.dlq_topic,
                    self.progress_topic,
                    self.control_topic,
                    self.encoded_topic,
                    self.denoised_topic,
                ]
            )
        )

    def reply_topic_rule(self) -> ReplyTopicRule:
        return ReplyTopicRule.of(
            default=self.response_topic,
            exact=self.reply_topics,
            prefixes=self.reply_topic_prefixes,
            forbidden=(self.request_topic, self.dlq_topic, self.progress_topic, self.control_topic),
        )

    def limits(self) -> Limits:
        return Limits(
            max_steps=self.max_steps,
            max_width=self.max_width,
            max_height=self.max_height,
            max_num_images=self.max_num_images,
            max_prompt_chars=self.max_prompt_chars,
            max_init_image_bytes=self.max_init_image_bytes,
        )


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, an optional env file, then explicit overrides."""
    if env_file is not None:
        overrides["_env_file"] = env_file
    return Settings(**overrides)
