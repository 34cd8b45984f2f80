"""The in-memory backend with switchable outages, for unit tests of the elector.

The store's semantics are ``lock_backends.memory``'s (the contract suite holds
it to the real servers' rules); this only lets a test cut the store off or
slow it down without timing noise.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from lock_backends import BackendUnavailable, memory


@dataclass
class Store:
    """One shared store; ``down`` makes every operation fail, ``delay`` makes each take that long."""

    name: str = field(default_factory=lambda: f"unit-{uuid.uuid4().hex[:10]}")
    down: bool = False
    delay: float = 0.0


class MemoryBackend(memory.MemoryBackend):
    def __init__(self, store: Store) -> None:
        super().__init__(memory.store(store.name), memory.MemoryBackend.from_url(f"memory://{store.name}").options)
        self.outage = store

    async def _op(self) -> None:
        if self.outage.delay:
            await asyncio.sleep(self.outage.delay)
        if self.outage.down:
            raise BackendUnavailable("store is down", backend="memory", address="memory")
        await super()._op()
