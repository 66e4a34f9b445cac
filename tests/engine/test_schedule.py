"""The scheduler's admission rule, which both the thread pool and the estimate follow."""

from __future__ import annotations

from modelfuse.engine.schedule import admission_order


def replay(scratch: list[int], budget: int, threads: int) -> tuple[list[tuple[str, int]], int]:
    """The events and the largest scratch in flight at once."""
    events = list(admission_order(scratch, budget, threads))
    in_flight = peak = 0
    for event, index in events:
        in_flight += scratch[index] if event == "start" else -scratch[index]
        peak = max(peak, in_flight)
    return events, peak


def test_at_most_two_units_per_thread_oldest_finished_first() -> None:
    events, peak = replay([5, 5, 5], budget=100, threads=1)
    assert events == [("start", 0), ("start", 1), ("finish", 0), ("start", 2), ("finish", 1), ("finish", 2)]
    assert peak == 10


def test_the_budget_holds_and_a_unit_over_it_runs_alone() -> None:
    scratch = [6, 6, 30, 3, 3, 3]
    events, peak = replay(scratch, budget=10, threads=4)
    assert peak == 30  # the oversized unit, alone
    running: set[int] = set()
    for event, index in events:
        if event == "start":
            running.add(index)
            assert len(running) <= 8
            assert sum(scratch[i] for i in running) <= 10 or running == {index}
        else:
            running.remove(index)
    assert not running and sorted(i for e, i in events if e == "start") == list(range(len(scratch)))
