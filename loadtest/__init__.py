"""Local clusters, fault injection, the probe collector, the checker and benchmarks."""
