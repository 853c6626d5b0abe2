"""What each stage role reads, and what it hands on to the next role (issue 12).

`--role all` and `encode` read request records; `denoise` reads EncodedRequest records from
`encoded_topic`, `decode` reads DenoisedLatents from `denoised_topic`. A role that does not
answer (encode, denoise) hands its job on as the next role's record, keyed by request id; the
handling adds the correlation id and `traceparent` headers, as on every record it publishes.
The cutting and resuming of jobs is `orchestrator.core.roles`; the wire form is the codec's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from orchestrator.adapters.avro import AvroCodec, DenoisedLatentsRecord, EncodedRequestRecord
from orchestrator.config import Settings
from orchestrator.core.pipeline import Job
from orchestrator.core.roles import (
    Role,
    handoff_after_denoise,
    handoff_after_encode,
    job_from_denoised,
    job_from_encoded,
)
from orchestrator.core.validation import Limits
from orchestrator.domain import GenerationRequest, ModelInfo
from orchestrator.errors import ValidationError

#: rebuilds the job a hand-off carries, at the phase this role starts in
Resume = Callable[[ModelInfo, Limits], Job]


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A role's input record, decoded."""

    request: GenerationRequest
    reply_topic: str | None
    #: None for a request record (a fresh job: `start_job`), else the hand-off's resume
    resume: Resume | None = None
    #: what the roles before this one measured and served
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_versions: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HandedOn:
    """A job cut at this role's boundary, encoded for the next role's topic."""

    topic: str
    value: bytes
    timings_ms: Mapping[str, float]


#: bytes of a hand-off beside its tensors and prompts (the records' other fields)
_HANDOFF_OVERHEAD = 8 * 1024


class Handoffs:
    """One role's reading and handing on."""

    def __init__(self, role: Role, codec: AvroCodec, settings: Settings) -> None:
        self.role = role
        self.codec = codec
        self.settings = settings

    @property
    def input_topic(self) -> str:
        if self.role is Role.DENOISE:
            return self.settings.encoded_topic
        if self.role is Role.DECODE:
            return self.settings.denoised_topic
        return self.settings.request_topic

    @property
    def group_id(self) -> str:
        """Role all keeps the group; each stage role has its own, so each scales on its lag."""
        group = self.settings.kafka().group_id
        return group if self.role is Role.ALL else f"{group}-{self.role.value}"

    @property
    def answers(self) -> bool:
        """True for the roles that answer on the reply topic (all, decode)."""
        return self.role in (Role.ALL, Role.DECODE)

    @property
    def max_input_bytes(self) -> int:
        if self.role in (Role.ALL, Role.ENCODE):
            return self.settings.max_request_bytes
        return self.settings.max_record_bytes

    def read(self, value: bytes) -> Incoming:
        """Decode this role's input record (DecodeError naming the field)."""
        if self.role is Role.DENOISE:
            encoded = self.codec.decode_encoded(value)
            return Incoming(
                encoded.request,
                encoded.reply_topic,
                lambda info, limits: job_from_encoded(encoded, info, limits),
                encoded.timings_ms,
                encoded.model_versions,
            )
        if self.role is Role.DECODE:
            denoised = self.codec.decode_denoised(value)
            return Incoming(
                denoised.request,
                denoised.reply_topic,
                lambda info, limits: job_from_denoised(denoised, info, limits),
                denoised.timings_ms,
                denoised.model_versions,
            )
        decoded = self.codec.decode_request_record(value)
        return Incoming(decoded.request, decoded.reply_topic)

    def check_fits(self, job: Job) -> None:
        """Refuse at admission, naming the field, a request whose final latents cannot travel
        in one record (they are the bulk of both hand-offs; the text embeddings add at most a
        few hundred KiB, checked again on the encoded bytes)."""
        if self.role is not Role.ENCODE:
            return
        n, c, h, w = job.latent_shape
        size = n * c * h * w * 4 + _HANDOFF_OVERHEAD + 8 * len(job.request.prompt)
        if size > self.settings.max_record_bytes:
            raise ValidationError(
                "num_images",
                f"{n} images of {job.valid.width}x{job.valid.height} make hand-off records "
                f"of about {size} bytes, more than max_record_bytes "
                f"({self.settings.max_record_bytes}): ask for fewer or smaller images",
            )

    def hand_on(
        self, job: Job, incoming: Incoming, reply_topic: str, timings_ms: Mapping[str, float]
    ) -> HandedOn:
        """The record the next role resumes `job` from (encode, denoise)."""
        timings = merge_timings(incoming.timings_ms, timings_ms)
        versions = {**incoming.model_versions, **job.info.versions}
        if self.role is Role.ENCODE:
            encoded = handoff_after_encode(job)
            value = self.codec.encode_encoded(
                EncodedRequestRecord(
                    request=encoded.request,
                    text_embeds=encoded.text_embeds,
                    init_latents=encoded.init_latents,
                    prompt_truncated=encoded.prompt_truncated,
                    reply_topic=reply_topic,
                    timings_ms=timings,
                    model_versions=versions,
                )
            )
            return HandedOn(self.settings.encoded_topic, value, timings_ms)
        if self.role is Role.DENOISE:
            denoised = handoff_after_denoise(job)
            value = self.codec.encode_denoised(
                DenoisedLatentsRecord(
                    request=denoised.request,
                    latents=denoised.latents,
                    prompt_truncated=denoised.prompt_truncated,
                    unet_calls=denoised.unet_calls,
                    reply_topic=reply_topic,
                    timings_ms=timings,
                    model_versions=versions,
                )
            )
            return HandedOn(self.settings.denoised_topic, value, timings_ms)
        raise RuntimeError(f"role {self.role.value} answers, it does not hand on")


def merge_timings(*parts: Mapping[str, float]) -> dict[str, float]:
    """Milliseconds per model summed over the roles a job went through ("total" too: the
    time spent running, not the time between roles)."""
    merged: dict[str, float] = {}
    for part in parts:
        for key, ms in part.items():
            merged[key] = merged.get(key, 0.0) + ms
    return merged
