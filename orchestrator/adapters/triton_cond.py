"""Conditioning sent once per job and endpoint over plain gRPC (issue 14, Triton remote).

Where the orchestrator cannot share memory with Triton, a UNet call goes to `unet_cached`
(triton_models/unet_cached/model.py) instead of `unet`: it names, per row, the id of the
conditioning row it uses, and carries the conditioning only of rows the endpoint has not been
sent yet. The endpoint keeps them (bounded, LRU, idle TTL) and calls the UNet through BLS.

Row ids: each job's conditioning is one array per conditioning input, set once and never changed
in place (the contract the shared-memory path relies on too). The first time a set of source
arrays is seen it gets a block of ids, one per row, for as long as the arrays live: when the job
ends and its arrays are collected, the block is released (every endpoint that was sent it is
told with its next call, `release_ids`). Ids are never reused within a process; a process-unique
random base keeps two orchestrators sharing an endpoint apart.

Per endpoint (`CondState`): the blocks it was sent. A call sends the blocks not in that set; a
`CONDITIONING_MISS` answer (Triton restarted, evicted rows, or another orchestrator released
them) empties the set and the same call goes again carrying every row's conditioning; once the
probe sees the endpoint come back after being down, the set is emptied too. Nothing here does
a retry of a failed call: a miss is not a failure.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import secrets
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

#: ORCHESTRATOR_TRITON_CONDITIONING_CACHE values
MODES = ("auto", "on", "off")
#: the UNet inputs that stay the same for a job's every step
CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")
RESIDENT = frozenset(CONDITIONING)
#: how an endpoint's error message says it does not hold a row it was asked for
MISS_MARK = "CONDITIONING_MISS"
SUFFIX = "_cached"
NEW_PREFIX = "new_"


def cached_model(model: str) -> str:
    """The wrapper serving `model` with cached conditioning."""
    return model + SUFFIX


def is_miss(message: str) -> bool:
    return MISS_MARK in message


@dataclasses.dataclass(frozen=True)
class Block:
    """One job's conditioning rows: ids base .. base + rows - 1."""

    base: int
    rows: int


class RowIds:
    """Blocks of row ids for source arrays, released when an array is collected."""

    def __init__(self) -> None:
        # 20 random bits above 42 bits of blocks (1024 ids each): processes sharing an
        # endpoint draw distinct bases in practice, and a process never wraps
        self._base = secrets.randbits(20) << 42
        self._serial = itertools.count(1)
        self._by_key: dict[tuple[int, ...], tuple[Block, tuple[weakref.ref[Any], ...]]] = {}
        self._states: weakref.WeakSet[CondState] = weakref.WeakSet()

    def watch(self, state: CondState) -> None:
        self._states.add(state)

    def block(self, sources: Sequence[npt.NDArray[Any]]) -> Block:
        """The ids of the rows of one job's conditioning (one array per conditioning input)."""
        key = tuple(id(a) for a in sources)
        held = self._by_key.get(key)
        if held is not None and all(r() is s for r, s in zip(held[1], sources, strict=True)):
            return held[0]
        rows = int(sources[0].shape[0])
        if rows > 1024:
            raise ValueError(f"a job's conditioning has {rows} rows; at most 1024")
        block = Block(self._base + next(self._serial) * 1024, rows)

        def gone(_: object, key: tuple[int, ...] = key, block: Block = block) -> None:
            held = self._by_key.get(key)
            if held is not None and held[0] == block:
                del self._by_key[key]
            for state in list(self._states):
                state.ended(block)

        self._by_key[key] = (block, tuple(weakref.ref(a, gone) for a in sources))
        return block

    def __len__(self) -> int:
        return len(self._by_key)


#: the process's row ids (shared by every endpoint: a job keeps its ids wherever it is served)
ROW_IDS = RowIds()


@dataclasses.dataclass
class CondCounters:
    calls: int = 0
    misses: int = 0
    #: conditioning bytes sent (in wire dtypes): once per job and endpoint, plus resends
    conditioning_bytes: int = 0
    #: bytes per input name sent so far (wire dtypes), every call counted
    input_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the last calls' input bytes by name (what one call carried)
    recent: collections.deque[dict[str, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=256)
    )


