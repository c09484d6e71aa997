"""A bounded ``adapter`` label: with thousands of adapters, metrics name only the busiest.

Prometheus stores one series per label value; a label per adapter would explode with a
fleet of thousands. ``AdapterLabels`` keeps the busiest ``max_named`` adapters by recent
traffic (Space-Saving counts, decaying) and maps every other one to ``other``.
"""

from __future__ import annotations

from collections.abc import Callable

#: Label value of requests on the base model (no adapter).
BASE = "base"
#: Label value of every adapter that is not among the named busiest ones.
OTHER = "other"


class AdapterLabels:
    """Maps adapter names to a bounded set of ``adapter`` label values.

    Contract: at any time at most ``max_named`` adapter names are label values (they are
    returned as themselves); ``None`` (the base model) maps to ``base`` and every other
    adapter to ``other``. Adapters literally named ``base`` or ``other`` are never named.

    The named adapters are the busiest by recent traffic: ``hit`` counts one request; a
    decaying count (halved every ``16 * capacity`` hits) is kept for at most ``capacity``
    adapters, replacing the least counted one Space-Saving style (the newcomer inherits its
    count plus one), so memory stays bounded with any number of adapters and an adapter with
    a sizeable share of the traffic is always tracked. A tracked adapter takes a free named
    place, or the place of the weakest named adapter once its count is more than twice that
    one's (the margin stops two similar adapters from swapping places on every request);
    ``on_demote(name)`` is then called so the demoted adapter's series can be removed.
    """

    def __init__(self, max_named: int, on_demote: Callable[[str], None]) -> None:
        if max_named < 0:
            raise ValueError(f"max_named must be >= 0, got {max_named}")
        self.max_named = max_named
        self.capacity = 4 * max_named + 16
        self._on_demote = on_demote
        self._counts: dict[str, float] = {}
        self._named: set[str] = set()
        self._hits = 0

    @property
    def named(self) -> frozenset[str]:
        return frozenset(self._named)

    def hit(self, name: str | None) -> str:
        """Count one request for adapter ``name``; return its label value now."""
        if name is None:
            return BASE
        if name in (BASE, OTHER) or self.max_named == 0:
            return OTHER
        self._count(name)
        if name not in self._named:
            self._maybe_promote(name)
        return self.label(name)

    def label(self, name: str | None) -> str:
        """The label value of ``name`` now, without counting a request."""
        if name is None:
            return BASE
        return name if name in self._named else OTHER

    def _count(self, name: str) -> None:
        self._hits += 1
        if self._hits % (16 * self.capacity) == 0:  # halve: recent traffic counts most
            self._counts = {n: c / 2 for n, c in self._counts.items()}
        if name in self._counts:
            self._counts[name] += 1
            return
        inherited = 0.0
        if len(self._counts) >= self.capacity:
            least = min((n for n in self._counts if n not in self._named), key=self._counts.get)
            inherited = self._counts.pop(least)
        self._counts[name] = inherited + 1

    def _maybe_promote(self, name: str) -> None:
        if len(self._named) < self.max_named:
            self._named.add(name)
            return
        weakest = min(self._named, key=self._counts.__getitem__)
        if self._counts[name] > 2 * self._counts[weakest]:
            self._named.remove(weakest)
            self._named.add(name)
            self._on_demote(weakest)
