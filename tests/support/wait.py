"""The one way a test waits: poll a predicate until it holds, or fail the test."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], timeout: float,
               what: str | Callable[[], str], *, interval: float = 0.02) -> T:
    """The first truthy value of predicate() within `timeout` seconds; AssertionError naming
    `what` otherwise (a callable `what` is asked only then, so it can show the state at the
    deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()  # a last look: the deadline may have passed while we slept
    if value:
        return value
    raise AssertionError(f"not within {timeout} s: {what if isinstance(what, str) else what()}")
