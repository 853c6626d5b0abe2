"""A StageRunner in front of the Triton runner that encodes each distinct prompt once.

Every job starts with an `encode_prompt` call carrying its prompts ([negative, prompt] when
guided); most guided requests share the empty negative prompt, and repeated prompts are common.
`PromptCacheRunner.infer` answers the rows of such a call from `EmbeddingCache` (the pure LRU in
`orchestrator.core.prompt_cache`), sends the rest, each distinct prompt once, as one smaller call
to the runner behind it, and reassembles every output the call asked for in the call's order.
A prompt already being encoded by another call is awaited, not sent again. Other models' calls
pass straight through.

It sits between the step batcher and Triton: the batcher still sees every job's call (its rule,
flush when every active job waits, is unchanged) and merges them, and the cache then drops the
duplicates of the merged call (16 guided requests: 16 empty negative prompts become one row, or
none once warm).

Keys carry the model's identity as Triton describes it (`triton_identity`), read before the first
call, again at most every `check_interval_s`, and again after any failed call (a restarted or
redeployed Triton). While the identity cannot be read (Triton down, endpoints that disagree) the
cache is bypassed: calls go through whole, nothing is served from or stored in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from orchestrator.core.pipeline import ENCODE_PROMPT
from orchestrator.core.prompt_cache import (
    EmbeddingCache,
    PromptKey,
    Row,
    covers,
    ensemble_steps,
    frozen_row,
    model_identity,
    prompt_bytes,
)
from orchestrator.domain import StageCall
from orchestrator.errors import InferenceError, TransientInferenceError
from orchestrator.executor import StageRunner

if TYPE_CHECKING:
    from orchestrator.adapters.metrics import Metrics
    from orchestrator.config import Settings

log = logging.getLogger("orchestrator.prompt_cache")

Outputs = dict[str, npt.NDArray[Any]]
#: the model's identity now; None: unknown (the cache is bypassed until it is known)
IdentitySource = Callable[[], Awaitable[str | None]]
#: per endpoint, per model: {"config": ..., "versions": [...]} (TritonPool.describe_models)
Describe = Callable[[Sequence[str]], Awaitable[Mapping[str, Mapping[str, Any]]]]


#: while the identity is unknown, it is read again at least this often
UNKNOWN_RECHECK_S = 1.0


class TritonPoolLike(StageRunner, Protocol):
    """A runner that can also describe its models (TritonPool)."""

    async def describe_models(self, models: Sequence[str]) -> dict[str, dict[str, Any]]: ...


def identity_of(descriptions: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One identity for every endpoint's description; None when none answered or they differ
    (a call may go to any endpoint, so an entry is only safe when all serve the same model)."""
    identities = {model_identity(d) for d in descriptions.values()}
    if len(identities) == 1:
        return identities.pop()
    if identities:
        log.warning(
            "the Triton endpoints describe the text encoder differently (%d versions): "
            "the prompt cache is bypassed until they agree",
            len(identities),
        )
    return None


def triton_identity(describe: Describe, model: str = ENCODE_PROMPT) -> IdentitySource:
    """The identity of `model` and, for an ensemble, of every model it runs (recursively):
    their configs and ready versions, as every reachable Triton endpoint reports them."""

    async def read() -> str | None:
        found: dict[str, dict[str, Any]] = {
            address: dict(models) for address, models in (await describe([model])).items()
        }
        seen = {model}
        while found:
            steps = {
                step
                for models in found.values()
                for desc in models.values()
                for step in ensemble_steps(desc.get("config", {}))
            } - seen
            if not steps:
                break
            seen |= steps
            more = await describe(sorted(steps))
            # an endpoint that did not answer every round is left out
            found = {a: {**found[a], **more[a]} for a in found if a in more}
        return identity_of(found)

    return read


