"""The one poll-until loop of the tests, benchmarks and test peers: they wait on a condition,
never for a fixed time.

``wait_until(check)`` calls ``check()`` every ``interval`` seconds and returns its first truthy
value; after ``timeout`` seconds it raises :class:`WaitTimeout`, which names what was awaited and
the last value ``check()`` returned (or the last exception of ``ignore`` it raised).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not hold in time."""

    def __init__(self, message: str, *, last: object = None) -> None:
        super().__init__(message)
        #: the last value the check returned (None when its last call raised)
        self.last = last


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
    detail: Callable[[], object] | None = None,
) -> T:
    """The first truthy value of ``check()``, called every ``interval`` s until ``timeout`` s.

    ``check`` runs at least once, and once more at the deadline. Exceptions of ``ignore`` (e.g.
    ``OSError`` while a server starts) count as "not yet"; any other propagates at once. On
    timeout, :class:`WaitTimeout` names ``what`` (or the check), the last value or exception,
    and ``detail()`` when given (e.g. a log's tail), read at that moment.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = check()
        except ignore as exc:
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    message = f"waited {timeout:g} s for {what or getattr(check, '__qualname__', check)}"
    message += f"; last error: {error!r}" if error is not None else f"; last value: {last!r}"
    if detail is not None:
        message += f"\n{detail()}"
    raise WaitTimeout(message, last=last) from error
