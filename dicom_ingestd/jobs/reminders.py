"""Repeated failures in the master's loop, logged as one line and then a reminder at most every
so often, not once per attempt (a full state file system fails every retry the same way).

Stdlib only.  The caller picks the key (what fails, and why) and writes the lines; `Reminders`
only says when a line is due and how often the failure happened since the last one.
"""

import time
from collections.abc import Callable

REMINDER_INTERVAL = 300.0  # seconds between two lines about the same ongoing failure
MAX_KEYS = 1000  # distinct failures remembered (the oldest are forgotten beyond)


class Reminders:
    """Ongoing failures by key: when each was first seen, when last logged, how often."""

    def __init__(self, interval: float = REMINDER_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._failing: dict[str, list[float]] = {}  # key -> [since, logged, count]

    def failed(self, key: str) -> int:
        """Count a failure; returns 0 when no line is due now, otherwise how many failures
        the line speaks for (1: the first, a line is always due for it)."""
        now = self._clock()
        entry = self._failing.get(key)
        if entry is None:
            if len(self._failing) >= MAX_KEYS:
                self._failing.pop(next(iter(self._failing)))
            self._failing[key] = [now, now, 1]
            return 1
        entry[2] += 1
        if now - entry[1] < self.interval:
            return 0
        entry[1] = now
        return int(entry[2])

    def since(self, key: str) -> float:
        """When the ongoing failure `key` was first seen (clock time), or 0."""
        entry = self._failing.get(key)
        return entry[0] if entry else 0.0

    def recovered(self, key: str) -> int:
        """The failure `key` is over: how many times it happened (0: it was not failing)."""
        entry = self._failing.pop(key, None)
        return int(entry[2]) if entry else 0

    def clear(self) -> int:
        """Every failure is over: how many were ongoing."""
        ongoing = len(self._failing)
        self._failing.clear()
        return ongoing
