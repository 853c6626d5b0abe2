"""Avro codec: round trips, schema evolution, and every decoding failure kind."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.adapters.avro import (
    DEFAULT_SCHEMA_DIR,
    FAILURE_SCHEMA,
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    AvroCodec,
    GenerationFailureRecord,
    GenerationResultRecord,
    HttpSchemaRegistry,
    ImageRecord,
    LocalSchemaDirectory,
    SchemaRegistryUnavailable,
    failure_record,
    frame,
    result_record,
)
from orchestrator.domain import GeneratedImages, GenerationRequest
from orchestrator.errors import DecodeError, UnknownSchemaError, ValidationError

CODEC = AvroCodec()

FULL_REQUEST = GenerationRequest(
    prompt="a lighthouse at dusk",
    negative_prompt="blurry",
    seed=2**40 + 3,
    steps=30,
    scheduler="euler_a",
    guidance_scale=6.25,
    width=512,
    height=768,
    num_images=2,
    init_image=b"\x89PNG fake",
    strength=0.55,
    request_id="req-42",
    deadline=1_700_000_123.456,
    metadata={"tenant": "t1", "trace": "abc"},
)


def test_schema_ids_are_stable() -> None:
    directory = LocalSchemaDirectory()
    assert directory.ids == {
        1: REQUEST_SCHEMA,
        2: REQUEST_SCHEMA,
        3: RESULT_SCHEMA,
        4: FAILURE_SCHEMA,
    }
    assert CODEC.prepare() == {REQUEST_SCHEMA: 2, RESULT_SCHEMA: 3, FAILURE_SCHEMA: 4}


def test_request_round_trip() -> None:
    data = CODEC.encode_request(FULL_REQUEST, reply_topic="replies")
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5]) == (2,)
    decoded = CODEC.decode_request_record(data)
    assert decoded.request == FULL_REQUEST
    assert decoded.reply_topic == "replies"
    assert decoded.schema_id == 2


def test_request_defaults_round_trip() -> None:
    request = GenerationRequest(prompt="x", request_id="r")
    decoded = CODEC.decode_request_record(CODEC.encode_request(request))
    assert decoded.request == request
    assert decoded.reply_topic is None


def test_v1_writer_is_read_by_current_reader() -> None:
    """A record written with the frozen v1 schema (id 1) decodes; new fields take defaults."""
    v1 = fastavro.parse_schema(LocalSchemaDirectory().schema_by_id(1))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(
        buffer,
        v1,
        {
            "request_id": "old-1",
            "prompt": "an old client",
            "negative_prompt": "",
            "width": None,
            "height": 256,
            "steps": 10,
            "guidance_scale": 5.0,
            "scheduler": "ddim",
            "seed": 7,
            "num_images": 1,
        },
    )
    decoded = CODEC.decode_request_record(frame(1, buffer.getvalue()))
    assert decoded.schema_id == 1
    assert decoded.reply_topic is None
    assert decoded.request == GenerationRequest(
        prompt="an old client",
        request_id="old-1",
        height=256,
        steps=10,
        guidance_scale=5.0,
        scheduler="ddim",
        seed=7,
        metadata={},
        deadline=None,
        init_image=None,
        strength=0.8,
    )


def test_result_round_trip_with_png() -> None:
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[2:4, 3:5] = (255, 0, 10)
    generated = GeneratedImages(
        images=(image,),
        seed=99,
        timings_ms={"unet": 12.5, "vae": 3.0},
        model_versions={"unet": "1"},
        prompt_truncated=True,
    )
    record = result_record("req-1", generated, metadata={"k": "v"})
    decoded = CODEC.decode_result(CODEC.encode_result(record))
    assert decoded == record
    assert decoded.images[0].width == 12 and decoded.images[0].height == 8
    from PIL import Image

    png = decoded.images[0].png
    assert png is not None
    back = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(back, image)


def test_result_with_uri() -> None:
    record = GenerationResultRecord(
        request_id="r",
        images=(ImageRecord(index=0, width=4, height=4, uri="s3://b/k.png"),),
        seed=1,
    )
    assert CODEC.decode_result(CODEC.encode_result(record)) == record


def test_failure_round_trip() -> None:
    record = failure_record(ValidationError("steps", "must be in [1, 150]"), request_id="r9")
    assert record.reason == "invalid_request"
    assert record.stage == "validate"
    assert record.error_class == "ValidationError"
    assert CODEC.decode_failure(CODEC.encode_failure(record)) == record
    anonymous = GenerationFailureRecord(error_class="X", reason="internal_error", message="m")
    assert CODEC.decode_failure(CODEC.encode_failure(anonymous)) == anonymous


def test_wrong_magic_byte_names_the_fix() -> None:
    with pytest.raises(DecodeError, match=r"expected magic byte 0, got 0x7b.*JSON.*Confluent"):
        CODEC.decode_request(b'{"prompt": "hi"}')


def test_too_short_and_empty() -> None:
    with pytest.raises(DecodeError, match="shorter than the 5-byte"):
        CODEC.decode_request(b"\x00\x00\x02")
    with pytest.raises(DecodeError, match="empty record"):
        CODEC.decode_request(b"")


def test_unknown_schema_id() -> None:
    with pytest.raises(UnknownSchemaError, match="unknown schema id 999"):
        CODEC.decode_request(frame(999, b"\x00"))


def test_schema_of_another_type_is_refused() -> None:
    data = CODEC.encode_failure(GenerationFailureRecord("E", "r", "m"))
    with pytest.raises(DecodeError, match=r"expected ai\.orchestrator\.v1\.GenerationRequest"):
        CODEC.decode_request(data)


def test_truncated_and_trailing_bytes() -> None:
    data = CODEC.encode_request(FULL_REQUEST)
    for cut in range(5, len(data)):
        with pytest.raises(DecodeError):
            CODEC.decode_request(data[:cut])
    with pytest.raises(DecodeError, match="unexpected bytes after"):
        CODEC.decode_request(data + b"\x00\x01")


def test_decode_error_is_not_retriable() -> None:
    with pytest.raises(DecodeError) as info:
        CODEC.decode_request(b"\x01")
    assert info.value.retriable is False
    assert info.value.reason == "malformed_record"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_decode_error(data: bytes) -> None:
    for decode in (CODEC.decode_request, CODEC.decode_result, CODEC.decode_failure):
        with contextlib.suppress(DecodeError):
            decode(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from((1, 2, 3, 4)), st.binary(max_size=120))
def test_fuzz_valid_header_random_body(schema_id: int, body: bytes) -> None:
    for decode in (CODEC.decode_request, CODEC.decode_result, CODEC.decode_failure):
        with contextlib.suppress(DecodeError):
            decode(frame(schema_id, body))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=5), st.integers(min_value=0, max_value=255), st.data())
def test_fuzz_mutated_valid_record(position: int, value: int, data: st.DataObject) -> None:
    original = CODEC.encode_request(FULL_REQUEST, reply_topic="t")
    index = position % len(original)
    mutated = original[:index] + bytes([value]) + original[index + 1 :]
    cut = data.draw(st.integers(min_value=0, max_value=len(mutated)))
    with contextlib.suppress(DecodeError):
        CODEC.decode_request(mutated[:cut])


def test_edited_schema_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "avro"
    shutil.copytree(DEFAULT_SCHEMA_DIR, copy)
    path = copy / "generation_request.v1.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append({"name": "extra", "type": "int", "default": 0})
    path.write_text(json.dumps(schema))
    with pytest.raises(ValueError, match="immutable"):
        LocalSchemaDirectory(copy)


# ---------------------------------------------------------------------------------------------
# a tiny fake Confluent Schema Registry


class _FakeRegistry(BaseHTTPRequestHandler):
    schemas: dict[int, str] = {}  # noqa: RUF012
    subjects: dict[str, int] = {}  # noqa: RUF012

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        prefix = "/schemas/ids/"
        if self.path.startswith(prefix):
            schema_id = int(self.path[len(prefix) :])
            if schema_id in self.schemas:
                self._answer(200, {"schema": self.schemas[schema_id]})
                return
        self._answer(404, {"error_code": 40403, "message": "Schema not found"})

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        subject = self.path.split("/")[2]
        for schema_id, text in self.schemas.items():
            if text == body["schema"]:
                self._answer(200, {"id": schema_id})
                return
        schema_id = 100 + len(self.schemas)
        self.schemas[schema_id] = body["schema"]
        self.subjects[subject] = schema_id
        self._answer(200, {"id": schema_id})


@pytest.fixture
def fake_registry() -> Iterator[str]:
    _FakeRegistry.schemas = {}
    _FakeRegistry.subjects = {}
    server = HTTPServer(("127.0.0.1", 0), _FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_schema_registry(fake_registry: str) -> None:
    codec = AvroCodec(HttpSchemaRegistry(fake_registry))
    ids = codec.prepare()
    assert sorted(ids.values()) == [100, 101, 102]
    assert set(_FakeRegistry.subjects) == {REQUEST_SCHEMA, RESULT_SCHEMA, FAILURE_SCHEMA}
    data = codec.encode_request(FULL_REQUEST)
    assert struct.unpack(">I", data[1:5]) == (ids[REQUEST_SCHEMA],)
    # a fresh client (no cache) resolves the writer schema over HTTP
    fresh = AvroCodec(HttpSchemaRegistry(fake_registry))
    assert fresh.decode_request(data) == FULL_REQUEST
    with pytest.raises(UnknownSchemaError):
        fresh.decode_request(frame(7, b""))


def test_http_schema_registry_unreachable() -> None:
    codec = AvroCodec(HttpSchemaRegistry("http://127.0.0.1:9", timeout_s=1.0))
    with pytest.raises(SchemaRegistryUnavailable) as info:
        codec.decode_request(frame(1, b""))
    assert info.value.retriable
