"""Logging: the named loggers, text or JSON lines, and a flood guard for rejections.

Every module logs through `logging.getLogger("sidecar.<module>")` with %-style arguments.
Session ids are shortened before they reach a log call (`sessions.short`), and no
credential is ever passed to one. The JSON format is one object per line, for journald's or a
log shipper's parsers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TIME = "%Y-%m-%d %H:%M:%S"  # `logging.Formatter`'s own, with `,%03d` milliseconds


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, its local time text made once per second, not once per line (a line
    per created session, thousands a second: `strftime` was a tenth of writing one)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            # Local time changes (DST) only at a whole second: the text holds for all of it.
            self._stamp = time.strftime(_TIME, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure(level: str, fmt: str) -> None:
    """Install one stderr handler on the `sidecar` logger (idempotent, reload-safe)."""
    # Neither format shows them, and each record would otherwise look them up (a getpid
    # system call among them): a mass expiry writes one line per closed session.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor the caller's file and line: without this every record walks the stack to find them.
    logging._srcfile = None  # the logging HOWTO's own knob
    logger = logging.getLogger("sidecar")
    handler = next((h for h in logger.handlers if getattr(h, "_sidecar", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._sidecar = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("sidecar").setLevel(level.upper())


class Throttled:
    """Logs at most one line per key per interval, counting what it held back.

    Rejections must each leave a log line, but a client hammering a dead session id at
    hundreds of requests a second must not drown the journal: the first one is logged at
    once, the rest are summarised ("... and 412 more") in the next line for that key.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def info(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it in the last %gs)"
            args = (*args, held, self._interval)
        self._logger.log(level, msg, *args)
        if len(self._last) > 1000:  # keys are a fixed vocabulary; this is only a backstop
            self._last.clear()
