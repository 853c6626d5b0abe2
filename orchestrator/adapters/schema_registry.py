"""Where writer schemas live, by id: a local folder with permanent ids, or a schema registry.

Two implementations of one async port, :class:`SchemaRegistry`:

- :class:`LocalSchemaDirectory` reads ``avro/`` (``.avsc`` files, permanent ids in
  ``schema-ids.json``); it never does I/O after construction.
- :class:`HttpSchemaRegistry` speaks the Confluent Schema Registry REST API with aiohttp: a
  per-request timeout, basic auth, TLS (CA file, client certificate, verification), a cache of
  schemas by id, a negative cache with a TTL for ids the registry does not know, and one request
  per id however many records ask for it at once.

Errors say whether waiting helps: :class:`SchemaRegistryUnavailable` (connection refused,
timeout, 5xx, 429; and :class:`SchemaRegistryAuthError` for refused credentials) is retriable,
the record itself may be fine; an id the registry does not know raises
:class:`~orchestrator.errors.UnknownSchemaError`, which is not.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import hashlib
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import aiohttp
import fastavro
import fastavro.schema

from orchestrator.errors import DecodeError, OrchestratorError, UnknownSchemaError
from orchestrator.resources import avro_dir

#: the ``avro/`` folder shipped with the package
DEFAULT_SCHEMA_DIR: Final = avro_dir()
IDS_FILE: Final = "schema-ids.json"
#: the media type the Confluent REST API speaks
REGISTRY_MEDIA_TYPE: Final = "application/vnd.schemaregistry.v1+json"

Schema = dict[str, Any]


class SchemaRegistryError(OrchestratorError):
    """The schema registry refused a call for a reason waiting will not fix (409, 422...)."""

    reason = "schema_registry_error"


class SchemaRegistryUnavailable(SchemaRegistryError):
    """The schema registry could not be reached or answered 5xx; the record itself may be fine."""

    retriable = True
    reason = "schema_registry_unavailable"


class SchemaRegistryAuthError(SchemaRegistryUnavailable):
    """The registry refused our credentials (401/403). Records wait (retriable) until they
    work again; at start-up it means the settings are wrong and the service must not start."""

    reason = "schema_registry_auth"


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

    async def schema_by_id(self, schema_id: int) -> Schema:
        """The writer schema with this id. Raises UnknownSchemaError when there is none,
        SchemaRegistryUnavailable when the registry cannot say."""
        ...

    async def register(self, subject: str, schema: Schema) -> int:
        """The id of ``schema`` under ``subject``, registering it if the registry allows."""
        ...

    async def aclose(self) -> None:
        """Release connections (a no-op for a local directory)."""
        ...


class LocalSchemaDirectory:
    """Schemas from a folder of ``.avsc`` files with permanent ids in ``schema-ids.json``.

    ``schema-ids.json`` maps id -> file and the schema's fingerprint under ``schemas``; ids no
    longer in use stay under ``retired`` (id -> name and fingerprint) so they are never given
    to another schema. Listed files are never edited (a changed fingerprint is refused at load),
    so a record written with an old id always resolves to the schema it was written with. The
    current schema of a record type is the one with the highest live id of that full name.
    """

    def __init__(self, path: str | Path = DEFAULT_SCHEMA_DIR) -> None:
        self.path = Path(path)
        ids_path = self.path / IDS_FILE
        try:
            listing = json.loads(ids_path.read_text(encoding="utf-8"))
            entries: Mapping[str, Any] = listing["schemas"]
            retired: Mapping[str, Any] = listing.get("retired", {})
            self._retired: dict[int, Mapping[str, Any]] = {int(k): v for k, v in retired.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"cannot read schema ids from {ids_path}: {exc}") from exc
        self._by_id: dict[int, Schema] = {}
        self._by_fingerprint: dict[str, int] = {}
        self._current: dict[str, int] = {}
        for key, entry in entries.items():
            schema_id = int(key)
            if schema_id in self._retired:
                raise ValueError(
                    f"{ids_path}: id {schema_id} is retired ({self._retired[schema_id]}) and "
                    "cannot be given to another schema; use the next unused id"
                )
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
        """id -> full record name, for every live schema."""
        return {i: schema_name(s) for i, s in sorted(self._by_id.items())}

    @property
    def retired_ids(self) -> dict[int, str]:
        """id -> full record name, for every retired id (never to be given again)."""
        return {i: str(e.get("name", "")) for i, e in sorted(self._retired.items())}

    def current_id(self, name: str) -> int:
        try:
            return self._current[name]
        except KeyError:
            raise UnknownSchemaError(f"no schema named {name} in {self.path}") from None

    def current(self, name: str) -> Schema:
        """The newest schema (highest id) of the record type ``name``."""
        return self._by_id[self.current_id(name)]

    def schema(self, schema_id: int) -> Schema:
        """The schema with this id (no I/O). Raises UnknownSchemaError."""
        try:
            return self._by_id[schema_id]
        except KeyError:
            pass
        if schema_id in self._retired:
            raise UnknownSchemaError(
                f"schema id {schema_id} ({self.retired_ids[schema_id]}) is retired in "
                f"{self.path / IDS_FILE}; records written with it are no longer read"
            )
        known = ", ".join(str(i) for i in sorted(self._by_id))
        raise UnknownSchemaError(
            f"unknown schema id {schema_id} (known ids in {self.path / IDS_FILE}: {known}); "
            "was the record written against another schema registry?"
        )

    def id_of(self, subject: str, schema: Schema) -> int:
        """The listed id of ``schema`` (no I/O). Raises UnknownSchemaError."""
        try:
            return self._by_fingerprint[fingerprint(schema)]
        except KeyError:
            raise UnknownSchemaError(
                f"schema for subject {subject} is not listed in {self.path / IDS_FILE}; "
                "add it there with a new id"
            ) from None

    async def schema_by_id(self, schema_id: int) -> Schema:
        return self.schema(schema_id)

    async def register(self, subject: str, schema: Schema) -> int:
        return self.id_of(subject, schema)

    async def aclose(self) -> None:
        return None


class HttpSchemaRegistry:
    """A Confluent Schema Registry over its REST API, without blocking the event loop.

    ``GET /schemas/ids/{id}`` for writer schemas, ``POST /subjects/{subject}/versions`` to
    register (idempotent: an existing identical schema returns its id). Schemas are cached by
    id for good (an id's schema never changes); an id the registry does not know is remembered
    for ``negative_ttl_s`` (0: not remembered), up to ``negative_cache_size`` ids, so a stream
    of records with made-up ids costs one request per id per TTL. Concurrent lookups of one id
    share one request. The HTTP session is made on first use in the running event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        verify: bool = True,
        timeout_s: float = 5.0,
        negative_ttl_s: float = 60.0,
        negative_cache_size: int = 100_000,
        max_connections: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"schema registry URL must be http(s)://host[:port][/path], got {url!r}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "schema registry URL must not carry credentials; set the registry user name and "
                "password settings instead"
            )
        if (username is None) != (password is None):
            raise ValueError("schema registry basic auth needs both a user name and a password")
        tls_files = {"CA file": ca_file, "client certificate": cert_file, "client key": key_file}
        if parts.scheme == "http" and (any(tls_files.values()) or not verify):
            given = ", ".join(k for k, v in tls_files.items() if v) or "verify=False"
            raise ValueError(f"schema registry TLS settings ({given}) need an https:// URL")
        if key_file is not None and cert_file is None:
            raise ValueError("a schema registry client key needs its client certificate")
        if timeout_s <= 0 or negative_ttl_s < 0 or negative_cache_size < 1 or max_connections < 1:
            raise ValueError("schema registry timeout, TTL, cache size and connections are bounded")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.negative_ttl_s = negative_ttl_s
        self.negative_cache_size = negative_cache_size
        self.max_connections = max_connections
        self._clock = clock
        self._headers = {"Accept": REGISTRY_MEDIA_TYPE}
        if username is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._ssl: ssl.SSLContext | bool = True
        if parts.scheme == "https":
            self._ssl = _ssl_context(ca_file, cert_file, key_file, verify)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._by_id: dict[int, Schema] = {}
        #: id -> (monotonic expiry, message) of ids the registry said it does not know
        self._unknown: collections.OrderedDict[int, tuple[float, str]] = collections.OrderedDict()
        self._pending: dict[int, asyncio.Task[Schema]] = {}
        self._registered: dict[tuple[str, str], int] = {}
        #: HTTP requests sent, and lookups answered from the negative cache (for tests, metrics)
        self.requests_sent = 0
        self.negative_hits = 0

    def __repr__(self) -> str:
        return f"HttpSchemaRegistry({self.url!r})"

    # -- the port ----------------------------------------------------------------------------

    async def schema_by_id(self, schema_id: int) -> Schema:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        unknown = self._known_unknown(schema_id)
        if unknown is not None:
            self.negative_hits += 1
            raise UnknownSchemaError(unknown)
        task = self._pending.get(schema_id)
        if task is None:
            task = asyncio.create_task(self._fetch(schema_id))
            self._pending[schema_id] = task
            task.add_done_callback(functools.partial(self._fetched, schema_id))
        # shielded: one caller's cancellation must not fail the others' shared lookup
        return await asyncio.shield(task)

    async def register(self, subject: str, schema: Schema) -> int:
        key = (subject, fingerprint(schema))
        cached = self._registered.get(key)
        if cached is not None:
            return cached
        quoted = urllib.parse.quote(subject, safe="")
        what = f"registering subject {subject}"
        status, body = await self._request(
            "POST", f"/subjects/{quoted}/versions", {"schema": json.dumps(schema)}, what
        )
        if status == 200:
            try:
                schema_id = int(body["id"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SchemaRegistryError(
                    f"schema registry {self.url} gave no id when {what}: {body!r}"
                ) from exc
            self._registered[key] = schema_id
            self._by_id[schema_id] = schema
            self._unknown.pop(schema_id, None)
            return schema_id
        if status == 409:
            raise SchemaRegistryError(
                f"schema registry {self.url} refused the schema of subject {subject} as "
                f"incompatible with its registered versions (HTTP 409: {_message(body)})"
            )
        raise self._failure(status, body, what)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # -- internals ---------------------------------------------------------------------------

    async def _fetch(self, schema_id: int) -> Schema:
        what = f"schema id {schema_id}"
        status, body = await self._request("GET", f"/schemas/ids/{schema_id}", None, what)
        if status == 404:  # Confluent error 40403: schema not found
            message = (
                f"unknown schema id {schema_id} at schema registry {self.url} "
                f"({_message(body)}); was the record written against another registry?"
            )
            self._remember_unknown(schema_id, message)
            raise UnknownSchemaError(message)
        if status != 200:
            raise self._failure(status, body, what)
        try:
            schema_type = body.get("schemaType", "AVRO")
            text = body["schema"]
        except (AttributeError, KeyError) as exc:
            raise SchemaRegistryError(
                f"schema registry {self.url} answered {what} without a schema: {body!r}"
            ) from exc
        if schema_type != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {schema_type} schema, not Avro")
        try:
            schema = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"schema id {schema_id} is not readable JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        self._by_id[schema_id] = schema
        return schema

    def _fetched(self, schema_id: int, task: asyncio.Task[Schema]) -> None:
        self._pending.pop(schema_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here: its callers may all have been cancelled

    def _known_unknown(self, schema_id: int) -> str | None:
        entry = self._unknown.get(schema_id)
        if entry is None:
            return None
        expires, message = entry
        if self._clock() >= expires:
            del self._unknown[schema_id]
            return None
        return message

    def _remember_unknown(self, schema_id: int, message: str) -> None:
        if self.negative_ttl_s <= 0:
            return
        self._unknown[schema_id] = (self._clock() + self.negative_ttl_s, message)
        self._unknown.move_to_end(schema_id)
        while len(self._unknown) > self.negative_cache_size:
            self._unknown.popitem(last=False)

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # a session belongs to the loop it was made in; a new loop gets its own
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=self._headers,
            )
            self._session_loop = loop
        return self._session

    async def _request(self, method: str, path: str, body: Any, what: str) -> tuple[int, Any]:
        """(HTTP status, JSON body or None); raises SchemaRegistryUnavailable when no answer."""
        session = self._session_here()
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {} if data is None else {"Content-Type": REGISTRY_MEDIA_TYPE}
        self.requests_sent += 1
        try:
            async with session.request(
                method, self.url + path, data=data, headers=headers
            ) as response:
                status = response.status
                raw = await response.read()
        except TimeoutError as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} did not answer {what} within {self.timeout_s:g} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise SchemaRegistryUnavailable(
                f"schema registry {self.url} unreachable ({what}): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw[:200].decode("utf-8", "replace")

    def _failure(self, status: int, body: Any, what: str) -> SchemaRegistryError:
        detail = f"HTTP {status}: {_message(body)}"
        if status in (401, 403):
            return SchemaRegistryAuthError(
                f"schema registry {self.url} refused our credentials ({what}; {detail}); check "
                "the registry user name and password settings"
            )
        if status >= 500 or status in (408, 429):
            return SchemaRegistryUnavailable(f"schema registry {self.url} failed {what} ({detail})")
        return SchemaRegistryError(f"schema registry {self.url} refused {what} ({detail})")


def _message(body: Any) -> str:
    """The registry's own words: Confluent errors are {"error_code": ..., "message": ...}."""
    if isinstance(body, Mapping):
        code = body.get("error_code")
        message = body.get("message", "")
        return f"error {code}: {message}" if code is not None else str(message or body)
    return str(body or "no body")


def _ssl_context(
    ca_file: str | Path | None,
    cert_file: str | Path | None,
    key_file: str | Path | None,
    verify: bool,
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"schema registry TLS files (CA {ca_file}, certificate {cert_file}, key {key_file}) "
            f"cannot be loaded: {exc}"
        ) from exc
    return context


__all__: Sequence[str] = (
    "DEFAULT_SCHEMA_DIR",
    "IDS_FILE",
    "REGISTRY_MEDIA_TYPE",
    "HttpSchemaRegistry",
    "LocalSchemaDirectory",
    "Schema",
    "SchemaRegistry",
    "SchemaRegistryAuthError",
    "SchemaRegistryError",
    "SchemaRegistryUnavailable",
    "fingerprint",
    "schema_name",
)
