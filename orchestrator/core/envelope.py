"""Checks of what a request says about itself rather than about the image: its id, where the
answer goes, its metadata and its deadline. Pure: the service applies them before any work.

- ``request_id`` is the idempotency key, the answer's record key and (through a digest) the
  name of stored files: 1 to ``max_request_id_chars`` characters, letters, digits and
  ``. _ : @ + = -``, starting with a letter or digit (so never ``.`` or ``..``).
- ``reply_topic`` must be allowed: one of the exact names, or under one of the prefixes, and
  never the request or dead-letter topic (the service would feed itself or forge dead letters).
- ``metadata`` is echoed in the answer: entries and sizes are bounded.
- ``deadline`` must look like an absolute epoch time and not lie absurdly far ahead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from orchestrator.domain import GenerationRequest, Priority
from orchestrator.errors import ReplyTopicNotAllowed, ValidationError

_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]*")
#: Kafka's own rule for topic names
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: epoch seconds before this (2001-09-09) are taken for a unit mistake (seconds, a duration)
_EARLIEST_DEADLINE_S = 1_000_000_000.0


@dataclasses.dataclass(frozen=True)
class EnvelopeLimits:
    max_request_id_chars: int = 128
    max_metadata_entries: int = 32
    max_metadata_key_chars: int = 128
    max_metadata_value_chars: int = 1024
    #: how far in the future a deadline may lie
    max_deadline_ahead_s: float = 7 * 24 * 3600.0


_PRIORITIES = frozenset(p.value for p in Priority)


def check_envelope(request: GenerationRequest, limits: EnvelopeLimits, now: float) -> None:
    """Raise :class:`ValidationError` naming the field when the envelope is out of bounds."""
    rid = request.request_id
    if not rid:
        raise ValidationError("request_id", "must not be empty")
    if len(rid) > limits.max_request_id_chars:
        raise ValidationError(
            "request_id",
            f"is {len(rid)} characters, more than the {limits.max_request_id_chars} allowed",
        )
    if not _REQUEST_ID.fullmatch(rid):
        raise ValidationError(
            "request_id",
            f"{rid[:40]!r} must start with a letter or digit and use only letters, digits "
            "and . _ : @ + = -",
        )
    if request.priority not in _PRIORITIES:
        raise ValidationError(
            "priority",
            f"{request.priority[:40]!r} is not one of {', '.join(sorted(_PRIORITIES))}",
        )
    metadata = request.metadata
    if len(metadata) > limits.max_metadata_entries:
        raise ValidationError(
            "metadata",
            f"has {len(metadata)} entries, more than the {limits.max_metadata_entries} allowed",
        )
    for key, value in metadata.items():
        if len(key) > limits.max_metadata_key_chars:
            raise ValidationError(
                "metadata",
                f"key {key[:40]!r}... is {len(key)} characters, more than the "
                f"{limits.max_metadata_key_chars} allowed",
            )
        if len(value) > limits.max_metadata_value_chars:
            raise ValidationError(
                f"metadata[{key[:40]!r}]",
                f"value is {len(value)} characters, more than the "
                f"{limits.max_metadata_value_chars} allowed",
            )
    deadline = request.deadline
    if deadline is not None:
        if deadline < _EARLIEST_DEADLINE_S:
            raise ValidationError(
                "deadline_ms",
                f"{deadline * 1000:.0f} is not an absolute time in epoch milliseconds "
                "(it lies before 2001; a duration or seconds?)",
            )
        if deadline > now + limits.max_deadline_ahead_s:
            raise ValidationError(
                "deadline_ms",
                f"lies {deadline - now:.0f} s ahead, more than the "
                f"{limits.max_deadline_ahead_s:.0f} s allowed",
            )


def _split(names: str | Iterable[str]) -> tuple[str, ...]:
    items = names.split(",") if isinstance(names, str) else names
    return tuple(n.strip() for n in items if n.strip())


@dataclasses.dataclass(frozen=True)
class ReplyTopicRule:
    """Which topics a request may ask its answer to go to."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    #: never allowed, whatever the other fields say
    forbidden: frozenset[str]

    @classmethod
    def of(
        cls,
        *,
        default: str,
        exact: str | Iterable[str] = (),
        prefixes: str | Iterable[str] = (),
        forbidden: Iterable[str] = (),
    ) -> ReplyTopicRule:
        return cls(
            exact=frozenset((default, *_split(exact))),
            prefixes=_split(prefixes),
            forbidden=frozenset(forbidden),
        )

    def allows(self, topic: str) -> bool:
        if topic in self.forbidden or not _TOPIC.fullmatch(topic):
            return False
        return topic in self.exact or any(
            topic.startswith(p) and len(topic) > len(p) for p in self.prefixes
        )

    def check(self, topic: str) -> None:
        if not self.allows(topic):
            allowed = sorted(self.exact - self.forbidden)
            under = f" or a topic under {', '.join(self.prefixes)}" if self.prefixes else ""
            raise ReplyTopicNotAllowed(
                f"reply topic {topic[:250]!r} is not allowed: use one of {allowed}{under}",
                stage="validate",
            )
