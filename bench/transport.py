"""Transport benchmark (issue 14): what moving one UNet step's tensors costs, with no compute.

Writes a Triton repository of echo UNets (orchestrator/models/echo.py: Python backend, dynamic
batching as in the real repository, `noise_pred` = `sample`), starts the real tritonserver on
it and times one call after another, per transport, for SD 1.5 and SDXL shapes, rows 2, 16, 32,
64, wire dtypes fp32 and fp16, plus a floor of tiny tensors (the micro preset's, 2 rows):

    .venv/bin/python bench/transport.py [--json out.json] [--profile] [--malloc-keep]

Each call starts from what the orchestrator holds (fp32 arrays) and ends with fp32 outputs, so
the edge's conversions are inside the time (fp16 casts go through torch on one thread, as the
orchestrator runs: OMP_NUM_THREADS=1). Transports (a `Transport` each; later designs, such as
conditioning kept resident in Triton, join as more of them):

- `grpc`: the project's own client, `TritonClient.infer` with a `StageCall`;
- `grpc+shm`: Triton's system shared memory for inputs and outputs (the orchestrator beside
  Triton, e.g. a sidecar sharing a memory-backed volume); regions are registered once per cell
  and reused by every call; the inputs are copied into them (cast to the wire dtype on the way)
  and the outputs copied out, as an orchestrator that keeps its own arrays must.

Counting: "MB moved" = request tensor bytes + response tensor bytes in wire dtypes (the inputs
sent and `noise_pred` returned), whichever way they travel; "MB in gRPC" = the part of those
carried inside gRPC messages (protobuf framing, tensor names and shapes, a few hundred bytes, is
not counted). Times: median and p95 of `--calls` sequential calls after `--warmup`; Triton's
statistics over the same calls give the time the server held each request (queue, compute
input/infer/output); "outside" = mean call time - that: conversions, protobuf, gRPC, asyncio.
Before timing, one call per cell asks for every input back (`echo_*` outputs) and checks each
equals what was sent (rounded to the wire dtype): the round trip is correct, not just fast.

`--profile` adds where the time of an SD 1.5, 32-row, fp32 gRPC call goes (docs/benchmarks.md,
"Transport at production shapes"). `--malloc-keep` makes glibc keep freed memory in this process
and in tritonserver, which removes the page faults that fresh multi-megabyte buffers cost.
This bench imports tritonclient itself (the package leaves that to orchestrator/adapters/
triton.py) for what the adapter does not offer yet: shared memory and full statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import dataclasses
import datetime
import io
import itertools
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import psutil
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype

from orchestrator.adapters.child_process import cpu_seconds
from orchestrator.adapters.triton import TritonClient
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.adapters.triton_shm import RESIDENT_INPUTS, cast, cast_into
from orchestrator.core.batching import merge
from orchestrator.domain import StageCall
from orchestrator.models import echo
from orchestrator.models.repository import DEFAULT_QUEUE_DELAY_US

F32 = npt.NDArray[np.float32]
Arrays = Mapping[str, npt.NDArray[Any]]

SHAPES = ("sd15", "sdxl")
ROWS = (2, 16, 32, 64)
WIRES = ("fp32", "fp16")
TRANSPORTS = ("grpc", "grpc+shm", "resident", "resident+grpc", "cached+grpc")
#: the floor: tiny tensors, 2 rows, fp32
FLOOR = ("tiny", 2, "fp32")
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measured configuration: shape family, rows per call, wire dtype."""

    shape: str
    rows: int
    wire: str

    @property
    def model(self) -> str:
        return echo.model_name(self.shape, self.wire)

    @property
    def spec(self) -> echo.EchoShape:
        return echo.SHAPES[self.shape]

    def wire_inputs(self) -> tuple[echo.EchoTensor, ...]:
        return echo.unet_inputs(self.spec, self.wire)

    def wire_outputs(self) -> dict[str, echo.EchoTensor]:
        return {t.name: t for t in echo.unet_outputs(self.spec, self.wire)}

    def bytes_in(self) -> int:
        return sum(t.nbytes(self.rows) for t in self.wire_inputs())

    def bytes_out(self, outputs: Sequence[str] = (echo.OUTPUT,)) -> int:
        declared = self.wire_outputs()
        return sum(declared[name].nbytes(self.rows) for name in outputs)


def to_wire(cell: Cell, inputs: Arrays) -> dict[str, npt.NDArray[Any]]:
    """The orchestrator's fp32 arrays in the wire dtypes (no copy where they already match)."""
    return {t.name: cast(inputs[t.name], t.dtype) for t in cell.wire_inputs()}


