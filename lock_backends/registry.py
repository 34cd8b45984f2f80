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
    #: True when one operation carries a whole batch of run records, so a leader spaces its record writes
    #: (``node.claims.RECORD_SPACING``) and its operations a second stop growing with its jobs. Not the file
    #: backend (a file per record) nor etcd (a transaction holds about 60 records): spacing would save them few
    #: operations, and its longer batches hold the event loop longer (etcd's protobuf work, the file writer's
    #: thread on the GIL): etcd's fire lag at 1,000 runs/s went from 1.4-2.8x plain's to 3.7-4.5x with it.
    batched_records: bool = True


KINDS: tuple[BackendKind, ...] = (
    BackendKind("file", ("file",), "lock_backends.file", "FileBackend",
                "file:///absolute/path/to/lock-directory", server=False, batched_records=False),
    BackendKind("redis", ("redis", "rediss"), "lock_backends.redis", "RedisBackend",
                "redis://[:password@]host[:port][/db]", server=True, binary="redis-server"),
    BackendKind("postgres", ("postgresql", "postgres"), "lock_backends.postgres", "PostgresBackend",
                "postgresql://[user[:password]@]host[:port]/dbname", server=True, binary="postgres"),
    BackendKind("etcd", ("etcd",), "lock_backends.etcd", "EtcdBackend",
                "etcd://host:port[,host:port...]", server=True, binary="etcd", batched_records=False),
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
