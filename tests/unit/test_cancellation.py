"""The cancel registry: where a cancel finds its request, idempotence, what is remembered."""

from __future__ import annotations

import pytest

from orchestrator.core.cancellation import CancelRegistry, Where


def registry(remember_s: float = 600.0, remember_max: int = 100) -> CancelRegistry[str]:
    return CancelRegistry(remember_s, remember_max)


def test_cancel_of_a_waiting_job_hands_its_handle_back_and_it_never_starts() -> None:
    reg = registry()
    entry = reg.register("a", "task-a", now=0.0)
    assert not entry.cancelled
    decision = reg.cancel("a", now=1.0, issued_at=0.5)
    assert decision.where is Where.WAITING
    assert decision.handle == "task-a"
    assert entry.cancelled and entry.cancelled_at == 1.0 and entry.issued_at == 0.5
    assert reg.started("a") is False
    assert not entry.running


def test_cancel_of_a_running_job() -> None:
    reg = registry()
    entry = reg.register("a", "task-a", now=0.0)
    assert reg.started("a") is True
    assert entry.running
    decision = reg.cancel("a", now=2.0)
    assert decision.where is Where.RUNNING
    assert decision.handle == "task-a"
    assert reg.is_cancelled("a", now=2.0)


def test_a_second_cancel_changes_nothing() -> None:
    reg = registry()
    entry = reg.register("a", "task-a", now=0.0)
    reg.started("a")
    assert reg.cancel("a", now=1.0).handle == "task-a"
    again = reg.cancel("a", now=3.0, issued_at=2.9)
    assert again.where is Where.UNKNOWN_OR_FINISHED
    assert again.handle is None
    assert entry.cancelled_at == 1.0  # the first cancel's time stays


def test_a_cancel_of_a_finished_request_changes_nothing_and_is_not_remembered() -> None:
    reg = registry()
    reg.register("a", "task-a", now=0.0)
    reg.started("a")
    reg.finish("a", now=5.0)
    decision = reg.cancel("a", now=6.0)
    assert decision.where is Where.UNKNOWN_OR_FINISHED and decision.handle is None
    assert reg.remembered == 0
    # the same id coming again (a repeat) is not answered cancelled
    assert not reg.register("a", "task-a2", now=7.0).cancelled


def test_a_cancel_before_its_request_is_remembered_and_the_request_comes_cancelled() -> None:
    reg = registry()
    decision = reg.cancel("early", now=10.0, issued_at=9.0)
    assert decision.where is Where.UNKNOWN_OR_FINISHED and decision.handle is None
    assert reg.remembered == 1
    assert reg.is_cancelled("early", now=11.0)
    entry = reg.register("early", "task", now=12.0)
    assert entry.cancelled and entry.cancelled_at == 10.0 and entry.issued_at == 9.0
    assert reg.started("early") is False
    assert reg.remembered == 0  # taken by its request
    # cancelling it again while it is answered: nothing new
    assert reg.cancel("early", now=12.5).handle is None


def test_a_remembered_cancel_is_forgotten_after_remember_s() -> None:
    reg = registry(remember_s=60.0)
    reg.cancel("x", now=0.0)
    assert reg.is_cancelled("x", now=59.0)
    assert not reg.is_cancelled("x", now=60.0)
    assert not reg.register("x", "task", now=61.0).cancelled
    assert reg.remembered == 0


def test_at_most_remember_max_cancels_the_oldest_forgotten_first() -> None:
    reg = registry(remember_max=3)
    for i in range(5):
        reg.cancel(f"id{i}", now=float(i))
    assert reg.remembered == 3
    assert not reg.is_cancelled("id0", now=5.0)
    assert not reg.is_cancelled("id1", now=5.0)
    assert all(reg.is_cancelled(f"id{i}", now=5.0) for i in (2, 3, 4))


def test_finished_ids_are_bounded_too() -> None:
    reg = registry(remember_s=100.0, remember_max=2)
    for i in range(3):
        reg.register(f"f{i}", "t", now=float(i))
        reg.finish(f"f{i}", now=float(i))
    # f0 was forgotten as finished: a cancel for it is remembered like an unknown id's
    reg.cancel("f0", now=4.0)
    assert reg.remembered == 1
    reg.cancel("f2", now=4.0)
    assert reg.remembered == 1


def test_a_job_registered_twice_keeps_its_first_entry() -> None:
    reg = registry()
    first = reg.register("a", "task-1", now=0.0)
    assert reg.register("a", "task-2", now=1.0) is first
    assert reg.cancel("a", now=2.0).handle == "task-1"
    reg.finish("a", now=3.0)
    assert reg.tracked == 0


@pytest.mark.parametrize(("remember_s", "remember_max"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bad_bounds_are_refused(remember_s: float, remember_max: int) -> None:
    with pytest.raises(ValueError):
        CancelRegistry[str](remember_s, remember_max)
