"""``python -m node`` / ``baton-node``: run one node under uvicorn.

Exit codes: 0 after a clean shutdown, 2 for bad configuration (one line on
stderr naming the variable), 1 for anything else that stopped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from types import FrameType

import uvicorn

from node import logs
from node.app import Node, create_app
from node.config import ConfigError, Settings, from_argv


def bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ConfigError("BATON_PORT", f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; "
                          "pick a free port") from None
    sock.set_inheritable(True)
    return sock


class NodeServer(uvicorn.Server):
    """uvicorn, except that a stop signal hands the lease over at once.

    uvicorn notices SIGTERM on its next 0.1 s tick, then sleeps another 0.1 s while closing
    connections, and only then runs the lifespan shutdown that releases the lease: about 0.2 s
    of a graceful handoff spent waiting. Handing over first (the scheduler runs what it owns
    and hands the rest of its claim window back, the elector releases, followers are woken by
    the backend) leaves uvicorn's sequence as it was; ``Node.stop`` later finds the handoff
    done and waits for the running bodies.
    """

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node
        self._releasing: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        with contextlib.suppress(RuntimeError):  # no loop running: nothing to release yet
            asyncio.get_running_loop().call_soon_threadsafe(self._release)

    def _release(self) -> None:
        if self._releasing is None and self.started:
            self._releasing = self.node.hand_over()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = from_argv(argv)
        node = Node(settings)  # imports BATON_JOBS
        sock = bind(settings)
    except ConfigError as exc:
        print(f"baton: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format, node.context)
    config = uvicorn.Config(create_app(node), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = NodeServer(config, node)
    asyncio.run(server.serve(sockets=[sock]))
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
