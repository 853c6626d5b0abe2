"""`orchestrator dev`: the embedded default stack in one foreground process.

Starts Tansu (Kafka-compatible) and tritonserver as child processes, builds the tiny models if
they are missing, creates the topics, runs the service, prints a line with `ready`, and shuts
everything down on Ctrl-C / SIGTERM. If a component dies, it says which, with its log tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.config import Settings
from orchestrator.service import Service

log = logging.getLogger("orchestrator.dev")


class ComponentFailed(RuntimeError):
    def __init__(self, component: str, detail: str) -> None:
        super().__init__(f"{component} failed: {detail}")
        self.component = component


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
    ) -> None:
        self.models_dir = models_dir
        self.preset = preset
        self.work_dir = work_dir
        self.kafka_port = kafka_port
        self.partitions = partitions
        self.broker = TansuBroker(kafka_port, log_path=work_dir / "tansu.log")
        self.triton: TritonServer | None = None
        self.ports = (grpc_port, http_port, metrics_port)

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker.start()
            self.broker.wait_ready(30)
        except Exception as exc:
            raise ComponentFailed("kafka (tansu)", f"{exc}") from exc
        repo = ensure_models(self.models_dir, self.preset)
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
            self.triton.wait_ready(180)
        except Exception as exc:
            raise ComponentFailed("tritonserver", f"{exc}") from exc

    async def create_topics(self, settings: Settings) -> None:
        await create_topics(
            self.broker.bootstrap_servers,
            [settings.request_topic, settings.response_topic, settings.dlq_topic],
            partitions=self.partitions,
        )

    def check(self) -> None:
        """Raise ComponentFailed if a child process has died."""
        if not self.broker.is_running():
            raise ComponentFailed("kafka (tansu)", "exited\n" + self.broker.log_tail())
        proc = self.triton._process if self.triton is not None else None
        if self.triton is not None and proc is not None and proc.poll() is not None:
            raise ComponentFailed("tritonserver", "exited\n" + self.triton.log_tail())

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
        self.broker.stop(keep_log=True)


async def run_dev(stack: DevStack, settings: Settings) -> int:
    """Run the stack and the service until a signal; returns the exit code."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(stack.start)
        await stack.create_topics(settings)
    except ComponentFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        stack.stop()
        return 1
    assert stack.triton is not None
    settings = settings.model_copy(
        update={
            "bootstrap_servers": stack.broker.bootstrap_servers,
            "triton_url": stack.triton.grpc_url,
        }
    )

    def ready() -> None:
        print(
            f"ready: kafka {settings.bootstrap_servers}, triton grpc {settings.triton_url}, "
            f"requests on {settings.request_topic}, answers on {settings.response_topic} "
            f"(failures on {settings.dlq_topic}); Ctrl-C stops",
            flush=True,
        )

    service = Service(settings, on_ready=ready)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.stop)
    failure: list[ComponentFailed] = []

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                stack.check()
            except ComponentFailed as exc:
                failure.append(exc)
                service.stop()
                return

    watcher = asyncio.create_task(watch())
    try:
        await service.run()
    finally:
        watcher.cancel()
        stack.stop()
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr, flush=True)
        return 1
    print("stopped", flush=True)
    return 0
