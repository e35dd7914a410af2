"""Admission of the continuous-batching scheduler: bounded, first-come first-served, fair."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from llmops_trainer.serve.batching import Scheduler


@dataclass(eq=False)
class Job:
    name: str
    prompt: int = 4
    tokens: int = 3  # tokens still to generate
    produced: list[int] = field(default_factory=list)


def scheduler(max_running: int = 2, capacity: int = 4, budget: int = 100) -> Scheduler[Job]:
    return Scheduler(max_running, capacity, budget, cost=lambda job: job.prompt)


def run(s: Scheduler[Job]) -> list[tuple[int, list[str]]]:
    """Drive the scheduler as the engine does: admit, then one token for every running job.
    Returns (step, names of running jobs) per step."""
    running: list[Job] = []
    trace = []
    step = 0
    while s.waiting or s.running:
        running += s.admit()
        trace.append((step, [job.name for job in running]))
        for job in list(running):
            job.produced.append(step)
            job.tokens -= 1
            if job.tokens == 0:
                running.remove(job)
                s.finish(job)
        step += 1
    return trace


def test_admits_in_arrival_order_up_to_the_batch_size() -> None:
    s = scheduler(max_running=2)
    jobs = [Job(n) for n in "abcd"]
    assert all(s.submit(job) for job in jobs)
    assert [j.name for j in s.admit()] == ["a", "b"]
    assert (s.running, s.waiting) == (2, 2)
    assert s.admit() == []  # no free slot
    s.finish(jobs[1])
    assert [j.name for j in s.admit()] == ["c"]


def test_capacity_bounds_running_plus_waiting() -> None:
    s = scheduler(max_running=2, capacity=3)
    assert [s.submit(Job(n)) for n in "abcd"] == [True, True, True, False]
    s.admit()
    assert not s.submit(Job("e"))  # two running and one waiting fill it
    s.finish(s._running[0])
    assert s.submit(Job("e"))


def test_closed_scheduler_refuses_but_keeps_what_it_has() -> None:
    s = scheduler()
    a = Job("a")
    s.submit(a)
    s.close()
    assert s.closed and not s.submit(Job("b"))
    assert s.admit() == [a]


def test_withdraw_removes_only_waiting_items() -> None:
    s = scheduler(max_running=1)
    a, b = Job("a"), Job("b")
    s.submit(a)
    s.submit(b)
    s.admit()
    assert not s.withdraw(a)  # running: the engine drops it
    assert s.withdraw(b)
    assert s.waiting == 0 and not s.withdraw(b)


def test_prefill_budget_keeps_fifo_order() -> None:
    s = scheduler(max_running=4, capacity=8, budget=10)
    for job in (Job("a", prompt=6), Job("long", prompt=9), Job("c", prompt=1)):
        s.submit(job)
    # "long" does not fit what is left of the budget; "c" must not overtake it.
    assert [j.name for j in s.admit()] == ["a"]
    assert [j.name for j in s.admit()] == ["long", "c"]


def test_head_of_queue_is_admitted_even_beyond_the_budget() -> None:
    s = scheduler(budget=10)
    s.submit(Job("huge", prompt=1000))
    assert [j.name for j in s.admit()] == ["huge"]


def test_every_running_job_advances_every_step_and_nobody_starves() -> None:
    s = scheduler(max_running=3, capacity=16)
    jobs = [Job(f"j{i}", tokens=1 + i % 4) for i in range(10)]
    for job in jobs:
        s.submit(job)
    trace = run(s)
    for job in jobs:
        # Once admitted, a job gets a token in each consecutive step until it is done.
        assert job.produced == list(range(job.produced[0], job.produced[0] + len(job.produced)))
        assert len(job.produced) == 1 + int(job.name[1:]) % 4
    starts = [job.produced[0] for job in jobs]
    assert starts == sorted(starts)  # admission in arrival order
    assert max(len(names) for _, names in trace) == 3


@pytest.mark.parametrize("max_running, capacity", [(0, 4), (4, 2)])
def test_rejects_inconsistent_sizes(max_running: int, capacity: int) -> None:
    with pytest.raises(ValueError):
        Scheduler(max_running, capacity, 10, cost=len)


def test_concurrent_submitters_never_exceed_capacity() -> None:
    s: Scheduler[Job] = scheduler(max_running=2, capacity=50)
    accepted: list[bool] = []
    lock = threading.Lock()

    def submit_many() -> None:
        for i in range(40):
            ok = s.submit(Job(str(i)))
            with lock:
                accepted.append(ok)

    threads = [threading.Thread(target=submit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(accepted) == 50 and s.waiting == 50


def test_wait_for_work_and_idle() -> None:
    s = scheduler()
    assert not s.wait_for_work(0.0)
    assert s.wait_idle(0.0)
    job = Job("a")
    s.submit(job)
    assert s.wait_for_work(0.0) and not s.wait_idle(0.0)
    s.admit()
    s.finish(job)
    assert s.wait_idle(0.0)


def test_submit_all_is_all_or_nothing() -> None:
    s = scheduler(max_running=2, capacity=4)
    assert s.submit_all([Job("a"), Job("b"), Job("c")])
    assert not s.submit_all([Job("d"), Job("e")])  # one place left: neither goes in
    assert s.waiting == 3
    assert s.submit_all([Job("d")])
    s.close()
    assert not s.submit_all([])  # closed


def test_on_free_is_told_when_room_appears() -> None:
    s = scheduler(max_running=1, capacity=2)
    freed: list[int] = []
    s.on_free = lambda: freed.append(s.running + s.waiting)
    a, b = Job("a"), Job("b")
    s.submit_all([a, b])
    s.admit()
    assert freed == []
    assert s.withdraw(b) and freed == [1]
    s.finish(a)
    assert freed == [1, 0]
    s.finish(a)  # no longer running: nothing freed
    assert freed == [1, 0]
