"""The prompt-embedding cache, pure part: keys, the model's identity, an LRU bounded by bytes.

No I/O here. `orchestrator/prompt_cache.py` puts it in front of the Triton runner.

Why the prompt's text is a correct key: the `encode_prompt` model (tokenizer + text encoder, an
ensemble in this repository) is a deterministic function of its input, the prompt's bytes, and of
the deployed models. The tokenised prompt is determined by the text and the tokenizer, the
embeddings by the token ids and the text encoder, so (model identity, model name, prompt bytes)
determines every output row; two prompts that tokenise alike merely get two entries.

The model identity is a digest of what Triton reports about the model and, for an ensemble, each
model it runs: the full model config (backend, tensors, parameters such as the repository's
`source`, the ensemble's steps) and the versions Triton has ready. A new model version, a changed
config or a repository built from other weights (another `source`) gives another identity, and
entries made under the old one are never looked up again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

#: one prompt's outputs: output name -> that prompt's row (the batch dimension removed)
Row = Mapping[str, npt.NDArray[Any]]

#: bytes counted per entry beyond its tensors and prompt (the dict, the arrays' headers, the key)
ENTRY_OVERHEAD_BYTES = 512


class PromptKey(NamedTuple):
    """What determines one encoded prompt: the deployed model's identity, its name, the text."""

    identity: str
    model: str
    prompt: bytes


def model_identity(description: Mapping[str, Any]) -> str:
    """A digest of a JSON-able description (model name -> its config and ready versions).

    Canonical JSON (sorted keys), so the same description always gives the same identity."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ensemble_steps(config: Mapping[str, Any]) -> list[str]:
    """The model names an ensemble's config runs (Triton's JSON form); [] for other models."""
    scheduling = config.get("ensemble_scheduling") or {}
    return [str(step["model_name"]) for step in scheduling.get("step", []) if "model_name" in step]


def prompt_bytes(value: object) -> bytes:
    """A BYTES tensor element as Triton receives it: bytes as they are, text as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.bytes_):
        return bytes(value)
    raise TypeError(f"a prompt must be bytes or str, not {type(value).__name__}")


def frozen_row(outputs: Mapping[str, npt.NDArray[Any]], index: int) -> dict[str, npt.NDArray[Any]]:
    """Row `index` of every output: a private, read-only copy (a view would keep the whole
    batch's buffer alive and let a consumer change what the cache serves)."""
    row: dict[str, npt.NDArray[Any]] = {}
    for name, arr in outputs.items():
        one = np.array(arr[index], copy=True)
        one.setflags(write=False)
        row[name] = one
    return row


def entry_bytes(key: PromptKey, row: Row) -> int:
    """What one entry is charged against the byte bound."""
    return sum(int(a.nbytes) for a in row.values()) + len(key.prompt) + ENTRY_OVERHEAD_BYTES


def covers(row: Row, outputs: Iterable[str]) -> bool:
    """True when the entry holds every output a call asks for."""
    return all(name in row for name in outputs)


@dataclasses.dataclass
class _Entry:
    row: Row
    size: int


class EmbeddingCache:
    """Least-recently-used entries, at most `max_entries` of them and `max_bytes` in all.

    Either bound at 0 disables the cache: nothing is stored, every lookup misses."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[PromptKey, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: PromptKey) -> Row | None:
        """The entry, now the most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.row

    def put(self, key: PromptKey, row: Row) -> bool:
        """Store (or replace) an entry, evicting the least recently used ones to stay within
        both bounds. False when the entry alone exceeds the byte bound (or the cache is off)."""
        size = entry_bytes(key, row)
        if not self.enabled or size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = _Entry(row, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
            self.evictions += 1
        return True

    def clear(self) -> int:
        """Drop every entry; returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return n

    def __iter__(self) -> Iterator[PromptKey]:
        """The keys, least recently used first."""
        return iter(list(self._entries))
