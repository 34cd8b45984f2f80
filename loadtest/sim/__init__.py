"""A deterministic simulator of a Baton cluster (issue #13): real electors and gated schedulers in one
event loop on virtual time, faults from a seeded schedule, invariants checked on the history.

    python -m loadtest sim --seed 1234      # one run: its fault schedule, then OK or the first violation
    python -m loadtest sim --runs 10000     # explore seeds on every core
"""
