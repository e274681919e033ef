"""From the engines' thread to the event loop: `Bridge` wakes each waiting request at a
bounded rate however many streams got characters."""

from __future__ import annotations

import asyncio
import threading
import time

from charrnn.serve.sequence import Sequence


class Bridge:
    """Wakes each sequence's waiter (an asyncio.Event) on the loop: at once for a sequence's
    first characters (the time to first character) and its end, else at most every
    `interval` seconds (10 ms: a hundred updates a second read as a smooth stream), and
    less often with many streams, keeping to about `wakes_per_second` wakes in all. Each
    wake costs the event loop a chunk's JSON and a write (~100 us of Python holding the
    GIL the decoding loop needs), so its work grows with the clients, never with the
    decoding steps: at 64 streams, a chunk every ~64 ms of ~20 characters each."""

    def __init__(self, interval: float = 0.01, wakes_per_second: float = 1000):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.interval, self.wakes_per_second = interval, wakes_per_second
        self._pending: set[Sequence] = set()
        self._lock = threading.Lock()
        self._scheduled = False
        self._last = 0.0

    def notify(self, sequences: list[Sequence]) -> None:
        if not sequences or self.loop is None:
            return
        urgent = any(not getattr(s, "woken", False) or s.finished for s in sequences)
        with self._lock:
            self._pending.update(sequences)
            if self._scheduled:
                return
            self._scheduled = True
            waiting = len(self._pending)
        interval = max(self.interval, waiting / self.wakes_per_second)
        delay = 0.0 if urgent else max(0.0, self._last + interval - time.monotonic())
        self.loop.call_soon_threadsafe(self._schedule, delay)

    def _schedule(self, delay: float) -> None:
        if delay > 0:
            self.loop.call_later(delay, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, set(), False
        self._last = time.monotonic()
        for sequence in pending:
            sequence.woken = True
            sequence.waker.set()