def from_wire(arr: npt.NDArray[Any]) -> F32:
    """An output as the orchestrator uses it: fp32 (no copy when it already is)."""
    return cast(arr, np.dtype(np.float32))


# -- transports --------------------------------------------------------------------------------


class Transport(Protocol):
    """One way of moving a call's tensors to Triton and back."""

    name: str
    #: works when Triton runs on another host
    remote: bool

    async def prepare(self, cell: Cell) -> None:
        """Set up what the calls of `cell` reuse (regions, buffers)."""

    async def infer(self, cell: Cell, inputs: Arrays, outputs: Sequence[str]) -> dict[str, F32]:
        """One call: fp32 inputs in, fp32 outputs out (the edge's conversions included)."""

    def grpc_bytes(self, cell: Cell, outputs: Sequence[str]) -> int:
        """Tensor bytes of one call carried inside gRPC messages."""

    async def release(self) -> None:
        """Undo `prepare`."""

    async def close(self) -> None: ...


class GrpcTransport:
    """The project's own client path: `TritonClient.infer` with a `StageCall`."""

    name = "grpc"
    remote = True

    def __init__(self, url: str) -> None:
        self.client = TritonClient(url, timeout_s=120.0)

    async def prepare(self, cell: Cell) -> None:
        return None

    async def infer(self, cell: Cell, inputs: Arrays, outputs: Sequence[str]) -> dict[str, F32]:
        call = StageCall(cell.model, to_wire(cell, inputs), tuple(outputs))
        result = await self.client.infer(call)
        return {name: from_wire(arr) for name, arr in result.items()}

    def grpc_bytes(self, cell: Cell, outputs: Sequence[str]) -> int:
        return cell.bytes_in() + cell.bytes_out(outputs)

    async def release(self) -> None:
        return None

    async def close(self) -> None:
        await self.client.close()


class _Region:
    """A system shared memory region registered with Triton, with numpy views into it."""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.key = f"/{name}"
        self.byte_size = byte_size
        self.handle = shm.create_shared_memory_region(name, self.key, byte_size, create_only=True)
        self.offsets: dict[str, int] = {}
        self.views: dict[str, npt.NDArray[Any]] = {}

    def lay_out(self, tensors: Sequence[echo.EchoTensor], rows: int) -> None:
        offset = 0
        for t in tensors:
            self.offsets[t.name] = offset
            self.views[t.name] = shm.get_contents_as_numpy(
                self.handle, t.dtype, [rows, *t.dims], offset
            )
            offset += t.nbytes(rows)

    def destroy(self) -> None:
        self.views.clear()  # the views hold the mapping open
        shm.destroy_shared_memory_region(self.handle)


class ShmTransport:
    """Triton system shared memory for inputs and outputs: the orchestrator beside Triton."""

    name = "grpc+shm"
    remote = False
    _serial = itertools.count()

    def __init__(self, url: str) -> None:
        self.client = aioclient.InferenceServerClient(url)
        self.inputs: _Region | None = None
        self.outputs: _Region | None = None

    async def prepare(self, cell: Cell) -> None:
        await self.release()
        tag = f"orch-transport-{os.getpid()}-{next(self._serial)}"
        declared = list(cell.wire_outputs().values())
        self.inputs = _Region(f"{tag}-in", cell.bytes_in())
        self.outputs = _Region(f"{tag}-out", sum(t.nbytes(cell.rows) for t in declared))
        for region in (self.inputs, self.outputs):
            await self.client.register_system_shared_memory(
                region.name, region.key, region.byte_size
            )
        self.inputs.lay_out(cell.wire_inputs(), cell.rows)
        self.outputs.lay_out(declared, cell.rows)

    async def infer(self, cell: Cell, inputs: Arrays, outputs: Sequence[str]) -> dict[str, F32]:
        region_in, region_out = self.inputs, self.outputs
        if region_in is None or region_out is None:
            raise RuntimeError("prepare() the cell first")
        infer_inputs = []
        for t in cell.wire_inputs():
            # the cast to the wire dtype and the copy into the region are one pass
            cast_into(region_in.views[t.name], inputs[t.name])
            inp = grpcclient.InferInput(t.name, [cell.rows, *t.dims], np_to_triton_dtype(t.dtype))
            inp.set_shared_memory(region_in.name, t.nbytes(cell.rows), region_in.offsets[t.name])
            infer_inputs.append(inp)
        declared = cell.wire_outputs()
        requested = []
        for name in outputs:
            out = grpcclient.InferRequestedOutput(name)
            out.set_shared_memory(
                region_out.name, declared[name].nbytes(cell.rows), region_out.offsets[name]
            )
            requested.append(out)
        await self.client.infer(cell.model, infer_inputs, outputs=requested)
        # the region is overwritten by the next call: the orchestrator keeps copies
        answers = {}
        for name in outputs:
            answers[name] = np.empty(region_out.views[name].shape, np.float32)
            cast_into(answers[name], region_out.views[name])
        return answers

    def grpc_bytes(self, cell: Cell, outputs: Sequence[str]) -> int:
        return 0

    async def release(self) -> None:
        for region in (self.inputs, self.outputs):
            if region is not None:
                with contextlib.suppress(Exception):
                    await self.client.unregister_system_shared_memory(region.name)
                region.destroy()
        self.inputs = self.outputs = None

    async def close(self) -> None:
        await self.release()
        await self.client.close()


