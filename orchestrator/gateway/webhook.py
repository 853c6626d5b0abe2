"""Webhook calls: one signed POST of a job's outcome, retried with backoff.

The signature header is ``Orchestrator-Signature: t=<unix seconds>,v1=<hex>`` where ``<hex>`` is
HMAC-SHA256 with the gateway's webhook secret over ``"<t>." + body``; a receiver recomputes it
and refuses stale timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import aiohttp

log = logging.getLogger("orchestrator.gateway.webhook")

SIGNATURE_HEADER = "Orchestrator-Signature"


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance_s: float = 300) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    stamp = parts.get("t", "")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return False
    timestamp = int(stamp)
    if abs(now - timestamp) > tolerance_s:
        return False
    # bytes: a forged header with non-ASCII text is a mismatch, not a TypeError
    return hmac.compare_digest(sign(secret, body, timestamp).encode(), header.encode())


async def deliver(
    url: str, body: bytes, secret: bytes, *, attempts: int, backoff_s: float, timeout_s: float = 10
) -> bool:
    """POST `body` to `url` until a 2xx answer, at most `attempts` times; True if delivered."""
    delay = backoff_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for attempt in range(1, attempts + 1):
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, body, int(time.time())),
            }
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if 200 <= response.status < 300:
                        return True
                    log.warning("webhook %s answered %d (try %d)", url, response.status, attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("webhook %s failed (try %d): %r", url, attempt, exc)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= 2
    return False
