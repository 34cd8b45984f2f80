"""``python -m node`` / ``baton-node``: run one node under uvicorn.

Exit codes: 0 after a clean shutdown, a SIGTERM or SIGINT (Ctrl-C) included;
2 for bad configuration (one line on stderr naming the variable); 130 when a
second SIGINT forced the exit, or one came before the node was serving; 1 for
anything else that stopped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
from collections.abc import Iterator
from types import FrameType

import uvicorn

from node import logs
from node.app import Node, create_app
from node.config import ConfigError, Settings, from_argv

#: bind() errors that are the port's fault; any other is the host's.
_PORT_ERRORS = {errno.EADDRINUSE: "the port is in use", errno.EACCES: "ports below 1024 need privileges"}


def bind(settings: Settings) -> socket.socket:
    """The listening socket, or a ConfigError blaming BATON_HOST or BATON_PORT, whichever is at fault.

    The socket is made with protocol IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on
    connections whose socket says TCP, and without it every response on a kept-alive
    connection waits ~40 ms for the client's delayed ACK (Nagle's algorithm).
    """
    host, port = settings.host, settings.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"{f'[{host}]' if ':' in host else host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("BATON_HOST", f"cannot resolve {host!r} to an address to listen on: {exc.strerror}") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno in _PORT_ERRORS and not (exc.errno == errno.EACCES and port >= 1024):
            raise ConfigError("BATON_PORT", f"cannot listen on {where}: {why} "
                              f"({_PORT_ERRORS[exc.errno]}); pick another port") from None
        raise ConfigError("BATON_HOST", f"cannot listen on {where}: {why}; "
                          "BATON_HOST must be an address of this machine") from None
    sock.set_inheritable(True)
    return sock


class NodeServer(uvicorn.Server):
    """uvicorn, except that a stop signal hands the lease over at once and ends in exit code 0.

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

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's capture, without raising the captured signals again after the shutdown.

        uvicorn >= 0.29 re-raises them so that the process dies of the signal: exit 143 for
        SIGTERM, and a KeyboardInterrupt traceback and 130 for SIGINT. A node that shut down
        cleanly exits 0, as systemd and Kubernetes expect.
        """
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = from_argv(argv)
        sock = bind(settings)
    except ConfigError as exc:
        print(f"baton: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        node = Node(settings)  # imports BATON_JOBS
    except ConfigError as exc:
        sock.close()
        print(f"baton: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        logs.setup(settings.log_level, settings.log_format, node.context)
        config = uvicorn.Config(create_app(node), log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        server = NodeServer(config, node)
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:  # before uvicorn took over the signals
        return 130
    if server.force_exit:
        return 130
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
