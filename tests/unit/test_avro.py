"""Avro codec: round trips, schema evolution, and every decoding failure kind."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import struct
from pathlib import Path

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.adapters.avro import (
    CONTROL_SCHEMA,
    DENOISED_SCHEMA,
    ENCODED_SCHEMA,
    OUTCOME_CANCELLED,
    PROGRESS_SCHEMA,
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    AvroCodec,
    ControlCommandRecord,
    DenoisedLatentsRecord,
    EncodedRequestRecord,
    GenerationResultRecord,
    ImageRecord,
    PreviewRecord,
    ProgressEventRecord,
    frame,
)
from orchestrator.adapters.schema_registry import (
    DEFAULT_SCHEMA_DIR,
    IDS_FILE,
    LocalSchemaDirectory,
    fingerprint,
    schema_name,
)
from orchestrator.domain import GenerationRequest
from orchestrator.errors import DecodeError, UnknownSchemaError
from orchestrator.imagefile import encode_png

FAILURE_SCHEMA = "ai.orchestrator.v1.GenerationFailure"

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
    priority="high",
    preview=True,
)


#: every schema id ever assigned, with the fingerprint it was assigned to. Append a line when
#: avro/schema-ids.json gets a new id; never change or remove a line.
ID_HISTORY = {
    1: (REQUEST_SCHEMA, "b7d1b597647572aba0bf0a6badfb258808df5f534cd38e6a365457881ac4f3a3"),
    2: (REQUEST_SCHEMA, "64b33e2a21b66d7519409e00a9778106f83b726e6a79e296c0256f412a0fd52d"),
    3: (RESULT_SCHEMA, "ca9e7388c8e9a1aa6e50022e7a470f0c09febbddb5b903fb71a9abdeb626f452"),
    4: (FAILURE_SCHEMA, "958c3ba96168b1741dd506ac97ff0b6f47dba581af32a82fab749a96d6dfb4a1"),
    5: (PROGRESS_SCHEMA, "2452fb6fe75e37398dee02c02723d364625bb5763d383c48e86a7bf64648a3f7"),
    6: (CONTROL_SCHEMA, "8694a34bb90f57f742d32d34db277b359ed9d4dff78f9b623805ef5f967980cd"),
    7: (REQUEST_SCHEMA, "c8cfcfed013101f99e61531f0a98fc77641bcd6bb3faadd09ccec10193504abd"),
    8: (RESULT_SCHEMA, "64f32c4ae147bc94d2d5e715e55f1fdbd874373136cceeddba5ec2779d69315a"),
    9: (ENCODED_SCHEMA, "4cac51e47275f6f03faf3aaef1de155d704f257dbdb1718fe978cf05633b4eb5"),
    10: (DENOISED_SCHEMA, "527c07a149780fe3b5d5a236d0d5ad9131ce623c3280367e05321d75c9a22360"),
}


async def test_schema_ids_are_stable() -> None:
    directory = LocalSchemaDirectory()
    assert directory.ids == {
        1: REQUEST_SCHEMA,
        2: REQUEST_SCHEMA,
        3: RESULT_SCHEMA,
        5: PROGRESS_SCHEMA,
        6: CONTROL_SCHEMA,
        7: REQUEST_SCHEMA,
        8: RESULT_SCHEMA,
        9: ENCODED_SCHEMA,
        10: DENOISED_SCHEMA,
    }
    assert directory.retired_ids == {4: FAILURE_SCHEMA}
    assert await AvroCodec().prepare() == {
        REQUEST_SCHEMA: 7,
        RESULT_SCHEMA: 8,
        PROGRESS_SCHEMA: 5,
        CONTROL_SCHEMA: 6,
        ENCODED_SCHEMA: 9,
        DENOISED_SCHEMA: 10,
    }


def test_no_schema_id_is_ever_reused() -> None:
    """Every id ever assigned is still listed, live or retired, with the same schema, and a
    new id is the next one after all of them."""
    listing = json.loads((DEFAULT_SCHEMA_DIR / IDS_FILE).read_text())
    directory = LocalSchemaDirectory()
    now: dict[int, tuple[str, str]] = {}
    for key in listing["schemas"]:
        schema = directory.schema(int(key))
        now[int(key)] = (schema_name(schema), fingerprint(schema))
    for key, entry in listing["retired"].items():
        assert int(key) not in now, f"id {key} is both live and retired"
        now[int(key)] = (entry["name"], entry["fingerprint"])
    for schema_id, (name, print_) in ID_HISTORY.items():
        assert schema_id in now, f"id {schema_id} ({name}) disappeared: retire it, never drop it"
        assert now[schema_id] == (name, print_), f"id {schema_id} was given to another schema"
    new = sorted(set(now) - set(ID_HISTORY))
    assert new == list(range(len(ID_HISTORY) + 1, len(ID_HISTORY) + 1 + len(new))), (
        f"new ids {new} must follow the highest id ever assigned ({max(ID_HISTORY)}); "
        "add them to ID_HISTORY"
    )
    assert len({p for _, p in now.values()}) == len(now), "one schema listed under two ids"


def test_loader_refuses_an_id_both_live_and_retired(tmp_path: Path) -> None:
    copy = tmp_path / "avro"
    shutil.copytree(DEFAULT_SCHEMA_DIR, copy)
    listing = json.loads((copy / IDS_FILE).read_text())
    listing["schemas"]["4"] = listing["schemas"]["3"]  # a result schema under the retired id
    (copy / IDS_FILE).write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="id 4 is retired"):
        LocalSchemaDirectory(copy)


def test_retired_id_is_unknown_and_says_why() -> None:
    with pytest.raises(UnknownSchemaError, match=r"schema id 4 .*GenerationFailure.* is retired"):
        CODEC.decode_request(frame(4, b"\x00"))


async def test_resolve_with_local_ids() -> None:
    codec = AvroCodec()
    data = codec.encode_request(FULL_REQUEST)
    await codec.resolve(data)  # known locally: no I/O, no error
    assert codec.decode_request(data) == FULL_REQUEST
    with pytest.raises(UnknownSchemaError, match="unknown schema id 999"):
        await codec.resolve(frame(999, b""))
    with pytest.raises(DecodeError, match="expected magic byte 0"):
        await codec.resolve(b'{"prompt": "json"}')
    with pytest.raises(DecodeError, match="shorter than the 5-byte"):
        await codec.resolve(b"\x00\x00")


def test_request_round_trip() -> None:
    data = CODEC.encode_request(FULL_REQUEST, reply_topic="replies")
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5]) == (7,)
    decoded = CODEC.decode_request_record(data)
    assert decoded.request == FULL_REQUEST
    assert decoded.reply_topic == "replies"
    assert decoded.schema_id == 7


def test_request_defaults_round_trip() -> None:
    request = GenerationRequest(prompt="x", request_id="r")
    decoded = CODEC.decode_request_record(CODEC.encode_request(request))
    assert decoded.request == request
    assert decoded.reply_topic is None


def test_v1_writer_is_read_by_current_reader() -> None:
    """A record written with the frozen v1 schema (id 1) decodes; new fields take defaults."""
    v1 = fastavro.parse_schema(LocalSchemaDirectory().schema(1))
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


def _write_with(schema_id: int, datum: dict[str, object]) -> bytes:
    schema = fastavro.parse_schema(LocalSchemaDirectory().schema(schema_id))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, datum)
    return frame(schema_id, buffer.getvalue())


def test_v2_writer_gets_normal_priority_and_no_preview() -> None:
    """A v2 request (id 2, before priority and preview) reads with their defaults."""
    v2 = {
        "request_id": "v2-1",
        "prompt": "p",
        "negative_prompt": "",
        "width": None,
        "height": None,
        "steps": 5,
        "guidance_scale": 7.5,
        "scheduler": "pndm",
        "seed": 1,
        "num_images": 1,
        "init_image": None,
        "strength": 0.8,
        "reply_topic": "diffusion.replies.x",
        "deadline_ms": None,
        "metadata": {},
    }
    decoded = CODEC.decode_request_record(_write_with(2, v2))
    assert decoded.schema_id == 2
    assert decoded.reply_topic == "diffusion.replies.x"
    assert decoded.request.priority == "normal"
    assert decoded.request.preview is False


def test_v1_result_reads_as_succeeded_and_cancelled_round_trips() -> None:
    v1 = {
        "request_id": "r",
        "images": [],
        "seed": 3,
        "timings_ms": {},
        "model_versions": {},
        "prompt_truncated": False,
        "metadata": {},
    }
    assert CODEC.decode_result(_write_with(3, v1)).outcome == "succeeded"
    cancelled = GenerationResultRecord(request_id="r", images=(), seed=3, outcome=OUTCOME_CANCELLED)
    data = CODEC.encode_result(cancelled)
    assert struct.unpack(">I", data[1:5]) == (8,)
    assert CODEC.decode_result(data) == cancelled


def test_progress_event_round_trip() -> None:
    event = ProgressEventRecord(
        request_id="req-1",
        event="step",
        timestamp_ms=1_800_000_000_123,
        step=3,
        steps=20,
        elapsed_ms=41.5,
        previews=(PreviewRecord(0, 32, 32, "image/jpeg", b"\xff\xd8 jpeg"),),
    )
    data = CODEC.encode_progress(event)
    assert struct.unpack(">I", data[1:5]) == (5,)
    assert CODEC.decode_progress(data) == event
    failed = ProgressEventRecord(
        "req-2", "failed", 1, reason="deadline_exceeded", message="late", queue_position=4
    )
    assert CODEC.decode_progress(CODEC.encode_progress(failed)) == failed


def test_control_command_round_trip_and_wrong_topic() -> None:
    command = ControlCommandRecord("cancel", "req-1", 1_800_000_000_000, reason="user")
    data = CODEC.encode_control(command)
    assert struct.unpack(">I", data[1:5]) == (6,)
    assert CODEC.decode_control(data) == command
    # a control record read as a request names the mix-up
    with pytest.raises(DecodeError, match="ControlCommand record sent to the wrong topic"):
        CODEC.decode_request(data)


def test_result_round_trip_with_png() -> None:
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[2:4, 3:5] = (255, 0, 10)
    record = GenerationResultRecord(
        request_id="req-1",
        images=(ImageRecord(index=0, width=12, height=8, png=encode_png(image)),),
        seed=99,
        timings_ms={"unet": 12.5, "vae": 3.0},
        model_versions={"unet": "1"},
        prompt_truncated=True,
        metadata={"k": "v"},
    )
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
    data = CODEC.encode_result(GenerationResultRecord("r", (), 1))
    with pytest.raises(DecodeError, match=r"expected ai\.orchestrator\.v1\.GenerationRequest"):
        CODEC.decode_request(data)
    with pytest.raises(DecodeError, match=r"expected ai\.orchestrator\.v1\.GenerationResult"):
        CODEC.decode_result(CODEC.encode_request(FULL_REQUEST))


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
    for decode in (CODEC.decode_request, CODEC.decode_result):
        with contextlib.suppress(DecodeError):
            decode(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from((1, 2, 3, 4)), st.binary(max_size=120))
def test_fuzz_valid_header_random_body(schema_id: int, body: bytes) -> None:
    for decode in (CODEC.decode_request, CODEC.decode_result):
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
# hand-offs between stage roles

HANDOFF_REQUEST = GenerationRequest(
    prompt="a lighthouse at dusk",
    negative_prompt="blurry",
    seed=2**40 + 3,
    steps=30,
    scheduler="euler_a",
    guidance_scale=6.25,
    width=512,
    height=768,
    num_images=2,
    strength=0.55,
    request_id="req-42",
    deadline=1_700_000_123.456,
    metadata={"tenant": "t1"},
    priority="high",
    preview=True,
)


def test_encoded_request_round_trips_with_float16_only_where_lossless() -> None:
    rng = np.random.default_rng(1)
    half = rng.standard_normal((2, 77, 32), dtype=np.float32).astype(np.float16)
    embeds = half.astype(np.float32)  # an fp16 encoder's values: float16 on the wire
    init = rng.standard_normal((2, 4, 96, 64), dtype=np.float32)  # not fp16-exact: float32
    record = EncodedRequestRecord(
        request=HANDOFF_REQUEST,
        text_embeds=embeds,
        init_latents=init,
        prompt_truncated=True,
        reply_topic="replies",
        timings_ms={"encode_prompt": 12.5},
        model_versions={"text_encoder": "3"},
    )
    data = CODEC.encode_encoded(record)
    back = CODEC.decode_encoded(data)
    assert back.request == HANDOFF_REQUEST
    assert back.text_embeds.dtype == np.float32 and np.array_equal(back.text_embeds, embeds)
    assert back.init_latents is not None and np.array_equal(back.init_latents, init)
    assert back.init_latents.flags.writeable
    assert (back.prompt_truncated, back.reply_topic) == (True, "replies")
    assert back.timings_ms == {"encode_prompt": 12.5}
    assert back.model_versions == {"text_encoder": "3"}
    # embeddings at 2 bytes a value, latents at 4
    assert len(data) > embeds.size * 2 + init.size * 4
    assert len(data) < embeds.size * 4 + init.size * 4
    txt2img = CODEC.decode_encoded(
        CODEC.encode_encoded(dataclasses.replace(record, init_latents=None))
    )
    assert txt2img.init_latents is None


def test_denoised_latents_round_trip() -> None:
    latents = np.random.default_rng(2).standard_normal((2, 4, 96, 64), dtype=np.float32)
    record = DenoisedLatentsRecord(
        request=HANDOFF_REQUEST, latents=latents, prompt_truncated=False, unet_calls=30
    )
    back = CODEC.decode_denoised(CODEC.encode_denoised(record))
    assert back.request == HANDOFF_REQUEST and back.unet_calls == 30
    assert back.latents.dtype == np.float32 and np.array_equal(back.latents, latents)
    assert back.reply_topic is None and back.timings_ms == {}


def test_handoff_needs_the_resolved_size() -> None:
    record = DenoisedLatentsRecord(
        request=dataclasses.replace(HANDOFF_REQUEST, width=None),
        latents=np.zeros((2, 4, 8, 8), dtype=np.float32),
    )
    with pytest.raises(ValueError, match="resolved width and height"):
        CODEC.encode_denoised(record)


def _denoised_datum(**tensor: object) -> dict[str, object]:
    latents = {"dtype": "float32", "shape": [2, 4, 8, 8], "data": bytes(2 * 4 * 8 * 8 * 4)}
    latents.update(tensor)
    return {
        "request_id": "r",
        "prompt": "p",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.5,
        "scheduler": "pndm",
        "seed": 1,
        "num_images": 2,
        "strength": 0.8,
        "latents": latents,
    }


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"dtype": "bfloat16"}, r"latents: dtype 'bfloat16' is not one of float16, float32"),
        ({"shape": [2, 4, 8]}, r"latents: shape \[2, 4, 8\] is not 4 positive dimensions"),
        ({"shape": [2, 4, 0, 8]}, r"latents: shape .* is not 4 positive dimensions"),
        ({"data": bytes(10)}, r"latents: 10 bytes of data, expected 2048 for float32"),
        ({"dtype": "float16"}, r"latents: 2048 bytes of data, expected 1024 for float16"),
        ({"shape": [3, 4, 8, 8], "data": bytes(3 * 256 * 4)}, "latents: 3 rows for num_images 2"),
    ],
)
def test_bad_handoff_tensors_are_decode_errors_naming_the_field(
    tensor: dict[str, object], message: str
) -> None:
    data = CODEC.encode(DENOISED_SCHEMA, _denoised_datum(**tensor))
    with pytest.raises(DecodeError, match=r"DenoisedLatents \(schema id 10\): " + message):
        CODEC.decode_denoised(data)


def test_bad_init_latents_rows_name_the_field() -> None:
    record = EncodedRequestRecord(
        request=HANDOFF_REQUEST,
        text_embeds=np.zeros((2, 77, 8), dtype=np.float32),
        init_latents=np.zeros((3, 4, 8, 8), dtype=np.float32),
    )
    with pytest.raises(DecodeError, match="init_latents: 3 rows for num_images 2"):
        CODEC.decode_encoded(CODEC.encode_encoded(record))
    with pytest.raises(DecodeError, match=r"schema id 10 is .*DenoisedLatents, expected .*Encoded"):
        CODEC.decode_encoded(
            CODEC.encode_denoised(
                DenoisedLatentsRecord(HANDOFF_REQUEST, np.zeros((2, 4, 8, 8), np.float32))
            )
        )
