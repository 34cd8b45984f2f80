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
    #: (``node.claims.RECORD_SPACING``) and its operations a second stop growing with its jobs. etcd does since
    #: its finished runs go into segments (``lock_backends.etcd_segments``: hundreds of records a value, a batch
    #: one transaction): a leader with 10, 1,000 and 10,000 jobs every 5 s measured 5.6, 25.2 and 22.7 gRPC
    #: calls a second, against 5.5, 63 and 56 with a record a key (about 60 a transaction) and unspaced writes;
    #: its fire lag at 1,000 runs/s measured 1.06x plain's p99 (1.36x before), and at 10,000 runs/s it ran every
    #: fire time (half of them before, when its larger batches held the event loop in protobuf work).
    #: Not the file backend (no server to spare operations: a batch is a file written by the node's own
    #: threads; its fire lag measured no better spaced, 2.2x against 1.9x, for a quarter second of records at
    #: stake).
    batched_records: bool = True
    #: True when a holder that dies (its process or its session) gives the lease up at once, so a new leader
    #: follows a crash within the retry period rather than a TTL: PostgreSQL (the session ends), the file
    #: backend (the holder's process is gone). A Redis key or an etcd lease expires only after its TTL.
    released_on_crash: bool = False


KINDS: tuple[BackendKind, ...] = (
    BackendKind("file", ("file",), "lock_backends.file", "FileBackend",
                "file:///absolute/path/to/lock-directory", server=False, batched_records=False,
                released_on_crash=True),
    BackendKind("redis", ("redis", "rediss"), "lock_backends.redis", "RedisBackend",
                "redis://[:password@]host[:port][/db]", server=True, binary="redis-server"),
    BackendKind("postgres", ("postgresql", "postgres"), "lock_backends.postgres", "PostgresBackend",
                "postgresql://[user[:password]@]host[:port]/dbname", server=True, binary="postgres",
                released_on_crash=True),
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
