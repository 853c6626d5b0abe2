"""One root error for the orchestrator; every class says whether it is retriable.

Foreign exceptions (gRPC, Kafka, Avro, numpy) are mapped to these once, at the adapter that
meets them. `disposition(exc)` is the single place that decides what happens next.
"""

from __future__ import annotations

import enum


class Disposition(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


class OrchestratorError(Exception):
    """Root of every error the orchestrator raises on purpose."""

    retriable: bool = False
    #: short machine-readable reason, used in dead-letter headers and metrics labels
    reason: str = "error"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage


class ValidationError(OrchestratorError):
    """A request field is out of range or malformed. Names the field."""

    reason = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", stage="validate")
        self.field = field


class ReplyTopicNotAllowed(OrchestratorError):
    """The request names a reply topic the service may not write to."""

    reason = "reply_topic_not_allowed"


class DecodeError(OrchestratorError):
    """A record could not be decoded (bad magic byte, unknown schema id, malformed Avro)."""

    reason = "malformed_record"


class UnknownSchemaError(DecodeError):
    reason = "unknown_schema"


class ModelConfigError(OrchestratorError):
    """The model repository does not describe what the orchestrator needs."""

    reason = "model_config"


class InferenceError(OrchestratorError):
    """A Triton call failed and retrying will not help (bad argument, shape error)."""

    reason = "inference_error"


class TransientInferenceError(InferenceError):
    """A Triton call failed in a way that may pass (unavailable, deadline, exhausted)."""

    retriable = True
    reason = "inference_unavailable"


class DeadlineExceeded(OrchestratorError):
    """The request's own deadline passed before it could be answered."""

    reason = "deadline_exceeded"


class PublishError(OrchestratorError):
    """The broker did not acknowledge a result or dead letter."""

    retriable = True
    reason = "publish_failed"


class PermanentPublishError(PublishError):
    """The broker refused a record for what it is (too large, invalid topic, not authorized):
    sending the same record again can never succeed."""

    retriable = False
    reason = "publish_rejected"


def disposition(exc: BaseException) -> Disposition:
    """Decide, in one place, whether a failure is retried or dead-lettered."""
    if isinstance(exc, OrchestratorError) and exc.retriable:
        return Disposition.RETRY
    return Disposition.DEAD_LETTER


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, OrchestratorError):
        return exc.reason
    return "internal_error"
