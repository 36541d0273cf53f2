"""Unit tests for `sidecar.tombstones.Tombstones`: closed ids spread over hash shards, ordered
by a deque, with the same lookups, cap and retention as one ordered map of them all."""

from __future__ import annotations

import pytest

from sidecar import tombstones as module
from sidecar.sessions import CloseReason, Tombstone
from sidecar.tombstones import SHARDS, Tombstones


def _tomb(session_id: str, closed_at: float = 0.0) -> Tombstone:
    return Tombstone(session_id, CloseReason.IDLE_TIMEOUT, closed_at, "client", "label")


def test_lookups_find_every_remembered_id_and_no_other() -> None:
    tombs = Tombstones()
    for n in range(1000):
        tombs.remember(_tomb(f"s{n}", n))
    assert len(tombs) == 1000
    assert "s0" in tombs
    assert "s999" in tombs
    assert "s1000" not in tombs
    assert 17 not in tombs
    assert tombs.get("s500") == _tomb("s500", 500)
    assert tombs["s7"].closed_at == 7
    assert tombs.get("never") is None
    with pytest.raises(KeyError):
        tombs["never"]


def test_no_shard_holds_them_all() -> None:
    """The point of the shards: a table of every id is never built, so never resized."""
    tombs = Tombstones()
    for n in range(SHARDS * 100):
        tombs.remember(_tomb(f"id-{n}", n))
    largest = max(len(shard) for shard in tombs._shards)
    assert largest < SHARDS * 100 // 4


def test_iteration_is_closing_order_and_a_closed_again_id_moves_to_the_end() -> None:
    tombs = Tombstones()
    for n in range(5):
        tombs.remember(_tomb(f"s{n}", n))
    tombs.remember(_tomb("s1", 10))
    assert list(tombs) == ["s0", "s2", "s3", "s4", "s1"]
    assert len(tombs) == 5
    assert tombs["s1"].closed_at == 10


def test_forget_removes_the_id_and_leaves_the_order_of_the_rest() -> None:
    tombs = Tombstones()
    for n in range(4):
        tombs.remember(_tomb(f"s{n}", n))
    tombs.forget("s1")
    tombs.forget("never")
    assert "s1" not in tombs
    assert list(tombs) == ["s0", "s2", "s3"]
    assert len(tombs) == 3


def test_the_cap_forgets_the_oldest_first() -> None:
    tombs = Tombstones(cap=3)
    for n in range(5):
        tombs.remember(_tomb(f"s{n}", n))
    assert list(tombs) == ["s2", "s3", "s4"]
    assert "s0" not in tombs
    assert "s1" not in tombs
    assert len(tombs) == 3


def test_the_cap_bounds_memory_however_often_one_id_is_closed_again() -> None:
    tombs = Tombstones(cap=10)
    for n in range(1000):
        tombs.remember(_tomb("same", n))
    assert tombs.entries <= 10
    assert list(tombs) == ["same"]
    assert tombs["same"].closed_at == 999
    assert len(tombs) == 1


def test_the_default_cap_is_read_when_the_map_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "MAX_TOMBSTONES_IN_MEMORY", 2)
    tombs = Tombstones()
    for n in range(3):
        tombs.remember(_tomb(f"s{n}", n))
    assert list(tombs) == ["s1", "s2"]


def test_forget_older_than_stops_at_the_first_young_id_in_closing_order() -> None:
    tombs = Tombstones()
    for n, closed_at in enumerate([1.0, 2.0, 9.0, 3.0, 10.0]):
        tombs.remember(_tomb(f"s{n}", closed_at))
    tombs.forget_older_than(5.0)
    # As one ordered map did: "s3" is older than the horizon but behind a young one, so it
    # is forgotten only once the ids before it are.
    assert list(tombs) == ["s2", "s3", "s4"]
    assert len(tombs) == 3
    tombs.forget_older_than(11.0)
    assert list(tombs) == []
    assert len(tombs) == 0
    assert tombs.entries == 0


def test_forget_older_than_skips_stale_entries_whatever_their_time() -> None:
    tombs = Tombstones()
    tombs.remember(_tomb("a", 1.0))
    tombs.remember(_tomb("b", 9.0))
    tombs.remember(_tomb("c", 2.0))
    tombs.forget("b")  # its entry stays in the deque, stale, with a young time
    tombs.forget_older_than(5.0)
    assert list(tombs) == []
    assert tombs.entries == 0


def test_an_id_closed_again_is_kept_by_its_newest_time() -> None:
    tombs = Tombstones()
    tombs.remember(_tomb("a", 1.0))
    tombs.remember(_tomb("b", 2.0))
    tombs.remember(_tomb("a", 8.0))
    tombs.forget_older_than(5.0)
    assert list(tombs) == ["a"]
    assert tombs["a"].closed_at == 8.0
