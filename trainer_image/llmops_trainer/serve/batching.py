"""Admission for continuous batching: a bounded FIFO queue in front of a fixed number of
decoding slots.

The engine asks for new work between decoding steps, so a request that arrives while others
are generating joins the running batch at the next step instead of waiting for the whole batch
to finish (Orca/vLLM-style iteration-level scheduling). Every running sequence advances by one
token per step, so sequences in the batch progress at the same rate; admission is strictly
first-come first-served, so a long prompt at the head of the queue is never overtaken by
shorter ones behind it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Scheduler(Generic[T]):
    """Waiting and running items. Thread-safe: request handlers submit and cancel, the engine
    thread admits and finishes.

    `capacity` bounds running plus waiting items, so memory stays bounded however many clients
    connect; `submit` refuses beyond it (the API queues the request a bounded while, then
    answers 429). `on_free`, when set, is called (outside the lock, on whichever thread freed
    it) whenever room appears. `prefill_budget` bounds the prompt
    tokens admitted in one step, so a burst of long prompts does not stall the decoding of the
    running batch for long; the head of the queue is always admitted when a slot is free.
    """

    def __init__(
        self,
        max_running: int,
        capacity: int,
        prefill_budget: int,
        cost: Callable[[T], int],
    ) -> None:
        if max_running < 1 or capacity < max_running:
            raise ValueError("need 1 <= max_running <= capacity")
        self.max_running = max_running
        self.capacity = capacity
        self.prefill_budget = prefill_budget
        self._cost = cost
        self._waiting: deque[T] = deque()
        self._running: list[T] = []
        self._changed = threading.Condition()
        self._closed = False
        self.on_free: Callable[[], None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, item: T) -> bool:
        """Queue an item; False when the scheduler is full or closed."""
        return self.submit_all([item])

    def submit_all(self, items: list[T]) -> bool:
        """Queue all the items (consecutively) or none; False when they do not fit or the
        scheduler is closed."""
        with self._changed:
            if self._closed or len(self._waiting) + len(self._running) + len(items) > (
                self.capacity
            ):
                return False
            self._waiting.extend(items)
            self._changed.notify_all()
            return True

    def withdraw(self, item: T) -> bool:
        """Remove a waiting item (its client went away); False if it is running or gone."""
        with self._changed:
            try:
                self._waiting.remove(item)
            except ValueError:
                return False
            self._changed.notify_all()
        self._freed()
        return True

    def _freed(self) -> None:
        if self.on_free is not None:
            self.on_free()

    def admit(self) -> list[T]:
        """Move items from the head of the queue into free running slots, within the prefill
        budget, and return them in arrival order."""
        with self._changed:
            admitted: list[T] = []
            budget = self.prefill_budget
            while self._waiting and len(self._running) < self.max_running:
                cost = self._cost(self._waiting[0])
                if admitted and cost > budget:
                    break  # the head waits for the next step; nobody overtakes it
                item = self._waiting.popleft()
                budget -= cost
                self._running.append(item)
                admitted.append(item)
            return admitted

    def finish(self, item: T) -> None:
        with self._changed:
            if item not in self._running:
                return
            self._running.remove(item)
            self._changed.notify_all()
        self._freed()

    def wait_for_work(self, timeout: float) -> bool:
        """Block until something is waiting or running; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._waiting or self._running), timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is waiting or running; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._waiting or self._running), timeout)

    def close(self) -> None:
        """Refuse new items from now on; what is queued or running still completes."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
