"""Avro records on the wire: the Confluent framing, schema ids, schema evolution.

Wire format (Confluent): ``0x00`` magic byte, 4-byte big-endian schema id, Avro binary body.
The writer schema is looked up by id in a :class:`SchemaRegistry`; the reader schema is the
current version from ``avro/``, so older writers decode through Avro schema resolution (new
fields take their defaults).

Every decoding failure becomes :class:`~orchestrator.errors.DecodeError` (or its subclass
:class:`~orchestrator.errors.UnknownSchemaError`); fastavro's own exceptions never leave here.
Field ranges are not checked here (the core validates); types and shapes are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import fastavro
import fastavro.schema

from orchestrator.domain import GeneratedImages, GenerationRequest
from orchestrator.errors import DecodeError, OrchestratorError, UnknownSchemaError, reason_of
from orchestrator.imagefile import encode_png

MAGIC_BYTE: Final = 0
HEADER_SIZE: Final = 5
NAMESPACE: Final = "ai.orchestrator.v1"
REQUEST_SCHEMA: Final = f"{NAMESPACE}.GenerationRequest"
RESULT_SCHEMA: Final = f"{NAMESPACE}.GenerationResult"
FAILURE_SCHEMA: Final = f"{NAMESPACE}.GenerationFailure"
#: the ``avro/`` folder of this repository
DEFAULT_SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "avro"
IDS_FILE: Final = "schema-ids.json"

Schema = dict[str, Any]


class SchemaRegistryUnavailable(OrchestratorError):
    """The schema registry could not be reached; the record itself may be fine."""

    retriable = True
    reason = "schema_registry_unavailable"


def fingerprint(schema: Any) -> str:
    """sha256 (hex) of the Avro parsing canonical form: equal for equivalent schemas."""
    parsed = fastavro.parse_schema(schema, _write_hint=False)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def schema_name(schema: Mapping[str, Any]) -> str:
    """Full name of a named schema (namespace.name)."""
    name = str(schema.get("name", ""))
    namespace = schema.get("namespace")
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


@runtime_checkable
class SchemaRegistry(Protocol):
    """Where writer schemas live, by id (a local directory or a Confluent Schema Registry)."""

    def schema_by_id(self, schema_id: int) -> Schema:
        """The writer schema with this id. Raises UnknownSchemaError when there is none."""
        ...

    def register(self, subject: str, schema: Schema) -> int:
        """The id of ``schema`` under ``subject``, registering it if the registry allows."""
        ...


class LocalSchemaDirectory:
    """Schemas from a folder of ``.avsc`` files with permanent ids in ``schema-ids.json``.

    ``schema-ids.json`` maps id -> file and the schema's fingerprint. Ids are never reused and
    listed files never edited (a changed fingerprint is refused at load), so a record written
    with an old id always resolves to the schema it was written with. The current schema of a
    record type is the one with the highest id among those of that full name.
    """

    def __init__(self, path: str | Path = DEFAULT_SCHEMA_DIR) -> None:
        self.path = Path(path)
        ids_path = self.path / IDS_FILE
        try:
            listing = json.loads(ids_path.read_text(encoding="utf-8"))
            entries: Mapping[str, Any] = listing["schemas"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read schema ids from {ids_path}: {exc}") from exc
        self._by_id: dict[int, Schema] = {}
        self._by_fingerprint: dict[str, int] = {}
        self._current: dict[str, int] = {}
        for key, entry in entries.items():
            schema_id = int(key)
            file = self.path / str(entry["file"])
            schema = json.loads(file.read_text(encoding="utf-8"))
            actual = fingerprint(schema)
            if actual != entry["fingerprint"]:
                raise ValueError(
                    f"{file} changed after id {schema_id} was assigned to it (fingerprint "
                    f"{actual} != {entry['fingerprint']}); published schemas are immutable: "
                    "restore the file and add the new version as a new file with a new id"
                )
            self._by_id[schema_id] = schema
            self._by_fingerprint[actual] = schema_id
            name = schema_name(schema)
            if schema_id > self._current.get(name, -1):
                self._current[name] = schema_id

    @property
    def ids(self) -> dict[int, str]:
        """id -> full record name, for every known schema."""
        return {i: schema_name(s) for i, s in sorted(self._by_id.items())}

    def current_id(self, name: str) -> int:
        try:
            return self._current[name]
        except KeyError:
            raise UnknownSchemaError(f"no schema named {name} in {self.path}") from None

    def current(self, name: str) -> Schema:
        """The newest schema (highest id) of the record type ``name``."""
        return self._by_id[self.current_id(name)]

    def schema_by_id(self, schema_id: int) -> Schema:
        try:
            return self._by_id[schema_id]
        except KeyError:
            known = ", ".join(str(i) for i in sorted(self._by_id))
            raise UnknownSchemaError(
                f"unknown schema id {schema_id} (known ids in {self.path / IDS_FILE}: {known}); "
                "was the record written against another schema registry?"
            ) from None

    def register(self, subject: str, schema: Schema) -> int:
        try:
            return self._by_fingerprint[fingerprint(schema)]
        except KeyError:
            raise UnknownSchemaError(
                f"schema for subject {subject} is not listed in {self.path / IDS_FILE}; "
                "add it there with a new id"
            ) from None


class HttpSchemaRegistry:
    """A Confluent Schema Registry over its REST API (stdlib urllib), with caches.

    ``GET /schemas/ids/{id}`` for writer schemas, ``POST /subjects/{subject}/versions`` to
    register (idempotent: an existing identical schema returns its id). Calls block; the codec
    caches results, and :meth:`AvroCodec.prepare` registers everything once at start-up.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._auth_header: str | None = None
        if auth is not None:
            import base64

            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self._auth_header = f"Basic {token}"
        self._by_id: dict[int, Schema] = {}
        self._registered: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/vnd.schemaregistry.v1+json")
        if data is not None:
            request.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        if self._auth_header:
            request.add_header("Authorization", self._auth_header)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def schema_by_id(self, schema_id: int) -> Schema:
        with self._lock:
            cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        try:
            answer = self._call("GET", f"/schemas/ids/{schema_id}")
            schema_type = answer.get("schemaType", "AVRO")
            if schema_type != "AVRO":
                raise DecodeError(f"schema id {schema_id} is a {schema_type} schema, not Avro")
            schema = json.loads(answer["schema"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise UnknownSchemaError(
                    f"unknown schema id {schema_id} at schema registry {self.url}"
                ) from None
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} answered HTTP {exc.code} for id {schema_id}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} unreachable: {exc}"
            ) from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DecodeError(
                f"schema registry returned an unreadable schema for id {schema_id}: {exc}"
            ) from exc
        if not isinstance(schema, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        with self._lock:
            self._by_id[schema_id] = schema
        return schema

    def register(self, subject: str, schema: Schema) -> int:
        key = (subject, fingerprint(schema))
        with self._lock:
            cached = self._registered.get(key)
        if cached is not None:
            return cached
        quoted = urllib.parse.quote(subject, safe="")
        try:
            answer = self._call(
                "POST", f"/subjects/{quoted}/versions", {"schema": json.dumps(schema)}
            )
            schema_id = int(answer["id"])
        except urllib.error.HTTPError as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} refused subject {subject}: HTTP {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} unreachable: {exc}"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} gave no id for {subject}: {exc}"
            ) from exc
        with self._lock:
            self._registered[key] = schema_id
            self._by_id[schema_id] = schema
        return schema_id


