"""Local clusters, fault injection, the probe collector, the checker and benchmarks."""

import os

# The harness forks children (servers, restarted servers and nodes) from processes that talk to etcd over gRPC
# meanwhile. With gRPC's fork handlers on, as grpcio 1.81 and later have them, about one child in ten forked
# while a gRPC call was under way died before it could exec (SIGABRT, "epoll_wait error: Bad file descriptor",
# or SIGSEGV; grpc/grpc#43055): a PostgreSQL restart of the contract suite died so in CI. The children exec at
# once and never use gRPC, so the handlers buy nothing here. Set before anything imports grpc (this package is
# imported first); a setting of one's own is kept.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
