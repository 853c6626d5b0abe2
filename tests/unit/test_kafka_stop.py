"""stop_client: aiokafka clients stopped with the broker gone (no server needed)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.adapters.kafka import stop_client


async def test_stop_client_ends_aiokafkas_own_cancelled_error_not_the_callers() -> None:

    class BrokerGone:
        """As aiokafka's consumer.stop() with the broker gone: it cancels its fetch task while
        that sleeps in retry backoff, then awaits it, and the CancelledError comes out."""

        async def stop(self) -> None:
            inner = asyncio.create_task(asyncio.sleep(10))
            await asyncio.sleep(0)
            inner.cancel()
            await inner

    await stop_client(BrokerGone())  # ends here: the rest of a shutdown goes on

    class Slow:
        async def stop(self) -> None:
            await asyncio.sleep(10)

    caller = asyncio.create_task(stop_client(Slow()))
    await asyncio.sleep(0.01)
    caller.cancel()  # the caller's own cancellation still propagates
    with pytest.raises(asyncio.CancelledError):
        await caller

    class Broken:
        async def stop(self) -> None:
            raise RuntimeError("other errors too")

    with pytest.raises(RuntimeError):
        await stop_client(Broken())
