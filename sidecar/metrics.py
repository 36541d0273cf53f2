"""Prometheus instruments (SPEC 3.3), one registry per running sidecar.

A registry per `Metrics` object rather than prometheus-client's global one, so that several
sidecars in one process (the test suite, the demo) never share or collide on counters.
Labels are bounded on purpose: `method` is the HTTP method, `reason` and `outcome` come from
fixed vocabularies, and client strings never become labels (see `clients.py`).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .peer_events import REJECT_REASONS as PEER_REJECT_REASONS

log = logging.getLogger(__name__)

PREFIX = "mcp_sidecar_"

# Sub-millisecond buckets: the request histogram measures the sidecar's own overhead.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
WORK_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)

# `checkpoint`: the SQLite store's background WAL checkpoints (store/checkpoint.py).
STORE_OPERATIONS = (
    "insert",
    "close",
    "activity",
    "pending",
    "hibernate",
    "resume",
    "checkpoint",
)
RESUME_CAUSES = ("hibernated", "upstream_lost")
REJECT_REASONS = (
    "expired",
    "unknown",
    "binding",
    "limit",
    "origin",
    "too_large",
    "bad_session_id",
    "ambiguous_session",
    "store_unavailable",
    "malformed_http",
    "header_timeout",
    "body_timeout",
    "admin_host",
    "untrackable_session",
)


class Tally:
    """The fast path's two instruments per request (`requests{POST,forwarded}` and the
    request-duration histogram) as plain numbers, folded into the prometheus instruments
    whenever the registry is collected (`FoldingRegistry`): an `inc` takes a lock and an
    `observe` walks the buckets in Python, ~3 us a request together; here a request adds to
    two integers and a float. The event loop is the only writer, and every scrape
    (`/metrics`, `get_sample_value`) collects on it too, so nothing is lost between the two."""

    __slots__ = ("bounds", "buckets", "forwarded", "seconds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # the histogram's upper bounds, +Inf last
        self.forwarded = 0
        self.buckets = [0] * len(bounds)
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        """One forwarded POST that took `seconds` of the sidecar's own time."""
        self.forwarded += 1
        # The first bound >= seconds: the bucket `Histogram.observe` picks.
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.seconds += seconds

    def fold(self, requests: Counter, duration: Histogram) -> None:
        """Add what was counted since the last fold to the instruments, and start again."""
        if not self.forwarded:
            return
        requests.labels("POST", "forwarded").inc(self.forwarded)
        # prometheus-client has no `observe` of many: its per-bucket values are added to
        # directly (tests/test_metrics_tally.py holds the result equal to `observe`'s).
        for bucket, count in zip(duration._buckets, self.buckets, strict=True):
            if count:
                bucket.inc(count)
        duration._sum.inc(self.seconds)
        self.forwarded = 0
        self.buckets = [0] * len(self.bounds)
        self.seconds = 0.0


class DirectTally(Tally):
    """What `Tally` stands for, when prometheus-client's insides are not the ones `fold`
    adds to (`_upper_bounds`, `_buckets`, `_sum`): every request observed at once, as
    before the tally. Slower, never wrong, whatever version an operator's pip resolves."""

    __slots__ = ("_duration", "_forwarded")

    def __init__(self, requests: Counter, duration: Histogram) -> None:
        super().__init__(())
        self._forwarded = requests.labels("POST", "forwarded")
        self._duration = duration

    def observe(self, seconds: float) -> None:
        self._forwarded.inc()
        self._duration.observe(seconds)

    def fold(self, requests: Counter, duration: Histogram) -> None:
        return


def tally_for(requests: Counter, duration: Histogram) -> Tally:
    """A `Tally` folding into `duration`'s buckets if they are laid out as it expects."""
    bounds = getattr(duration, "_upper_bounds", None)
    buckets = getattr(duration, "_buckets", None)
    if (
        isinstance(bounds, list | tuple)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and all(hasattr(b, "inc") for b in buckets)
        and hasattr(getattr(duration, "_sum", None), "inc")
    ):
        return Tally(tuple(bounds))
    log.warning(
        "prometheus-client's histogram is not laid out as this sidecar knows it: "
        "fast-path requests are observed one by one (slower, same figures)"
    )
    return DirectTally(requests, duration)


