"""The async schema registry client against a registry-compatible HTTP server run in-process:
basic auth, TLS, timeouts, 5xx vs 404, the negative cache and its TTL, shared lookups."""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pydantic
import pytest
import trustme

from orchestrator.adapters.avro import (
    CONTROL_SCHEMA,
    DENOISED_SCHEMA,
    ENCODED_SCHEMA,
    PROGRESS_SCHEMA,
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    AvroCodec,
    SchemaNotLoaded,
    frame,
    make_codec,
)
from orchestrator.adapters.child_process import free_port
from orchestrator.adapters.schema_registry import (
    HttpSchemaRegistry,
    LocalSchemaDirectory,
    SchemaRegistryAuthError,
    SchemaRegistryError,
    SchemaRegistryUnavailable,
)
from orchestrator.config import load_settings
from orchestrator.domain import GenerationRequest
from orchestrator.errors import DecodeError, UnknownSchemaError
from tests.registry_server import RegistryServer

USER, PASSWORD = "registry-user", "registry-secret"
V2 = LocalSchemaDirectory().schema(2)
REQUEST = GenerationRequest(prompt="a kite", request_id="r-1", seed=5, metadata={"k": "v"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[RegistryServer]:
    async with RegistryServer(USER, PASSWORD) as running:
        yield running


def client(server: RegistryServer, **kwargs: object) -> HttpSchemaRegistry:
    options: dict[object, object] = {"username": USER, "password": PASSWORD, **kwargs}
    return HttpSchemaRegistry(server.url, **options)  # type: ignore[arg-type]


async def test_register_and_look_up_with_basic_auth(server: RegistryServer) -> None:
    writer = client(server)
    schema_id = await writer.register(REQUEST_SCHEMA, V2)
    assert schema_id == 100
    assert await writer.register(REQUEST_SCHEMA, V2) == 100
    assert server.posts[REQUEST_SCHEMA] == 1, "a registered schema is cached"
    reader = client(server)
    assert await reader.schema_by_id(schema_id) == V2
    assert await reader.schema_by_id(schema_id) == V2
    assert server.gets[schema_id] == 1, "a schema is fetched once, then cached"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert server.auth_headers == {f"Basic {token}"}
    assert server.unauthorized == 0
    await writer.aclose()
    await reader.aclose()


async def test_wrong_or_missing_credentials_raise_a_clear_auth_error(
    server: RegistryServer,
) -> None:
    for registry in (
        client(server, password="wrong"),
        HttpSchemaRegistry(server.url),
    ):
        with pytest.raises(SchemaRegistryAuthError, match=r"refused our credentials.*HTTP 401"):
            await registry.register(REQUEST_SCHEMA, V2)
        with pytest.raises(SchemaRegistryAuthError) as info:
            await registry.schema_by_id(100)
        assert info.value.retriable, "records wait for the registry, they are not dead-lettered"
        await registry.aclose()
    assert server.unauthorized == 4


async def test_unknown_id_is_remembered_until_the_ttl_passes(server: RegistryServer) -> None:
    clock = Clock()
    registry = client(server, negative_ttl_s=30.0, clock=clock)
    with pytest.raises(UnknownSchemaError, match=r"unknown schema id 7 .*40403") as info:
        await registry.schema_by_id(7)
    assert not info.value.retriable and info.value.reason == "unknown_schema"
    for _ in range(5):
        with pytest.raises(UnknownSchemaError):
            await registry.schema_by_id(7)
    assert server.gets[7] == 1 and registry.negative_hits == 5
    clock.now += 29.9
    with pytest.raises(UnknownSchemaError):
        await registry.schema_by_id(7)
    assert server.gets[7] == 1
    # the id is registered meanwhile: after the TTL the registry is asked again
    server.schemas[7] = '{"type": "record", "name": "R", "fields": []}'
    clock.now += 0.2
    assert (await registry.schema_by_id(7))["name"] == "R"
    assert server.gets[7] == 2
    await registry.aclose()


async def test_negative_ttl_zero_asks_every_time_and_the_cache_is_bounded(
    server: RegistryServer,
) -> None:
    uncached = client(server, negative_ttl_s=0.0)
    for _ in range(3):
        with pytest.raises(UnknownSchemaError):
            await uncached.schema_by_id(8)
    assert server.gets[8] == 3
    bounded = client(server, negative_cache_size=2)
    for schema_id in (20, 21, 22, 20):
        with pytest.raises(UnknownSchemaError):
            await bounded.schema_by_id(schema_id)
    assert [server.gets[i] for i in (20, 21, 22)] == [2, 1, 1], "the oldest id was evicted"
    await uncached.aclose()
    await bounded.aclose()


async def test_concurrent_lookups_of_one_id_share_one_request_without_blocking_the_loop(
    server: RegistryServer,
) -> None:
    known = server.add(V2)
    server.delay_s = 0.3
    registry = client(server)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    results = await asyncio.gather(
        *(registry.schema_by_id(i) for i in [known] * 20 + [5000 + n % 5 for n in range(50)]),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    tick.cancel()
    assert results[:20] == [V2] * 20
    assert all(isinstance(r, UnknownSchemaError) for r in results[20:])
    assert server.gets[known] == 1
    assert [server.gets[5000 + n] for n in range(5)] == [1] * 5
    assert elapsed < 1.5, f"lookups ran one after another ({elapsed:.2f} s)"
    assert max(lags) < 0.2, f"the event loop stalled {max(lags):.2f} s"
    await registry.aclose()


async def test_a_cancelled_caller_does_not_fail_the_others(server: RegistryServer) -> None:
    known = server.add(V2)
    server.delay_s = 0.3
    registry = client(server)
    first = asyncio.create_task(registry.schema_by_id(known))
    second = asyncio.create_task(registry.schema_by_id(known))
    await asyncio.sleep(0.1)
    first.cancel()
    assert await second == V2
    assert first.cancelled()
    assert server.gets[known] == 1
    await registry.aclose()


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_5xx_is_unavailable_and_not_remembered(server: RegistryServer, status: int) -> None:
    known = server.add(V2)
    registry = client(server)
    server.fail_with = status
    with pytest.raises(SchemaRegistryUnavailable, match=f"HTTP {status}") as info:
        await registry.schema_by_id(known)
    assert info.value.retriable and info.value.reason == "schema_registry_unavailable"
    with pytest.raises(SchemaRegistryUnavailable):
        await registry.register(REQUEST_SCHEMA, V2)
    server.fail_with = None
    assert await registry.schema_by_id(known) == V2
    await registry.aclose()


async def test_other_4xx_are_refusals_not_retried(server: RegistryServer) -> None:
    registry = client(server)
    server.fail_with = 409
    with pytest.raises(SchemaRegistryError, match="incompatible") as info:
        await registry.register(REQUEST_SCHEMA, V2)
    assert not info.value.retriable
    server.fail_with = 400
    with pytest.raises(SchemaRegistryError, match="HTTP 400") as info:
        await registry.schema_by_id(1)
    assert not info.value.retriable
    await registry.aclose()


async def test_timeout_is_unavailable(server: RegistryServer) -> None:
    server.delay_s = 3.0
    registry = client(server, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(SchemaRegistryUnavailable, match=r"did not answer .* within 0.3 s"):
        await registry.schema_by_id(server.add(V2))
    assert time.monotonic() - started < 1.5
    await registry.aclose()


async def test_connection_refused_is_unavailable() -> None:
    registry = HttpSchemaRegistry(f"http://127.0.0.1:{free_port()}", timeout_s=2.0)
    with pytest.raises(SchemaRegistryUnavailable, match="unreachable") as info:
        await registry.schema_by_id(1)
    assert info.value.retriable
    await registry.aclose()


async def test_registry_restarted_on_the_same_port_answers_again(
    server: RegistryServer,
) -> None:
    known = server.add(V2)
    registry = client(server)
    await registry.register(RESULT_SCHEMA, LocalSchemaDirectory().schema(3))  # opens a connection
    await server.stop()
    with pytest.raises(SchemaRegistryUnavailable):
        await registry.schema_by_id(known)
    await server.start()
    assert await registry.schema_by_id(known) == V2
    await registry.aclose()


async def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("orchestrator@example.test")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"
    for blob in client_cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    client_cert.private_key_pem.write_to_path(str(key_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    async with RegistryServer(USER, PASSWORD, ssl_context=context) as server:
        known = server.add(V2)
        good = client(server, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        assert await good.schema_by_id(known) == V2
        await good.aclose()
        no_client_cert = client(server, ca_file=ca_file)
        with pytest.raises(SchemaRegistryUnavailable):
            await no_client_cert.schema_by_id(known)
        await no_client_cert.aclose()
        unknown_ca = client(server, cert_file=cert_file, key_file=key_file)
        with pytest.raises(SchemaRegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await unknown_ca.schema_by_id(known)
        await unknown_ca.aclose()
        unverified = client(server, cert_file=cert_file, key_file=key_file, verify=False)
        assert await unverified.schema_by_id(known) == V2
        await unverified.aclose()
    assert server.gets[known] == 2


def test_bad_settings_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not carry credentials"):
        HttpSchemaRegistry("http://u:p@127.0.0.1:1")
    with pytest.raises(ValueError, match="both a user name and a password"):
        HttpSchemaRegistry("http://127.0.0.1:1", username="u")
    with pytest.raises(ValueError, match=r"TLS settings \(CA file\) need an https:// URL"):
        HttpSchemaRegistry("http://127.0.0.1:1", ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="client key needs its client certificate"):
        HttpSchemaRegistry("https://127.0.0.1:1", key_file=tmp_path / "k.pem")
    with pytest.raises(ValueError, match=r"TLS files .* cannot be loaded"):
        HttpSchemaRegistry("https://127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="http"):
        HttpSchemaRegistry("kafka://127.0.0.1:1")


async def test_codec_through_the_registry_resolves_then_decodes_without_io(
    server: RegistryServer,
) -> None:
    writer = AvroCodec(client(server))
    ids = await writer.prepare()
    assert ids == {
        REQUEST_SCHEMA: 100,
        RESULT_SCHEMA: 101,
        PROGRESS_SCHEMA: 102,
        CONTROL_SCHEMA: 103,
        ENCODED_SCHEMA: 104,
        DENOISED_SCHEMA: 105,
    }
    data = writer.encode_request(REQUEST, reply_topic="replies")
    assert struct.unpack(">I", data[1:5]) == (100,)
    reader = AvroCodec(client(server))
    with pytest.raises(SchemaNotLoaded, match=r"await codec\.resolve"):
        reader.decode_request(data)
    with pytest.raises(SchemaNotLoaded, match=r"await codec\.prepare"):
        reader.encode_request(REQUEST)
    await reader.resolve(data)
    await reader.resolve(data)
    assert server.gets[100] == 1
    decoded = reader.decode_request_record(data)
    assert decoded.request == REQUEST and decoded.reply_topic == "replies"
    with pytest.raises(UnknownSchemaError):
        await reader.resolve(frame(4242, b""))
    with pytest.raises(DecodeError, match="magic byte"):
        await reader.resolve(b"\x01\x00\x00\x00\x64")
    server.schemas[300] = '{"type": "record", "name": "Bad", "fields": [{"name": "x"}]}'
    with pytest.raises(DecodeError, match="not a valid Avro schema"):
        await reader.resolve(frame(300, b""))
    await writer.aclose()
    await reader.aclose()


async def test_make_codec_builds_the_registry_from_settings(
    server: RegistryServer, tmp_path: Path
) -> None:
    settings = load_settings(
        None,
        schema_registry_url=server.url,
        schema_registry_username=USER,
        schema_registry_password=PASSWORD,
        schema_registry_timeout_s=2.5,
        schema_registry_negative_ttl_s=12,
    )
    assert PASSWORD not in repr(settings)
    codec = make_codec(settings)
    assert isinstance(codec.registry, HttpSchemaRegistry)
    assert codec.registry.timeout_s == 2.5 and codec.registry.negative_ttl_s == 12
    assert await codec.prepare() == {
        REQUEST_SCHEMA: 100,
        RESULT_SCHEMA: 101,
        PROGRESS_SCHEMA: 102,
        CONTROL_SCHEMA: 103,
        ENCODED_SCHEMA: 104,
        DENOISED_SCHEMA: 105,
    }
    await codec.aclose()
    assert isinstance(make_codec(load_settings(None)).registry, LocalSchemaDirectory)
    with pytest.raises(ValueError, match="both a user name and a password"):
        make_codec(settings.model_copy(update={"schema_registry_password": None}))
    with pytest.raises(pydantic.ValidationError, match="schema_registry_ca_file"):
        load_settings(None, schema_registry_ca_file=tmp_path / "missing.pem")
    with pytest.raises(pydantic.ValidationError, match="schema_registry_negative_ttl_s"):
        load_settings(None, schema_registry_negative_ttl_s=-1)