class ResidentTransport:
    """The orchestrator's own shared memory path (`TritonClient(shared_memory="on")`, issue 14):
    the call is a batch of 2-row jobs whose conditioning arrays stay the same objects from call
    to call (as a job's do between steps), so it stays resident in a staging region; the
    latents, timestep and noise_pred go through a scratch region (`resident`) or in gRPC
    (`resident+grpc`). The batcher's concatenation is left out, as for the other transports."""

    remote = False
    resident = True
    ROWS_PER_JOB = 2

    def __init__(self, url: str, *, scratch: bool) -> None:
        self.name = "resident" if scratch else "resident+grpc"
        self.scratch = scratch
        self.client = TritonClient(url, timeout_s=120.0, shared_memory="on")
        #: per input set (held, so ids stay unique): its per-job conditioning views
        self._jobs: dict[int, tuple[Arrays, dict[str, tuple[npt.NDArray[Any], ...]]]] = {}

    async def prepare(self, cell: Cell) -> None:
        self._jobs.clear()

    def _sources(self, inputs: Arrays) -> dict[str, tuple[npt.NDArray[Any], ...]]:
        held = self._jobs.get(id(inputs))
        if held is None:
            step = self.ROWS_PER_JOB
            parts = {
                name: tuple(arr[i : i + step] for i in range(0, arr.shape[0], step))
                for name, arr in inputs.items()
            }
            held = self._jobs[id(inputs)] = (inputs, parts)
        return held[1]

    async def infer(self, cell: Cell, inputs: Arrays, outputs: Sequence[str]) -> dict[str, F32]:
        call = StageCall(cell.model, inputs, tuple(outputs), self._sources(inputs))
        if self.client.shm is not None:
            self.client.shm.scratch_tensors = self.scratch
        result = await self.client.infer(call)
        if self.client.shm is not None and self.client.shm.scratch_tensors != self.scratch:
            self.client.shm.scratch_tensors = self.scratch  # created by this first call
        return result

    def staged(self) -> int:
        return self.client.shm.bytes_staged if self.client.shm is not None else 0

    def grpc_bytes(self, cell: Cell, outputs: Sequence[str]) -> int:
        if self.scratch:
            return 0
        sizes = {t.name: t.nbytes(cell.rows) for t in cell.wire_inputs()}
        return sizes["sample"] + sizes["timestep"] + cell.bytes_out(outputs)

    async def release(self) -> None:
        self._jobs.clear()

    async def close(self) -> None:
        await self.client.close()


class CachedTransport(ResidentTransport):
    """The conditioning cache in Triton over plain gRPC (`TritonClient(conditioning_cache="on")`,
    issue 14, Triton remote): the call goes to the echo model's `_cached` wrapper
    (triton_models/unet_cached), which keeps each 2-row job's conditioning by row id and calls
    the echo through BLS. After the warm-up every job is held there, so a timed call carries the
    latents, the timesteps and 8 bytes of row id per row. Jobs are per input set, as for
    `resident`; the batcher's concatenation is left out (a merged call's is lazy and unread)."""

    remote = True

    def __init__(self, url: str) -> None:
        self.name = "cached+grpc"
        self.scratch = False
        self.client = TritonClient(url, timeout_s=120.0, conditioning_cache="on")
        self._jobs = {}

    async def infer(self, cell: Cell, inputs: Arrays, outputs: Sequence[str]) -> dict[str, F32]:
        call = StageCall(cell.model, inputs, tuple(outputs), self._sources(inputs))
        return await self.client.infer(call)

    def staged(self) -> int:
        return self.client.cond.counters.conditioning_bytes

    def id_bytes(self, cell: Cell) -> int:
        return cell.rows * 8

    def grpc_bytes(self, cell: Cell, outputs: Sequence[str]) -> int:
        sizes = {t.name: t.nbytes(cell.rows) for t in cell.wire_inputs()}
        return sizes["sample"] + sizes["timestep"] + self.id_bytes(cell) + cell.bytes_out(outputs)