class CondState:
    """What one endpoint was sent: blocks it holds (as far as we know) and releases due."""

    def __init__(self, ids: RowIds = ROW_IDS) -> None:
        self.ids = ids
        #: "unprobed", "on" or "off" (the endpoint serves no conditioning cache)
        self.state = "unprobed"
        self.sent: set[Block] = set()
        self.releases: list[Block] = []
        self.counters = CondCounters()
        ids.watch(self)

    def ended(self, block: Block) -> None:
        if block in self.sent:
            self.sent.discard(block)
            self.releases.append(block)

    def forget(self, why: str) -> None:
        if self.sent:
            log.info("conditioning cache: forgetting %d jobs' rows (%s)", len(self.sent), why)
        self.sent.clear()
        self.releases.clear()

    def plan(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        sources: Mapping[str, Sequence[npt.NDArray[Any]]],
        *,
        resend: bool,
    ) -> CachedCall:
        """The inputs of one `unet_cached` call (fp32 or own dtypes; the caller casts)."""
        names = [n for n in CONDITIONING if n in sources]
        members = list(zip(*(sources[n] for n in names), strict=True))
        blocks = [self.ids.block(m) for m in members]
        ids = np.concatenate([np.arange(b.base, b.base + b.rows, dtype=np.int64) for b in blocks])
        # by name: reading a merged call's conditioning would concatenate it
        out: dict[str, npt.NDArray[Any]] = {n: inputs[n] for n in inputs if n not in RESIDENT}
        out["cond_ids"] = ids
        new = [i for i, b in enumerate(blocks) if resend or b not in self.sent]
        if new:
            out["new_ids"] = np.concatenate(
                [np.arange(blocks[i].base, blocks[i].base + blocks[i].rows) for i in new]
            ).astype(np.int64)
            for k, name in enumerate(names):
                parts = [members[i][k] for i in new]
                out[NEW_PREFIX + name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        releases = list(self.releases)
        if releases:
            out["release_ids"] = np.concatenate(
                [np.arange(b.base, b.base + b.rows, dtype=np.int64) for b in releases]
            )
        return CachedCall(out, tuple(blocks[i] for i in new), tuple(releases))

    def done(self, call: CachedCall) -> None:
        """The call succeeded: its new blocks are held there, its releases delivered."""
        self.sent.update(call.new)
        for block in call.releases:
            if block in self.releases:
                self.releases.remove(block)

    def count(self, wire: Mapping[str, npt.NDArray[Any]]) -> None:
        c = self.counters
        c.calls += 1
        c.recent.append({name: int(arr.nbytes) for name, arr in wire.items()})
        for name, arr in wire.items():
            c.input_bytes[name] = c.input_bytes.get(name, 0) + int(arr.nbytes)
            if name.startswith(NEW_PREFIX) and name != "new_ids":
                c.conditioning_bytes += int(arr.nbytes)


@dataclasses.dataclass(frozen=True)
class CachedCall:
    inputs: dict[str, npt.NDArray[Any]]
    new: tuple[Block, ...]
    releases: tuple[Block, ...]


def sources_of(
    inputs: Mapping[str, npt.NDArray[Any]],
    given: Mapping[str, Sequence[npt.NDArray[Any]]],
) -> dict[str, Sequence[npt.NDArray[Any]]] | None:
    """Per conditioning input, the members' own arrays (a merged call's `sources`, or the input
    itself for a single job); None when the call has no conditioning or they disagree."""
    out: dict[str, Sequence[npt.NDArray[Any]]] = {}
    for name in CONDITIONING:
        if name not in inputs:
            continue
        parts = given.get(name)
        out[name] = tuple(parts) if parts else (inputs[name],)
    if not out:
        return None
    counts = {len(p) for p in out.values()}
    if len(counts) != 1:
        return None
    rows = [sum(int(a.shape[0]) for a in p) for p in out.values()]
    if len(set(rows)) != 1:
        return None
    return out
