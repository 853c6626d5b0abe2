"""Avro records on the wire: the Confluent framing, the record types, schema evolution.

Wire format (Confluent): ``0x00`` magic byte, 4-byte big-endian schema id, Avro binary body.
The writer schema is looked up by id in a
:class:`~orchestrator.adapters.schema_registry.SchemaRegistry`; the reader schema is the current
version from ``avro/``, so older writers decode through Avro schema resolution (new fields take
their defaults).

I/O happens in two async calls only: :meth:`AvroCodec.prepare` (register the current schemas,
once at start) and :meth:`AvroCodec.resolve` (load a record's writer schema); encoding and
decoding are then synchronous and work from the cache.

Every decoding failure becomes :class:`~orchestrator.errors.DecodeError` (or its subclass
:class:`~orchestrator.errors.UnknownSchemaError`); fastavro's own exceptions never leave here.
Field ranges are not checked here (the core validates); types and shapes are.
"""

from __future__ import annotations

import dataclasses
import io
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import fastavro
import numpy as np

from orchestrator.adapters.schema_registry import (
    HttpSchemaRegistry,
    LocalSchemaDirectory,
    SchemaRegistry,
)
from orchestrator.domain import FloatArray, GenerationRequest
from orchestrator.errors import DecodeError

if TYPE_CHECKING:
    from orchestrator.config import Settings

MAGIC_BYTE: Final = 0
HEADER_SIZE: Final = 5
NAMESPACE: Final = "ai.orchestrator.v1"
REQUEST_SCHEMA: Final = f"{NAMESPACE}.GenerationRequest"
RESULT_SCHEMA: Final = f"{NAMESPACE}.GenerationResult"
PROGRESS_SCHEMA: Final = f"{NAMESPACE}.ProgressEvent"
CONTROL_SCHEMA: Final = f"{NAMESPACE}.ControlCommand"
#: hand-offs between stage roles: encode -> denoise, denoise -> decode
ENCODED_SCHEMA: Final = f"{NAMESPACE}.EncodedRequest"
DENOISED_SCHEMA: Final = f"{NAMESPACE}.DenoisedLatents"
#: the record types this codec reads and writes
RECORD_TYPES: Final = (
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    PROGRESS_SCHEMA,
    CONTROL_SCHEMA,
    ENCODED_SCHEMA,
    DENOISED_SCHEMA,
)
#: dtype name on the wire -> numpy dtype (little endian) of a hand-off tensor
TENSOR_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
#: the outcomes a result record carries (a failure is a dead letter, not a result)
OUTCOME_SUCCEEDED: Final = "succeeded"
OUTCOME_CANCELLED: Final = "cancelled"
#: the commands a control record carries
COMMAND_CANCEL: Final = "cancel"


# ---------------------------------------------------------------------------------------------
# wire framing


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix an Avro body with the Confluent header."""
    return struct.pack(">bI", MAGIC_BYTE, schema_id) + body


def schema_id_of(data: bytes) -> int:
    """The schema id in a Confluent-framed record's header; DecodeError if it is not framed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"record value must be bytes, got {type(data).__name__}")
    if not data:
        raise DecodeError("empty record value (a tombstone?); expected a Confluent Avro record")
    if data[0] != MAGIC_BYTE:
        hint = ""
        if bytes(data[:1]) in (b"{", b"["):
            hint = " (looks like JSON)"
        raise DecodeError(
            f"expected magic byte 0, got 0x{data[0]:02x}{hint}; "
            "is the producer using the Confluent Avro serializer?"
        )
    if len(data) < HEADER_SIZE:
        raise DecodeError(
            f"record is {len(data)} bytes, shorter than the 5-byte Confluent header "
            "(magic byte + 4-byte schema id)"
        )
    (schema_id,) = struct.unpack(">I", data[1:HEADER_SIZE])
    return int(schema_id)


def unframe(data: bytes) -> tuple[int, bytes]:
    """Split a Confluent-framed record into (schema id, Avro body); DecodeError if it is not."""
    schema_id = schema_id_of(data)
    return schema_id, bytes(data[HEADER_SIZE:])


