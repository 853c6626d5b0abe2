"""The endpoint choice (pure) and the pool's bookkeeping without servers."""

from __future__ import annotations

import pytest

from orchestrator.core.routing import EndpointState, choose, parse_endpoints


def test_least_outstanding_rows_wins() -> None:
    eps = [EndpointState("a", outstanding_rows=16), EndpointState("b", outstanding_rows=2)]
    assert choose(eps, 0) == 1


def test_open_circuits_are_skipped_and_none_when_all_are_open() -> None:
    eps = [EndpointState("a", open=True), EndpointState("b", outstanding_rows=64)]
    assert choose(eps, 0) == 1
    eps[1].open = True
    assert choose(eps, 0) is None


def test_equals_take_turns() -> None:
    eps = [EndpointState("a"), EndpointState("b"), EndpointState("c")]
    picks = [choose(eps, turn) for turn in range(6)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]  # type: ignore[type-var]


def test_a_slow_endpoint_loses_ties() -> None:
    eps = [EndpointState("a", seconds_per_row=0.05), EndpointState("b", seconds_per_row=0.01)]
    assert {choose(eps, turn) for turn in range(4)} == {1}
    # within 1.5x the speeds count as equal: turns again
    eps[0].seconds_per_row = 0.012
    assert {choose(eps, turn) for turn in range(4)} == {0, 1}


def test_failures_open_the_circuit_and_recovery_closes_it() -> None:
    e = EndpointState("a")
    for _ in range(2):
        e.started(4)
        e.finished(4, 0.1, ok=False, failure_threshold=3)
    assert not e.open and e.outstanding_rows == 0
    e.started(4)
    e.finished(4, 0.1, ok=False, failure_threshold=3)
    assert e.open and e.failures == 3
    e.recovered()
    assert e.available and e.consecutive_failures == 0
    e.started(2)
    e.finished(2, 0.2, ok=True, failure_threshold=3)
    assert e.seconds_per_row == pytest.approx(0.1) and e.rows_sent == 14


def test_parse_endpoints() -> None:
    assert parse_endpoints("a:1, b.svc:8001,[::1]:9") == [("a", 1), ("b.svc", 8001), ("::1", 9)]
    for bad in ("", "a", "a:b", ":80", "a:0", "a:70000"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_settings_refuse_a_bad_endpoint_list() -> None:
    from pydantic import ValidationError

    from orchestrator.config import load_settings

    with pytest.raises(ValidationError, match="triton_url"):
        load_settings(None, triton_url="host-without-port")
    assert load_settings(None, triton_url="a:1,b:2").triton_url == "a:1,b:2"


async def test_pool_resolves_names_and_retires_addresses_gone_from_dns() -> None:
    from orchestrator.adapters.triton_pool import TritonPool

    answers = {"triton-headless": ["10.0.0.1", "10.0.0.2"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    pool = TritonPool("triton-headless:8001,127.0.0.1:9", resolve=resolve)
    try:
        await pool.refresh(force=True)
        assert set(pool.endpoints) == {"10.0.0.1:8001", "10.0.0.2:8001", "127.0.0.1:9"}
        answers["triton-headless"] = ["10.0.0.2", "10.0.0.3"]
        await pool.refresh(force=True)
        assert set(pool.endpoints) == {"10.0.0.2:8001", "10.0.0.3:8001", "127.0.0.1:9"}

        async def broken(host: str, port: int) -> list[str]:
            raise OSError("resolver down")

        pool._resolve = broken
        await pool.refresh(force=True)  # a resolver hiccup keeps what we had
        assert set(pool.endpoints) == {"10.0.0.2:8001", "10.0.0.3:8001", "127.0.0.1:9"}
    finally:
        await pool.close()
