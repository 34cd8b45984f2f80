"""The fire-lag section's interval for a p99 ratio (``loadtest.bench.resample``)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.bench.resample import Tops, p99_ratio_interval, seconds
from loadtest.percentile import percentile

lag = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(lag, min_size=1, max_size=300), min_size=1, max_size=12), st.data())
def test_a_resample_p99_from_the_tops_is_the_p99_of_the_blocks_put_together(
        blocks: list[list[float]], data: st.DataObject) -> None:
    picks = data.draw(st.lists(st.integers(0, len(blocks) - 1), min_size=1, max_size=len(blocks)))
    together = [x for i in picks for x in blocks[i]]
    assert Tops(blocks).p99(picks) == percentile(together, 99)


def test_seconds_cut_in_start_order_and_keep_the_tail() -> None:
    assert seconds([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [[1.0, 2.0], [3.0, 4.0], [5.0]]


def spells(rng: random.Random, n_seconds: int, scale: float) -> list[list[float]]:
    """Seconds of 1,000 lags: mostly under a millisecond, 2% of them late (a few milliseconds)."""
    out = []
    for _ in range(n_seconds):
        second = [rng.uniform(0.0003, 0.001) * scale for _ in range(1000)]
        for k in rng.sample(range(1000), 20):
            second[k] = rng.uniform(0.002, 0.004) * scale
        out.append(second)
    return out


def test_the_interval_mostly_holds_the_true_ratio_and_tells_a_slower_system_apart() -> None:
    """Over 12 seeded runs of two systems with the same lags (true ratio 1) and of one twice as slow (2): a 90%
    interval holds the true ratio in most of them, and never takes the slower one for the same."""
    held, told_apart = 0, 0
    for seed in range(12):
        rng = random.Random(seed)
        base = spells(rng, 30, 1.0)
        same = p99_ratio_interval(spells(rng, 30, 1.0), base, draws=200, seed=seed)
        slower = p99_ratio_interval(spells(rng, 30, 2.0), base, draws=200, seed=seed)
        assert same is not None and slower is not None
        held += same[0] <= 1.0 <= same[1] and slower[0] <= 2.0 <= slower[1]
        told_apart += slower[0] > same[1]
    assert held >= 8, held
    assert told_apart == 12


def test_no_interval_without_lags() -> None:
    assert p99_ratio_interval([], [[0.001]]) is None
    assert p99_ratio_interval([[0.001]], [[]]) is None