TRANSPORT_TYPES: Mapping[str, Callable[[str], Transport]] = {
    "grpc": GrpcTransport,
    "grpc+shm": ShmTransport,
    "resident": lambda url: ResidentTransport(url, scratch=True),
    "resident+grpc": lambda url: ResidentTransport(url, scratch=False),
    "cached+grpc": CachedTransport,
}


# -- measurement -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    shape: str
    label: str
    rows: int
    wire: str
    transport: str
    remote: bool
    bytes_in: int
    bytes_out: int
    #: tensor bytes carried inside gRPC messages
    grpc_bytes: int
    calls: int
    median_ms: float
    p95_ms: float
    mean_ms: float
    #: Triton's statistics over the timed calls, per call: the whole request, then its parts
    triton_ms: float
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    #: every echoed input equalled what was sent (rounded to the wire dtype)
    round_trip_ok: bool
    #: what the round-trip check found wrong (empty when ok)
    problems: tuple[str, ...] = ()
    #: conditioning bytes that stayed resident (not moved) per timed call
    resident_bytes: int = 0
    #: bytes a call carries besides the tensors (the conditioning cache's row ids)
    id_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out - self.resident_bytes + self.id_bytes

    @property
    def outside_ms(self) -> float:
        return self.mean_ms - self.triton_ms


async def triton_stats(client: aioclient.InferenceServerClient, model: str) -> dict[str, int]:
    resp = await client.get_inference_statistics(model, as_json=True)
    (entry,) = resp["model_stats"]
    s = entry.get("inference_stats", {})
    out = {
        key: int(s.get(key, {}).get("ns", 0))
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    }
    out["count"] = int(s.get("success", {}).get("count", 0))
    return out


def check_round_trip(cell: Cell, sent: Arrays, got: Mapping[str, F32]) -> list[str]:
    """Names of the outputs that differ from the input they echo (after wire rounding)."""
    # numpy's own cast as the reference (the transports cast with torch)
    wire = {t.name: np.asarray(sent[t.name], dtype=t.dtype) for t in cell.wire_inputs()}
    bad = []
    for out, src in echo.echo_sources(cell.spec, cell.wire).items():
        expected = wire[src].astype(np.float32)
        if out not in got or not np.array_equal(got[out], expected):
            bad.append(out)
    return bad


async def measure_cell(
    transport: Transport,
    stats_client: aioclient.InferenceServerClient,
    cell: Cell,
    *,
    calls: int,
    warmup: int,
    seed: int = 0,
) -> Row:
    """Time `calls` sequential calls of `cell` (after a checked round trip and `warmup`)."""
    rng = np.random.default_rng(seed)
    # two input sets, alternated: an answer left over from the previous call would show
    sets = [echo.orchestrator_inputs(cell.spec, cell.rows, rng) for _ in range(2)]
    outputs = (echo.OUTPUT,)
    await transport.prepare(cell)
    try:
        every = tuple(echo.echo_sources(cell.spec, cell.wire))
        bad = check_round_trip(cell, sets[0], await transport.infer(cell, sets[0], every))
        # every input set at least once before timing, so conditioning that stays resident
        # is staged before the timed calls (they check nothing is staged again)
        for i in range(max(warmup, len(sets))):
            await transport.infer(cell, sets[i % 2], outputs)
        staged = getattr(transport, "staged", lambda: 0)
        staged_before = staged()
        before = await triton_stats(stats_client, cell.model)
        times = []
        for i in range(calls):
            inputs = sets[i % 2]
            start = time.perf_counter()
            got = await transport.infer(cell, inputs, outputs)
            times.append((time.perf_counter() - start) * 1e3)
            if not np.array_equal(got[echo.OUTPUT], to_wire(cell, inputs)["sample"]):
                bad.append(f"call {i}: {echo.OUTPUT}")
        after = await triton_stats(stats_client, cell.model)
        if staged() != staged_before:
            bad.append(f"conditioning staged again: {staged() - staged_before} bytes")
    finally:
        await transport.release()
    n = max(after["count"] - before["count"], 1)

    def per_call(key: str) -> float:
        return (after[key] - before[key]) / n / 1e6

    return Row(
        shape=cell.shape,
        label=cell.spec.label,
        rows=cell.rows,
        wire=cell.wire,
        transport=transport.name,
        remote=transport.remote,
        bytes_in=cell.bytes_in(),
        bytes_out=cell.bytes_out(outputs),
        grpc_bytes=transport.grpc_bytes(cell, outputs),
        calls=calls,
        median_ms=statistics.median(times),
        p95_ms=float(np.percentile(times, 95)),
        mean_ms=statistics.fmean(times),
        triton_ms=per_call("success"),
        queue_ms=per_call("queue"),
        compute_input_ms=per_call("compute_input"),
        compute_infer_ms=per_call("compute_infer"),
        compute_output_ms=per_call("compute_output"),
        round_trip_ok=not bad,
        problems=tuple(bad),
        resident_bytes=conditioning_bytes(cell) if getattr(transport, "resident", False) else 0,
        id_bytes=getattr(transport, "id_bytes", lambda cell: 0)(cell),
    )


