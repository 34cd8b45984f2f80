"""``python -m loadtest bench``: run the benchmark sections, write report.md, report.json and plots.

    python -m loadtest bench [--quick] [--out DIR] [--sections failover,fire_lag,burst,load,scale,peers,sim]
                             [--backends file,redis,postgres,etcd] [--seed N] [--rounds N] [--keep-work]

Each section is a module ``loadtest.bench.<name>`` with ``run(ctx) -> SectionResult``
(see ``loadtest.bench.base``). They run one after another, never in parallel:
they measure time on a shared machine. A section that is missing or raises is
reported as failed, with one line, and the others still run; the exit code is
then 1. Bad flags exit 2 with one line. Scratch files (server data, collector
files, node logs) go to ``DIR/out/run-<time>/``, which is removed after a clean
run and kept when a section failed, with that section's traceback in it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.bench.base import BenchContext, SectionResult
from loadtest.bench.report import SectionOutcome, merge_verdict, verdict_markdown, write_report
from lock_backends.registry import SHARED

SECTIONS = ("failover", "fire_lag", "burst", "load", "scale", "peers", "sim")
BACKENDS = SHARED
#: Error lines in the report are cut here; the full traceback is in the scratch folder.
ERROR_LINE_LIMIT = 300


class BadInput(Exception):
    """One line for the person at the terminal; exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m loadtest bench", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI mode: few rounds, small sizes, a couple of minutes")
    p.add_argument("--out", type=Path, default=Path("bench"), help="output folder (default bench)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, in order: {','.join(SECTIONS)}")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random (default 0)")
    p.add_argument("--rounds", type=int, default=None, help="fault rounds per backend and fault (default: 20, quick 2)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder DIR/out even after a clean run")
    return p


def pick(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in allowed]
    if unknown:
        raise BadInput(f"unknown {what} {', '.join(map(repr, unknown))}; expected a comma-separated subset of "
                       f"{','.join(allowed)}")
    if not chosen:
        raise BadInput(f"no {what} given; expected a comma-separated subset of {','.join(allowed)}")
    return list(dict.fromkeys(chosen))


def writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before minutes of benchmarking."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BadInput(f"output folder {path} is not writable: {exc.strerror or exc}") from None
    return path.resolve()


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= ERROR_LINE_LIMIT else line[:ERROR_LINE_LIMIT - 1] + "…"


def run_section(name: str, ctx: BenchContext) -> SectionOutcome:
    """Import ``loadtest.bench.<name>`` and run it; any failure becomes one line, the traceback a file."""
    t0 = time.monotonic()
    module_name = f"loadtest.bench.{name}"
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return SectionOutcome(name, None, f"not implemented yet (no module {module_name})", 0.0)
            raise
        run = getattr(module, "run", None)
        if not callable(run):
            return SectionOutcome(name, None, f"{module_name} has no run(ctx) function", 0.0)
        result = run(ctx)
        if not isinstance(result, SectionResult):
            raise TypeError(f"{module_name}.run returned {type(result).__name__}, not a SectionResult")
        return SectionOutcome(name, result, None, time.monotonic() - t0)
    except (Exception, SystemExit) as exc:
        trace = ctx.work / f"{name}.traceback.txt"
        try:
            trace.write_text("".join(traceback.format_exception(exc)))
            where = f" (traceback in {trace})"
        except OSError:
            where = ""
        return SectionOutcome(name, None, error_line(exc) + where, time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    err = Console(stderr=True, soft_wrap=True)
    try:
        args = build_parser().parse_args(argv)
        sections = pick(args.sections, SECTIONS, "section(s)")
        backends = pick(args.backends, BACKENDS, "backend(s)")
        if args.rounds is not None and args.rounds < 1:
            raise BadInput(f"--rounds must be at least 1, got {args.rounds}")
        out = writable_dir(args.out)
        started = datetime.now(UTC)
        # a folder of this run's own under DIR/out (gitignored as bench/out/): only it is ever removed
        work = writable_dir(out / "out" / started.strftime("run-%Y%m%d-%H%M%S"))
    except BadInput as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    outcomes: list[SectionOutcome] = []
    interrupted = False
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        ctx = BenchContext(out=out, work=work, quick=args.quick, backends=backends, seed=args.seed,
                           console=err, progress=progress, rounds=args.rounds)
        overall = progress.add_task("[bold]bench sections", total=len(sections))
        for name in sections:
            progress.update(overall, description=f"[bold]bench: {name}")
            try:
                outcome = run_section(name, ctx)
            except KeyboardInterrupt:
                outcomes.append(SectionOutcome(name, None, "interrupted (Ctrl-C)", 0.0))
                interrupted = True
                break
            outcomes.append(outcome)
            if outcome.error:
                progress.console.print(f"[red]section {name} failed:[/red] {outcome.error}")
            progress.advance(overall)
    command = "python -m loadtest bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    report_args = {"quick": args.quick, "sections": sections, "backends": backends, "seed": args.seed,
                   "rounds": args.rounds, "command": command.strip()}
    report_md, report_json = write_report(out, outcomes, args=report_args, started=started,
                                          seconds=time.monotonic() - t0)
    failed = [o for o in outcomes if o.error is not None]
    err.print(verdict_markdown(merge_verdict(outcomes)))
    err.print(f"wrote {report_md} and {report_json}")
    if not failed and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # only if no other run left anything there
    elif failed:
        err.print(f"[red]{len(failed)} section(s) failed[/red]; scratch files kept in {work}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