class PromptCacheRunner:
    """A StageRunner: `encode_prompt` rows from the cache, the misses from `inner`."""

    def __init__(
        self,
        inner: StageRunner,
        cache: EmbeddingCache,
        identity: IdentitySource,
        *,
        model: str = ENCODE_PROMPT,
        input_name: str = "prompt",
        check_interval_s: float = 10.0,
        on_lookup: Callable[[int, int], None] | None = None,
        on_size: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.cache = cache
        self.model = model
        self.input_name = input_name
        self.check_interval_s = check_interval_s
        self.on_lookup = on_lookup
        self.on_size = on_size
        self._identity_source = identity
        self._clock = clock
        #: the identity in use; None: unknown now (the cache is bypassed)
        self._identity: str | None = None
        #: the last identity read (a different one drops the cache)
        self._known: str | None = None
        self._checked_at: float | None = None
        self._check_lock = asyncio.Lock()
        self._inflight: dict[tuple[PromptKey, tuple[str, ...]], asyncio.Future[Row]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: rows answered without a row of their own in a Triton call (from the cache, or by a
        #: computation of the same prompt already under way), and rows sent
        self.hits = 0
        self.misses = 0

    # -- the model's identity ----------------------------------------------------------------

    @property
    def identity(self) -> str | None:
        return self._identity

    def invalidate_identity(self) -> None:
        """Read the identity again before the next call is served."""
        self._checked_at = None

    async def current_identity(self) -> str | None:
        """The identity, read again when older than check_interval_s."""
        if not self._due():
            return self._identity
        async with self._check_lock:
            if not self._due():
                return self._identity
            try:
                identity = await self._identity_source()
            except Exception as exc:
                log.warning("cannot read the text encoder's identity: %r", exc)
                identity = None
            if identity is not None and self._known is not None and identity != self._known:
                dropped = self.cache.clear()
                self._report_size()
                log.info(
                    "the text encoder changed (identity %s -> %s): %d cached prompts dropped",
                    self._known[:12],
                    identity[:12],
                    dropped,
                )
            if identity is not None:
                self._known = identity
            self._identity = identity
            self._checked_at = self._clock()
            return identity

    def _due(self) -> bool:
        if self._checked_at is None:
            return True
        # while unknown (Triton down, endpoints disagreeing), ask again sooner
        interval = self.check_interval_s if self._identity is not None else UNKNOWN_RECHECK_S
        return self._clock() - self._checked_at >= min(interval, self.check_interval_s)

    # -- the StageRunner ---------------------------------------------------------------------

    def _prompts(self, call: StageCall) -> list[bytes] | None:
        """The call's prompts when it is a call this cache serves, else None."""
        if call.model != self.model or set(call.inputs) != {self.input_name}:
            return None
        arr = call.inputs[self.input_name]
        if arr.dtype != np.object_ or arr.ndim != 2 or arr.shape[1] != 1:
            return None
        try:
            return [prompt_bytes(v) for v in arr[:, 0]]
        except TypeError:
            return None

    async def infer(self, call: StageCall) -> Outputs:
        prompts = self._prompts(call) if self.cache.enabled else None
        if prompts is None:
            return await self.inner.infer(call)
        identity = await self.current_identity()
        if identity is None:
            return await self.inner.infer(call)
        outputs = tuple(call.outputs)
        rows: list[Row | None] = [None] * len(prompts)
        waits: dict[int, asyncio.Future[Row]] = {}
        mine: dict[PromptKey, asyncio.Future[Row]] = {}
        loop = asyncio.get_running_loop()
        hits = 0
        for i, text in enumerate(prompts):
            key = PromptKey(identity, call.model, text)
            row = self.cache.get(key)
            if row is not None and covers(row, outputs):
                rows[i] = row
                hits += 1
                continue
            fut = self._inflight.get((key, outputs))
            if fut is None:
                fut = loop.create_future()
                fut.add_done_callback(_retrieve)
                self._inflight[(key, outputs)] = fut
                mine[key] = fut
            else:
                hits += 1
            waits[i] = fut
        self.hits += hits
        self.misses += len(mine)
        if self.on_lookup is not None:
            self.on_lookup(hits, len(mine))
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("prompt_cache.hits", hits)
            span.set_attribute("prompt_cache.misses", len(mine))
        if mine:
            # its own task: a caller that gives up does not fail the others awaiting its prompts
            task = loop.create_task(self._compute(call, outputs, mine))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if waits:
            done = await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
            for i, row in zip(waits, done, strict=True):
                rows[i] = row
        full = [r for r in rows if r is not None]
        assert len(full) == len(rows)
        return {name: np.stack([r[name] for r in full]) for name in outputs}

    async def _compute(
        self,
        call: StageCall,
        outputs: tuple[str, ...],
        mine: dict[PromptKey, asyncio.Future[Row]],
    ) -> None:
        keys = list(mine)
        prompts = np.array([[k.prompt] for k in keys], dtype=np.object_)
        try:
            try:
                out = await self.inner.infer(
                    StageCall(call.model, {self.input_name: prompts}, outputs)
                )
                _check_rows(call.model, out, outputs, len(keys))
            except asyncio.CancelledError:
                # only aclose() cancels a computation: the service is stopping
                gone = TransientInferenceError(
                    f"{call.model}: encoding cancelled (shutting down)", stage=call.model
                )
                for fut in mine.values():
                    if not fut.done():
                        fut.set_exception(gone)
                raise
            except Exception as exc:
                # Triton may have restarted or changed: confirm the identity before serving more
                self.invalidate_identity()
                for fut in mine.values():
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for j, key in enumerate(keys):
                row = frozen_row({name: out[name] for name in outputs}, j)
                # an entry computed under an identity that has since changed is not kept
                if key.identity == self._identity:
                    self.cache.put(key, row)
                mine[key].set_result(row)
            self._report_size()
        finally:
            for key in keys:
                self._inflight.pop((key, outputs), None)

    def _report_size(self) -> None:
        if self.on_size is not None:
            self.on_size(self.cache.bytes, len(self.cache))

    async def aclose(self) -> None:
        """Cancel computations still running (at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _check_rows(
    model: str, out: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str], rows: int
) -> None:
    for name in outputs:
        arr = out.get(name)
        if arr is None or arr.ndim == 0 or arr.shape[0] != rows:
            got = "no such output" if arr is None else f"shape {arr.shape}"
            raise InferenceError(
                f"{model} output {name!r}: {got}, expected {rows} rows", stage=model
            )


def _retrieve(fut: asyncio.Future[Row]) -> None:
    """Mark a shared computation's failure as seen: its waiters may all have given up."""
    if not fut.cancelled():
        fut.exception()


def prompt_cache_runner(
    triton: TritonPoolLike,
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    inner: StageRunner | None = None,
) -> StageRunner:
    """The service's runner: `triton` (or `inner`, a runner over it) behind a prompt cache
    sized by the settings (hits, misses and size into `metrics`); `triton` (or `inner`) itself
    when a bound is 0. The identity is read from `triton`'s endpoints."""
    runner = inner if inner is not None else triton
    cache = EmbeddingCache(settings.prompt_cache_entries, settings.prompt_cache_bytes)
    if not cache.enabled:
        return runner
    on_lookup = on_size = None
    if metrics is not None:
        hits, misses = metrics.prompt_cache_hits, metrics.prompt_cache_misses
        size, entries = metrics.prompt_cache_bytes, metrics.prompt_cache_entries

        def on_lookup(n_hits: int, n_misses: int) -> None:
            hits.inc(n_hits)
            misses.inc(n_misses)

        def on_size(n_bytes: int, n_entries: int) -> None:
            size.set(n_bytes)
            entries.set(n_entries)

    return PromptCacheRunner(
        runner,
        cache,
        triton_identity(triton.describe_models),
        check_interval_s=settings.prompt_cache_check_s,
        on_lookup=on_lookup,
        on_size=on_size,
    )
