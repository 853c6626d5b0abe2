"""`orchestrator gateway`: the app under uvicorn.

The HTTP parser and the event loop are chosen here, not left to uvicorn's guess: httptools and
uvloop (a C parser and a libuv loop) when they are installed, as they are with the project's
dependencies; h11 and asyncio's loop, with a warning, where they are not (the `http` and `loop`
settings force either). On the 2-core bench machine their gain was within its noise (see the
gateway section of docs/benchmarks.md).

With the `workers` setting above 1 the command is a supervisor of that many worker processes,
each a full gateway (its own Kafka tail, limits and idempotency turns, as a replica) on the same
host:port. Each worker binds its own listening socket with SO_REUSEPORT, so that the kernel
spreads the connections over them by their addresses; one socket shared by all (bound by the
parent) would hand each connection to whichever worker woke first, and a burst of new
connections often all to one. The parent holds the port bound (not listening, so it is given no
connection) from its check until it exits, so that no other server takes it meanwhile; port 0
is resolved there once for all workers. A worker that dies ends the whole command (status 1)
rather than being restarted: the process manager (Kubernetes) restarts the pod, and a worker
that keeps dying is not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import uvicorn
from opentelemetry.trace import TracerProvider

from orchestrator.config import Settings
from orchestrator.gateway.app import create_app
from orchestrator.gateway.settings import GatewaySettings

log = logging.getLogger("orchestrator.gateway")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def http_parser(gateway: GatewaySettings) -> str:
    """uvicorn's `http` implementation: httptools where it is installed (or asked for)."""
    if gateway.http != "auto":
        return gateway.http
    if _installed("httptools"):
        return "httptools"
    log.warning("gateway: httptools is not installed, parsing HTTP with h11 (slower)")
    return "h11"


