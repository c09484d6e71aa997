"""Homes for adapters: rendezvous hashing over live workers, more homes for hot adapters,
stable under fleet changes; the registry read as routing reads it; decayed traffic."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lorafleet.worker.serve.homes import (
    MIN_TRAFFIC,
    FleetView,
    WorkerView,
    home_count,
    homes,
    traffic_shares,
)
from lorafleet.worker.serve.traffic import AdapterTraffic

NAMES = [f"w{i}" for i in range(5)]


def _views(names: list[str]) -> list[WorkerView]:
    return [WorkerView(n) for n in names]


def test_cold_adapters_spread_evenly_one_home_each():
    owners = Counter(homes(a, _views(NAMES))[0] for a in range(1, 5001))
    assert set(owners) == set(NAMES)
    assert all(abs(c - 1000) < 150 for c in owners.values()), owners
    assert all(len(homes(a, _views(NAMES))) == 1 for a in range(1, 100))


def test_a_worker_leaving_moves_only_its_adapters_and_one_joining_takes_a_fair_part():
    before = {a: homes(a, _views(NAMES))[0] for a in range(1, 3001)}
    after_leave = {a: homes(a, _views(NAMES[:-1]))[0] for a in before}
    moved = [a for a in before if before[a] != after_leave[a]]
    assert all(before[a] == "w4" for a in moved)  # nobody else's adapters moved
    assert len(moved) == sum(1 for h in before.values() if h == "w4")
    after_join = {a: homes(a, _views([*NAMES, "w5"]))[0] for a in before}
    taken = [a for a in before if before[a] != after_join[a]]
    assert all(after_join[a] == "w5" for a in taken)  # moves only to the newcomer
    assert 3000 / 6 * 0.8 < len(taken) < 3000 / 6 * 1.2


def test_hotter_adapters_get_more_homes_up_to_every_worker():
    assert home_count(0.0, 3) == 1
    assert home_count(0.2, 3) == 1  # below 1 / (N * SPREAD) of the traffic
    assert home_count(0.25, 3) == 2
    assert home_count(0.5, 3) == 3  # half the traffic of 3 workers: all of them
    assert home_count(1.0, 10) == 10
    assert home_count(0.5, 0) == 0
    hot = homes(7, _views(NAMES), share=0.5)
    assert len(hot) == 4 and hot[0] == homes(7, _views(NAMES))[0]  # the cold home stays first


def test_traffic_shares_need_enough_traffic_to_count():
    few = [WorkerView("a", traffic={1: 5.0}), WorkerView("b", traffic={2: 1.0})]
    assert traffic_shares(few) == {}  # six jobs say nothing about heat
    many = [WorkerView("a", traffic={1: MIN_TRAFFIC}), WorkerView("b", traffic={1: 10, 2: 10})]
    shares = traffic_shares(many)
    assert shares == pytest.approx({1: 0.75, 2: 0.25})


def _entry(now: float, **over) -> bytes:
    entry = {
        "heartbeat": now,
        "ttl": 3.0,
        "state": "ready",
        "queue": "q",
        "fleet": {"slots": [1], "cached": [1, 2], "traffic": {"1": 30.0}},
    }
    entry.update(over)
    return json.dumps(entry).encode()


def test_the_fleet_view_keeps_live_ready_workers_of_the_queue_only():
    now = 1000.0
    entries = {
        b"live": _entry(now - 1),
        b"stale": _entry(now - 4),  # beat more than a TTL ago: dead
        b"draining": _entry(now, state="draining"),
        b"other-queue": _entry(now, queue="elsewhere"),
        b"garbage": b"{not json",
        b"no-fleet": json.dumps({"heartbeat": now, "ttl": 3, "state": "ready", "queue": "q"}),
    }
    view = FleetView.of(entries, "q", now)
    assert view.names() == {"live", "no-fleet"}
    live = next(w for w in view.workers if w.name == "live")
    assert (live.slots, live.cached, live.holds) == ({1}, {1, 2}, {1, 2})
    assert view.shares == {1: 1.0}
    assert view.held_by_others(2, "no-fleet") and not view.held_by_others(2, "live")
    assert len(view.homes_of(1)) == 2  # all the traffic: every worker is its home
    assert len(view.homes_of(99)) == 1


def test_traffic_decays_by_half_life_and_forgets_cold_adapters():
    t = [0.0]
    traffic = AdapterTraffic(half_life=10.0, clock=lambda: t[0])
    for _ in range(8):
        traffic.note(1)
    traffic.note(2)
    assert traffic.top() == {1: 8.0, 2: 1.0}
    t[0] = 10.0
    assert traffic.top() == pytest.approx({1: 4.0, 2: 0.5})
    t[0] = 100.0
    assert traffic.top() == {}  # both decayed below the floor and were dropped
    assert list(AdapterTraffic(clock=lambda: 0.0).top(limit=1)) == []
    for adapter in range(1, 6):
        traffic.note(adapter)
    assert len(traffic.top(limit=3)) == 3
    with pytest.raises(ValueError, match="half_life"):
        AdapterTraffic(half_life=0)
