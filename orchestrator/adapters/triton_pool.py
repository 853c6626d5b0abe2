"""Several Triton servers behind one StageRunner.

`ORCHESTRATOR_TRITON_URL` is a comma-separated list of `host:port`. Every host name is resolved
again every `resolve_interval_s`, and each address it yields is an endpoint with its own gRPC
channel: a Kubernetes headless Service (one A record per ready Triton pod) gives one channel per
pod, where a plain ClusterIP Service would pin one HTTP/2 connection to one pod. A call (a whole
batch) goes to one endpoint, chosen by `orchestrator.core.routing.choose`: least rows in flight
among endpoints whose circuit is closed. An endpoint that cannot be reached (UNAVAILABLE) is
skipped at once and the call goes to the next; other transient failures count towards its
circuit; a readiness probe brings it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy.typing as npt

from orchestrator.adapters.triton import ENDPOINT_DOWN_CODES, TritonClient, grpc_code
from orchestrator.core.routing import EndpointState, choose, parse_endpoints
from orchestrator.domain import ModelInfo, StageCall
from orchestrator.errors import ModelConfigError, OrchestratorError, TransientInferenceError

log = logging.getLogger("orchestrator.triton_pool")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class _Endpoint:
    state: EndpointState
    client: TritonClient
    #: the configured name it came from (for logs)
    source: str
    #: no longer resolved: closed once its calls are done
    retired: bool = False


class TritonPool:
    """A StageRunner over every resolved Triton endpoint (one is fine)."""

    def __init__(
        self,
        spec: str,
        *,
        timeout_s: float = 60.0,
        ssl: bool = False,
        on_error: Callable[[str, str], None] | None = None,
        propagate_trace: bool = True,
        failure_threshold: int = 3,
        probe_interval_s: float = 1.0,
        resolve_interval_s: float = 10.0,
        resolve: Callable[[str, int], Any] | None = None,
        shared_memory: str = "off",
        conditioning_cache: str = "off",
    ) -> None:
        self.spec = spec
        self.shared_memory = shared_memory
        self.conditioning_cache = conditioning_cache
        self.targets = parse_endpoints(spec)
        self.timeout_s = timeout_s
        self.ssl = ssl
        self.on_error = on_error
        self.propagate_trace = propagate_trace
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self.resolve_interval_s = resolve_interval_s
        self._resolve = resolve or self._getaddrinfo
        self._endpoints: dict[str, _Endpoint] = {}
        self._turn = 0
        self._resolved_at = -float("inf")
        self._task: asyncio.Task[None] | None = None
        self._resolve_lock = asyncio.Lock()
        # endpoints named by IP need no resolver: known at once
        for host, port in self.targets:
            if _is_ip(host) or host == "localhost":
                self._add(_address(host, port), _address(host, port))

    # -- endpoints ---------------------------------------------------------------------------

    @staticmethod
    async def _getaddrinfo(host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return sorted({str(info[4][0]) for info in infos})

    def _add(self, address: str, source: str) -> None:
        if address in self._endpoints and not self._endpoints[address].retired:
            return
        client = TritonClient(
            address,
            timeout_s=self.timeout_s,
            ssl=self.ssl,
            on_error=self.on_error,
            propagate_trace=self.propagate_trace,
            shared_memory=self.shared_memory,
            conditioning_cache=self.conditioning_cache,
        )
        self._endpoints[address] = _Endpoint(EndpointState(address), client, source)
        log.info("Triton endpoint %s (from %s)", address, source)

    async def refresh(self, force: bool = False) -> None:
        """Resolve the configured names again (at most every resolve_interval_s)."""
        now = time.monotonic()
        if not force and now - self._resolved_at < self.resolve_interval_s:
            return
        async with self._resolve_lock:
            if not force and time.monotonic() - self._resolved_at < self.resolve_interval_s:
                return
            self._resolved_at = time.monotonic()
            seen: set[str] = set()
            for host, port in self.targets:
                if _is_ip(host) or host == "localhost":
                    seen.add(_address(host, port))
                    continue
                try:
                    addresses = await self._resolve(host, port)
                except OSError as exc:
                    # keep what we had: a resolver hiccup must not drop working endpoints
                    log.warning("cannot resolve Triton host %s: %s", host, exc)
                    source = _address(host, port)
                    seen.update(a for a, e in self._endpoints.items() if e.source == source)
                    continue
                for ip in addresses:
                    address = _address(ip, port)
                    seen.add(address)
                    self._add(address, _address(host, port))
            for address, endpoint in list(self._endpoints.items()):
                if address not in seen and not endpoint.retired:
                    log.info("Triton endpoint %s is gone from DNS: retiring it", address)
                    endpoint.retired = True
            await self._close_retired()

    async def _close_retired(self) -> None:
        for address, endpoint in list(self._endpoints.items()):
            if endpoint.retired and endpoint.state.outstanding_calls == 0:
                del self._endpoints[address]
                with contextlib.suppress(Exception):
                    await endpoint.client.close()

    def _live(self) -> list[_Endpoint]:
        return [e for e in self._endpoints.values() if not e.retired]

    @property
    def endpoints(self) -> dict[str, EndpointState]:
        """Each live endpoint's state (rows sent, outstanding work, circuit)."""
        return {a: e.state for a, e in self._endpoints.items() if not e.retired}

    # -- the probe ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background probe (re-resolving and closing circuits that recovered)."""
        if self._task is None:
            self._task = asyncio.create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.refresh()
                for endpoint in self._live():
                    if endpoint.state.open and await endpoint.client.is_ready():
                        log.info("Triton endpoint %s is back", endpoint.state.address)
                        endpoint.state.recovered()
                        # it may have restarted: its conditioning cache is empty
                        endpoint.client.cond.forget("endpoint came back")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the probe must outlive anything
                log.warning("Triton endpoint probe failed: %r", exc)
            await asyncio.sleep(self.probe_interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for endpoint in list(self._endpoints.values()):
            with contextlib.suppress(Exception):
                await endpoint.client.close()
        self._endpoints.clear()

    async def __aenter__(self) -> TritonPool:
        await self.refresh(force=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the StageRunner ---------------------------------------------------------------------

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        """True when any endpoint is ready (and closes the circuit of those that are)."""
        await self.refresh()
        ready = False
        for endpoint in self._live():
            if await endpoint.client.is_ready(timeout_s):
                endpoint.state.recovered()
                ready = True
        return ready

    def _pick(self, tried: set[str]) -> _Endpoint | None:
        live = [e for e in self._live() if e.state.address not in tried]
        self._turn += 1
        index = choose([e.state for e in live], self._turn)
        return None if index is None else live[index]

    async def infer(
        self,
        call: StageCall,
        *,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one call on one endpoint; an unreachable endpoint is skipped for the next."""
        await self.refresh()
        rows = _rows(call)
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried)
            if endpoint is None:
                raise TransientInferenceError(
                    f"{call.model}: no Triton endpoint available "
                    f"({len(self._live())} known, circuits open or unreachable)",
                    stage=call.model,
                )
            tried.add(endpoint.state.address)
            state = endpoint.state
            state.started(rows)
            t0 = time.perf_counter()
            try:
                out = await endpoint.client.infer(call, timeout_s=timeout_s, headers=headers)
            except TransientInferenceError as exc:
                state.finished(rows, time.perf_counter() - t0, False, self.failure_threshold)
                code = grpc_code(exc)
                if code is None or code in ENDPOINT_DOWN_CODES:
                    # cannot reach it: open its circuit now and try another endpoint
                    if not state.open:
                        log.warning("Triton endpoint %s unreachable: %s", state.address, exc)
                    state.open = True
                    continue
                raise
            except BaseException:
                state.finished(rows, time.perf_counter() - t0, True, self.failure_threshold)
                raise
            state.finished(rows, time.perf_counter() - t0, True, self.failure_threshold)
            return out

    async def model_info(self) -> ModelInfo:
        """The model facts, read from every reachable endpoint: they must agree; each stage's
        max batch is the smallest any endpoint declares (a batch may go to any of them)."""
        await self.refresh(force=True)
        infos: list[ModelInfo] = []
        errors: list[OrchestratorError] = []
        for endpoint in self._live():
            try:
                infos.append(await endpoint.client.model_info())
            except OrchestratorError as exc:
                if not exc.retriable:
                    raise
                errors.append(exc)
        if not infos:
            raise errors[0] if errors else TransientInferenceError("no Triton endpoint resolved")
        return merge_model_info(infos)

    async def inference_statistics(self, models: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """Statistics summed over the reachable endpoints."""
        total: dict[str, dict[str, int]] = {}
        for endpoint in self._live():
            try:
                stats = await endpoint.client.inference_statistics(models)
            except OrchestratorError:
                continue
            for model, counters in stats.items():
                into = total.setdefault(model, {})
                for key, value in counters.items():
                    into[key] = into.get(key, 0) + value
        return total

    async def statistics_by_endpoint(
        self, models: Sequence[str] = ()
    ) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for endpoint in self._live():
            with contextlib.suppress(OrchestratorError):
                out[endpoint.state.address] = await endpoint.client.inference_statistics(models)
        return out

    async def describe_models(self, models: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per reachable endpoint, per model: its config and the versions Triton has ready
        (what a prompt-embedding cache keys on); an endpoint that does not answer is left out."""
        out: dict[str, dict[str, Any]] = {}
        for endpoint in self._live():
            client = endpoint.client
            with contextlib.suppress(OrchestratorError):
                out[endpoint.state.address] = {
                    m: {
                        "config": await client.model_config(m),
                        "versions": await client.model_versions(m),
                    }
                    for m in models
                }
        return out


def _rows(call: StageCall) -> int:
    for arr in call.inputs.values():
        return int(arr.shape[0]) if arr.ndim else 1
    return 1


def merge_model_info(infos: Sequence[ModelInfo]) -> ModelInfo:
    first = infos[0]
    for other in infos[1:]:
        a = dataclasses.replace(first, versions={}, unet_max_batch_size=0, max_batch_sizes={})
        b = dataclasses.replace(other, versions={}, unet_max_batch_size=0, max_batch_sizes={})
        if a != b:
            raise ModelConfigError(
                "Triton endpoints serve different models (their unet parameters differ): "
                "every endpoint must serve the same model repository"
            )
    rows: dict[str, int] = {}
    for info in infos:
        for model, n in info.max_batch_sizes.items():
            rows[model] = min(rows.get(model, n), n)
    return dataclasses.replace(
        first,
        unet_max_batch_size=min(i.unet_max_batch_size for i in infos),
        max_batch_sizes=rows,
    )