# ---------------------------------------------------------------------------------------------
# wire framing


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix an Avro body with the Confluent header."""
    return struct.pack(">bI", MAGIC_BYTE, schema_id) + body


def unframe(data: bytes) -> tuple[int, bytes]:
    """Split a Confluent-framed record into (schema id, Avro body); DecodeError if it is not."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"record value must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DecodeError("empty record value (a tombstone?); expected a Confluent Avro record")
    if data[0] != MAGIC_BYTE:
        hint = ""
        if data[:1] in (b"{", b"["):
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
    return schema_id, data[HEADER_SIZE:]


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


@dataclasses.dataclass(frozen=True)
class GenerationFailureRecord:
    """Why a request failed, as sent to a reply topic / dead-letter topic."""

    error_class: str
    reason: str
    message: str
    request_id: str | None = None
    stage: str | None = None


@dataclasses.dataclass(frozen=True)
class DecodedRequest:
    """A decoded request plus the wire-only facts the domain type does not carry."""

    request: GenerationRequest
    reply_topic: str | None
    schema_id: int


def result_record(
    request_id: str,
    generated: GeneratedImages,
    *,
    metadata: Mapping[str, str] | None = None,
) -> GenerationResultRecord:
    """Build the result record of a finished job, PNG-encoding each image inline."""
    images = tuple(
        ImageRecord(index=i, width=int(img.shape[1]), height=int(img.shape[0]), png=encode_png(img))
        for i, img in enumerate(generated.images)
    )
    return GenerationResultRecord(
        request_id=request_id,
        images=images,
        seed=generated.seed,
        timings_ms=dict(generated.timings_ms),
        model_versions=dict(generated.model_versions),
        prompt_truncated=generated.prompt_truncated,
        metadata=dict(metadata or {}),
    )


