"""``python -m loadtest`` (or ``baton-loadtest``): up | chaos | check | bench-locks | bench | sim.

    python -m loadtest up --backend redis --nodes 3        # a local cluster with a live table
    python -m loadtest chaos --fault kill --rounds 3        # faults against it, from another terminal
    python -m loadtest chaos --fault term,step-down --aim before-fire:0.08   # ... 80 ms before a fire time
    python -m loadtest check                                # what the collector saw: duplicates, misses, gaps
    python -m loadtest bench --quick                        # benchmarks: report.md, report.json, plots in bench/
    python -m loadtest sim --seed 1234                      # deterministic simulation: one seed, or --runs 10000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from rich.console import Console

from loadtest.chaos import FAULTS, Aim, ChaosError, parse_skew
from loadtest.cluster import BACKENDS
from loadtest.servers import ServerError

DEFAULT_STATE_DIR = ".baton"


def positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local cluster and show it live")
    up.add_argument("--backend", default="file", help=f"one of {', '.join(BACKENDS)} (default file)")
    up.add_argument("--nodes", type=positive(int), default=3)
    up.add_argument("--lock-url", help="use this lock server instead of starting one")
    up.add_argument("--probe-jobs", type=int, default=3)
    up.add_argument("--probe-interval", type=positive(float), default=1.0)
    up.add_argument("--probes", metavar="SPEC", help="probe shapes, e.g. basic:2@1,sparse:1@8,long:1@8/2.5,"
                    "recover:1@4 (COUNT defaults to --probe-jobs, INTERVAL to --probe-interval; default: "
                    "--probe-jobs basic probes)")
    up.add_argument("--ttl", type=positive(float), default=5.0, help="lease TTL in seconds (default 5)")
    up.add_argument("--misfire-grace", type=positive(float), default=30.0)
    up.add_argument("--base-port", type=int, default=None, help="first node port (default: free ports)")
    up.add_argument("--etcd-members", type=positive(int), default=1)
    up.add_argument("--claims", choices=("on", "off"), default="on",
                    help="off: no fencing, for the checker's negative control only")
    up.add_argument("--admin-token", default="local-admin-token")
    up.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                    help="where the collector's records, the logs and the state file go (default .baton)")
    up.add_argument("--replace", action="store_true",
                    help="stop a cluster still running from the same --state-dir first (default: refuse)")
    up.add_argument("--duration", type=positive(float), help="stop by itself after this many seconds")
    up.add_argument("--no-live", dest="live", action="store_false", help="no live table, just a final one")
    up.add_argument("--seed", type=int, default=0, help="seed for random faults")

    chaos = sub.add_parser("chaos", help="apply faults to the running local cluster")
    chaos.add_argument("--fault", default="kill",
                       help=f"comma-separated: {', '.join(FAULTS)}, random (default kill)")
    chaos.add_argument("--rounds", type=positive(int), default=1)
    chaos.add_argument("--interval", type=float, default=5.0, help="seconds between faults (default 5)")
    chaos.add_argument("--target", help="node id (default: the current leader)")
    chaos.add_argument("--hold", type=positive(float), help="seconds a pause/partition/latency/skew lasts")
    chaos.add_argument("--aim", metavar="before-fire:SECONDS[:SHAPE]",
                       help="fire each fault SECONDS (or LOW..HIGH, drawn per fault) before a fire time of the "
                       "probe SHAPE (default: the sparsest), e.g. before-fire:0.08")
    chaos.add_argument("--skew", default="+30s", help="the skew fault's clock offset, e.g. +30s or -30s (default +30s)")
    chaos.add_argument("--state-dir", default=DEFAULT_STATE_DIR)

    check = sub.add_parser("check", help="count duplicates and misses from the collector's records",
                           add_help=False)
    check.add_argument("rest", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench-locks", help="lock operation latency per backend", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    report = sub.add_parser("bench", help="failover, fire lag, load, scale and peers: bench/report.md",
                            add_help=False)
    report.add_argument("rest", nargs=argparse.REMAINDER)

    sim = sub.add_parser("sim", help="deterministic simulation: seeded faults, invariants on the history",
                         add_help=False)
    sim.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def delegated(command: str, rest: list[str]) -> int | None:
    """Subcommands with parsers of their own get their arguments untouched."""
    if command == "check":
        from loadtest import check_cli

        if not any(a.startswith(("--state", "--records")) for a in rest) and Path(DEFAULT_STATE_DIR).is_dir():
            rest = ["--state", str(Path(DEFAULT_STATE_DIR) / "state.json"), *rest]
        return check_cli.main(rest)
    if command == "bench-locks":
        from loadtest import bench_locks

        return bench_locks.main(rest)
    if command == "bench":
        from loadtest.bench import runner

        return runner.main(rest)
    if command == "sim":
        from loadtest.sim import cli

        return cli.main(rest)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and (code := delegated(argv[0], argv[1:])) is not None:
        return code
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    from loadtest.up import UpError, post_fault, run

    try:
        if args.command == "up":
            if args.backend not in BACKENDS:
                raise UpError(f"unknown backend {args.backend!r}; expected one of {', '.join(BACKENDS)}")
            if args.probes:
                from node.probes import SPEC_FORM, ProbeSpecError, parse_shapes

                try:
                    parse_shapes(args.probes, count=args.probe_jobs or 1, interval=args.probe_interval)
                except ProbeSpecError as exc:
                    raise UpError(f"--probes: {exc}; expected {SPEC_FORM}") from None
            return run(args, console)
        faults = [f.strip() for f in args.fault.split(",") if f.strip()]
        unknown = [f for f in faults if f not in (*FAULTS, "random")]
        if unknown:
            raise UpError(f"unknown fault(s) {', '.join(unknown)}; expected {', '.join(FAULTS)} or random")
        state_path = Path(args.state_dir) / "state.json"
        aim = Aim.parse(args.aim).text() if args.aim else None
        skew = parse_skew(args.skew) if "skew" in faults else None
        total = args.rounds * len(faults)
        done = 0
        for _ in range(args.rounds):
            for fault in faults:
                stamp = datetime.now().astimezone().isoformat(timespec="seconds")
                console.print(f"{stamp} [{done + 1}/{total}] {fault} ...")
                result = post_fault(state_path, fault, args.target, args.hold, timeout=600, aim=aim, skew=skew)
                done += 1
                took = f" in {result['failover_s']}s" if result.get("failover_s") is not None else ""
                details = result.get("details") or {}
                aimed = (f" (aimed at the fire time {details['fire_time']}, {details['aim_late_s']}s late)"
                         if "fire_time" in details else "")
                console.print(f"{result['ended_at']} {result['fault']} {result['target']}: "
                              f"leader now {result['new_leader']}{took}{aimed}")
                if done < total:
                    import time

                    time.sleep(args.interval)
        return 0
    except (UpError, ServerError, ChaosError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if args.command == "up" else 1
    except KeyboardInterrupt:  # before `up` handles signals itself, or during a chaos round
        return 130


if __name__ == "__main__":
    sys.exit(main())
