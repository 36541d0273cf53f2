"""The flood guard for rejection and upstream-failure log lines, and the JSON line format."""

from __future__ import annotations

import json
import logging

import pytest

from sidecar import log as sidecar_log
from sidecar.log import TEXT_FORMAT, JsonFormatter, TextFormatter, Throttled


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttled_logs_the_first_line_then_summarises_what_it_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(sidecar_log.time, "monotonic", clock)
    throttled = Throttled(logging.getLogger("sidecar.test"), interval=1.0)
    with caplog.at_level(logging.INFO, logger="sidecar.test"):
        for _ in range(50):
            throttled.info("expired", "rejected reason=%s", "expired")
        throttled.warning("UpstreamUnreachableError", "upstream down")  # its own key
        clock.now += 1.5
        throttled.info("expired", "rejected reason=%s", "expired")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.INFO, "rejected reason=expired"),
        (logging.WARNING, "upstream down"),
        (logging.INFO, "rejected reason=expired (and 49 more like it in the last 1s)"),
    ]


def test_json_lines_carry_utc_time_level_logger_and_message() -> None:
    record = logging.LogRecord("sidecar.proxy", logging.INFO, __file__, 1, "x=%d", (3,), None)
    record.created = 0.25
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {
        "time": "1970-01-01T00:00:00.250+00:00",
        "level": "info",
        "logger": "sidecar.proxy",
        "message": "x=3",
    }


def test_text_lines_are_logging_formatters_own_across_seconds() -> None:
    """The time text made once per second reads as `logging.Formatter` writes it each line."""
    plain, cached = logging.Formatter(TEXT_FORMAT), TextFormatter()
    for created in (1_767_225_599.001, 1_767_225_599.999, 1_767_225_600.0, 1_767_225_600.5):
        record = logging.LogRecord("sidecar.manager", logging.INFO, "x", 1, "m %s", ("a",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == plain.format(record)