# ---------------------------------------------------------------------------------------------
# record types that are not in orchestrator.domain


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a result: inline PNG or a URI where it was stored."""

    index: int
    width: int
    height: int
    png: bytes | None = None
    uri: str | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResultRecord:
    """The result record as it travels (images PNG-encoded)."""

    request_id: str
    images: tuple[ImageRecord, ...]
    seed: int
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prompt_truncated: bool = False
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: OUTCOME_SUCCEEDED, or OUTCOME_CANCELLED (then no images)
    outcome: str = OUTCOME_SUCCEEDED


@dataclasses.dataclass(frozen=True)
class PreviewRecord:
    """A small image of a job's current latents, carried by a progress event."""

    index: int
    width: int
    height: int
    media_type: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class ProgressEventRecord:
    """One event of a request's life on the progress topic (``event`` is a JobEvent value)."""

    request_id: str
    event: str
    timestamp_ms: int
    step: int = 0
    steps: int = 0
    elapsed_ms: float = 0.0
    reason: str | None = None
    message: str | None = None
    previews: tuple[PreviewRecord, ...] = ()
    queue_position: int | None = None


@dataclasses.dataclass(frozen=True)
class ControlCommandRecord:
    """A command about one request on the control topic (today: ``cancel``)."""

    command: str
    request_id: str
    issued_ms: int
    reason: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedRequestRecord:
    """encode role -> denoise role (EncodedRequest): the request, its text embeddings and, for
    img2img, the latents its denoising starts from; `orchestrator.core.roles.job_from_encoded`
    resumes from it."""

    #: width and height resolved (never None); init_image None (its latents travel instead)
    request: GenerationRequest
    #: float32, [negative, positive] when guided else [positive]: one row per prompt
    text_embeds: FloatArray
    #: img2img: the latents denoising starts from (scaled, repeated, noised), one per image;
    #: None for text-to-image (the denoise role draws the seed's noise)
    init_latents: FloatArray | None = None
    prompt_truncated: bool = False
    reply_topic: str | None = None
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_versions: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class DenoisedLatentsRecord:
    """denoise role -> decode role (DenoisedLatents): the final latents and what the answer
    needs; `orchestrator.core.roles.job_from_denoised` resumes from it."""

    #: width and height resolved (never None); init_image None
    request: GenerationRequest
    #: float32, [num_images, channels, height / f, width / f], before 1 / scaling_factor
    latents: FloatArray
    prompt_truncated: bool = False
    unet_calls: int = 0
    reply_topic: str | None = None
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_versions: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DecodedRequest:
    """A decoded request plus the wire-only facts the domain type does not carry."""

    request: GenerationRequest
    reply_topic: str | None
    schema_id: int


# ---------------------------------------------------------------------------------------------
# the codec


class SchemaNotLoaded(RuntimeError):
    """A registry-backed codec was asked to encode or decode before its async preparation."""


