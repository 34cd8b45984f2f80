"""How far a p99 ratio can be trusted: a bootstrap over whole seconds of fire times.

On a shared VM a fire-lag p99 follows the machine's spells: the hypervisor takes
the core for a few milliseconds, a few times a second, and every fire time due
meanwhile starts late. Such a stall is short against a second, so the seconds of
a measurement are close to independent of each other, while the fire times
inside one second are not (a stall makes a run of late starts). Resampling whole
seconds, with replacement, for Baton and for plain APScheduler apart, and
taking the ratio of the two p99s each time, gives an interval for the ratio:
how much it could have moved had this run's seconds fallen otherwise. It says
nothing about a different machine or hour; the bench's other yardsticks (plain
against itself, the ratio round by round) speak to that.

The p99 here is the same nearest-rank percentile as ``loadtest.percentile``.
Only the top 1% of a resample decides it, so each second keeps just its largest
lags, and a draw looks at those alone: a few milliseconds per draw at 200,000
fire times, where sorting each resample would take seconds per backend.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Sequence

#: Resamples per interval, and the share of them the interval holds.
DRAWS = 400
LEVEL = 0.90


def seconds(lags: Sequence[float], per_second: int) -> list[list[float]]:
    """Lags in start order cut into blocks of ``per_second`` (one second of fire times); a short tail is kept."""
    size = max(1, per_second)
    return [list(lags[i:i + size]) for i in range(0, len(lags), size)]


class Tops:
    """Blocks of lags reduced to what the p99 of any resample of them can depend on: each block's largest."""

    def __init__(self, blocks: Sequence[Sequence[float]]) -> None:
        self.blocks = [b for b in blocks if b]
        self.sizes = [len(b) for b in self.blocks]
        most = len(self.blocks) * max(self.sizes, default=0)  # the largest a resample can be
        keep = math.floor(most / 100) + 1
        self.tops = [heapq.nlargest(keep, b) for b in self.blocks]

    def p99(self, picks: Sequence[int]) -> float:
        """Nearest-rank p99 of the blocks at ``picks`` (indexes, repeats allowed) put together."""
        total = sum(self.sizes[i] for i in picks)
        from_top = total - max(0, math.ceil(99 / 100 * total) - 1)  # its place counted from the largest
        return sorted(itertools.chain.from_iterable(self.tops[i] for i in picks), reverse=True)[from_top - 1]

    def draw(self, rng: random.Random) -> float:
        n = len(self.blocks)
        return self.p99([rng.randrange(n) for _ in range(n)])


def p99_ratio_interval(mine: Sequence[Sequence[float]], base: Sequence[Sequence[float]], *, draws: int = DRAWS,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """The central ``level`` share of ``p99(mine) / p99(base)`` over ``draws`` block resamples of each.

    ``mine`` and ``base`` are lists of blocks (``seconds``). None when either side has no lags.
    """
    a, b = Tops(mine), Tops(base)
    if not a.blocks or not b.blocks:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(draws):
        denominator = b.draw(rng)
        ratios.append(a.draw(rng) / denominator if denominator > 0 else math.inf)
    ratios.sort()
    tail = (1 - level) / 2
    lo = ratios[max(0, math.ceil(tail * draws) - 1)]
    hi = ratios[min(draws - 1, math.ceil((1 - tail) * draws) - 1)]
    return lo, hi
