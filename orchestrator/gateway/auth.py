"""API keys (stored as sha256 hashes, compared in constant time) and per-key limits.

The keys file is JSON: ``{"keys": [{"id": "alice", "sha256": "<hex of sha256(key)>",
"routes": ["jobs", "generations", "images"], "rate_per_s": 5, "burst": 20,
"max_concurrent": 8}]}``; ``routes`` ``["*"]`` allows every route; the limits default to the
gateway settings. Mount a Kubernetes secret holding it as the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
from pathlib import Path
from typing import Any

#: route groups a key may be allowed
ROUTES = ("generations", "jobs", "images")


@dataclasses.dataclass(frozen=True)
class ApiKey:
    key_id: str
    sha256: bytes
    routes: frozenset[str]
    rate_per_s: float
    burst: int
    max_concurrent: int

    def allows(self, route: str) -> bool:
        return "*" in self.routes or route in self.routes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        rate_per_s: float,
        burst: int,
        max_concurrent: int,
        extra_plain_keys: dict[str, str] | None = None,
    ) -> KeyStore:
        """Keys from `path` (None: none) plus `extra_plain_keys` (id -> key, allowed all routes).
        Raises ValueError naming the entry for a malformed file."""
        raw: Any = {"keys": []} if path is None else json.loads(path.read_text("utf-8"))
        entries = raw.get("keys") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected an object with a `keys` list")
        keys = []
        for i, entry in enumerate(entries):
            try:
                digest = bytes.fromhex(entry["sha256"])
                if len(digest) != 32:
                    raise ValueError("sha256 must be 64 hex digits")
                routes = frozenset(str(r) for r in entry.get("routes", ["*"]))
                keys.append(
                    ApiKey(
                        key_id=str(entry["id"]),
                        sha256=digest,
                        routes=routes,
                        rate_per_s=float(entry.get("rate_per_s", rate_per_s)),
                        burst=int(entry.get("burst", burst)),
                        max_concurrent=int(entry.get("max_concurrent", max_concurrent)),
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: keys[{i}] is malformed: {exc}") from exc
        for key_id, plain in (extra_plain_keys or {}).items():
            keys.append(
                ApiKey(
                    key_id,
                    hashlib.sha256(plain.encode()).digest(),
                    frozenset({"*"}),
                    rate_per_s,
                    burst,
                    max_concurrent,
                )
            )
        return cls(keys)

    def authenticate(self, token: str) -> ApiKey | None:
        """The key whose hash matches `token`; every stored hash is compared (constant time)."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take(now)` -> 0.0 when allowed, else the seconds
    until a token is there (the Retry-After)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
