"""`bus bench`: run the benchmark sections and print their figures next to the targets.

Each section (bus.bench.SECTIONS) starts its own fresh servers in a scratch directory and
returns {figure: value}. A section whose module does not exist is skipped and said so; one
that fails is reported and the others still run. While a section runs, a terminal's standard
error shows which one and for how long (redrawn once a second, so the figures are not disturbed;
nothing in a pipe). `--json` prints one object:

    {"figures": {name: value, ...},
     "targets": {name: {"target": ">= 40000", "met": true}, ...},   (figures that have one)
     "sections": {module: {"status": "ok" | "skipped" | "failed", ...}, ...},
     "scale": 1.0, "repeats": 3, "cpus": 2, "python": "3.11.7"}
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bus.bench import SECTIONS, BenchEnv
from bus.cli.common import CliError, out
from bus.cli.progress_line import ProgressLine, polling

log = logging.getLogger("continuum.bench")

# (comparison, bound) per figure; what the README promises on a 2-core machine.
TARGETS: dict[str, tuple[str, float]] = {
    "durable_publish_per_s": (">=", 40_000),
    "consume_ack_per_s": (">=", 40_000),
    "latency_p99_ms": ("<=", 5),
    "auth_publish_ratio": (">=", 0.9),
    "auth_consume_ratio": (">=", 0.9),
    "r3_publish_ratio": (">=", 0.8),
    "r3_consume_ratio": (">=", 0.8),
    "failover_resume_s": ("<=", 3),
    "console_first_paint_ms": ("<=", 300),
    "console_conversation_first_paint_ms": ("<=", 500),
    "console_live_delay_p99_ms": ("<=", 250),
    "console_publish_ratio": (">=", 0.95),
    "console_consume_ratio": (">=", 0.95),
    "fold_per_s": (">=", 200_000),
    "fold_publish_ratio": (">=", 1.2),
    "rebuild_1m_s": ("<=", 10),
    "archive_per_s": (">=", 300_000),
    "rebuild_archive_1m_s": ("<=", 5),
    "query_archive_p50_ms": ("<=", 20),
    "query_p50_ms": ("<=", 5),
    "lag_p99_ms": ("<=", 100),
    "agent_start_ms": ("<=", 1_000),
    "agent_restart_ms": ("<=", 2_000),
    "agent_rss_mb": ("<=", 80),
    "memory_write_p99_ms": ("<=", 20),
    "recall_query_p95_ms": ("<=", 150),
    "context_compile_ms": ("<=", 10),
    "mcp_tool_call_p50_ms": ("<=", 20),
    "mcp_step_overhead_ms": ("<=", 2),
}

QUICK_SCALE = 0.05


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="measure throughput and latency against the targets",
        description="Run the benchmark sections, each against fresh servers it starts itself, and print "
        "every figure with its target. Numbers on a shared machine are noisy: compare them with the "
        "baselines measured in the same run.",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    bench.add_argument(
        "--quick", action="store_true",
        help=f"small sizes (scale {QUICK_SCALE}, 1 repeat) to check that every section runs; not comparable with targets",
    )
    bench.add_argument(
        "--section", action="append", default=[], metavar="NAME",
        help=f"run only this section (repeatable): {', '.join(_short(m) for m in SECTIONS)} or a module name",
    )
    bench.add_argument("--scale", type=float, default=1.0, help="size scale without --quick (default %(default)s)")
    bench.add_argument("--repeats", type=int, default=3, help="repeats per figure without --quick (default %(default)s)")
    bench.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target")
    bench.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    bench.set_defaults(func=run_bench)


def _short(module: str) -> str:
    """bus.bench.publish -> publish, projections.bench -> projections."""
    if module.startswith("bus.bench."):
        return module.removeprefix("bus.bench.")
    return module.removesuffix(".bench")


def select_sections(names: list[str]) -> list[str]:
    """The section modules to run, in SECTIONS order. Raises CliError for an unknown name."""
    if not names:
        return list(SECTIONS)
    by_name = {_short(m): m for m in SECTIONS} | {m: m for m in SECTIONS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CliError(
            f"unknown bench section(s) {', '.join(map(repr, unknown))}; "
            f"sections: {', '.join(_short(m) for m in SECTIONS)}"
        )
    wanted = {by_name[n] for n in names}
    return [m for m in SECTIONS if m in wanted]


class SectionResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    reason: str | None = None


def check_target(name: str, value: float) -> tuple[str, bool] | None:
    """('>= 40000', met) for a figure with a target, else None."""
    target = TARGETS.get(name)
    if target is None:
        return None
    op, bound = target
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:,g}", met


async def run_bench(args: argparse.Namespace) -> int:
    """Run the selected sections; exit 1 if one failed (or, with --check, missed a target)."""
    modules = select_sections(args.section)
    if args.repeats < 1 or args.scale <= 0:
        raise CliError("--repeats must be at least 1 and --scale more than 0")
    scale, repeats = (QUICK_SCALE, 1) if args.quick else (args.scale, args.repeats)
    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else out
    figures: dict[str, float] = {}
    sections: dict[str, SectionResult] = {}
    with tempfile.TemporaryDirectory(prefix="continuum-bench-") as tmp:
        root = args.workdir or Path(tmp)
        for number, module_name in enumerate(modules, 1):
            line = ProgressLine(f"bench: section {number}/{len(modules)} {_short(module_name)}")
            sections[module_name] = await _run_section(module_name, root, scale, repeats, figures, progress, line)
    if args.json:
        out(msgspec.json.encode(_report(figures, sections, scale, repeats)).decode())
    else:
        _print_table(figures, sections, scale, repeats, quick=args.quick)
    failed = any(s.status == "failed" for s in sections.values())
    missed = any((c := check_target(k, v)) is not None and not c[1] for k, v in figures.items())
    return 1 if failed or (args.check and missed) else 0


async def _run_section(
    module_name: str, root: Path, scale: float, repeats: int, figures: dict[str, float], progress: Any,
    line: ProgressLine,
) -> SectionResult:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            progress(f"section {_short(module_name)}: skipped ({module_name} does not exist yet)")
            return SectionResult(status="skipped", reason=f"{module_name} does not exist yet")
        raise
    workdir = root / _short(module_name)
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"section {_short(module_name)}: running (scale {scale:g}, {repeats} repeat(s)) ...")
    started = time.perf_counter()

    async def elapsed() -> None:
        line.update(note=f"running for {time.perf_counter() - started:.0f}s")

    try:
        async with polling(line, elapsed, interval_s=1.0):
            result = await module.run(BenchEnv(workdir=workdir, scale=scale, repeats=repeats))
    except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others' figures
        log.debug("section %s failed", module_name, exc_info=True)
        seconds = time.perf_counter() - started
        progress(f"section {_short(module_name)}: FAILED after {seconds:.1f}s: {type(exc).__name__}: {exc}")
        return SectionResult(status="failed", seconds=round(seconds, 2), reason=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    figures.update({str(k): float(v) for k, v in result.items()})
    progress(f"section {_short(module_name)}: done in {seconds:.1f}s")
    return SectionResult(status="ok", seconds=round(seconds, 2))


def _report(
    figures: dict[str, float], sections: dict[str, SectionResult], scale: float, repeats: int
) -> dict[str, Any]:
    targets = {}
    for name, value in figures.items():
        checked = check_target(name, value)
        if checked is not None:
            targets[name] = {"target": checked[0], "met": checked[1]}
    return {
        "figures": figures,
        "targets": targets,
        "sections": sections,
        "scale": scale,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _print_table(
    figures: dict[str, float], sections: dict[str, SectionResult], scale: float, repeats: int, *, quick: bool
) -> None:
    out("")
    if figures:
        width = max(len(name) for name in figures)
        out(f"{'figure':<{width}}  {'value':>12}  {'target':<12}")
        for name, value in figures.items():
            checked = check_target(name, value)
            target = "" if checked is None else f"{checked[0]:<12}  {'ok' if checked[1] else 'MISSED'}"
            out(f"{name:<{width}}  {_number(value):>12}  {target}")
    else:
        out("no figures (no section ran)")
    for module_name, result in sections.items():
        if result.status != "ok":
            out(f"{_short(module_name)}: {result.status} ({result.reason})")
    note = " (--quick: sizes too small to compare with the targets)" if quick else ""
    out(f"scale {scale:g}, {repeats} repeat(s), {os.cpu_count()} CPUs, Python {platform.python_version()}{note}")


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"
