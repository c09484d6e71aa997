"""Load-test workloads: when requests arrive, which adapter each names, how long they are.

The adapter mixes are the workloads of the Punica and S-LoRA papers:

- ``identical``: every request uses the same adapter;
- ``uniform``: each request picks one of N adapters with equal probability;
- ``zipf:ALPHA``: adapter of popularity rank k (1-based) with probability k**-ALPHA / H(N, ALPHA);
- ``distinct``: requests take the N adapters in turn, so no two of the first N share one.

A ``base_share`` of requests (drawn independently) run the base model instead.

Lengths are ``N`` or ``fixed:N`` and ``uniform:A:B`` (both ends included). Prompt lengths
are in characters: synthetic prompts are random lowercase letters, one token per character
on the byte- and character-level tokenizers of lorafleet's tiny models (a BPE tokenizer packs
about two to three of these letters per token); the load-test report gives the prompt token
counts the workers actually saw. Prompts may also come from a file, one per line.

Everything draws from one seeded ``random.Random``, so a seed reproduces a workload exactly.
Standard library only: the producer installs without torch or numpy.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MixKind = Literal["identical", "uniform", "zipf", "distinct"]
MIX_KINDS: tuple[MixKind, ...] = ("identical", "uniform", "zipf", "distinct")


@dataclass(frozen=True)
class Arrivals:
    """Open-loop arrival process: gaps between request arrivals.

    ``rate`` is the mean arrival rate in requests/s (``math.inf``: everything at once).
    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / rate``
    (vLLM's ``--burstiness``): 1 is a Poisson process (exponential gaps), below 1 is
    burstier, above 1 more regular. The coefficient of variation of the gaps is
    ``1 / sqrt(burstiness)``.
    """

    rate: float
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")

    def gaps(self, rng: random.Random) -> Iterator[float]:
        """Endless seconds between consecutive arrivals (the first one too)."""
        if math.isinf(self.rate):
            yield from itertools.repeat(0.0)
            return
        scale = 1.0 / (self.rate * self.burstiness)
        while True:
            yield rng.gammavariate(self.burstiness, scale)


@dataclass(frozen=True)
class AdapterMix:
    """Which adapter (an index in ``range(num_adapters)``, or ``None`` for the base model)
    each request uses. Index 0 is the most popular under ``zipf``."""

    kind: MixKind
    num_adapters: int
    alpha: float = 1.0
    base_share: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in MIX_KINDS:
            raise ValueError(
                f"adapter mix must be one of {', '.join(MIX_KINDS)}, got {self.kind!r}"
            )
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError(f"base share must be in [0, 1], got {self.base_share}")
        if self.num_adapters < 0 or (self.num_adapters == 0 and self.base_share < 1.0):
            raise ValueError(
                f"the {self.kind!r} mix needs at least one adapter (or a base share of 1)"
            )
        if self.kind == "zipf" and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"zipf alpha must be a finite number > 0, got {self.alpha}")

    @classmethod
    def parse(cls, spec: str, num_adapters: int, base_share: float = 0.0) -> AdapterMix:
        """``identical``, ``uniform``, ``zipf`` / ``zipf:ALPHA`` (default 1.0), ``distinct``."""
        kind, _, arg = spec.strip().lower().partition(":")
        if kind == "zipf":
            try:
                alpha = float(arg) if arg else 1.0
            except ValueError:
                raise ValueError(f"zipf wants a number, as in zipf:1.0; got {spec!r}") from None
            return cls("zipf", num_adapters, alpha, base_share)
        if arg:
            raise ValueError(f"adapter mix {kind!r} takes no argument, got {spec!r}")
        return cls(kind, num_adapters, base_share=base_share)  # type: ignore[arg-type]

    def probabilities(self) -> list[float]:
        """Long-run share of requests of each adapter index (they sum to ``1 - base_share``).
        For ``distinct`` the share is exact over every ``num_adapters`` adapter requests."""
        n = self.num_adapters
        if n == 0:
            return []
        weights = self._weights()
        total = sum(weights)
        return [(1.0 - self.base_share) * w / total for w in weights]

    def _weights(self) -> list[float]:
        n = self.num_adapters
        if self.kind == "identical":
            return [1.0] + [0.0] * (n - 1)
        if self.kind == "zipf":
            return [(k + 1) ** -self.alpha for k in range(n)]
        return [1.0] * n

    def draws(self, rng: random.Random) -> Iterator[int | None]:
        """Endless adapter choices, one per request."""
        turn = itertools.cycle(range(self.num_adapters)) if self.num_adapters else None
        cumulative = list(itertools.accumulate(self._weights())) if self.num_adapters else []
        while True:
            if self.base_share and rng.random() < self.base_share:
                yield None
            elif self.kind == "distinct":
                assert turn is not None
                yield next(turn)
            else:
                # bisect on the cumulative weights: O(log N) per draw for 512+ adapters.
                x = rng.random() * cumulative[-1]
                yield min(bisect.bisect_right(cumulative, x), self.num_adapters - 1)

    def describe(self) -> str:
        if self.num_adapters == 0:
            return "base model only"
        kind = f"zipf:{self.alpha:g}" if self.kind == "zipf" else self.kind
        base = f", {self.base_share:.0%} base model" if self.base_share else ""
        return f"{kind} over {self.num_adapters} adapters{base}"


@dataclass(frozen=True)
class Length:
    """A length distribution: ``low == high`` is fixed, else uniform on [low, high]."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"lengths must satisfy 1 <= low <= high, got {self.low}..{self.high}")

    @classmethod
    def parse(cls, spec: str) -> Length:
        """``N``, ``fixed:N`` or ``uniform:A:B``."""
        kind, *numbers = spec.strip().lower().split(":")
        if not numbers:
            kind, numbers = "fixed", [kind]
        shape = {"fixed": 1, "uniform": 2}
        if shape.get(kind) != len(numbers) or not all(n.isdigit() for n in numbers):
            raise ValueError(f"a length is N, fixed:N or uniform:A:B (integers), got {spec!r}")
        return cls(int(numbers[0]), int(numbers[-1]))

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def describe(self) -> str:
        return str(self.low) if self.low == self.high else f"uniform {self.low}..{self.high}"


@dataclass(frozen=True)
class Prompts:
    """Where prompts come from: random letters of a drawn ``length``, or ``texts`` drawn
    uniformly at random (a prompt file, one prompt per line)."""

    length: Length = Length(32, 32)
    texts: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: str | Path) -> Prompts:
        """One prompt per non-blank line (trailing newline removed)."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        texts = tuple(line for line in lines if line.strip())
        if not texts:
            raise ValueError(f"no prompts in {path}: it has no non-blank line")
        return cls(texts=texts)

    def draw(self, rng: random.Random) -> str:
        if self.texts:
            return rng.choice(self.texts)
        # Letters only: every tiny test tokenizer (byte-level, the demo's a-z) has them.
        return "".join(rng.choices(string.ascii_lowercase, k=self.length.draw(rng)))

    def describe(self) -> str:
        if self.texts:
            return f"{len(self.texts)} prompts from a file"
        return f"{self.length.describe()} chars"


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a workload: ``adapter`` indexes the load test's adapter list."""

    index: int
    prompt: str
    max_tokens: int
    adapter: int | None


