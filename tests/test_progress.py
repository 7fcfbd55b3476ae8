"""Progress lines: one per finished item, with an ETA; a bar only on a terminal."""

from __future__ import annotations

import io
import logging

import pytest

from brainage_bids.progress import Progress, eta_seconds, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("seconds", "text"), [(41.2, "41 s"), (89, "89 s"), (420, "7 min"),
                                               (7500, "2 h 05 min")])
def test_durations_read_as_people_say_them(seconds, text):
    assert format_duration(seconds) == text


def test_eta_is_the_pace_so_far_times_what_is_left():
    assert eta_seconds(60.0, 2, 10) == pytest.approx(240.0)
    assert eta_seconds(60.0, 0, 10) is None
    assert eta_seconds(60.0, 10, 10) == 0.0


def test_one_line_per_item_with_an_eta_in_a_batch_log(caplog):
    clock = Clock()
    logger = logging.getLogger("brainage_bids.test_progress")
    progress = Progress(3, logger=logger, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger=logger.name):
        clock.now += 40
        progress.advance("sub-01: predicted age 52.3 (age 49.1)", seconds=41)
        clock.now += 20
        progress.advance("sub-02: FAILED: cannot be read", seconds=3, failed=True)
        clock.now += 30
        progress.advance("sub-03: predicted age 30.0", seconds=30)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[1/3] sub-01: predicted age 52.3 (age 49.1), 41 s, ETA 80 s",
                     "[2/3] sub-02: FAILED: cannot be read, 3 s, ETA 30 s",
                     "[3/3] sub-03: predicted age 30.0, 30 s"]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.ERROR, logging.INFO]
    assert progress.done == 3 and progress.failed == 1


def test_bar_only_on_a_terminal():
    logger = logging.getLogger("brainage_bids.test_progress_bar")
    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        progress = Progress(2, logger=logger, stream=stream, unit="image")
        progress.advance("sub-01")
        progress.close()
    assert plain.getvalue() == ""  # a SLURM log gets the log lines, never a redrawn bar
    assert "1/2" in terminal.getvalue() and "image" in terminal.getvalue()
