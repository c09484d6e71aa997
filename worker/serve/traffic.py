"""A worker's recent jobs per adapter, as it publishes them for homes
(``lorafleet.worker.serve.homes``): exponentially decayed counts, so a burst an hour ago
no longer spreads an adapter over the fleet, and a newly hot one spreads within about one
half-life.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

#: Seconds after which a job counts half.
HALF_LIFE_S = 60.0
#: Adapters published per worker (the busiest): bounds the registry entry's size. Adapters
#: below it count as cold everywhere, which is what they are.
MAX_PUBLISHED = 64
#: Counts below this are dropped, so the table does not grow with every adapter ever seen.
FORGET_BELOW = 0.05


class AdapterTraffic:
    """Decayed job counts per ``lora_int_id``. ``note`` on each job taken; ``top`` for the
    registry. ``clock`` is ``time.monotonic`` unless a test supplies its own."""

    def __init__(
        self, half_life: float = HALF_LIFE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 seconds, got {half_life}")
        self._rate = math.log(2) / half_life
        self._clock = clock
        self._counts: dict[int, float] = {}
        self._at = clock()

    def note(self, adapter: int) -> None:
        self._decay()
        self._counts[adapter] = self._counts.get(adapter, 0.0) + 1.0

    def top(self, limit: int = MAX_PUBLISHED) -> dict[int, float]:
        """The ``limit`` busiest adapters' decayed counts (rounded: it goes on the wire)."""
        self._decay()
        busiest = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)[:limit]
        return {a: round(c, 3) for a, c in busiest}

    def _decay(self) -> None:
        now = self._clock()
        factor = math.exp(-self._rate * (now - self._at))
        self._at = now
        if factor < 1.0:
            self._counts = {
                a: c * factor for a, c in self._counts.items() if c * factor >= FORGET_BELOW
            }
