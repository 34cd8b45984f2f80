"""TCP proxies between each node and the backend, for partition and latency faults.

``tc netem`` is not available everywhere (not on our CI kernel), and network
namespaces need root; a proxy per node works anywhere. A partition stops
forwarding in both directions without closing anything, as a cut cable does:
the node's requests hang until its own timeouts fire, and the server sees a
silent client. Healing resumes the flow. Latency delays every chunk.

The proxies run on an event loop in a background thread of the harness
process, so the process that owns the cluster owns its faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

from loadtest.servers import free_port

CHUNK = 65536


@dataclass
class Link:
    """One listening port forwarding to one backend endpoint, for one node."""

    node: str
    target: tuple[str, int]
    port: int = field(default_factory=free_port)
    latency: float = 0.0
    flowing: asyncio.Event | None = None
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def partitioned(self) -> bool:
        return self.flowing is not None and not self.flowing.is_set()


class ProxyHub:
    """All links of a cluster, on one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-hub", daemon=True)
        self.thread.start()

    def _call(self, coro: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def add(self, node: str, host: str, port: int) -> Link:
        link = Link(node, (host, port))
        self._call(self._serve(link))
        self.links.append(link)
        return link

    async def _serve(self, link: Link) -> None:
        link.flowing = asyncio.Event()
        link.flowing.set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Cancelled by ``close``, the handler ends normally: Python 3.11's stream server asks a finished
            # handler task for its exception, which raises on a cancelled one, and logs it as a traceback.
            with contextlib.suppress(asyncio.CancelledError):
                await relay(reader, writer)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert link.flowing is not None
            try:
                await link.flowing.wait()  # a partition also holds new connections
                up_reader, up_writer = await asyncio.open_connection(*link.target)
            except OSError:
                writer.close()
                return
            except asyncio.CancelledError:
                writer.close()
                raise
            link.writers.update((writer, up_writer))
            try:
                await asyncio.gather(self._pump(link, reader, up_writer), self._pump(link, up_reader, writer),
                                     return_exceptions=True)
            finally:
                for w in (writer, up_writer):
                    link.writers.discard(w)
                    w.close()

        link.server = await asyncio.start_server(handle, "127.0.0.1", link.port)

    @staticmethod
    async def _pump(link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert link.flowing is not None
        try:
            while data := await reader.read(CHUNK):
                await link.flowing.wait()
                if link.latency:
                    await asyncio.sleep(link.latency)
                await link.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def links_of(self, node: str) -> list[Link]:
        return [link for link in self.links if link.node == node]

    def partition(self, node: str) -> None:
        for link in self.links_of(node):
            self.loop.call_soon_threadsafe(link.flowing.clear)  # type: ignore[union-attr]

    def heal(self, node: str) -> None:
        for link in self.links_of(node):
            link.latency = 0.0
            self.loop.call_soon_threadsafe(link.flowing.set)  # type: ignore[union-attr]

    def set_latency(self, node: str, seconds: float) -> None:
        for link in self.links_of(node):
            link.latency = seconds

    def close(self) -> None:
        async def shutdown() -> None:
            for link in self.links:
                if link.flowing is not None:
                    link.flowing.set()
                if link.server is not None:
                    link.server.close()
                for w in list(link.writers):
                    w.close()
            # the loop is the hub's own: end every connection still pumping, so none is destroyed pending
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
