"""Ctrl-C means "interrupted", whatever the tasks below made of their cancellation.

``asyncio.run`` turns Ctrl-C into a cancellation of the main task and raises
``KeyboardInterrupt`` only if that cancellation comes back out of it. A gRPC
call cancelled under a task can instead end as an ordinary answer (status
CANCELLED), and a query or a triage run would then finish as if complete and
report exit status 0 or 1 — an investigator who pressed Ctrl-C would get an
answer that looks whole. Here the signal itself is remembered, and the run
ends with ``KeyboardInterrupt`` (exit 130) whenever it came.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, raising ``KeyboardInterrupt`` if Ctrl-C came while it ran."""
    return asyncio.run(_interruptible(main))


async def _interruptible(main: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        result = await main
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    return result
