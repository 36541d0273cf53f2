"""The fast path counts its requests in plain numbers (`metrics.Tally`) that are folded into
the prometheus instruments when they are read: a scrape must show what `inc` and `observe`
would have shown, at once, the same series and values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import OVERHEAD_BUCKETS, PREFIX, DirectTally, Metrics, tally_for
from tests.peers.ops import Admin
from tests.peers.processes import SidecarHandle, start_sidecar
from tests.test_fast_path import Recorder, call, exchange, initialize

DURATIONS = [0.0, 0.00005, 0.0001, 0.00010001, 0.0003, 0.001, 0.02, 0.9, 1.0, 1.5, 30.0]


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_folded_tally_shows_what_observe_would_have_shown() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    observed = Histogram("observed", "reference", buckets=OVERHEAD_BUCKETS, registry=reference)
    for seconds in DURATIONS:
        metrics.fast.observe(seconds)
        observed.observe(seconds)
    ours = samples(metrics.registry, PREFIX + "request_duration_seconds")
    theirs = samples(reference, "observed")
    assert {k[1]: v for k, v in ours.items() if k[0].endswith("_bucket")} == {
        k[1]: v for k, v in theirs.items() if k[0].endswith("_bucket")
    }
    count = ours[(PREFIX + "request_duration_seconds_count", "")]
    assert count == theirs[("observed_count", "")] == len(DURATIONS)
    assert ours[(PREFIX + "request_duration_seconds_sum", "")] == pytest.approx(sum(DURATIONS))
    forwarded = {"method": "POST", "outcome": "forwarded"}
    assert metrics.registry.get_sample_value(PREFIX + "requests_total", forwarded) == len(DURATIONS)


def test_a_histogram_laid_out_otherwise_is_observed_one_by_one_with_the_same_figures() -> None:
    """A prometheus-client whose histogram has no `_buckets` (its insides are not an API):
    the tally is not used, and a scrape still shows every request, not an error."""
    metrics = Metrics()

    class Other(Histogram):
        """A histogram keeping its buckets under another name."""

    registry = CollectorRegistry()
    other = Other("other", "insides moved", buckets=OVERHEAD_BUCKETS, registry=registry)
    other._other_buckets = other.__dict__.pop("_buckets")  # type: ignore[attr-defined]
    tally = tally_for(metrics.requests, other)
    assert isinstance(tally, DirectTally)
    other._buckets = other.__dict__.pop("_other_buckets")  # type: ignore[attr-defined]
    for seconds in DURATIONS:
        tally.observe(seconds)
    tally.fold(metrics.requests, other)  # nothing held back to fold
    assert registry.get_sample_value("other_count") == len(DURATIONS)
    forwarded = {"method": "POST", "outcome": "forwarded"}
    assert metrics.registry.get_sample_value(PREFIX + "requests_total", forwarded) == len(DURATIONS)
    assert not isinstance(Metrics().fast, DirectTally)  # this version: the tally is used


def test_folding_twice_counts_each_request_once() -> None:
    metrics = Metrics()
    forwarded = {"method": "POST", "outcome": "forwarded"}
    registry = metrics.registry
    assert registry.get_sample_value(PREFIX + "requests_total", forwarded) is None
    metrics.fast.observe(0.001)
    assert registry.get_sample_value(PREFIX + "requests_total", forwarded) == 1
    assert registry.get_sample_value(PREFIX + "requests_total", forwarded) == 1
    metrics.requests.labels("POST", "forwarded").inc()  # the full path's own count
    metrics.fast.observe(0.002)
    assert registry.get_sample_value(PREFIX + "requests_total", forwarded) == 3
    assert registry.get_sample_value(PREFIX + "request_duration_seconds_count") == 2


@pytest.fixture
async def fast_sidecar(tmp_path: Path) -> AsyncIterator[tuple[SidecarHandle, Recorder]]:
    upstream = Recorder()
    await upstream.start()
    sidecar = start_sidecar(tmp_path, upstream.url, server={"fast_path": True})
    try:
        yield sidecar, upstream
    finally:
        sidecar.stop()
        await upstream.stop()


async def test_a_scrape_right_after_n_fast_path_requests_shows_n(
    fast_sidecar: tuple[SidecarHandle, Recorder],
) -> None:
    sidecar, upstream = fast_sidecar
    admin = Admin(sidecar.admin_url)
    (status, _, _) = (await exchange(sidecar.listen_port, [initialize("s-1")]))[0]
    assert status == 200
    before = await admin.scrape()
    n = 25
    answers = await exchange(sidecar.listen_port, [call(i) for i in range(1, n + 1)])
    assert [status for status, _, _ in answers] == [200] * n
    after = await admin.scrape()
    forwarded = {"method": "POST", "outcome": "forwarded"}
    name = PREFIX + "requests_total"
    assert after.value(name, **forwarded) - before.value(name, **forwarded) == n
    timed = PREFIX + "request_duration_seconds_count"
    assert after.value(timed) - before.value(timed) == n
    assert len(upstream.log) == n + 1
