"""CPU time the host took from this VM's cores: what tells a spell of the machine from a slow system.

On a virtual machine the host can give the core a measurement runs on to
another guest for a while; the guest's kernel counts that time as *steal*
(``/proc/stat``: the eighth number of each ``cpuN`` line, in clock ticks). A
fire-lag p99 is the slowest hundredth of the fire times: a few tenths of a
second taken away in a window of a few seconds set it, whichever system was
being measured then. On this project's two-core VM such spells came and went
within minutes: plain APScheduler's p99 at 1,000 runs/s was 1.3 ms in quiet
rounds and 3.5 ms over a noisy run, and single rounds of one Baton backend
went from 1.0x to 4.6x plain's and back, with the code unchanged. The fire-lag
section reads this counter around each measured window, so a round the host
took CPU from is seen as such (and measured again), not read as Baton's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

STAT = Path("/proc/stat")
#: Steal is the eighth counter after the name: user nice system idle iowait irq softirq steal.
STEAL_FIELD = 8


def stolen(cpus: Iterable[int], stat: str | None = None) -> float | None:
    """Seconds the host has taken from ``cpus`` since boot; None where the kernel does not say (not Linux).

    ``stat`` is the text of ``/proc/stat`` (read when not given).
    """
    if stat is None:
        try:
            stat = STAT.read_text()
        except OSError:
            return None
    wanted = {f"cpu{cpu}" for cpu in cpus}
    ticks = 0
    seen = 0
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted and len(fields) > STEAL_FIELD:
            ticks += int(fields[STEAL_FIELD])
            seen += 1
    if seen != len(wanted):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def share(before: float | None, after: float | None, wall: float, cores: int) -> float | None:
    """Stolen time between two readings as a share of the cores' time over ``wall`` seconds (0 to 1)."""
    if before is None or after is None or wall <= 0 or cores <= 0:
        return None
    return max(0.0, after - before) / (wall * cores)