def conditioning_bytes(cell: Cell) -> int:
    """Per call, the bytes of the inputs that stay the same for a job's every step."""
    return sum(t.nbytes(cell.rows) for t in cell.wire_inputs() if t.name in RESIDENT_INPUTS)


def plan_cells(
    shapes: Sequence[str], rows: Sequence[int], wires: Sequence[str], floor: bool
) -> list[Cell]:
    cells = [Cell(s, r, w) for s in shapes for r in rows for w in wires]
    if floor:
        cells.append(Cell(*FLOOR))
    return cells


async def measure(
    url: str, cells: Sequence[Cell], transports: Sequence[str], *, calls: int, warmup: int
) -> list[Row]:
    """Every cell through every transport, one call at a time, against a running server that
    serves the cells' echo models."""
    stats_client = aioclient.InferenceServerClient(url)
    opened = [TRANSPORT_TYPES[name](url) for name in transports]
    rows = []
    try:
        for cell in cells:
            for transport in opened:
                row = await measure_cell(transport, stats_client, cell, calls=calls, warmup=warmup)
                print(format_row(row), flush=True)
                rows.append(row)
    finally:
        for transport in opened:
            await transport.close()
        await stats_client.close()
    return rows


# -- the report --------------------------------------------------------------------------------

HEADER = (
    "| shapes | rows | wire | transport | MB moved | MB in gRPC | median ms | p95 ms "
    "| Triton ms | queue / in / infer / out ms | outside ms | round trip |"
)
RULE = "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---|"