@dataclass(frozen=True)
class Workload:
    """What to send: adapter mix, prompts and output lengths, reproducible from ``seed``.

    Output lengths are exact when the load test sets ``ignore_eos`` (it does), as in
    vLLM's serving benchmark.
    """

    mix: AdapterMix
    prompts: Prompts = field(default_factory=Prompts)
    output_len: Length = Length(32, 32)
    seed: int = 0

    def requests(self, *, seed_offset: int = 0) -> Iterator[PlannedRequest]:
        """Endless planned requests. ``seed_offset`` gives an independent stream from the
        same distributions (the warm-up uses one, so the measured requests stay the same
        whatever the warm-up)."""
        rng = random.Random(self.seed * 1_000_003 + seed_offset)
        adapters = self.mix.draws(rng)
        for i in itertools.count():
            prompt = self.prompts.draw(rng)
            yield PlannedRequest(i, prompt, self.output_len.draw(rng), next(adapters))

    def take(self, n: int, *, seed_offset: int = 0) -> list[PlannedRequest]:
        return list(itertools.islice(self.requests(seed_offset=seed_offset), n))

    def describe(self) -> str:
        return (
            f"{self.mix.describe()}; prompts {self.prompts.describe()}; "
            f"outputs {self.output_len.describe()} tokens"
        )
