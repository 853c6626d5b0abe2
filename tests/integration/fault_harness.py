"""Helpers of the fault-injection tests: the service as a child process, metric scrapes, RSS.

Everything here drives real processes: `python -m orchestrator serve` configured through
ORCHESTRATOR_* variables, and HTTP requests to the service's own /metrics, /healthz, /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.child_process import spawn
from orchestrator.config import Settings
from orchestrator.service import Service

_PORT_LINE = re.compile(r"metrics and probes on :(\d+)")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; never raises on an HTTP error code."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


async def aget(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """http_get off the event loop (an in-process service answers on this very loop)."""
    return await asyncio.to_thread(http_get, port, path, timeout)


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted label pairs: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = float(sample.value)
    return out


class Scrape:
    """One /metrics scrape, with sums over label sets."""

    def __init__(self, text: str) -> None:
        self.samples = parse_metrics(text)

    def total(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(value for key, value in self.samples.get(name, {}).items() if want <= set(key))


async def scrape(port: int) -> Scrape:
    status, body = await aget(port, "/metrics")
    assert status == 200, f"/metrics answered {status}"
    return Scrape(body)


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process (VmRSS), KiB; 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def service_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `orchestrator serve` use these settings."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("ORCHESTRATOR_"):
            del env[key]
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"ORCHESTRATOR_{name.upper()}"] = text
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class ServiceProcess:
    """`python -m orchestrator serve [args]` as a child process, its log in a file."""

    def __init__(self, settings: Settings, log_path: Path, args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.log_path = log_path
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.port = None
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            # dies with this process even if pytest itself is killed
            self.process = spawn(
                [sys.executable, "-m", "orchestrator", "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=service_env(self.settings),
            )

    def log_text(self, since_start: bool = True) -> str:
        data = self.log_path.read_bytes()
        if since_start:
            data = data[self._log_offset :]
        return data.decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text(False).splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 90.0) -> int:
        """Until the service logs that it consumes (its HTTP port is in that line)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            match = _PORT_LINE.search(self.log_text())
            if match:
                self.port = int(match.group(1))
                return self.port
            code = self.process.poll()
            if code is not None:
                raise AssertionError(
                    f"orchestrator serve exited with {code} before it was ready:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"orchestrator serve not ready after {timeout} s:\n" + self.log_tail()
                )
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, nothing."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (the service drains and commits); SIGKILL after `timeout`."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if process.poll() is None:
                self.kill()
        return process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ServiceTask:
    """An in-process Service run as an asyncio task, stoppable on its own (not a context)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.ready = asyncio.Event()
        self.service = Service(settings, on_ready=self.ready.set, **kwargs)
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> Service:
        self.task = asyncio.create_task(self.service.run())
        waiter = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait(
            [self.task, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self.task in done:
            self.task.result()  # raises the start-up failure
            raise AssertionError("the service returned before it was ready")
        assert self.ready.is_set(), f"service did not become ready in {timeout} s"
        return self.service

    async def stop(self, timeout: float = 60.0) -> None:
        self.service.stop()
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)


@contextlib.asynccontextmanager
async def sampling(interval: float, sample: Any) -> AsyncIterator[None]:
    """Call `sample()` (sync or async) every `interval` seconds while the block runs."""

    async def loop() -> None:
        while True:
            result = sample()
            if asyncio.iscoroutine(result):
                with contextlib.suppress(Exception):
                    await result
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