def format_row(r: Row) -> str:
    parts = (
        f"{r.queue_ms:.2f} / {r.compute_input_ms:.2f} / {r.compute_infer_ms:.2f} / "
        f"{r.compute_output_ms:.2f}"
    )
    return (
        f"| {r.label} | {r.rows} | {r.wire} | {r.transport} | {r.bytes_moved / MB:.2f} "
        f"| {r.grpc_bytes / MB:.2f} | {r.median_ms:.2f} | {r.p95_ms:.2f} | {r.triton_ms:.2f} "
        f"| {parts} | {r.outside_ms:.2f} | {'ok' if r.round_trip_ok else 'WRONG'} |"
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """A time target of issue 14 for one cell, met by the best qualifying transport."""

    text: str
    shape: str
    rows: int
    limit_ms: float
    #: only transports that also work with Triton on another host qualify
    remote_only: bool


TARGETS = (
    Target("SD 1.5, 32 rows, beside Triton", "sd15", 32, 5.0, remote_only=False),
    Target("SD 1.5, 32 rows, over plain gRPC", "sd15", 32, 15.0, remote_only=True),
    Target("SDXL, 32 rows, beside Triton", "sdxl", 32, 10.0, remote_only=False),
)


def latents_and_timesteps_bytes(r: Row) -> int:
    """What a step must move once the conditioning is resident: latents in and out, timesteps."""
    cell = Cell(r.shape, r.rows, r.wire)
    sizes = {t.name: t.nbytes(r.rows) for t in cell.wire_inputs()}
    return sizes["sample"] + sizes["timestep"] + cell.bytes_out()


def verdicts(rows: Sequence[Row]) -> list[str]:
    """One line per target: the best measured row that qualifies, and whether it meets it."""
    lines = []
    for t in TARGETS:
        candidates = [
            r
            for r in rows
            if r.shape == t.shape and r.rows == t.rows and (r.remote or not t.remote_only)
        ]
        head = f"- {t.text}: median <= {t.limit_ms:g} ms"
        if not candidates:
            lines.append(f"{head}: not measured")
            continue
        best = min(candidates, key=lambda r: r.median_ms)
        verdict = "MET" if best.median_ms <= t.limit_ms else "NOT MET"
        others = ", ".join(f"{r.transport} {r.wire} {r.median_ms:.1f}" for r in candidates)
        lines.append(
            f"{head}: best {best.transport} {best.wire} {best.median_ms:.1f} ms -> {verdict} "
            f"(all: {others})"
        )
    head = "- SD 1.5, 32 rows: bytes per step <= latents in and out plus timesteps"
    candidates = [r for r in rows if r.shape == "sd15" and r.rows == 32]
    if not candidates:
        lines.append(f"{head}: not measured")
    else:
        best = min(candidates, key=lambda r: r.bytes_moved / latents_and_timesteps_bytes(r))
        limit = latents_and_timesteps_bytes(best)
        verdict = "MET" if best.bytes_moved <= limit else "NOT MET"
        lines.append(
            f"{head}: best {best.transport} {best.wire} {best.bytes_moved / MB:.2f} MB vs "
            f"{limit / MB:.2f} MB -> {verdict}"
        )
    head = "- SD 1.5, 32 rows, over plain gRPC: bytes per step <= latents, timesteps and row ids"
    remote = [r for r in candidates if r.remote]
    if not remote:
        lines.append(f"{head}: not measured")
    else:
        best = min(remote, key=lambda r: r.bytes_moved)
        limit = latents_and_timesteps_bytes(best) + best.rows * 8
        verdict = "MET" if best.bytes_moved <= limit else "NOT MET"
        lines.append(
            f"{head}: best {best.transport} {best.wire} {best.bytes_moved / MB:.3f} MB vs "
            f"{limit / MB:.3f} MB -> {verdict}"
        )
    return lines


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    memory = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                break
    versions = {}
    for package in ("nvidia-pytriton", "tritonclient", "grpcio", "protobuf", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


# -- the profile -------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], object], repeat: int = 10) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def client_pieces(cell: Cell, inputs: Arrays, jobs: int = 16) -> dict[str, float]:
    """The client-side steps of one call, each timed alone (ms, median of 10): what the batcher,
    the edge and tritonclient's protobuf handling cost before and after the network."""
    wire = to_wire(cell, inputs)
    per_job = cell.rows // jobs
    job_calls = [
        StageCall(
            cell.model,
            {k: v[i * per_job : (i + 1) * per_job] for k, v in wire.items()},
            (echo.OUTPUT,),
        )
        for i in range(jobs)
    ]
    half = Cell(cell.shape, cell.rows, "fp16")
    sample = wire["sample"]

    def set_data() -> list[grpcclient.InferInput]:
        made = []
        for name, arr in wire.items():
            inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr)
            made.append(inp)
        return made

    contents = [arr.tobytes() for arr in wire.values()]

    def build_request() -> Any:
        request = service_pb2.ModelInferRequest(model_name=cell.model)
        for name, arr in wire.items():
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, np_to_triton_dtype(arr.dtype)
            tensor.shape.extend(arr.shape)
        request.raw_input_contents.extend(contents)
        return request

    request = build_request()
    response = service_pb2.ModelInferResponse(model_name=cell.model)
    out = response.outputs.add()
    out.name, out.datatype = echo.OUTPUT, np_to_triton_dtype(sample.dtype)
    out.shape.extend(sample.shape)
    response.raw_output_contents.append(sample.tobytes())
    answer = response.SerializeToString()
    return {
        f"batcher: merge {jobs} calls of {per_job} rows (orchestrator.core.batching.merge)": (
            _median_ms(lambda: merge(job_calls, range(jobs)))
        ),
        "InferInput.set_data_from_numpy, every input (ndarray.tobytes)": _median_ms(set_data),
        "request protobuf: build, raw_input_contents.extend": _median_ms(build_request),
        "request protobuf: SerializeToString": _median_ms(request.SerializeToString),
        "response protobuf: ModelInferResponse.FromString": _median_ms(
            lambda: service_pb2.ModelInferResponse.FromString(answer)
        ),
        "response: InferResult.as_numpy": _median_ms(
            lambda: grpcclient.InferResult(response).as_numpy(echo.OUTPUT)
        ),
        "(fp16 wire only) edge cast of the inputs to fp16, torch": _median_ms(
            lambda: to_wire(half, inputs)
        ),
        "(fp16 wire only) the same cast with numpy's astype": _median_ms(
            lambda: {t.name: inputs[t.name].astype(t.dtype) for t in half.wire_inputs()}
        ),
    }


def cpu_by_process(server_pid: int | None) -> dict[str, float]:
    """CPU time so far (ms) of this process, tritonserver and its Python-backend stubs."""
    out = {"client (this process)": cpu_seconds([os.getpid()]) * 1e3}
    if server_pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            stubs = [c.pid for c in psutil.Process(server_pid).children()]
            out["tritonserver (gRPC frontend, core, backend)"] = cpu_seconds([server_pid]) * 1e3
            out["Python-backend stubs"] = cpu_seconds(stubs) * 1e3
    return out


@dataclasses.dataclass(frozen=True)
class Profile:
    cell: str
    calls: int
    #: wall time per call without the profiler
    mean_ms: float
    #: Triton's statistics per call (ms)
    triton: dict[str, float]
    #: CPU time per call (ms) by process, over the same calls
    cpu: dict[str, float]
    #: client-side steps, each timed alone (ms)
    pieces: dict[str, float]
    #: wall time per call under cProfile, and its top functions
    profiled_ms: float
    top: str


async def profile(
    url: str,
    *,
    server_pid: int | None,
    calls: int,
    warmup: int,
    top: int = 14,
    transport_name: str = "grpc",
    wire: str = "fp32",
) -> Profile:
    """Where one call's time goes, for SD 1.5, 32 rows, `wire` through `transport_name` (the
    project's gRPC client by default): a plain loop (wall time, Triton's statistics, CPU time
    of each process), the same loop under cProfile, and the plain client-side steps timed
    alone. For `cached+grpc`, Triton's statistics are the wrapper's (its BLS call included)."""
    cell = Cell("sd15", 32, wire)
    inputs = echo.orchestrator_inputs(cell.spec, cell.rows, np.random.default_rng(0))
    transport = TRANSPORT_TYPES[transport_name](url)
    await transport.prepare(cell)
    stats_model = cell.model
    if transport_name == "cached+grpc":
        stats_model = echo.cached_name(cell.shape, cell.wire)
    stats_client = aioclient.InferenceServerClient(url)
    outputs = (echo.OUTPUT,)
    try:
        for _ in range(warmup):
            await transport.infer(cell, inputs, outputs)
        before, cpu_before = (
            await triton_stats(stats_client, stats_model),
            cpu_by_process(server_pid),
        )
        start = time.perf_counter()
        for _ in range(calls):
            await transport.infer(cell, inputs, outputs)
        wall = (time.perf_counter() - start) * 1e3
        cpu_after, after = cpu_by_process(server_pid), await triton_stats(stats_client, stats_model)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(calls):
            await transport.infer(cell, inputs, outputs)
        profiler.disable()
        profiled = (time.perf_counter() - start) * 1e3
    finally:
        await transport.close()
        await stats_client.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(top)
    n = max(after["count"] - before["count"], 1)
    triton = {
        key: (after[key] - before[key]) / n / 1e6
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    }
    return Profile(
        cell=f"SD 1.5, 32 rows, {wire}, {transport_name}",
        calls=calls,
        mean_ms=wall / calls,
        triton=triton,
        cpu={k: (cpu_after[k] - cpu_before[k]) / calls for k in cpu_after},
        pieces=client_pieces(cell, inputs),
        profiled_ms=profiled / calls,
        top=text.getvalue(),
    )


def format_profile(p: Profile) -> list[str]:
    t = p.triton
    table = [line for line in p.top.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(table) if "ncalls" in line), 0)
    return [
        f"profile: {p.cell}, {p.calls} calls, {p.mean_ms:.1f} ms per call",
        f"  Triton holds each request {t['success']:.2f} ms: queue {t['queue']:.2f}, "
        f"compute_input {t['compute_input']:.2f}, compute_infer {t['compute_infer']:.2f}, "
        f"compute_output {t['compute_output']:.2f}",
        "  CPU time per call by process (ms; the rest of the wall time is waiting):",
        *(f"    {v:7.1f}  {k}" for k, v in p.cpu.items()),
        "  client-side steps, each timed alone (ms):",
        *(f"    {v:7.2f}  {k}" for k, v in p.pieces.items()),
        f"  under cProfile ({p.profiled_ms:.1f} ms per call), top functions by own time (C code "
        "that grpc's Cython layer runs is charged to _invoke or not seen):",
        *(f"    {line}" for line in table[first:]),
    ]