class AvroCodec:
    """Encode/decode requests and results in the Confluent Avro wire format.

    Writers use the current schema of each type (from ``schemas``) and the id the ``registry``
    gives it; readers resolve the writer schema named by the record's id against the current
    one. ``registry`` defaults to ``schemas`` itself (local ids from ``schema-ids.json``), which
    needs no I/O: with it every method works without :meth:`prepare` or :meth:`resolve`. With a
    remote registry, ``await prepare()`` before encoding and ``await resolve(data)`` before
    decoding ``data``; the sync methods then never do I/O.
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        schemas: LocalSchemaDirectory | None = None,
    ) -> None:
        self.schemas = schemas if schemas is not None else LocalSchemaDirectory()
        self.registry: SchemaRegistry = registry if registry is not None else self.schemas
        self._readers: dict[str, Any] = {
            name: fastavro.parse_schema(self.schemas.current(name)) for name in RECORD_TYPES
        }
        self._writer_ids: dict[str, int] = {}
        self._parsed_writers: dict[int, Any] = {}

    @property
    def _local(self) -> LocalSchemaDirectory | None:
        """The registry when it is a local directory (lookups need no I/O)."""
        return self.registry if isinstance(self.registry, LocalSchemaDirectory) else None

    async def prepare(self) -> dict[str, int]:
        """Register (or look up) every current schema now; returns full name -> schema id."""
        for name in RECORD_TYPES:
            if name not in self._writer_ids:
                # RecordNameStrategy: one subject per record type, whatever the topic
                self._writer_ids[name] = await self.registry.register(
                    name, self.schemas.current(name)
                )
        return dict(self._writer_ids)

    async def resolve(self, data: bytes) -> None:
        """Make sure the writer schema of the framed record ``data`` is loaded, so the sync
        decode methods work on it without I/O.

        Raises DecodeError (not a Confluent-framed record, or a writer schema that is not valid
        Avro), UnknownSchemaError (the registry does not know the id) or, retriable,
        SchemaRegistryUnavailable (the registry could not say).
        """
        schema_id = schema_id_of(data)
        if schema_id in self._parsed_writers:
            return
        raw = await self.registry.schema_by_id(schema_id)
        self._parsed_writers.setdefault(schema_id, _parse_writer(schema_id, raw))

    async def aclose(self) -> None:
        """Close the registry's connections."""
        await self.registry.aclose()

    def _writer_id(self, name: str) -> int:
        cached = self._writer_ids.get(name)
        if cached is not None:
            return cached
        local = self._local
        if local is None:
            raise SchemaNotLoaded(
                f"no schema id for {name} yet: await codec.prepare() before encoding"
            )
        schema_id = self._writer_ids[name] = local.id_of(name, self.schemas.current(name))
        return schema_id

    def _writer_schema(self, schema_id: int) -> Any:
        cached = self._parsed_writers.get(schema_id)
        if cached is not None:
            return cached
        local = self._local
        if local is None:
            raise SchemaNotLoaded(
                f"writer schema id {schema_id} is not loaded: await codec.resolve(data) "
                "before decoding"
            )
        parsed = self._parsed_writers[schema_id] = _parse_writer(schema_id, local.schema(schema_id))
        return parsed

    # -- generic -----------------------------------------------------------------------------

    def encode(self, name: str, datum: Mapping[str, Any]) -> bytes:
        """Frame and encode ``datum`` with the current schema ``name``."""
        schema_id = self._writer_id(name)
        buffer = io.BytesIO()
        try:
            fastavro.schemaless_writer(buffer, self._readers[name], dict(datum))
        except (ValueError, TypeError, AttributeError, OverflowError, struct.error) as exc:
            raise ValueError(f"cannot encode {name}: {exc}") from exc
        return frame(schema_id, buffer.getvalue())

    def decode(self, name: str, data: bytes) -> tuple[dict[str, Any], int]:
        """(datum as read with the current schema ``name``, writer schema id)."""
        schema_id, body = unframe(data)
        writer = self._writer_schema(schema_id)
        writer_name = writer.get("name") if isinstance(writer, dict) else None
        if writer_name != name:
            short = str(writer_name).rsplit(".", 1)[-1]
            raise DecodeError(
                f"schema id {schema_id} is {writer_name}, expected {name}; "
                f"was a {short} record sent to the wrong topic?"
            )
        buffer = io.BytesIO(body)
        try:
            datum = fastavro.schemaless_reader(buffer, writer, self._readers[name])
        except fastavro.read.SchemaResolutionError as exc:
            raise DecodeError(
                f"writer schema id {schema_id} cannot be read as the current {name}: {exc}"
            ) from exc
        except EOFError:
            raise DecodeError(
                f"truncated Avro body: {len(body)} bytes ended before a whole {name} "
                f"(schema id {schema_id}) was read"
            ) from None
        except Exception as exc:
            raise DecodeError(
                f"malformed Avro body for {name} (schema id {schema_id}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if buffer.tell() != len(body):
            raise DecodeError(
                f"{len(body) - buffer.tell()} unexpected bytes after the {name} Avro body "
                f"(schema id {schema_id}); was it written with another schema?"
            )
        if not isinstance(datum, dict):
            raise DecodeError(f"decoded {name} is not a record")
        return datum, schema_id

    # -- requests ----------------------------------------------------------------------------

    def encode_request(
        self, request: GenerationRequest, *, reply_topic: str | None = None
    ) -> bytes:
        deadline_ms = None if request.deadline is None else round(request.deadline * 1000)
        return self.encode(
            REQUEST_SCHEMA,
            {
                "request_id": request.request_id,
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "width": request.width,
                "height": request.height,
                "steps": request.steps,
                "guidance_scale": float(request.guidance_scale),
                "scheduler": request.scheduler,
                "seed": request.seed,
                "num_images": request.num_images,
                "init_image": request.init_image,
                "strength": float(request.strength),
                "reply_topic": reply_topic,
                "deadline_ms": deadline_ms,
                "metadata": dict(request.metadata),
                "priority": request.priority,
                "preview": bool(request.preview),
            },
        )

    def decode_request_record(self, data: bytes) -> DecodedRequest:
        """Decode a request with its reply topic and writer schema id."""
        datum, schema_id = self.decode(REQUEST_SCHEMA, data)
        try:
            deadline_ms = datum["deadline_ms"]
            request = GenerationRequest(
                request_id=_str(datum["request_id"]),
                prompt=_str(datum["prompt"]),
                negative_prompt=_str(datum["negative_prompt"]),
                width=_opt_int(datum["width"]),
                height=_opt_int(datum["height"]),
                steps=_int(datum["steps"]),
                guidance_scale=_float(datum["guidance_scale"]),
                scheduler=_str(datum["scheduler"]),
                seed=_int(datum["seed"]),
                num_images=_int(datum["num_images"]),
                init_image=_opt_bytes(datum["init_image"]),
                strength=_float(datum["strength"]),
                deadline=None if deadline_ms is None else _int(deadline_ms) / 1000.0,
                metadata=_str_map(datum["metadata"]),
                priority=_str(datum["priority"]),
                preview=_bool(datum["preview"]),
            )
            reply_topic = datum["reply_topic"]
            if reply_topic is not None:
                reply_topic = _str(reply_topic)
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"request (schema id {schema_id}) has a bad shape: {exc}") from exc
        return DecodedRequest(request=request, reply_topic=reply_topic, schema_id=schema_id)

    def decode_request(self, data: bytes) -> GenerationRequest:
        return self.decode_request_record(data).request

    # -- results -----------------------------------------------------------------------------

    def encode_result(self, result: GenerationResultRecord) -> bytes:
        return self.encode(
            RESULT_SCHEMA,
            {
                "request_id": result.request_id,
                "images": [
                    {
                        "index": img.index,
                        "png": img.png,
                        "uri": img.uri,
                        "width": img.width,
                        "height": img.height,
                    }
                    for img in result.images
                ],
                "seed": result.seed,
                "timings_ms": {k: float(v) for k, v in result.timings_ms.items()},
                "model_versions": dict(result.model_versions),
                "prompt_truncated": result.prompt_truncated,
                "metadata": dict(result.metadata),
                "outcome": result.outcome,
            },
        )

    def decode_result(self, data: bytes) -> GenerationResultRecord:
        datum, schema_id = self.decode(RESULT_SCHEMA, data)
        try:
            images = tuple(
                ImageRecord(
                    index=_int(img["index"]),
                    width=_int(img["width"]),
                    height=_int(img["height"]),
                    png=_opt_bytes(img["png"]),
                    uri=None if img["uri"] is None else _str(img["uri"]),
                )
                for img in datum["images"]
            )
            return GenerationResultRecord(
                request_id=_str(datum["request_id"]),
                images=images,
                seed=_int(datum["seed"]),
                timings_ms={_str(k): _float(v) for k, v in datum["timings_ms"].items()},
                model_versions=_str_map(datum["model_versions"]),
                prompt_truncated=bool(datum["prompt_truncated"]),
                metadata=_str_map(datum["metadata"]),
                outcome=_str(datum["outcome"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"result (schema id {schema_id}) has a bad shape: {exc}") from exc

    # -- progress events and control commands ------------------------------------------------

    def encode_progress(self, event: ProgressEventRecord) -> bytes:
        return self.encode(
            PROGRESS_SCHEMA,
            {
                "request_id": event.request_id,
                "event": event.event,
                "timestamp_ms": int(event.timestamp_ms),
                "step": int(event.step),
                "steps": int(event.steps),
                "elapsed_ms": float(event.elapsed_ms),
                "reason": event.reason,
                "message": event.message,
                "previews": [
                    {
                        "index": p.index,
                        "width": p.width,
                        "height": p.height,
                        "media_type": p.media_type,
                        "data": p.data,
                    }
                    for p in event.previews
                ],
                "queue_position": event.queue_position,
            },
        )

    def decode_progress(self, data: bytes) -> ProgressEventRecord:
        datum, schema_id = self.decode(PROGRESS_SCHEMA, data)
        try:
            return ProgressEventRecord(
                request_id=_str(datum["request_id"]),
                event=_str(datum["event"]),
                timestamp_ms=_int(datum["timestamp_ms"]),
                step=_int(datum["step"]),
                steps=_int(datum["steps"]),
                elapsed_ms=_float(datum["elapsed_ms"]),
                reason=_opt_str(datum["reason"]),
                message=_opt_str(datum["message"]),
                previews=tuple(
                    PreviewRecord(
                        index=_int(p["index"]),
                        width=_int(p["width"]),
                        height=_int(p["height"]),
                        media_type=_str(p["media_type"]),
                        data=_bytes(p["data"]),
                    )
                    for p in datum["previews"]
                ),
                queue_position=_opt_int(datum["queue_position"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(
                f"progress event (schema id {schema_id}) has a bad shape: {exc}"
            ) from exc

    def encode_control(self, command: ControlCommandRecord) -> bytes:
        return self.encode(
            CONTROL_SCHEMA,
            {
                "command": command.command,
                "request_id": command.request_id,
                "issued_ms": int(command.issued_ms),
                "reason": command.reason,
            },
        )

    def decode_control(self, data: bytes) -> ControlCommandRecord:
        datum, schema_id = self.decode(CONTROL_SCHEMA, data)
        try:
            return ControlCommandRecord(
                command=_str(datum["command"]),
                request_id=_str(datum["request_id"]),
                issued_ms=_int(datum["issued_ms"]),
                reason=_opt_str(datum["reason"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(
                f"control command (schema id {schema_id}) has a bad shape: {exc}"
            ) from exc

    # -- hand-offs between stage roles ---------------------------------------------------------

    def encode_encoded(self, record: EncodedRequestRecord) -> bytes:
        """An EncodedRequest record (encode role -> denoise role)."""
        return self.encode(
            ENCODED_SCHEMA,
            {
                **_handoff_request_datum(record.request),
                "reply_topic": record.reply_topic,
                "prompt_truncated": bool(record.prompt_truncated),
                "text_embeds": tensor_datum(record.text_embeds),
                "init_latents": (
                    None if record.init_latents is None else tensor_datum(record.init_latents)
                ),
                "timings_ms": {k: float(v) for k, v in record.timings_ms.items()},
                "model_versions": dict(record.model_versions),
            },
        )

    def decode_encoded(self, data: bytes) -> EncodedRequestRecord:
        """Decode an EncodedRequest; DecodeError naming the field for a bad tensor."""
        datum, schema_id = self.decode(ENCODED_SCHEMA, data)
        what = f"EncodedRequest (schema id {schema_id})"
        try:
            request = _handoff_request(datum)
            text_embeds = tensor_from_datum(datum["text_embeds"], "text_embeds", ndim=3)
            init_latents = None
            if datum["init_latents"] is not None:
                init_latents = tensor_from_datum(datum["init_latents"], "init_latents", ndim=4)
                if init_latents.shape[0] != request.num_images:
                    raise DecodeError(
                        f"init_latents: {init_latents.shape[0]} rows for num_images "
                        f"{request.num_images}"
                    )
            return EncodedRequestRecord(
                request=request,
                text_embeds=text_embeds,
                init_latents=init_latents,
                prompt_truncated=_bool(datum["prompt_truncated"]),
                reply_topic=_opt_str(datum["reply_topic"]),
                timings_ms={_str(k): _float(v) for k, v in datum["timings_ms"].items()},
                model_versions=_str_map(datum["model_versions"]),
            )
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"{what} has a bad shape: {exc}") from exc

    def encode_denoised(self, record: DenoisedLatentsRecord) -> bytes:
        """A DenoisedLatents record (denoise role -> decode role)."""
        return self.encode(
            DENOISED_SCHEMA,
            {
                **_handoff_request_datum(record.request),
                "reply_topic": record.reply_topic,
                "prompt_truncated": bool(record.prompt_truncated),
                "unet_calls": int(record.unet_calls),
                "latents": tensor_datum(record.latents),
                "timings_ms": {k: float(v) for k, v in record.timings_ms.items()},
                "model_versions": dict(record.model_versions),
            },
        )

    def decode_denoised(self, data: bytes) -> DenoisedLatentsRecord:
        """Decode a DenoisedLatents; DecodeError naming the field for a bad tensor."""
        datum, schema_id = self.decode(DENOISED_SCHEMA, data)
        what = f"DenoisedLatents (schema id {schema_id})"
        try:
            request = _handoff_request(datum)
            latents = tensor_from_datum(datum["latents"], "latents", ndim=4)
            if latents.shape[0] != request.num_images:
                raise DecodeError(
                    f"latents: {latents.shape[0]} rows for num_images {request.num_images}"
                )
            return DenoisedLatentsRecord(
                request=request,
                latents=latents,
                prompt_truncated=_bool(datum["prompt_truncated"]),
                unet_calls=_int(datum["unet_calls"]),
                reply_topic=_opt_str(datum["reply_topic"]),
                timings_ms={_str(k): _float(v) for k, v in datum["timings_ms"].items()},
                model_versions=_str_map(datum["model_versions"]),
            )
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"{what} has a bad shape: {exc}") from exc


def tensor_datum(array: FloatArray) -> dict[str, Any]:
    """A hand-off Tensor datum: float16 when that loses nothing (every value is a float16, as
    an fp16 model's outputs are), else float32; C order, little endian."""
    wide = np.ascontiguousarray(array, dtype="<f4")
    narrow = wide.astype("<f2")
    lossless = np.array_equal(narrow.astype("<f4"), wide, equal_nan=True)
    chosen = narrow if lossless else wide
    return {
        "dtype": "float16" if lossless else "float32",
        "shape": [int(d) for d in chosen.shape],
        "data": chosen.tobytes(order="C"),
    }


def tensor_from_datum(datum: Any, field: str, *, ndim: int) -> FloatArray:
    """A float32 array (a private, writable copy) from a Tensor datum; DecodeError naming
    `field` for an unknown dtype, a bad shape or a byte count that does not match it."""
    if not isinstance(datum, Mapping):
        raise DecodeError(f"{field}: expected a Tensor record, got {type(datum).__name__}")
    dtype_name = datum.get("dtype")
    dtype = TENSOR_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise DecodeError(f"{field}: dtype {dtype_name!r} is not one of {', '.join(TENSOR_DTYPES)}")
    shape = datum.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise DecodeError(f"{field}: shape {shape!r} is not {ndim} positive dimensions")
    data = datum.get("data")
    if not isinstance(data, bytes):
        raise DecodeError(f"{field}: data is {type(data).__name__}, expected bytes")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DecodeError(
            f"{field}: {len(data)} bytes of data, expected {expected} for {dtype_name} "
            f"{tuple(shape)}"
        )
    out: FloatArray = np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.float32)
    return out


def _handoff_request_datum(request: GenerationRequest) -> dict[str, Any]:
    """The request fields both hand-off records carry (no init image; size resolved)."""
    if request.width is None or request.height is None:
        raise ValueError("a hand-off record needs the resolved width and height")
    deadline_ms = None if request.deadline is None else round(request.deadline * 1000)
    return {
        "request_id": request.request_id,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": float(request.guidance_scale),
        "scheduler": request.scheduler,
        "seed": request.seed,
        "num_images": request.num_images,
        "strength": float(request.strength),
        "deadline_ms": deadline_ms,
        "metadata": dict(request.metadata),
        "priority": request.priority,
        "preview": bool(request.preview),
    }


def _handoff_request(datum: Mapping[str, Any]) -> GenerationRequest:
    deadline_ms = datum["deadline_ms"]
    return GenerationRequest(
        request_id=_str(datum["request_id"]),
        prompt=_str(datum["prompt"]),
        negative_prompt=_str(datum["negative_prompt"]),
        width=_int(datum["width"]),
        height=_int(datum["height"]),
        steps=_int(datum["steps"]),
        guidance_scale=_float(datum["guidance_scale"]),
        scheduler=_str(datum["scheduler"]),
        seed=_int(datum["seed"]),
        num_images=_int(datum["num_images"]),
        strength=_float(datum["strength"]),
        deadline=None if deadline_ms is None else _int(deadline_ms) / 1000.0,
        metadata=_str_map(datum["metadata"]),
        priority=_str(datum["priority"]),
        preview=_bool(datum["preview"]),
    )


def _parse_writer(schema_id: int, raw: Any) -> Any:
    try:
        return fastavro.parse_schema(raw)
    except Exception as exc:
        raise DecodeError(
            f"writer schema id {schema_id} is not a valid Avro schema: {exc}"
        ) from exc


def make_codec(settings: Settings) -> AvroCodec:
    """The codec the settings describe: local schema ids, or a schema registry."""
    schemas = LocalSchemaDirectory(settings.schema_dir) if settings.schema_dir else None
    registry: SchemaRegistry | None = None
    if settings.schema_registry_url:
        password = settings.schema_registry_password
        registry = HttpSchemaRegistry(
            settings.schema_registry_url,
            username=settings.schema_registry_username,
            password=None if password is None else password.get_secret_value(),
            ca_file=settings.schema_registry_ca_file,
            cert_file=settings.schema_registry_cert_file,
            key_file=settings.schema_registry_key_file,
            timeout_s=settings.schema_registry_timeout_s,
            negative_ttl_s=settings.schema_registry_negative_ttl_s,
        )
    return AvroCodec(registry=registry, schemas=schemas)


# ---------------------------------------------------------------------------------------------
# strict conversions of decoded values (Avro already typed them; these keep mypy honest)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else _bytes(value)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a map, got {type(value).__name__}")
    return {_str(k): _str(v) for k, v in value.items()}


__all__: Sequence[str] = (
    "COMMAND_CANCEL",
    "CONTROL_SCHEMA",
    "DENOISED_SCHEMA",
    "ENCODED_SCHEMA",
    "HEADER_SIZE",
    "MAGIC_BYTE",
    "OUTCOME_CANCELLED",
    "OUTCOME_SUCCEEDED",
    "PROGRESS_SCHEMA",
    "RECORD_TYPES",
    "REQUEST_SCHEMA",
    "RESULT_SCHEMA",
    "AvroCodec",
    "ControlCommandRecord",
    "DecodedRequest",
    "DenoisedLatentsRecord",
    "EncodedRequestRecord",
    "GenerationResultRecord",
    "ImageRecord",
    "PreviewRecord",
    "ProgressEventRecord",
    "SchemaNotLoaded",
    "frame",
    "make_codec",
    "schema_id_of",
    "tensor_datum",
    "tensor_from_datum",
    "unframe",
)
