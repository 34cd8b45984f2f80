"""The list of lock backends: the one place their names, schemes and modules are written.

Everything else (URL parsing, settings, the harness, the benchmarks, the test
fixtures) reads ``KINDS`` or ``SHARED``. Adding a backend is a module in this
package and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendKind:
    #: Short name used in metrics, errors, CLI flags and test ids.
    name: str
    #: URL schemes that select it (the first is the canonical one).
    schemes: tuple[str, ...]
    #: Module and class that implement it; imported only when used.
    module: str
    cls: str
    #: The accepted URL form, for error messages.
    form: str
    #: True when it needs a server process (the harness starts one from local binaries).
    server: bool
    #: True when processes (nodes) can share it: every backend but the in-process one.
    shared: bool = True
    #: The server's executable (what the harness starts and the benchmark report asks for its version).
    binary: str | None = None
    #: True when a write of many run records costs the store fewer operations than one per record, so a leader
    #: spaces its record writes (``node.claims.RECORD_SPACING``). Not the file backend: a file per record, and
    #: a longer batch only keeps its writer thread longer on the GIL the event loop needs.
    batched_records: bool = True


KINDS: tuple[BackendKind, ...] = (
    BackendKind("file", ("file",), "lock_backends.file", "FileBackend",
                "file:///absolute/path/to/lock-directory", server=False, batched_records=False),
    BackendKind("redis", ("redis", "rediss"), "lock_backends.redis", "RedisBackend",
                "redis://[:password@]host[:port][/db]", server=True, binary="redis-server"),
    BackendKind("postgres", ("postgresql", "postgres"), "lock_backends.postgres", "PostgresBackend",
                "postgresql://[user[:password]@]host[:port]/dbname", server=True, binary="postgres"),
    BackendKind("etcd", ("etcd",), "lock_backends.etcd", "EtcdBackend",
                "etcd://host:port[,host:port...]", server=True, binary="etcd"),
    BackendKind("memory", ("memory",), "lock_backends.memory", "MemoryBackend",
                "memory://store-name (one process only: tests and the simulator)", server=False, shared=False),
)

#: Backends several processes can share, in the order the harness and reports list them.
SHARED: tuple[str, ...] = tuple(k.name for k in KINDS if k.shared)
#: Those that need a server process.
SERVERS: tuple[str, ...] = tuple(k.name for k in KINDS if k.server)
#: Every backend name, the in-process one included.
NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)

BY_SCHEME: dict[str, BackendKind] = {scheme: k for k in KINDS for scheme in k.schemes}
BY_NAME: dict[str, BackendKind] = {k.name: k for k in KINDS}

ACCEPTED_URL_FORMS: tuple[str, ...] = tuple(k.form for k in KINDS if k.shared)