# -- the command -------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/transport.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shapes", type=_csv(str, SHAPES), default=list(SHAPES), help="sd15,sdxl")
    p.add_argument("--rows", type=_csv(int), default=list(ROWS), help="rows per call")
    p.add_argument("--wires", type=_csv(str, WIRES), default=list(WIRES), help="wire dtypes")
    p.add_argument(
        "--transports", type=_csv(str, TRANSPORTS), default=list(TRANSPORTS), help="grpc,grpc+shm"
    )
    p.add_argument("--no-floor", action="store_true", help="skip the tiny-tensor floor row")
    p.add_argument("--calls", type=int, default=30, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per row")
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=DEFAULT_QUEUE_DELAY_US,
        help="the echo models' dynamic-batching delay (default: the real repository's)",
    )
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="glibc malloc keeps freed memory (mmap and trim thresholds 1 GiB) in this process "
        "and in tritonserver, so large buffers are reused instead of page-faulted in again",
    )
    p.add_argument("--profile", action="store_true", help="also profile SD 1.5 32-row fp32 gRPC")
    p.add_argument("--profile-only", action="store_true", help="only the profile, no table")
    p.add_argument("--profile-calls", type=int, default=40)
    p.add_argument(
        "--profile-transport", choices=TRANSPORTS, default="grpc", help="the profiled transport"
    )
    p.add_argument("--profile-wire", choices=WIRES, default="fp32", help="the profiled wire")
    p.add_argument("--work-dir", type=Path, default=None, help="repository and server log")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


