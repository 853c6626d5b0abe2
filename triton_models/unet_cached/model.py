"""Triton Python-backend model `unet_cached`: the UNet with each job's conditioning kept here.

Copied into `unet_cached/1/model.py` by `orchestrator models build` (both targets), and by the
transport benchmark in front of its echo UNets. Over plain gRPC (Triton on another host, no
shared memory) a UNet call would carry every job's text embeddings at every step; through this
model a step carries the latents, the timesteps and one conditioning row id per row, and the
conditioning travels once per job and endpoint (docs/operations.md, "Conditioning cached in
Triton (remote)").

Inputs (`max_batch_size: 0`: every dim is explicit, the first is the call's rows):
- `sample` [N, C, H, W], `timestep` [N, 1]: as the UNet's;
- `cond_ids` [N] INT64: per row, the id of the conditioning row it uses;
- optional `new_ids` [M] INT64 and, per conditioning input X of the UNet (`encoder_hidden_states`;
  SDXL's `text_embeds`, `time_ids`), `new_X` [M, ...]: conditioning rows to keep, by id;
- optional `release_ids` [K] INT64: rows whose job has ended (dropped; unknown ids are ignored).

A row id this model does not hold, and that the request does not bring, fails the whole request
with an error whose message starts with `CONDITIONING_MISS` (the orchestrator then sends the same
call again with every row's conditioning; it never counts as a failure). Rows the request brings
are used for this call even when the cache cannot keep them.

The cache: rows by id, least recently used first out, bounded by bytes (`cache_max_bytes`, or the
environment variable `ORCH_COND_CACHE_MAX_BYTES`); a row unused for `cache_idle_ttl_s` (or
`ORCH_COND_CACHE_IDLE_TTL_S`) is dropped. It lives in this process: a restart empties it. The
last few assembled batches (`BATCHES`, by their ids in order) are kept: lockstep step batching
names the same rows in the same order at every step of a cohort, so a steady-state step copies
no conditioning at all. The UNet itself (`target_model`,
default `unet`) is called through BLS, inside Triton.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by unit tests for the pure cache
    pb_utils = None

MISS = "CONDITIONING_MISS"
MAX_BYTES_ENV = "ORCH_COND_CACHE_MAX_BYTES"
TTL_ENV = "ORCH_COND_CACHE_IDLE_TTL_S"
DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_TTL_S = 600.0
NEW_PREFIX = "new_"
#: assembled batches kept (calls alternate between cohorts whose jobs step in lockstep)
BATCHES = 4


class Unavailable(Exception):
    """The UNet this model calls is not ready (a server starting): answered UNAVAILABLE, which
    the orchestrator treats as transient."""


class Miss(Exception):
    """Rows named by a request that the cache does not hold."""

    def __init__(self, ids: Sequence[int]) -> None:
        shown = ", ".join(str(i) for i in ids[:8])
        super().__init__(f"{MISS}: {len(ids)} conditioning row(s) not held: {shown}")
        self.ids = list(ids)


class RowCache:
    """Conditioning rows by id: a tuple of arrays (one per conditioning input) each."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.rows: OrderedDict[int, tuple[tuple[np.ndarray, ...], float]] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        #: the last assembled batches by their ids (one per cohort of lockstep jobs)
        self._batches: OrderedDict[tuple[int, ...], tuple[np.ndarray, ...]] = OrderedDict()

    @staticmethod
    def _size(row: tuple[np.ndarray, ...]) -> int:
        return sum(int(a.nbytes) for a in row)

    def _pop(self, row_id: int) -> None:
        row, _ = self.rows.pop(row_id)
        self.bytes -= self._size(row)

    def expire(self) -> None:
        """Drop rows idle for longer than the TTL (the oldest are first)."""
        now = self.clock()
        while self.rows:
            row_id, (_, used) = next(iter(self.rows.items()))
            if now - used <= self.ttl_s:
                break
            self._pop(row_id)
            self.evicted += 1

    def drop(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            if row_id in self.rows:
                self._pop(row_id)

    def put(self, row_id: int, row: tuple[np.ndarray, ...]) -> None:
        """Keep `row` (copied), evicting the least recently used beyond the bound."""
        if row_id in self.rows:
            self._pop(row_id)
        size = self._size(row)
        if size > self.max_bytes:
            return
        while self.rows and self.bytes + size > self.max_bytes:
            self._pop(next(iter(self.rows)))
            self.evicted += 1
        self.rows[row_id] = (tuple(np.array(a, copy=True) for a in row), self.clock())
        self.bytes += size

    def assemble(
        self, ids: Sequence[int], given: Mapping[int, tuple[np.ndarray, ...]], inputs: int
    ) -> tuple[np.ndarray, ...]:
        """Per conditioning input, the call's rows stacked in `ids` order; raises Miss when a
        row is neither held nor given."""
        missing = [i for i in ids if i not in given and i not in self.rows]
        if missing:
            raise Miss(missing)
        now = self.clock()
        for i in ids:
            if i in self.rows:
                row, _ = self.rows[i]
                self.rows[i] = (row, now)
                self.rows.move_to_end(i)
        key = tuple(ids)
        if not given and key in self._batches:
            self._batches.move_to_end(key)
            return self._batches[key]
        rows = [given[i] if i in given else self.rows[i][0] for i in ids]
        batch = tuple(np.stack([r[k] for r in rows]) for k in range(inputs))
        self._batches[key] = batch
        while len(self._batches) > BATCHES:
            self._batches.popitem(last=False)
        return batch


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    raw = config.get("parameters") or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.model_name = config.get("name", "unet_cached")
        self.target = params.get("target_model", "unet")
        names = [i["name"] for i in config.get("input", [])]
        self.conditioning = [n[len(NEW_PREFIX) :] for n in names if n.startswith(NEW_PREFIX)]
        self.conditioning = [n for n in self.conditioning if n != "ids"]
        max_bytes = int(os.environ.get(MAX_BYTES_ENV) or params.get("cache_max_bytes") or 0)
        ttl = float(os.environ.get(TTL_ENV) or params.get("cache_idle_ttl_s") or 0)
        self.cache = RowCache(max_bytes or DEFAULT_MAX_BYTES, ttl or DEFAULT_TTL_S)

    def _optional(self, request: Any, name: str) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _one(self, request: Any) -> Any:
        released = self._optional(request, "release_ids")
        if released is not None:
            self.cache.drop([int(i) for i in released])
        ids = [int(i) for i in pb_utils.get_input_tensor_by_name(request, "cond_ids").as_numpy()]
        given: dict[int, tuple[np.ndarray, ...]] = {}
        new_ids = self._optional(request, "new_ids")
        if new_ids is not None:
            columns = [self._optional(request, NEW_PREFIX + n) for n in self.conditioning]
            if any(c is None or c.shape[0] != len(new_ids) for c in columns):
                raise ValueError("new_ids needs every new_<conditioning> input, row for row")
            for r, row_id in enumerate(new_ids):
                given[int(row_id)] = tuple(c[r] for c in columns)  # type: ignore[index]
        batch = self.cache.assemble(ids, given, len(self.conditioning))
        for row_id, row in given.items():
            self.cache.put(row_id, row)
        inputs = [
            pb_utils.get_input_tensor_by_name(request, "sample"),
            pb_utils.get_input_tensor_by_name(request, "timestep"),
            *(pb_utils.Tensor(n, a) for n, a in zip(self.conditioning, batch, strict=True)),
        ]
        response = pb_utils.InferenceRequest(
            model_name=self.target,
            requested_output_names=self.outputs(request),
            inputs=inputs,
        ).exec()
        if response.has_error():
            error = response.error()
            message = f"{self.target}: {error.message()}"
            code = getattr(error, "code", lambda: None)()
            unavailable = getattr(pb_utils.TritonError, "UNAVAILABLE", object())
            if code == unavailable or "not ready" in message.lower():
                # the UNet is loading (a restart): the caller may try again, as with any
                # endpoint that is not ready yet
                raise Unavailable(message)
            raise RuntimeError(message)
        return pb_utils.InferenceResponse(output_tensors=response.output_tensors())

    def outputs(self, request: Any) -> list[str]:
        asked = request.requested_output_names()
        return list(asked) if asked else ["noise_pred"]

    def execute(self, requests: list[Any]) -> list[Any]:
        self.cache.expire()
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # answered, never raised out of execute
                message = str(exc) if isinstance(exc, Miss) else f"{self.model_name}: {exc!r}"
                error = pb_utils.TritonError(message)
                if isinstance(exc, Unavailable) and hasattr(pb_utils.TritonError, "UNAVAILABLE"):
                    error = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def finalize(self) -> None:
        self.cache.rows.clear()
