"""`orchestrator dev`: the embedded default stack in one foreground process.

Checks that its ports are free (naming what holds one and the flag that changes it), starts
Tansu (Kafka-compatible) and tritonserver as child processes, builds the tiny models if they are
missing, creates the topics, runs the service, and prints a line with `ready` once its own
servers answer. Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stop everything; the children also
die if this process is killed outright (a parent-death signal, see adapters.child_process). If a
component dies, it says which, with its log tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.adapters.child_process import (
    PortClaim,
    PortsUnavailable,
    check_ports,
    foreign_listeners,
)
from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.config import Settings

if TYPE_CHECKING:
    import uvicorn

    from orchestrator.service import Service

log = logging.getLogger("orchestrator.dev")

T = TypeVar("T")

#: signals that stop the stack in order (SIGHUP: the terminal was closed)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ComponentFailed(RuntimeError):
    def __init__(self, component: str, detail: str) -> None:
        super().__init__(f"{component} failed: {detail}")
        self.component = component


class Stopped(Exception):
    """A stop signal arrived while the stack was starting."""


def ensure_models(models_dir: Path, preset: str) -> Path:
    """The repository under models_dir, built from the preset if missing or stale."""
    from orchestrator.models.build import ensure_preset

    return ensure_preset(preset, models_dir)


class DevStack:
    """Tansu + tritonserver as child processes of this one."""

    def __init__(
        self,
        *,
        models_dir: Path,
        preset: str = "tiny",
        work_dir: Path,
        kafka_port: int = 9092,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        partitions: int = 4,
        service_http_port: int | None = None,
        gateway_port: int = 8080,
    ) -> None:
        self.models_dir = models_dir
        self.preset = preset
        self.work_dir = work_dir
        self.kafka_port = kafka_port
        self.partitions = partitions
        self.broker = TansuBroker(kafka_port, log_path=work_dir / "tansu.log")
        self.triton: TritonServer | None = None
        self.ports = (grpc_port, http_port, metrics_port)
        #: the service's metrics/health port; None: the `http_port` setting
        self.service_http_port = service_http_port
        #: the HTTP gateway's port (127.0.0.1)
        self.gateway_port = gateway_port

    def service_settings(self, settings: Settings) -> Settings:
        """`settings` with this stack's service port (the broker and Triton come once started);
        the embedded service is always role all, whatever ORCHESTRATOR_ROLE says."""
        update: dict[str, object] = {"role": "all"}
        if self.service_http_port is not None:
            update["http_port"] = self.service_http_port
        return settings.model_copy(update=update)

    def port_claims(self, settings: Settings) -> list[PortClaim]:
        grpc_port, http_port, metrics_port = self.ports
        return [
            PortClaim(self.kafka_port, "Kafka (tansu)", "--kafka-port", self.broker.host),
            PortClaim(grpc_port, "Triton gRPC", "--grpc-port", "0.0.0.0"),
            PortClaim(http_port, "Triton HTTP", "--http-port", "0.0.0.0"),
            PortClaim(metrics_port, "Triton metrics", "--metrics-port", "0.0.0.0"),
            PortClaim(
                settings.http_port,
                "the service's metrics and health endpoint",
                "--service-http-port (or the http_port setting, ORCHESTRATOR_HTTP_PORT)",
                settings.http_host,
            ),
            PortClaim(self.gateway_port, "the HTTP gateway", "--gateway-port", "127.0.0.1"),
        ]

    def check_ports(self, settings: Settings) -> None:
        """Raise PortsUnavailable naming each port that is taken, its holder and its flag."""
        check_ports(self.port_claims(settings))

    async def start(self) -> None:
        """Start the broker, build the models if needed, start Triton; wait until each is ready.

        The children are spawned from the event loop's (main) thread, whose exit is what their
        parent-death signal watches; only the waiting and the model build run in threads.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker.start()
            await asyncio.to_thread(self.broker.wait_ready, 30)
        except Exception as exc:
            raise ComponentFailed("kafka (tansu)", f"{exc}") from exc
        repo = await asyncio.to_thread(ensure_models, self.models_dir, self.preset)
        grpc_port, http_port, metrics_port = self.ports
        self.triton = TritonServer(
            repo,
            work_dir=self.work_dir / "tritonserver",
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
        )
        try:
            self.triton.start()
            await asyncio.to_thread(self.triton.wait_ready, 180)
        except Exception as exc:
            raise ComponentFailed("tritonserver", f"{exc}") from exc

    async def create_topics(self, settings: Settings) -> None:
        from orchestrator.gateway.settings import GatewaySettings

        await create_topics(
            self.broker.bootstrap_servers,
            [*settings.service_topics(), GatewaySettings(**{}).registry_topic],
            partitions=self.partitions,
        )

    def check(self) -> None:
        """Raise ComponentFailed if a child process has died."""
        if not self.broker.is_running():
            raise ComponentFailed("kafka (tansu)", "exited\n" + self.broker.log_tail())
        if self.triton is not None and not self.triton.is_running():
            raise ComponentFailed("tritonserver", "exited\n" + self.triton.log_tail())

    def check_own(self) -> None:
        """Raise ComponentFailed unless both children run and hold their own ports."""
        self.check()
        broker_pid = self.broker.pid
        assert broker_pid is not None
        others = foreign_listeners(broker_pid, self.broker.port)
        if others is not None:
            holders = ", ".join(h.describe() for h in others) or "nobody"
            raise ComponentFailed("kafka (tansu)", f"port {self.broker.port} is held by {holders}")
        if self.triton is None:
            raise ComponentFailed("tritonserver", "not started")
        problem = self.triton.ownership_problem()
        if problem is not None:
            raise ComponentFailed("tritonserver", problem[0])

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
        self.broker.stop(keep_log=True)


