"""Triton system shared memory for one endpoint: conditioning resident across steps (issue 14).

When the orchestrator runs beside Triton (same host, a memory-backed /dev/shm both can see), a
UNet call's conditioning (`encoder_hidden_states`, and SDXL's added conditions) does not travel in
gRPC at all. Each such input is gathered, in the wire dtype, into a *staging slot*: a system shared
memory region registered once with the endpoint and reused. A slot remembers which source arrays
(each job's own conditioning, in batch order) it holds; when the next call's sources are the same
objects in the same order (lockstep step batching keeps a batch's composition from step to step),
nothing is copied and only the region's name travels. A slot is rewritten only when the batch's
composition changed. The per-call tensors (latents in, `timestep`, `noise_pred` out) go through a
scratch region leased for the call: one local copy each way, no protobuf.

Identity is the contract: a source array must not be changed in place while it may be staged
(the pipeline never does: a job's conditioning is set once). The slots hold references to their
sources, so an array's id cannot be reused while a slot compares against it.

A Triton restart forgets registrations; the regions (ours, in /dev/shm) keep their bytes, so the
caller re-registers them all (`reregister`) and resends. An endpoint that cannot open the regions
(a remote Triton) refuses the probe registration: `auto` then uses plain gRPC for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import np_to_triton_dtype

log = logging.getLogger(__name__)

#: ORCHESTRATOR_TRITON_SHARED_MEMORY values
MODES = ("auto", "on", "off")
#: inputs that stay the same for a job's every step: staged, rewritten only when the batch changes
RESIDENT_INPUTS = frozenset({"encoder_hidden_states", "text_embeds", "time_ids"})
#: outputs whose shape is an input's (so a region can be sized before the call)
SAME_SHAPE_OUTPUTS: Mapping[str, str] = {"noise_pred": "sample"}
#: staging slots per resident input and endpoint (concurrent batches of different composition)
MAX_SLOTS = 4
_ALIGN = 64


def cast_into(dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> None:
    """Copy `src` into `dst`, casting to its dtype; fp32<->fp16 through torch, whose cast is
    vectorised (numpy 1.26's takes 30 times as long: docs/benchmarks.md, issue 14)."""
    if dst.dtype == src.dtype or dst.dtype.kind not in "f" or src.dtype.kind not in "f":
        np.copyto(dst, src, casting="unsafe")
        return
    with warnings.catch_warnings():
        # gRPC answers are read-only arrays; torch warns on wrapping them but only reads them
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(dst).copy_(torch.from_numpy(src))


def cast(arr: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """`arr` in `dtype`: itself when it already is, else a (fast) converted copy."""
    if arr.dtype == dtype:
        return arr
    out = np.empty(arr.shape, dtype)
    cast_into(out, np.ascontiguousarray(arr))
    return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Region:
    """One system shared memory region we created, registered with one endpoint."""

    _serial = itertools.count()

    def __init__(self, prefix: str, byte_size: int) -> None:
        self.name = f"{prefix}-{next(self._serial)}"
        self.key = f"/{self.name}"
        self.byte_size = byte_size
        self.handle = shm.create_shared_memory_region(self.name, self.key, byte_size)

    def view(self, dtype: np.dtype[Any], shape: Sequence[int], offset: int) -> npt.NDArray[Any]:
        arr: npt.NDArray[Any] = shm.get_contents_as_numpy(self.handle, dtype, list(shape), offset)
        return arr

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(self.handle)


@dataclasses.dataclass
class _Slot:
    region: Region
    sources: tuple[npt.NDArray[Any], ...] = ()
    dtype: np.dtype[Any] | None = None
    users: int = 0
    used_at: int = 0

    def holds(self, sources: Sequence[npt.NDArray[Any]], dtype: np.dtype[Any]) -> bool:
        return (
            self.dtype == dtype
            and len(sources) == len(self.sources)
            and all(a is b for a, b in zip(sources, self.sources, strict=True))
        )


@dataclasses.dataclass
class Lease:
    """What one call holds: its slots and its scratch region, and where its outputs land."""

    slots: list[_Slot]
    scratch: Region | None
    outputs: dict[str, npt.NDArray[Any]]
    #: resident input name -> whether it was (re)written for this call
    written: dict[str, bool]


class ShmChannel:
    """The shared memory of one endpoint's calls (held by its TritonClient)."""

    def __init__(
        self, client: aioclient.InferenceServerClient, *, timeout_s: float, url: str = ""
    ) -> None:
        self._client = client
        self.url = url
        #: the per-call tensors (latents, timestep, noise_pred) through a scratch region too;
        #: False: only the conditioning is in shared memory, the rest travels in gRPC
        self.scratch_tensors = True
        self.timeout_s = timeout_s
        self.prefix = f"orch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._slots: dict[str, list[_Slot]] = {}
        #: scratch regions free for a call (`_all_scratch`: every one, leased or not)
        self._scratch: list[Region] = []
        self._all_scratch: list[Region] = []
        self._lock = asyncio.Lock()
        self._clock = itertools.count()
        #: bumps at each re-registration (a caller that saw a lost region retries once)
        self.generation = 0
        #: conditioning bytes written into slots so far (0 in steady state), and calls served
        self.bytes_staged = 0
        self.calls = 0

    def _key(self, region: Region) -> str:
        """The key Triton opens (a hook for tests emulating a remote Triton)."""
        return region.key

    async def _register(self, region: Region) -> None:
        await self._client.register_system_shared_memory(
            region.name, self._key(region), region.byte_size, client_timeout=self.timeout_s
        )

    async def _drop(self, region: Region) -> None:
        with contextlib.suppress(Exception):
            await self._client.unregister_system_shared_memory(
                region.name, client_timeout=self.timeout_s
            )
        region.destroy()

    async def probe(self) -> None:
        """Register and drop a small region: raises where the endpoint cannot open ours."""
        region = Region(f"{self.prefix}-probe", _ALIGN)
        try:
            await self._register(region)
        finally:
            await self._drop(region)

    async def reregister(self, seen_generation: int) -> None:
        """Register every region again (Triton restarted and forgot them); the bytes are ours
        and still there, so nothing is rewritten. Once per generation, however many calls saw it."""
        async with self._lock:
            if self.generation != seen_generation:
                return
            regions = [s.region for slots in self._slots.values() for s in slots]
            for region in [*regions, *self._all_scratch]:
                with contextlib.suppress(Exception):
                    await self._client.unregister_system_shared_memory(
                        region.name, client_timeout=self.timeout_s
                    )
                await self._register(region)
            self.generation += 1
            log.info("re-registered %d shared memory regions with Triton", len(regions))

    async def _slot(
        self, name: str, sources: Sequence[npt.NDArray[Any]], dtype: np.dtype[Any], nbytes: int
    ) -> tuple[_Slot, bool] | None:
        """A slot holding `sources` in `dtype`, written now if it did not, with this call counted
        among its users; None when every slot is busy with other batches."""
        slots = self._slots.setdefault(name, [])
        for slot in slots:
            if slot.holds(sources, dtype) and slot.region.byte_size >= nbytes:
                slot.users += 1
                slot.used_at = next(self._clock)
                return slot, False
        free = [s for s in slots if s.users == 0]
        if len(slots) < MAX_SLOTS:  # a new slot first: the free ones may be wanted again
            slot = _Slot(Region(self.prefix, _aligned(nbytes)))
            slots.append(slot)
            slot.users += 1
            try:
                async with self._lock:
                    await self._register(slot.region)
            except BaseException:
                slots.remove(slot)
                slot.region.destroy()
                raise
            slot.users -= 1
        elif free:
            slot = min(free, key=lambda s: s.used_at)  # the least recently used
        else:
            return None
        # claimed before any await: no other call rewrites or reads it while it is written
        slot.users += 1
        slot.used_at = next(self._clock)
        slot.sources, slot.dtype = (), None
        try:
            if slot.region.byte_size < nbytes:
                async with self._lock:
                    await self._drop(slot.region)
                    slot.region = Region(self.prefix, _aligned(nbytes))
                    await self._register(slot.region)
            row_bytes = int(np.prod(sources[0].shape[1:])) * dtype.itemsize
            row = 0
            for src in sources:
                view = slot.region.view(dtype, src.shape, row * row_bytes)
                cast_into(view, np.ascontiguousarray(src))
                row += int(src.shape[0])
        except BaseException:
            slot.users -= 1
            raise
        slot.sources, slot.dtype = tuple(sources), dtype
        self.bytes_staged += nbytes
        return slot, True

    async def _scratch_region(self, nbytes: int) -> Region:
        for i, region in enumerate(self._scratch):
            if region.byte_size >= nbytes:
                return self._scratch.pop(i)
        async with self._lock:
            region = Region(self.prefix, _aligned(max(nbytes, 1 << 20)))
            try:
                await self._register(region)
            except BaseException:
                region.destroy()
                raise
            self._all_scratch.append(region)
        return region

    async def prepare(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        sources: Mapping[str, Sequence[npt.NDArray[Any]]],
        outputs: Sequence[str],
        dtypes: Mapping[str, np.dtype[Any]],
    ) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput], Lease]:
        """The call's inputs and requested outputs, every tensor through shared memory where it
        can (`inputs` in fp32 or their own dtype; `dtypes` the declared wire dtypes)."""
        lease = Lease([], None, {}, {})
        infer_inputs: list[grpcclient.InferInput] = []
        scratch_plan: list[tuple[str, npt.NDArray[Any], np.dtype[Any], int]] = []
        offset = 0
        try:
            for name in inputs:
                parts = sources.get(name, ())
                if name in RESIDENT_INPUTS and parts:
                    # the members' own arrays: a merged input is never concatenated for a slot
                    first = parts[0]
                    shape = (sum(int(p.shape[0]) for p in parts), *first.shape[1:])
                    dtype = dtypes.get(name, first.dtype)
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    found = await self._slot(name, parts, dtype, nbytes)
                    if found is not None:
                        slot, written = found
                        lease.slots.append(slot)
                        lease.written[name] = written
                        inp = grpcclient.InferInput(name, list(shape), np_to_triton_dtype(dtype))
                        inp.set_shared_memory(slot.region.name, nbytes, 0)
                        infer_inputs.append(inp)
                        continue
                arr = inputs[name]
                dtype = dtypes.get(name, arr.dtype)
                if arr.dtype == np.object_:
                    inp = grpcclient.InferInput(name, list(arr.shape), "BYTES")
                    inp.set_data_from_numpy(arr)
                    infer_inputs.append(inp)
                    continue
                nbytes = int(np.prod(arr.shape)) * dtype.itemsize
                inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(dtype))
                if name in RESIDENT_INPUTS:
                    found = await self._slot(name, sources.get(name, (arr,)), dtype, nbytes)
                    if found is not None:
                        slot, written = found
                        lease.slots.append(slot)
                        lease.written[name] = written
                        inp.set_shared_memory(slot.region.name, nbytes, 0)
                        infer_inputs.append(inp)
                        continue
                infer_inputs.append(inp)
                if not self.scratch_tensors:
                    inp.set_data_from_numpy(cast(arr, dtype))
                    continue
                scratch_plan.append((name, arr, dtype, offset))
                offset += _aligned(nbytes)
            requested: list[grpcclient.InferRequestedOutput] = []
            out_plan: list[tuple[str, tuple[int, ...], np.dtype[Any], int]] = []
            for name in outputs:
                out = grpcclient.InferRequestedOutput(name)
                like = SAME_SHAPE_OUTPUTS.get(name, "")
                if self.scratch_tensors and like in inputs and name in dtypes:
                    shape = tuple(int(d) for d in inputs[like].shape)
                    out_plan.append((name, shape, dtypes[name], offset))
                    offset += _aligned(int(np.prod(shape)) * dtypes[name].itemsize)
                requested.append(out)
            if offset:
                lease.scratch = region = await self._scratch_region(offset)
                by_input = {inp.name(): inp for inp in infer_inputs}
                for name, arr, dtype, at in scratch_plan:
                    cast_into(region.view(dtype, arr.shape, at), np.ascontiguousarray(arr))
                    nbytes = int(np.prod(arr.shape)) * dtype.itemsize
                    by_input[name].set_shared_memory(region.name, nbytes, at)
                by_output = {out.name(): out for out in requested}
                for name, shape, dtype, at in out_plan:
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    by_output[name].set_shared_memory(region.name, nbytes, at)
                    lease.outputs[name] = region.view(dtype, shape, at)
        except BaseException:
            self.release(lease)
            raise
        self.calls += 1
        return infer_inputs, requested, lease

    def release(self, lease: Lease) -> None:
        for slot in lease.slots:
            slot.users -= 1
        lease.slots.clear()
        lease.outputs.clear()
        if lease.scratch is not None:
            self._scratch.append(lease.scratch)
            lease.scratch = None

    async def close(self) -> None:
        regions = [s.region for slots in self._slots.values() for s in slots] + self._all_scratch
        self._slots.clear()
        self._scratch, self._all_scratch = [], []
        for region in regions:
            await self._drop(region)


def is_lost_region(message: str) -> bool:
    """Whether a Triton error says a shared memory region it was told about is unknown."""
    text = message.lower()
    return "shared memory region" in text and ("unable to find" in text or "not found" in text)