def failure_record(exc: BaseException, request_id: str | None = None) -> GenerationFailureRecord:
    """Describe an exception as a failure record (reason strings from orchestrator.errors)."""
    stage = exc.stage if isinstance(exc, OrchestratorError) else None
    message = exc.message if isinstance(exc, OrchestratorError) else str(exc)
    return GenerationFailureRecord(
        error_class=type(exc).__qualname__,
        reason=reason_of(exc),
        message=message,
        request_id=request_id,
        stage=stage,
    )


# ---------------------------------------------------------------------------------------------
# the codec


class AvroCodec:
    """Encode/decode requests, results and failures in the Confluent Avro wire format.

    Writers use the current schema of each type (from ``schemas``) and the id the ``registry``
    gives it; readers resolve the writer schema named by the record's id against the current
    one. ``registry`` defaults to ``schemas`` itself (local ids from ``schema-ids.json``).
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        schemas: LocalSchemaDirectory | None = None,
    ) -> None:
        self.schemas = schemas if schemas is not None else LocalSchemaDirectory()
        self.registry: SchemaRegistry = registry if registry is not None else self.schemas
        self._readers: dict[str, Any] = {}
        self._writer_ids: dict[str, int] = {}
        self._parsed_writers: dict[int, Any] = {}
        self._lock = threading.Lock()
        for name in (REQUEST_SCHEMA, RESULT_SCHEMA, FAILURE_SCHEMA):
            self._readers[name] = fastavro.parse_schema(self.schemas.current(name))

    def prepare(self) -> dict[str, int]:
        """Register (or look up) every current schema now; returns full name -> schema id."""
        return {name: self._writer_id(name) for name in self._readers}

    def _writer_id(self, name: str) -> int:
        cached = self._writer_ids.get(name)
        if cached is not None:
            return cached
        # RecordNameStrategy: one subject per record type, whatever the topic
        schema_id = self.registry.register(name, self.schemas.current(name))
        with self._lock:
            self._writer_ids[name] = schema_id
        return schema_id

    def _writer_schema(self, schema_id: int) -> Any:
        cached = self._parsed_writers.get(schema_id)
        if cached is not None:
            return cached
        raw = self.registry.schema_by_id(schema_id)
        try:
            parsed = fastavro.parse_schema(raw)
        except Exception as exc:
            raise DecodeError(
                f"writer schema id {schema_id} is not a valid Avro schema: {exc}"
            ) from exc
        with self._lock:
            self._parsed_writers[schema_id] = parsed
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
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"result (schema id {schema_id}) has a bad shape: {exc}") from exc

    # -- failures ----------------------------------------------------------------------------

    def encode_failure(self, failure: GenerationFailureRecord) -> bytes:
        return self.encode(FAILURE_SCHEMA, dataclasses.asdict(failure))

    def decode_failure(self, data: bytes) -> GenerationFailureRecord:
        datum, schema_id = self.decode(FAILURE_SCHEMA, data)
        try:
            return GenerationFailureRecord(
                error_class=_str(datum["error_class"]),
                reason=_str(datum["reason"]),
                message=_str(datum["message"]),
                request_id=None if datum["request_id"] is None else _str(datum["request_id"]),
                stage=None if datum["stage"] is None else _str(datum["stage"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"failure (schema id {schema_id}) has a bad shape: {exc}") from exc


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


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _opt_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a map, got {type(value).__name__}")
    return {_str(k): _str(v) for k, v in value.items()}


__all__: Sequence[str] = (
    "DEFAULT_SCHEMA_DIR",
    "FAILURE_SCHEMA",
    "MAGIC_BYTE",
    "REQUEST_SCHEMA",
    "RESULT_SCHEMA",
    "AvroCodec",
    "DecodedRequest",
    "GenerationFailureRecord",
    "GenerationResultRecord",
    "HttpSchemaRegistry",
    "ImageRecord",
    "LocalSchemaDirectory",
    "SchemaRegistry",
    "SchemaRegistryUnavailable",
    "encode_png",
    "failure_record",
    "fingerprint",
    "frame",
    "result_record",
    "schema_name",
    "unframe",
)