async def _run(
    url: str, server_pid: int | None, cells: Sequence[Cell], args: argparse.Namespace
) -> tuple[list[Row], Profile | None]:
    rows: list[Row] = []
    if not args.profile_only:
        print(HEADER)
        print(RULE, flush=True)
        rows = await measure(url, cells, args.transports, calls=args.calls, warmup=args.warmup)
    prof = None
    if args.profile or args.profile_only:
        prof = await profile(
            url,
            server_pid=server_pid,
            calls=args.profile_calls,
            warmup=args.warmup,
            transport_name=args.profile_transport,
            wire=args.profile_wire,
        )
    return rows, prof


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        yield Path(tmp)


#: glibc's mallopt parameters, and the environment variables that set them at a process' start
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_KEEP = 1 << 30
MALLOC_KEEP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_KEEP),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_KEEP),
}


def malloc_keep() -> dict[str, str]:
    """Make glibc malloc keep freed memory in this process (no mmap per large buffer, no trim);
    returns the environment that does the same for a child process."""
    libc = ctypes.CDLL("libc.so.6")
    if not (
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP) and libc.mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP)
    ):
        raise SystemExit("--malloc-keep: glibc refused mallopt")
    return dict(MALLOC_KEEP_ENV)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.rows) < 1 or max(args.rows) > echo.DEFAULT_MAX_BATCH_SIZE:
        raise SystemExit(f"rows must be within 1..{echo.DEFAULT_MAX_BATCH_SIZE}")
    cells = (
        []
        if args.profile_only
        else plan_cells(args.shapes, args.rows, args.wires, floor=not args.no_floor)
    )
    wanted = [(c.shape, c.wire) for c in cells]
    if args.profile or args.profile_only:
        wanted.append(("sd15", args.profile_wire))
    # as the orchestrator runs in production (Dockerfile, k8s: OMP_NUM_THREADS=1); torch's casts
    # on two threads of a busy 2-core machine wait for each other
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    server_env = malloc_keep() if args.malloc_keep else {}
    host = machine()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"transport bench, {when}: {host['cores']} cores ({host['cpu']}), {host['memory']}; "
        f"Python {host['python']}; {host['packages']}\n{args.calls} timed calls per row after "
        f"{args.warmup} warm-up, one at a time; echo models with dynamic batching "
        f"(max_queue_delay {args.queue_delay_us} us); torch threads {torch.get_num_threads()}; "
        f"malloc: {'keeps freed memory (--malloc-keep)' if args.malloc_keep else 'glibc defaults'}",
        flush=True,
    )
    started = time.monotonic()
    with _work_dir(args.work_dir) as work:
        repo = work / "repository"
        echo.write_repository(
            repo,
            wanted,
            queue_delay_us=args.queue_delay_us,
            cached="cached+grpc" in [*args.transports, args.profile_transport],
        )
        with TritonServer(
            repo, work_dir=work / "tritonserver", ort_threads=None, env=server_env
        ) as server:
            rows, prof = asyncio.run(_run(server.grpc_url, server.pid, cells, args))
    lines = []
    if rows:
        lines += ["", "targets (issue 14):", *verdicts(rows)]
    if prof is not None:
        lines += ["", *format_profile(prof)]
    print("\n".join(lines))
    wrong = [f"{format_row(r)}  <- {'; '.join(r.problems)}" for r in rows if not r.round_trip_ok]
    if args.json is not None:
        payload = {
            "date": when,
            "machine": host,
            "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": time.monotonic() - started,
            "rows": [
                {**dataclasses.asdict(r), "bytes_moved": r.bytes_moved, "outside_ms": r.outside_ms}
                for r in rows
            ],
            "targets": verdicts(rows) if rows else [],
            "profile": dataclasses.asdict(prof) if prof is not None else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"json: {args.json}")
    if wrong:
        print("round trip WRONG in:\n" + "\n".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