async def _unless_stopped(work: Awaitable[T], stopping: asyncio.Event) -> T:
    """The result of `work`, or Stopped (with `work` cancelled) if `stopping` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Stopped
    return task.result()


async def _start_gateway(
    stack: DevStack, settings: Settings
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """The HTTP gateway on 127.0.0.1:gateway_port with a fresh development key, started."""
    import secrets

    from orchestrator.gateway.server import server
    from orchestrator.gateway.settings import GatewaySettings

    api_key = f"dev-{secrets.token_urlsafe(24)}"
    overrides: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": stack.gateway_port,
        "dev_key": api_key,
    }
    gateway_settings = GatewaySettings(**overrides)
    srv = server(settings, gateway_settings, embedded=True)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        if task.done():
            detail = "exited before it listened"
            if not task.cancelled() and task.exception() is not None:
                detail = repr(task.exception())
            raise ComponentFailed("gateway", detail)
        await asyncio.sleep(0.05)
    return srv, task, api_key


async def run_dev(stack: DevStack, settings: Settings) -> int:
    """Run the stack and the service until a signal; returns the exit code."""
    settings = stack.service_settings(settings)
    try:
        stack.check_ports(settings)
    except PortsUnavailable as exc:
        print(f"error: cannot start the stack:\n{exc}", file=sys.stderr, flush=True)
        return 1
    from orchestrator.service import Service

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    running: list[Service] = []
    failure: list[ComponentFailed] = []

    def request_stop() -> None:
        stopping.set()
        for service in running:
            service.stop()

    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, request_stop)
    watcher: asyncio.Task[None] | None = None
    gateway: uvicorn.Server | None = None
    try:
        try:
            await _unless_stopped(stack.start(), stopping)
            await _unless_stopped(stack.create_topics(settings), stopping)
        except Stopped:
            print("stopped before the stack was ready", flush=True)
            return 0
        except ComponentFailed as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        assert stack.triton is not None
        settings = settings.model_copy(
            update={
                "bootstrap_servers": stack.broker.bootstrap_servers,
                "triton_url": stack.triton.grpc_url,
            }
        )

        try:
            gateway, gateway_task, api_key = await _unless_stopped(
                _start_gateway(stack, settings), stopping
            )
        except Stopped:
            print("stopped before the stack was ready", flush=True)
            return 0
        except ComponentFailed as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1

        def ready() -> None:
            # the service reached Kafka and Triton on these ports: ready only if they are ours
            try:
                stack.check_own()
            except ComponentFailed as exc:
                failure.append(exc)
                request_stop()
                return
            print(f"api key: {api_key}", flush=True)
            print(
                f"playground: http://127.0.0.1:{stack.gateway_port}/#key={api_key}", flush=True
            )
            print(
                f"ready: kafka {settings.bootstrap_servers}, triton grpc {settings.triton_url}, "
                f"requests on {settings.request_topic}, answers on {settings.response_topic} "
                f"(failures on {settings.dlq_topic}); Ctrl-C stops",
                flush=True,
            )

        service = Service(settings, on_ready=ready)
        running.append(service)
        if stopping.is_set():
            service.stop()

        async def watch() -> None:
            while True:
                await asyncio.sleep(1.0)
                try:
                    stack.check()
                    if gateway_task.done():
                        raise ComponentFailed("gateway", "exited")
                except ComponentFailed as exc:
                    failure.append(exc)
                    service.stop()
                    return

        watcher = asyncio.create_task(watch())
        await service.run()
    finally:
        if watcher is not None:
            watcher.cancel()
        if gateway is not None:
            gateway.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gateway_task, 15)
        stack.stop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr, flush=True)
        return 1
    print("stopped", flush=True)
    return 0
