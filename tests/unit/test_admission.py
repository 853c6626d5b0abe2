"""Priority admission: the pure policy (order, aging, refusals) and the async gate around it."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.admission import AdmissionGate
from orchestrator.core.admission import (
    AdmissionPolicy,
    AdmissionQueue,
    Running,
    preemption_victims,
    priority_of,
)
from orchestrator.domain import GenerationRequest, Priority
from orchestrator.errors import DeadlineExceeded

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


def queue(aging_s: float = 10.0) -> AdmissionQueue[str]:
    return AdmissionQueue(AdmissionPolicy(aging_s=aging_s))


# -- the pure policy -------------------------------------------------------------------------


def test_priority_then_deadline_then_arrival() -> None:
    q = queue()
    q.add("low", LOW, 0.0)
    q.add("normal-late-deadline", NORMAL, 0.1, deadline=500.0)
    q.add("normal-no-deadline", NORMAL, 0.2)
    q.add("normal-early-deadline", NORMAL, 0.3, deadline=100.0)
    q.add("high-2", HIGH, 0.5)
    q.add("high-1", HIGH, 0.4)
    assert q.order(1.0) == [
        "high-1",
        "high-2",
        "normal-early-deadline",
        "normal-late-deadline",
        "normal-no-deadline",
        "low",
    ]
    assert q.position("high-1", 1.0) == 1 and q.position("low", 1.0) == 6
    assert q.position("gone", 1.0) is None
    assert q.lengths() == {HIGH: 2, NORMAL: 3, LOW: 1}
    popped = q.pop(1.0)
    assert popped is not None and popped.key == "high-1" and len(q) == 5


def test_aging_promotes_one_class_per_aging_interval() -> None:
    q = queue(aging_s=10.0)
    q.add("low", LOW, 0.0)
    q.add("high", HIGH, 15.0)
    assert q.order(15.0) == ["high", "low"]  # low aged one class: normal, still behind high
    assert q.order(20.0) == ["low", "high"]  # two classes: ties with high, arrived first
    q.add("fresh-high-with-deadline", HIGH, 30.0, deadline=31.0)
    # low has waited 3 intervals: rank -1, ahead of any fresh high whatever its deadline
    assert q.order(30.0)[0] == "low"


def test_unknown_priority_is_normal() -> None:
    assert priority_of("high") is HIGH and priority_of("urgent") is NORMAL
    assert priority_of(None) is NORMAL


def test_refusal_by_passed_deadline_and_by_estimate() -> None:
    q = queue()
    q.add("passed", NORMAL, 0.0, deadline=5.0, steps=10)
    q.add("tight", NORMAL, 0.0, deadline=12.0, steps=10)
    q.add("loose", NORMAL, 0.0, deadline=100.0, steps=10)
    q.add("none", NORMAL, 0.0, steps=10)
    # no estimate yet: only a passed deadline refuses
    assert q.expected_run_s(10) == 0.0
    assert [e.key for e in q.refusals(6.0)] == ["passed"]
    assert q.next_refusal_at() == 12.0
    q.observe(duration_s=5.0, steps=10)  # 0.5 s a step: a 10-step job needs 5 s
    assert q.expected_run_s(10) == pytest.approx(5.0)
    assert q.next_refusal_at() == pytest.approx(7.0)
    assert [e.key for e in q.refusals(6.9)] == []
    assert [e.key for e in q.refusals(7.0)] == ["tight"]
    assert sorted(q.order(7.0)) == ["loose", "none"]
    assert q.lengths() == {HIGH: 0, NORMAL: 2, LOW: 0} and q.next_refusal_at() == 95.0
    q.observe(duration_s=15.0, steps=10)  # the average moves toward 1.5 s a step by alpha
    assert q.expected_run_s(1) == pytest.approx(0.2 * 1.5 + 0.8 * 0.5)


entries = st.lists(
    st.tuples(
        st.sampled_from(list(Priority)),
        st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)),
        st.floats(0, 5, allow_nan=False),  # gap since the previous arrival
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(entries)
def test_without_aging_pops_follow_priority_then_deadline(items: list[tuple]) -> None:  # type: ignore[type-arg]
    q: AdmissionQueue[int] = AdmissionQueue(AdmissionPolicy(aging_s=1e12))
    now = 0.0
    for i, (priority, deadline, gap) in enumerate(items):
        now += gap
        q.add(i, priority, now, deadline=deadline)
    popped = []
    while (head := q.pop(now)) is not None:
        popped.append((head.priority.rank, math.inf if head.deadline is None else head.deadline))
    assert popped == sorted(popped)
    assert len(popped) == len(items)


@settings(max_examples=150, deadline=None)
@given(
    aging_s=st.floats(0.5, 5, allow_nan=False),
    before=st.integers(0, 30),
    highs_per_tick=st.integers(1, 4),
    tick=st.floats(0.2, 2, allow_nan=False),
    with_deadlines=st.booleans(),
)
def test_no_starvation_under_a_never_ending_stream_of_highs(
    aging_s: float, before: int, highs_per_tick: int, tick: float, with_deadlines: bool
) -> None:
    """Bound: a low entry is admitted before every high entry that arrived 3 * aging_s or more
    after it. Here highs arrive faster than they are admitted (one admission per tick), with
    deadlines that would put them first, and `before` highs are already waiting: the low is
    admitted after at most `before` + the highs of the 3 * aging_s after it."""
    q: AdmissionQueue[str] = AdmissionQueue(AdmissionPolicy(aging_s=aging_s))
    for i in range(before):
        q.add(f"old-{i}", HIGH, 0.0)
    q.add("low", LOW, 0.0)
    arrivals = {"low": 0.0}
    now, n, admitted_before_low = 0.0, 0, 0
    while True:
        now += tick
        for _ in range(highs_per_tick):
            deadline = now + 1.0 if with_deadlines else None
            q.add(f"h-{n}", HIGH, now, deadline=deadline)
            arrivals[f"h-{n}"] = now
            n += 1
        head = q.pop(now)
        assert head is not None
        if head.key == "low":
            break
        # (a tolerance for floating point at the exact boundary)
        assert arrivals.get(head.key, 0.0) <= 3 * aging_s * (1 + 1e-9), "a younger high won"
        admitted_before_low += 1
    highs_in_window = highs_per_tick * (math.floor(3 * aging_s / tick) + 1)
    assert admitted_before_low <= before + highs_in_window


# -- the gate --------------------------------------------------------------------------------


def request(rid: str, priority: str = "normal", **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt="p", request_id=rid, priority=priority, steps=4, **kw)  # type: ignore[arg-type]


async def test_gate_admits_by_priority_and_releases_however_the_block_exits() -> None:
    counts: list[dict[Priority, int]] = []
    waits: list[tuple[Priority, float]] = []
    gate = AdmissionGate(1, on_queue=counts.append, on_admit=lambda p, s: waits.append((p, s)))
    freed: list[str] = []
    gate.on_slot_freed(freed.append)
    order: list[str] = []
    hold = asyncio.Event()

    async def job(rid: str, priority: str, fail: bool = False) -> None:
        async with gate.slot(request(rid, priority)):
            order.append(rid)
            await hold.wait()
            if fail:
                raise RuntimeError("boom")

    first = asyncio.create_task(job("first", "low", fail=True))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(job(r, p)) for r, p in [("l", "low"), ("n", "normal")]]
    tasks.append(asyncio.create_task(job("h", "high")))
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["first"] and gate.active == 1
    assert gate.waiting() == {HIGH: 1, NORMAL: 1, LOW: 1}
    assert gate.position("h") == 1 and gate.position("l") == 3 and gate.position("first") is None
    hold.set()
    with pytest.raises(RuntimeError):
        await first
    await asyncio.gather(*tasks)
    assert order == ["first", "h", "n", "l"]
    assert freed == ["first", "h", "n", "l"]
    assert gate.active == 0 and counts[-1] == {HIGH: 0, NORMAL: 0, LOW: 0}
    assert [p for p, _ in waits] == [LOW, HIGH, NORMAL, LOW]


async def test_a_cancelled_waiter_never_starts_and_a_cancelled_holder_frees_its_slot() -> None:
    gate = AdmissionGate(1)
    started: list[str] = []
    hold = asyncio.Event()

    async def job(rid: str) -> None:
        async with gate.slot(request(rid)):
            started.append(rid)
            await hold.wait()

    running = asyncio.create_task(job("running"))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(job("waiting"))
    after = asyncio.create_task(job("after"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.waiting()[NORMAL] == 1 and gate.position("waiting") is None
    running.cancel()  # cancelled while holding its slot: the slot goes to the next
    with pytest.raises(asyncio.CancelledError):
        await running
    hold.set()
    await after
    assert started == ["running", "after"] and gate.active == 0


async def test_a_slot_granted_to_a_waiter_cancelled_in_the_same_instant_is_passed_on() -> None:
    gate = AdmissionGate(1)
    started: list[str] = []
    release = asyncio.Event()

    async def job(rid: str) -> None:
        async with gate.slot(request(rid)):
            started.append(rid)
            await release.wait()

    holder = asyncio.create_task(job("holder"))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(job("doomed"))
    last = asyncio.create_task(job("last"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # holder wakes, releases: the slot is granted to doomed ...
    await holder
    doomed.cancel()  # ... which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await last
    assert started == ["holder", "last"] and gate.active == 0


async def test_a_waiter_whose_deadline_cannot_be_met_is_refused_at_once() -> None:
    refused: list[Priority] = []
    gate = AdmissionGate(1, on_refuse=refused.append)
    loop = asyncio.get_running_loop()
    # an estimate: one finished 4-step job of 0.2 s, so 0.05 s a step
    async with gate.slot(request("warm")):
        await asyncio.sleep(0.2)
    hold = asyncio.Event()

    async def blocker() -> None:
        async with gate.slot(request("blocker")):
            await hold.wait()

    block = asyncio.create_task(blocker())
    await asyncio.sleep(0)
    now = gate.clock()
    # needs ~0.2 s to run: refused when less than that is left, i.e. at about now + 0.3
    t0 = loop.time()
    with pytest.raises(DeadlineExceeded) as info:
        async with gate.slot(request("late", deadline=now + 0.5)):
            pytest.fail("must not start")
    waited = loop.time() - t0
    assert 0.2 < waited < 0.45, waited
    assert "cannot be met" in str(info.value) and info.value.reason == "deadline_exceeded"
    # a passed deadline is refused without waiting, even with a free slot
    hold.set()
    await block
    with pytest.raises(DeadlineExceeded, match="passed"):
        async with gate.slot(request("passed", deadline=gate.clock() - 1)):
            pytest.fail("must not start")
    assert refused == [NORMAL, NORMAL] and gate.active == 0


# -- preemption ------------------------------------------------------------------------------


def running(key: str, priority: Priority, arrival: float, **kw: object) -> Running[str]:
    return Running(key, priority, arrival, **kw)  # type: ignore[arg-type]


def test_only_a_waiting_high_preempts_and_only_a_worse_class_yields() -> None:
    jobs = [
        running("high", HIGH, 0.0),
        running("normal", NORMAL, 1.0),
        running("low-old", LOW, 2.0),
        running("low-new", LOW, 3.0),
    ]
    assert preemption_victims([NORMAL, LOW], jobs, 2) == []  # no high waits: nobody yields
    assert preemption_victims([HIGH], jobs, 2) == ["low-new"]  # worst class, latest arrival
    assert preemption_victims([HIGH, HIGH, HIGH], jobs, 2) == ["low-new", "low-old", "normal"]
    assert preemption_victims([HIGH] * 5, jobs, 2) == ["low-new", "low-old", "normal"]
    assert preemption_victims([HIGH], [running("high", HIGH, 0.0)], 2) == []  # never a high


def test_a_victim_already_asked_covers_one_high_and_max_preemptions_bounds_it() -> None:
    jobs = [running("asked", LOW, 0.0, asked=True), running("low", LOW, 1.0)]
    assert preemption_victims([HIGH], jobs, 2) == []  # the asked one covers the one high
    assert preemption_victims([HIGH, HIGH], jobs, 2) == ["low"]
    worn = [running("worn", LOW, 0.0, preemptions=2), running("once", NORMAL, 1.0, preemptions=1)]
    assert preemption_victims([HIGH, HIGH], worn, 2) == ["once"]
    assert preemption_victims([HIGH], worn, 0) == []  # 0: nobody is ever preempted


class StepJob:
    """A job of `steps` step boundaries inside its slot; records what happened in `log`."""

    def __init__(self, gate: AdmissionGate, rid: str, priority: str, steps: int) -> None:
        self.gate, self.rid, self.priority, self.steps = gate, rid, priority, steps
        self.done_steps = 0
        self.step = asyncio.Event()  # set to let one step go

    async def run(self, log: list[str]) -> None:
        async with self.gate.slot(request(self.rid, self.priority)):
            log.append(f"start {self.rid}")
            while self.done_steps < self.steps:
                await self.gate.checkpoint(self.rid, self.steps - self.done_steps)
                await self.step.wait()
                self.step.clear()
                self.done_steps += 1
            log.append(f"end {self.rid}")


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_high_makes_a_low_yield_at_its_next_step_and_the_low_resumes_where_it_was() -> None:
    waits: list[Priority] = []
    gate = AdmissionGate(1, on_admit=lambda p, s: waits.append(p), preempt=True)
    log: list[str] = []
    low = StepJob(gate, "low", "low", 3)
    low_task = asyncio.create_task(low.run(log))
    await settle()
    low.step.set()  # step 1 of 3 done
    await settle()
    high = StepJob(gate, "high", "high", 1)
    high_task = asyncio.create_task(high.run(log))
    await settle()
    assert log == ["start low"]  # the low holds the slot until its next step boundary
    low.step.set()  # step 2 done: at the boundary it yields
    await settle()
    assert log == ["start low", "start high"] and gate.active == 1 and gate.preemptions == 1
    assert gate.position("low") == 1 and low.done_steps == 2
    high.step.set()
    await high_task
    await settle()
    assert gate.position("low") is None and gate.active == 1  # resumed with its slot
    low.step.set()
    await low_task
    assert low.done_steps == 3 and log[-2:] == ["end high", "end low"]
    assert gate.active == 0 and waits == [LOW, HIGH]  # a resume is not a second admission


async def test_without_preempt_the_high_waits_for_the_whole_low_job() -> None:
    gate = AdmissionGate(1)
    log: list[str] = []
    low = StepJob(gate, "low", "low", 2)
    low_task = asyncio.create_task(low.run(log))
    await settle()
    high_task = asyncio.create_task(StepJob(gate, "high", "high", 0).run(log))
    await settle()
    low.step.set()
    await settle()
    low.step.set()
    await asyncio.gather(low_task, high_task)
    assert log == ["start low", "end low", "start high", "end high"] and gate.preemptions == 0


async def test_a_job_is_preempted_at_most_max_preemptions_times() -> None:
    gate = AdmissionGate(1, preempt=True, max_preemptions=1)
    log: list[str] = []
    low = StepJob(gate, "low", "low", 3)
    low_task = asyncio.create_task(low.run(log))
    await settle()
    highs = []
    for i in range(2):
        highs.append(asyncio.create_task(StepJob(gate, f"high-{i}", "high", 0).run(log)))
        await settle()
        low.step.set()
        await settle()
    await highs[0]
    # the first high preempted the low; the second found it worn out and waited for its end
    assert log[:3] == ["start low", "start high-0", "end high-0"]
    assert gate.preemptions == 1 and "start high-1" not in log
    low.step.set()
    await settle()
    low.step.set()
    await low_task
    await asyncio.gather(*highs)
    assert log[-3:] == ["end low", "start high-1", "end high-1"]
    assert gate.active == 0


async def test_cancel_while_suspended_frees_nothing_twice() -> None:
    gate = AdmissionGate(1, preempt=True)
    freed: list[str] = []
    gate.on_slot_freed(freed.append)
    log: list[str] = []
    low = StepJob(gate, "low", "low", 3)
    low_task = asyncio.create_task(low.run(log))
    await settle()
    high = StepJob(gate, "high", "high", 1)
    high_task = asyncio.create_task(high.run(log))
    await settle()
    low.step.set()  # the low yields at the boundary after step 1
    await settle()
    assert log == ["start low", "start high"] and gate.position("low") == 1
    low_task.cancel()  # cancelled while it waits to resume: it holds no slot
    with pytest.raises(asyncio.CancelledError):
        await low_task
    assert gate.active == 1 and gate.position("low") is None and freed == []
    high.step.set()
    await high_task
    assert gate.active == 0 and freed == ["high"]
    # the gate still works: a new job starts at once
    async with gate.slot(request("next")):
        assert gate.active == 1
    assert gate.active == 0


async def test_a_yield_whose_high_went_away_is_skipped() -> None:
    gate = AdmissionGate(1, preempt=True)
    log: list[str] = []
    low = StepJob(gate, "low", "low", 2)
    low_task = asyncio.create_task(low.run(log))
    await settle()
    high_task = asyncio.create_task(StepJob(gate, "high", "high", 0).run(log))
    await settle()
    high_task.cancel()  # the high is cancelled before the low reaches its boundary
    with pytest.raises(asyncio.CancelledError):
        await high_task
    low.step.set()
    await settle()
    assert gate.preemptions == 0 and gate.active == 1 and gate.position("low") is None
    low.step.set()
    await low_task
    assert log == ["start low", "end low"] and gate.active == 0
