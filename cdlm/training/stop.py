"""Clean stops of a training run: SIGINT / SIGTERM and the wall-clock limit ``train.max_minutes``.

A stop request does not interrupt a step: the loop finishes the step it is in, saves a checkpoint of it and
returns, so that a rerun resumes exactly there. A second SIGINT or SIGTERM while that happens aborts at once
(the checkpoint write is atomic, so the previous checkpoint stays intact).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context that turns SIGINT / SIGTERM into stop requests and keeps a wall-clock limit.

    Signal handlers are installed only in the main thread (elsewhere Python does not deliver signals to
    handlers); they are restored on exit.

    Args:
        max_minutes: the limit on this invocation's wall time, or None.
    """

    def __init__(self, max_minutes: float | None) -> None:
        self.max_minutes = max_minutes
        self.signal: signal.Signals | None = None
        self._start = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        self._start = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # the second request: abort now
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signal = signal.Signals(signum)

    def reason(self) -> str | None:
        """Return why the run should stop now (``"SIGINT"``, ``"SIGTERM"``, ``"time limit"``), or None."""
        if self.signal is not None:
            return self.signal.name
        if self.max_minutes is not None and time.monotonic() - self._start >= 60 * self.max_minutes:
            return "time limit"
        return None
