"""Worker programs for the peers benchmark: tooz and APScheduler 4 under Baton's probe workload.

These modules run inside ``.venv-peers`` (built by ``loadtest.bench.peers``),
not in the project venv: APScheduler 4 and the node's APScheduler 3 cannot
share one environment. So they import nothing from ``node`` or
``lock_backends``, only the standard library, their peer library, and each
other.
"""