class FoldingRegistry(CollectorRegistry):
    """A registry that folds the tallies in before it is read."""

    def __init__(self, fold: Callable[[], None]) -> None:
        super().__init__(auto_describe=True)
        self._fold = fold

    def collect(self) -> Iterable[Metric]:
        self._fold()
        yield from super().collect()


class BoundGauge(Collector):
    """A gauge read at scrape time that has no sample until it is bound: a sidecar it says
    nothing about (`peer_events_listening` alone on its store) exports its HELP and TYPE
    only, so an alert on its value never fires there, and `deploy/` may still name it."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], float] | None = None

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self.read is not None:
            family.add_metric([], self.read())
        yield family

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation)


class Metrics:
    def __init__(self) -> None:
        self.registry = FoldingRegistry(self._fold)
        r = self.registry
        self.sessions = Gauge(
            PREFIX + "sessions", "Sessions held, by state.", ["state"], registry=r
        )
        self.sessions_created = Counter(
            PREFIX + "sessions_created", "Sessions created.", registry=r
        )
        self.sessions_closed = Counter(
            PREFIX + "sessions_closed", "Sessions closed, by reason.", ["reason"], registry=r
        )
        self.requests = Counter(
            PREFIX + "requests",
            "Client requests on the MCP endpoints, by HTTP method and "
            "outcome (forwarded, rejected, upstream_error).",
            ["method", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "rejected",
            "Requests the sidecar answered itself instead of forwarding, by reason.",
            ["reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time the sidecar itself spends on a request, excluding waiting for the upstream.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_close = Counter(
            PREFIX + "upstream_close",
            "Upstream session closes (DELETE) attempted, by result.",
            ["result"],
            registry=r,
        )
        self.sweep_duration = Histogram(
            PREFIX + "sweep_duration_seconds",
            "Duration of one expiry sweep.",
            buckets=WORK_BUCKETS,
            registry=r,
        )
        self.store_flush_duration = Histogram(
            PREFIX + "store_flush_duration_seconds",
            "Duration of one write-behind flush.",
            buckets=WORK_BUCKETS,
            registry=r,
        )
        self.stateless_requests = Counter(
            PREFIX + "stateless_requests",
            "Requests passed through untracked (stateless upstream or sessionless protocol).",
            registry=r,
        )
        self.untracked_sessions = Counter(
            PREFIX + "untracked_sessions",
            "Sessions the upstream created for a request the sidecar did not read as an "
            "initialize, by result (tracked, closed); nonzero means the parser missed one.",
            ["result"],
            registry=r,
        )
        self.store_errors = Counter(
            PREFIX + "store_errors",
            "Store writes that failed (disk full, locked, I/O error, Redis unreachable), by "
            "operation; the sidecar keeps the data and retries (SPEC 2.5).",
            ["operation"],
            registry=r,
        )
        self.sessions_hibernated = Counter(
            PREFIX + "sessions_hibernated",
            "Idle sessions hibernated: upstream session closed, client id kept (SPEC 2.7).",
            registry=r,
        )
        self.sessions_resumed = Counter(
            PREFIX + "sessions_resumed",
            "Upstream sessions re-created behind a client's unchanged id, by cause "
            "(hibernated, upstream_lost).",
            ["cause"],
            registry=r,
        )
        self.resume_failures = Counter(
            PREFIX + "resume_failures",
            "Resumes that could not complete (replayed initialize refused, another protocol "
            "version, an upstream session id the sidecar cannot track, upstream unreachable), "
            "by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_up = Gauge(
            PREFIX + "upstream_up",
            "1 while a replica answers its health checks, 0 while it is down (SPEC 2.8).",
            ["upstream"],
            registry=r,
        )
        self.upstream_sessions = Gauge(
            PREFIX + "upstream_sessions",
            "Live sessions bound to each replica.",
            ["upstream"],
            registry=r,
        )
        self.session_limit = Gauge(
            PREFIX + "session_limit",
            "Configured limit on live sessions, by scope (global, per_client); 0 is unlimited.",
            ["scope"],
            registry=r,
        )
        self.ready = Gauge(
            PREFIX + "ready",
            "1 when the sidecar serves (as /readyz), 0 while starting or draining.",
            registry=r,
        )
        self.store_transactions = Gauge(
            PREFIX + "store_transactions",
            "Write transactions the store committed since start (concurrent creations share "
            "one: group commit; activity is written behind, one per flush).",
            registry=r,
        )
        self.stuck_clients = Gauge(
            PREFIX + "stuck_clients",
            "Clients (by label, bounded) that sent requests on closed session ids.",
            registry=r,
        )
        self.peer_events_listening = BoundGauge(
            PREFIX + "peer_events_listening",
            "1 while the other sidecars' events are heard (shared store only, SPEC 2.8), 0 "
            "while the listener is down and being started again.",
        )
        r.register(self.peer_events_listening)
        self.peer_events_rejected = Counter(
            PREFIX + "peer_events_rejected",
            "Messages on the events channel skipped as no event this version understands, by "
            "reason (not_json, not_an_object, unknown_kind, bad_field).",
            ["reason"],
            registry=r,
        )
        self.peer_events_restarts = Counter(
            PREFIX + "peer_events_restarts",
            "Times the listener for the other sidecars' events ended and was started again.",
            registry=r,
        )
        self.fast = tally_for(self.requests, self.request_duration)
        for cause in RESUME_CAUSES:
            self.sessions_resumed.labels(cause)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # export zeros so alerts can use rate() at once

    def bind_session_counts(self, counts: Callable[[], dict[str, int]]) -> None:
        """Read the live/dormant/closed gauges from the session table at scrape time."""
        for state in ("live", "dormant", "closed"):
            self.sessions.labels(state).set_function(_reader(counts, state))

    def bind_store_transactions(self, transactions: Callable[[], int]) -> None:
        """Read the store's own commit counter at scrape time (what a commit costs is the
        ceiling of `initialize`s per second)."""
        self.store_transactions.set_function(lambda: float(transactions()))

    def bind_upstreams(
        self, up: Callable[[], dict[str, bool]], sessions: Callable[[], dict[str, int]]
    ) -> None:
        """Read each replica's health and session count at scrape time (one label value per
        configured replica: bounded)."""
        for label in up():
            self.upstream_up.labels(label).set_function(_reader(up, label))
            self.upstream_sessions.labels(label).set_function(_reader(sessions, label))

    def bind_service_state(
        self,
        limits: Callable[[], tuple[int, int]],
        ready: Callable[[], bool],
        stuck: Callable[[], int],
    ) -> None:
        """Read the configured limits, readiness and stuck clients at scrape time, so a
        reload or a drain shows at once."""
        self.session_limit.labels("global").set_function(lambda: float(limits()[0]))
        self.session_limit.labels("per_client").set_function(lambda: float(limits()[1]))
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        self.stuck_clients.set_function(lambda: float(stuck()))

    def bind_peers(self, listening: Callable[[], bool]) -> None:
        """A shared store: whether its events are heard, read at scrape time; the refusals
        exported as zeros, so an alert can use increase() from the start."""
        self.peer_events_listening.read = lambda: 1.0 if listening() else 0.0
        for reason in PEER_REJECT_REASONS:
            self.peer_events_rejected.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _fold(self) -> None:
        self.fast.fold(self.requests, self.request_duration)


def _reader(counts: Callable[[], Mapping[str, float]], state: str) -> Callable[[], float]:
    def read() -> float:
        return float(counts()[state])

    return read
