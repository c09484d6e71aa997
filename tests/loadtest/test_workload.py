"""Workload distributions draw what they claim (pure, fast: no Redis, no worker)."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import string
import subprocess
import sys

import pytest

from lorafleet.producer import LoRARequest
from lorafleet.producer.loadtest import LoadTestSpec
from lorafleet.producer.workload import AdapterMix, Arrivals, Length, Prompts, Workload


def test_load_test_modules_stay_torch_free():
    code = (
        "import sys, lorafleet.producer.loadtest, lorafleet.producer.loadreport, "
        "lorafleet.producer.workload; "
        "heavy = {'torch', 'numpy', 'matplotlib'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _counts(mix: AdapterMix, n: int, seed: int = 1) -> list[int]:
    counts = [0] * (mix.num_adapters + 1)  # last slot: base model
    for choice in itertools.islice(mix.draws(random.Random(seed)), n):
        counts[mix.num_adapters if choice is None else choice] += 1
    return counts


def _assert_frequencies(counts: list[int], probabilities: list[float], n: int) -> None:
    """Every count within 5 binomial standard deviations of n * p (a false alarm about once
    in two million per category)."""
    for k, (count, p) in enumerate(zip(counts, probabilities, strict=True)):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 5 * sigma + 1e-9, (k, count, n * p)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5])
def test_zipf_frequencies_follow_the_power_law(alpha):
    n, adapters = 40_000, 16
    mix = AdapterMix.parse(f"zipf:{alpha}", adapters)
    harmonic = sum(k**-alpha for k in range(1, adapters + 1))
    theory = [k**-alpha / harmonic for k in range(1, adapters + 1)]
    assert mix.probabilities() == pytest.approx(theory)
    counts = _counts(mix, n)
    assert counts[-1] == 0  # no base share
    _assert_frequencies(counts[:-1], theory, n)
    # The defining property: frequency ratio of ranks 1 and 2 is 2**alpha.
    assert counts[0] / counts[1] == pytest.approx(2**alpha, rel=0.1)


def test_zipf_over_512_adapters_has_a_long_tail():
    n = 20_000
    counts = _counts(AdapterMix.parse("zipf:1.0", 512), n)[:-1]
    assert counts[0] / n == pytest.approx(1 / sum(1 / k for k in range(1, 513)), rel=0.08)
    assert sum(c > 0 for c in counts) > 400  # most of the tail is reached


def test_uniform_identical_and_base_share():
    n = 30_000
    uniform = AdapterMix.parse("uniform", 6, base_share=0.25)
    counts = _counts(uniform, n)
    _assert_frequencies(counts, [*uniform.probabilities(), 0.25], n)
    assert sum(uniform.probabilities()) == pytest.approx(0.75)

    identical = _counts(AdapterMix.parse("identical", 6), 1000)
    assert identical[0] == 1000

    base_only = AdapterMix("uniform", 0, base_share=1.0)
    assert set(itertools.islice(base_only.draws(random.Random(0)), 100)) == {None}


def test_distinct_never_repeats_within_n_adapters():
    mix = AdapterMix.parse("distinct", 50)
    draws = list(itertools.islice(mix.draws(random.Random(0)), 120))
    assert sorted(draws[:50]) == list(range(50))
    assert draws[50:100] == draws[:50]  # then it cycles


@pytest.mark.parametrize(
    "spec, error",
    [
        ("zipf:x", "zipf wants a number"),
        ("zipf:-1", "alpha"),
        ("uniform:2", "takes no argument"),
        ("skewed", "must be one of"),
    ],
)
def test_bad_mixes_are_rejected(spec, error):
    with pytest.raises(ValueError, match=error):
        AdapterMix.parse(spec, 4)


def test_a_mix_needs_adapters_unless_all_base():
    with pytest.raises(ValueError, match="at least one adapter"):
        AdapterMix.parse("uniform", 0)
    with pytest.raises(ValueError, match="base share"):
        AdapterMix.parse("uniform", 2, base_share=1.5)


@pytest.mark.parametrize("rate", [0.5, 20.0, 400.0])
def test_poisson_gaps_have_mean_one_over_rate(rate):
    n = 50_000
    gaps = list(itertools.islice(Arrivals(rate).gaps(random.Random(3)), n))
    mean = statistics.fmean(gaps)
    # The sample mean of n exponentials has relative standard error 1/sqrt(n) (0.45%).
    assert mean == pytest.approx(1 / rate, rel=0.025)
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, abs=0.03)  # CV of exponential


def test_burstiness_keeps_the_rate_and_changes_the_spread():
    n = 50_000
    for shape in (0.25, 4.0):
        gaps = list(itertools.islice(Arrivals(10.0, shape).gaps(random.Random(5)), n))
        assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.04)
        cv = statistics.stdev(gaps) / statistics.fmean(gaps)
        assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.06)


def test_infinite_rate_sends_everything_at_once():
    assert set(itertools.islice(Arrivals(math.inf).gaps(random.Random(0)), 50)) == {0.0}
    with pytest.raises(ValueError, match="rate"):
        Arrivals(0)


def test_uniform_lengths_stay_in_range_and_reach_both_ends():
    length = Length.parse("uniform:3:9")
    rng = random.Random(0)
    drawn = [length.draw(rng) for _ in range(5000)]
    assert set(drawn) == set(range(3, 10))
    assert statistics.fmean(drawn) == pytest.approx(6.0, abs=0.1)
    assert Length.parse("7") == Length.parse("fixed:7") == Length(7, 7)


@pytest.mark.parametrize("spec", ["", "uniform:9:3", "0", "uniform:1", "fixed:a", "normal:3:4"])
def test_bad_lengths_are_rejected(spec):
    with pytest.raises(ValueError):
        Length.parse(spec)


def test_synthetic_prompts_have_the_drawn_length_in_letters():
    prompts = Prompts(Length(5, 40))
    rng = random.Random(0)
    for _ in range(200):
        text = prompts.draw(rng)
        assert 5 <= len(text) <= 40
        assert set(text) <= set(string.ascii_lowercase)


def test_prompts_from_a_file_skip_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  \nsecond one\n", encoding="utf-8")
    prompts = Prompts.from_file(path)
    assert prompts.texts == ("first prompt", "second one")
    rng = random.Random(0)
    assert {prompts.draw(rng) for _ in range(100)} == set(prompts.texts)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        Prompts.from_file(tmp_path / "empty.txt")


def test_a_seed_reproduces_the_workload_and_warmup_draws_apart():
    workload = Workload(AdapterMix.parse("zipf", 8), Prompts(Length(4, 12)), Length(1, 9), seed=4)
    assert workload.take(50) == workload.take(50)
    assert workload.take(50) != workload.take(50, seed_offset=1)
    assert workload.take(50) != Workload(workload.mix, workload.prompts, seed=5).take(50)
    assert all(1 <= r.max_tokens <= 9 for r in workload.take(200))


def test_spec_checks_its_bounds():
    workload = Workload(AdapterMix.parse("uniform", 2))
    loras = [LoRARequest(f"a{i}", i + 1, f"/adapters/a{i}") for i in range(2)]
    with pytest.raises(ValueError, match="needs 2 adapters"):
        LoadTestSpec(workload, loras[:1])
    with pytest.raises(ValueError, match="bound the run"):
        LoadTestSpec(workload, loras, num_requests=None)
    with pytest.raises(ValueError, match="infinite rate"):
        LoadTestSpec(workload, loras, num_requests=None, duration=5.0)
    closed = LoadTestSpec(workload, loras, concurrency=4, num_requests=None, duration=5.0)
    assert closed.closed_loop and "closed loop, 4 concurrent users" in closed.describe()
