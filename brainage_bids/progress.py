"""Progress of a long run: one line per finished item with an ETA, or a tqdm bar on a terminal.

A cohort run can last hours; users need to see that it is alive and when it will end. In a
batch log (SLURM, a file) a redrawn bar is noise, so there each finished item is one plain
log line, e.g. ``[12/31] sub-X: predicted age 52.3 (age 49.1), 41 s, ETA 9 min``. On a
terminal the same lines are printed above a tqdm bar. The ETA is the wall time per finished
item so far times the items left, so it already accounts for items running in parallel.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any


def format_duration(seconds: float) -> str:
    """``41 s``, ``7 min``, ``2 h 05 min``: precise enough to plan around, short to read."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the average pace so far; ``None`` before anything has finished."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return elapsed / done * (total - done)


class Progress:
    """Counts finished items and reports each one as it finishes.

    Parameters
    ----------
    total:
        How many items the run will finish.
    logger:
        Where the plain lines go (the run's log, so they also reach the log file).
    unit:
        What an item is, for the bar (``image``, ``epoch``).
    stream:
        The terminal to draw a bar on; a bar is drawn only when it is a TTY.
    """

    def __init__(self, total: int, *, logger: logging.Logger, unit: str = "image",
                 stream: IO[str] | None = None, clock: Any = time.monotonic) -> None:
        self.total = int(total)
        self.done = 0
        self.failed = 0
        self._logger = logger
        self._clock = clock
        self._start = clock()
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if hasattr(stream, "isatty") and stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=unit, file=stream, dynamic_ncols=True,
                             leave=True)

    def line(self, message: str, *, seconds: float | None = None) -> str:
        """The text of the next finished item's line (without advancing)."""
        parts = [f"[{self.done + 1}/{self.total}] {message}"]
        if seconds is not None:
            parts.append(format_duration(seconds))
        left = eta_seconds(self._clock() - self._start, self.done + 1, self.total)
        if left:
            parts.append(f"ETA {format_duration(left)}")
        return ", ".join(parts)

    def advance(self, message: str, *, seconds: float | None = None,
                failed: bool = False) -> str:
        """Report one finished item; returns the line that was written."""
        text = self.line(message, seconds=seconds)
        self.done += 1
        self.failed += int(failed)
        level = logging.ERROR if failed else logging.INFO
        if self._bar is not None:
            # the log handler writes to the same terminal: keep the bar below the lines
            with self._bar.external_write_mode():
                self._logger.log(level, "%s", text)
            self._bar.update()
        else:
            self._logger.log(level, "%s", text)
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