def loop_factory(gateway: GatewaySettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The gateway's event loop: uvloop's where it is installed (or asked for); None: asyncio's."""
    if gateway.loop == "asyncio":
        return None
    if gateway.loop == "auto" and not _installed("uvloop"):
        log.warning("gateway: uvloop is not installed, running on asyncio's own event loop")
        return None
    import uvloop

    return uvloop.new_event_loop


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the signals to its host (`orchestrator dev`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StandaloneServer(uvicorn.Server):
    """A uvicorn server that owns the process's signals and runs `on_stopped` once it has shut
    down, before uvicorn re-raises the SIGINT/SIGTERM it caught (which ends the process: code
    after `serve()` would never run, and spans still buffered would be lost)."""

    def __init__(self, config: uvicorn.Config, on_stopped: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stopped = on_stopped

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_stopped()


def server(
    settings: Settings,
    gateway: GatewaySettings,
    *,
    embedded: bool = False,
    tracer_provider: TracerProvider | None = None,
    on_stopped: Callable[[], None] | None = None,
) -> uvicorn.Server:
    app = create_app(settings, gateway, tracer_provider=tracer_provider)
    replica: str = app.state.gateway.replica
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        http=http_parser(gateway),
        # the loop is the one this server is awaited on: `serve_command` makes it uvloop's
        loop="none",
        # which replica (worker process) answered: its id, as in its logs and job records
        headers=[("X-Gateway-Replica", replica)],
    )
    if embedded:
        return EmbeddedServer(config)
    return StandaloneServer(config, on_stopped) if on_stopped else uvicorn.Server(config)


async def serve(
    settings: Settings, gateway: GatewaySettings, sock: socket.socket | None = None
) -> None:
    """Serve until SIGINT/SIGTERM (on `sock` when given, else on the settings' host and port);
    spans go out over OTLP as `orchestrator serve`'s do (when the `tracing` setting is on and
    the OTEL_* variables do not switch them off)."""
    from orchestrator.adapters.tracing import setup_tracing

    provider = setup_tracing("diffusion-gateway") if settings.tracing else None
    # the provider is shut down (its last spans sent) inside the server's signal capture:
    # after a SIGTERM, uvicorn re-raises it as soon as the capture ends
    stopped = provider.shutdown if provider is not None else None
    srv = server(settings, gateway, tracer_provider=provider, on_stopped=stopped)
    await srv.serve(sockets=None if sock is None else [sock])
    if not srv.started:
        raise SystemExit(1)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (and SO_REUSEADDR, as uvicorn's), not
    listening yet: several of them, of this user, share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _port_error(host: str, port: int, exc: OSError | None = None) -> str:
    from orchestrator.adapters.child_process import port_problem

    problem = port_problem(host, port) if exc is None or exc.errno == errno.EADDRINUSE else None
    if problem is None:
        problem = f"cannot be bound: {exc.strerror if exc and exc.strerror else exc}"
    return (
        f"error: gateway port {port} on {host} {problem}; stop it or choose another port "
        "(--port, ORCHESTRATOR_GATEWAY_PORT)"
    )


#: how long a stopping worker may take (uvicorn's 5 s graceful shutdown, then the span flush)
WORKER_STOP_S = 20.0


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop_workers(workers: Sequence[subprocess.Popen[bytes]]) -> bool:
    """SIGTERM every worker (each drains as a single gateway does), wait for them, SIGKILL the
    late ones; True if all ended as SIGTERM ends a gateway."""
    from orchestrator.adapters.child_process import stop_process_group

    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_S
    clean = True
    for worker in workers:
        try:
            code = worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("gateway: worker pid %d did not stop in time, killing it", worker.pid)
            code = stop_process_group(worker, timeout=0, sig=signal.SIGKILL)
        if code not in (0, -signal.SIGTERM):
            clean = False
    return clean


def run_workers(gateway: GatewaySettings, worker_argv: Callable[[int], list[str]]) -> int:
    """`orchestrator gateway` with `workers` > 1: start the workers (`worker_argv(port)`: the
    command of one), supervise them until SIGINT/SIGTERM or until one ends; 0 after a clean
    drain, 1 if a worker died or the port is taken."""
    from orchestrator.adapters.child_process import port_holders, spawn

    host, port = gateway.host, gateway.port
    if port != 0 and port_holders(port):  # a listener, maybe with SO_REUSEPORT too
        print(_port_error(host, port), file=sys.stderr)
        return 1
    try:
        reserved = reuse_port_socket(host, port)
    except OSError as exc:
        print(_port_error(host, port, exc), file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with reserved:
            port = int(reserved.getsockname()[1])
            env = {**os.environ, "ORCHESTRATOR_GATEWAY_WORKERS": "1"}
            # a worker gets SIGTERM (and drains) if this process dies without stopping it
            for _ in range(gateway.workers):
                workers.append(spawn(worker_argv(port), death_signal=signal.SIGTERM, env=env))
            log.info(
                "gateway: %d workers on %s:%d, pids %s",
                len(workers),
                host,
                port,
                " ".join(str(w.pid) for w in workers),
            )
            dead: subprocess.Popen[bytes] | None = None
            while dead is None and not stop.wait(0.1):
                dead = next((w for w in workers if w.poll() is not None), None)
            if dead is not None:
                assert dead.returncode is not None
                print(
                    f"error: gateway worker pid {dead.pid} {_describe_exit(dead.returncode)}; "
                    f"stopping the other {len(workers) - 1}",
                    file=sys.stderr,
                )
                _stop_workers(workers)
                return 1
            log.info("gateway: stopping %d workers", len(workers))
            return 0 if _stop_workers(workers) else 1
    finally:
        _stop_workers(workers)  # no-op once stopped; after an error in this function, stops them
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_command(
    settings: Settings,
    *,
    host: str | None,
    port: int | None,
    workers: int | None = None,
    worker: bool = False,
    cli_prefix: Sequence[str] = (),
    cli_args: Sequence[str] = (),
) -> int:
    """`orchestrator gateway`: exit status 2 for bad gateway settings, 1 for a port in use or a
    worker that died. `worker`: one of a supervisor's workers (binds with SO_REUSEPORT);
    `cli_prefix`, `cli_args`: the options a worker's command repeats before and after `gateway`
    (`--log-level`, `--env-file`)."""
    from pydantic import ValidationError

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if workers is not None:
        overrides["workers"] = workers
    try:
        gateway = GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"error: gateway settings: {exc}", file=sys.stderr)
        return 2
    if gateway.workers > 1 and not worker:

        def worker_argv(bound: int) -> list[str]:
            return [
                *(sys.executable, "-m", "orchestrator", *cli_prefix, "gateway"),
                *("--host", gateway.host, "--port", str(bound), "--worker", *cli_args),
            ]

        return run_workers(gateway, worker_argv)
    sock: socket.socket | None = None
    if worker:
        try:
            sock = reuse_port_socket(gateway.host, gateway.port)
        except OSError as exc:
            print(_port_error(gateway.host, gateway.port, exc), file=sys.stderr)
            return 1
    with asyncio.Runner(loop_factory=loop_factory(gateway)) as runner:
        runner.run(serve(settings, gateway, sock))
    return 0
